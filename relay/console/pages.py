"""What each page of the console shows: a builder per page, from the store's reads and the service functions
to a plain dictionary (the template's context, and the page's JSON under /data/...).

Builders run in a worker thread (the store's reads block) and hold no SQL: the queries are the inspection
views and relay/store/console.py's reads; the arithmetic is relay/core/console.py's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime

from relay import sets, suppression
from relay.config import Config
from relay.core import console as core
from relay.core import heatmap
from relay.core.resolve import UnknownSet
from relay.inspect import iso
from relay.resolve import Resolver
from relay.store import Store, queue_by_set, sets_with_events
from relay.store import console as reads
from relay.store.views import FUNNEL_COUNTS

NO_SET = "~"  # the path segment of mail sent without a configuration set (not a set name's character)
MESSAGES_SHOWN = 50  # a search shows this many messages, newest first: narrow it to see others
QUEUE_SHOWN = 50  # copies, replies and failures listed on the queue and destinations pages
SUPPRESSION_PAGE = 100  # entries per page of the suppression list (keyset pages: any length of list)


@dataclass(frozen=True)
class View:
    """What a builder is given: the running configuration, the store, the request's query and path."""

    config: Config
    store: Store
    query: Mapping[str, str]
    path: Mapping[str, str]
    now: datetime


class NotFound(Exception):
    pass


def scope_of(name: str | None) -> str | None:
    """A set chosen in a query or path: absent or "" = every set, NO_SET = mail without a set."""
    if not name:
        return reads.EVERY_SET
    return None if name == NO_SET else name


def set_slug(name: str | None) -> str:
    return NO_SET if name is None else name


def _sets(v: View) -> list[str | None]:
    """Sets to choose from: the configured ones and every set with events (sets since deleted too)."""
    configured = set(Resolver(v.config, v.store).model().sets)
    with_events = v.store.read(sets_with_events)
    names = sorted({s for s in with_events if s is not None} | configured)
    return names + ([None] if None in with_events else [])


def _range(v: View) -> core.TimeRange:
    return core.parse_range(v.query, v.now)


def _summed(rows: list[dict]) -> dict:
    return core.with_rates({k: sum(r.get(k) or 0 for r in rows) for k in FUNNEL_COUNTS})


# --- Overview ------------------------------------------------------------------------------------------------

def overview(v: View) -> dict:
    r = _range(v)
    scope = scope_of(v.query.get("set"))
    buckets = r.buckets()
    every = v.store.read(reads.funnel_days, reads.EVERY_SET, r.since_day, r.until_day)
    chosen = [row for row in every if scope == reads.EVERY_SET or row["configuration_set"] == scope]
    if r.by == "hour":
        series = core.hour_series(v.store.read(reads.funnel_hours, scope, r.hours()), buckets)
    else:
        series = core.day_series(chosen, buckets)
    days = {}
    for row in chosen:
        days.setdefault(row["day"], []).append(row)
    per_set = core.totals_by_set(every, FUNNEL_COUNTS)
    return {
        "range": r, "set": v.query.get("set", ""), "sets": _sets(v),
        "chart": {"labels": buckets, "by": r.by, "series": series},
        "days": [{"day": day, **_summed(rows)} for day, rows in sorted(days.items())],
        "total": _summed(chosen),
        "per_set": [{"configuration_set": name, "slug": set_slug(name), **core.with_rates(t)}
                    for name, t in sorted(per_set.items(), key=lambda kv: (kv[0] is None, kv[0] or ""))],
    }


# --- a configuration set -------------------------------------------------------------------------------------

def _set_settings(v: View, name: str | None) -> dict:
    """The set's definition (service functions of `relay config-set`), its effective tracking settings and
    where each comes from; {} for mail without a set or a set deleted since."""
    if name is None:
        return {}
    try:
        described = sets.describe_set(v.config, v.store, name)
        resolution = Resolver(v.config, v.store).resolve(name, "")
    except (sets.SesError, UnknownSet):
        return {"missing": True}
    settings = resolution.settings
    effective = {key: {"value": getattr(settings, key), "from": resolution.provenance.get(key, "")}
                 for key in ("open_tracking", "click_tracking", "host", "https_policy", "pixel_position",
                             "return_path_domain", "list_unsubscribe")}
    effective["suppression_reasons"] = {"value": ", ".join(settings.suppression_reasons) or "(none)",
                                        "from": resolution.provenance.get("suppression_reasons", "")}
    return {"source": described["Source"], "effective": effective, "default_of": described["DefaultOf"],
            "destinations": described["EventDestinations"]}


def configuration_set(v: View) -> dict:
    slug = v.path["name"]
    name = scope_of(slug)
    r = _range(v)
    days = v.store.read(reads.funnel_days, name, r.since_day, r.until_day)
    total = _summed(days)
    funnel = [(label, total[key]) for label, key in (
        ("sent", "sent"), ("delivered", "delivered"), ("opened", "unique_opens"),
        ("opened by a person", "unique_human_opens"), ("clicked", "unique_clicks"),
        ("clicked by a person", "unique_human_clicks"))]
    states = [s for s in v.store.read(reads.destination_states) if s["configuration_set"] == name]
    domains = v.store.read(reads.domain_rows, name, r.since_day, r.until_day, v.config.console.domain_sample)
    return {
        "range": r, "name": name, "slug": slug, "total": total,
        "chart": {"funnel": {"labels": [label for label, _n in funnel], "values": [n for _label, n in funnel]}},
        "links": v.store.read(reads.link_range_rows, name, r.since_day, r.until_day),
        "domains": [core.domain_rates(row) for row in domains],
        "domain_sample": v.config.console.domain_sample,
        "settings": _set_settings(v, name),
        "destination_states": states,
    }


# --- messages ------------------------------------------------------------------------------------------------

SEARCHES = ("recipient", "id", "subject", "time")


def messages(v: View) -> dict:
    """A search by recipient, message id (relay's or the Message-ID header), subject or time."""
    by = v.query.get("by") if v.query.get("by") in SEARCHES else "recipient"
    text = v.query.get("q", "").strip()
    r = core.parse_range({"range": "24h", **v.query}, v.now)
    since, until = (iso(r.since), iso(r.until))
    if not text and by != "time":
        by = "time"
    found = v.store.read(lambda conn: reads.find_messages(
        conn, recipient=text if by == "recipient" else None, message_id=text if by == "id" else None,
        subject=text if by == "subject" else None, since=since if by != "id" else None,
        until=until if by != "id" else None, limit=MESSAGES_SHOWN))
    return {"by": by, "q": text, "range": r, "found": found, "shown": MESSAGES_SHOWN}


def message(v: View) -> dict:
    message_id = v.path["id"]
    detail = v.store.read(reads.message_detail, message_id)
    if detail is None:
        raise NotFound(f"no message {message_id}")
    detail["links"] = [{**row, "number": None, "link_tags": _tags(row["link_tags"])} for row in detail["links"]]
    marked = preview(v) if detail["message"]["has_body"] else None
    if marked is not None:  # the links as they appear in the message, numbered as the preview marks them
        detail["links"] = [asdict(link) | {"link_tags": link.tags} for link in marked.links]
    detail["preview"] = marked is not None
    return detail


def preview(v: View) -> heatmap.Heatmap | None:
    """The message's HTML as delivered with its links marked by their clicks (while the spool keeps it)."""
    message_id = v.path["id"]
    body = v.store.read(reads.message_body, message_id)
    if body is None:
        return None
    raw, settings_json, recipient = body
    clicks = v.store.read(reads.message_links, message_id)
    return heatmap.heatmap(raw, json.loads(settings_json), message_id, recipient or "", clicks)


def _tags(text: str | None) -> dict:
    return json.loads(text) if text else {}


# --- queue, destinations -----------------------------------------------------------------------------------------

def queue(v: View) -> dict:
    by_set = [{"configuration_set": s, "copies": n, "oldest": oldest} for s, n, oldest in v.store.read(queue_by_set)]
    oldest = min((row["oldest"] for row in by_set if row["oldest"]), default=None)
    return {"depth": sum(row["copies"] for row in by_set), "oldest": oldest, "by_set": by_set,
            "replies": v.store.read(reads.queue_replies, QUEUE_SHOWN),
            "copies": v.store.read(reads.queue_oldest, QUEUE_SHOWN), "shown": QUEUE_SHOWN}


def destinations(v: View) -> dict:
    model = Resolver(v.config, v.store).model()
    states = {(s["configuration_set"], s["destination"]): s for s in v.store.read(reads.destination_states)}
    rows = []
    for set_def in sorted(model.sets.values(), key=lambda s: s.name):
        for d in set_def.destinations:
            state = states.pop((set_def.name, d.name), {})
            rows.append({"configuration_set": set_def.name, **d.public_json(), **state})
    rows += [{"configuration_set": s, "Name": n, "Enabled": bool(state["enabled"]), "removed": True, **state}
             for (s, n), state in sorted(states.items())]  # a cursor left behind by a destination deleted since
    return {"destinations": rows, "failures": v.store.read(reads.destination_failure_rows, QUEUE_SHOWN),
            "shown": QUEUE_SHOWN}


# --- the suppression list ------------------------------------------------------------------------------------------

def suppression_list(v: View) -> dict:
    text, reason = v.query.get("q", ""), v.query.get("reason", "").upper() or None
    if reason not in (None, *suppression.SUPPRESSION_REASONS):
        reason = None
    after_text = v.query.get("after", "")
    after = tuple(after_text.split(" ", 1)) if " " in after_text else None
    entries = v.store.read(reads.suppression_search, text, reason, after, SUPPRESSION_PAGE + 1)
    more = len(entries) > SUPPRESSION_PAGE
    entries = entries[:SUPPRESSION_PAGE]
    return {"q": text, "reason": reason or "", "reasons": suppression.SUPPRESSION_REASONS,
            "entries": [asdict(e) for e in entries],
            "next": f"{entries[-1].email_address} {entries[-1].reason}" if more else "",
            "counts": v.store.read(reads.suppression_counts), "page": SUPPRESSION_PAGE,
            "done": v.query.get("done", "")}


# --- reputation -------------------------------------------------------------------------------------------------

def reputation(v: View) -> dict:
    r = core.parse_range({"range": "30d", **v.query}, v.now)
    rows = v.store.read(reads.funnel_days, reads.EVERY_SET, r.since_day, r.until_day)
    per_set = core.totals_by_set(rows, FUNNEL_COUNTS)
    return {
        "range": r,
        "sets": [{"configuration_set": name, "slug": set_slug(name), **core.reputation(t)}
                 for name, t in sorted(per_set.items(), key=lambda kv: (kv[0] is None, kv[0] or ""))],
        "account": core.reputation({k: sum(t[k] for t in per_set.values()) for k in FUNNEL_COUNTS}),
        "bounce_levels": core.BOUNCE_LEVELS, "complaint_levels": core.COMPLAINT_LEVELS,
    }


PAGES = {"overview": overview, "set": configuration_set, "messages": messages, "message": message,
         "queue": queue, "destinations": destinations, "suppression": suppression_list, "reputation": reputation}
