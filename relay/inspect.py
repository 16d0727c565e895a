"""Inspection and operations: `relay stats`, `relay events tail`, `relay purge`, `relay forget`,
the retention task, and the privacy scrubbing of Open/Click events.

The pure parts (durations, cut-offs, tables, IP truncation, redaction) are plain functions; the commands are
thin shells over the store's read and write helpers (relay/store.py, section "inspection views").
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import re
import signal
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from relay import store as store_module
from relay.config import Config, PrivacySettings

log = logging.getLogger("relay.inspect")
PURGE_CHUNK = 5000
# recipient_rollup is brought up to date this often (seconds), so recipient_engagement reads only the last
# quarter of an hour or so of events live
RECIPIENT_ROLL_EVERY = 300.0
LEAD_POLL_S = 30.0  # how soon another node takes maintenance over when its leader dies
MAINTENANCE = "maintenance"  # the job of rollups and retention: one node at a time (Store.try_lead)
_SINCE = re.compile(r"^(\d+)([hdw])$")
_HOURS = {"h": 1, "d": 24, "w": 24 * 7}


# --- pure parts ----------------------------------------------------------------------------------------------

def since_time(text: str, now: datetime) -> datetime:
    """`7d`, `24h`, `2w` before `now`, or an ISO date/time (`2026-11-01`); ValueError otherwise."""
    m = _SINCE.match(text.strip())
    if m:
        return now - timedelta(hours=int(m.group(1)) * _HOURS[m.group(2)])
    dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def iso(dt: datetime) -> str:
    """The events table's time format (UTC, milliseconds), comparable as text."""
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def purge_cutoff(days: int, now: datetime) -> str | None:
    """Records older than this ISO time are purged; None when retention is off (0 days)."""
    return iso(now - timedelta(days=days)) if days > 0 else None


def truncate_ip(ip: str) -> str:
    """192.0.2.77 -> 192.0.2.0 (/24), 2001:db8:1:2::5 -> 2001:db8:1:: (/48); anything else -> ''."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    prefix = 24 if addr.version == 4 else 48
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False).network_address)


def scrubber(privacy: PrivacySettings) -> Callable[[dict], None]:
    """What the tracking listener's EventWriter applies to each new Open/Click record once its verdict is
    computed (the verdict is judged from the full hit, kept in memory, never from the record)."""
    if not (privacy.truncate_ip or privacy.drop_user_agent):
        return _keep

    def scrub(record: dict) -> None:
        detail = record.get("open") or record.get("click")
        if detail is None:
            return
        if privacy.truncate_ip:
            detail["ipAddress"] = truncate_ip(detail.get("ipAddress", ""))
        if privacy.drop_user_agent:
            detail["userAgent"] = ""

    return scrub


def _keep(record: dict) -> None:
    return None


FORGOTTEN = "forgotten@forgotten.invalid"


def redactor(address: str) -> Callable[[str], str]:
    """Rewrites a JSON document so `address` (any case, also inside "Name <addr>" strings) reads FORGOTTEN."""
    pattern = re.compile(re.escape(address), re.IGNORECASE)

    def walk(value):
        if isinstance(value, str):
            return pattern.sub(FORGOTTEN, value)
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        return value

    def redact(text: str) -> str:
        if address.isascii() and address.lower() not in text.lower():  # cheap: most documents lack it
            return text
        return json.dumps(walk(json.loads(text)), separators=(",", ":"))

    return redact


def format_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """Rows as plain aligned text: (key, heading) columns, numbers right-aligned, None as '-'."""
    def cell(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v * 100:.1f}%"
        return str(v)

    grid = [[cell(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max([len(h)] + [len(g[i]) for g in grid]) for i, (_, h) in enumerate(columns)]
    numeric = [all(isinstance(r.get(k), (int, float)) or r.get(k) is None for r in rows) for k, _ in columns]

    def line(values: list[str]) -> str:
        cells = (v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric, strict=True))
        return "  ".join(cells).rstrip()

    return "\n".join([line([h for _, h in columns]), line(["-" * w for w in widths])] + [line(g) for g in grid])


DAY_COLUMNS = [("day", "day"), ("configuration_set", "set"), ("sent", "sent"), ("delivered", "delivered"),
               ("bounced_permanent", "hard"), ("bounced_transient", "soft"), ("delayed", "delayed"),
               ("complained", "complaints"), ("opens", "opens"), ("unique_opens", "uniq opens"),
               ("unique_human_opens", "human opens"), ("clicks", "clicks"), ("unique_clicks", "uniq clicks"),
               ("unique_human_clicks", "human clicks"), ("open_rate", "open%"), ("human_open_rate", "human open%"),
               ("click_rate", "click%"), ("human_click_rate", "human click%")]
LINK_COLUMNS = [("configuration_set", "set"), ("link", "link"), ("link_tags", "tags"), ("clicks", "clicks"),
                ("unique_clicks", "unique"), ("human_clicks", "human"), ("first_click", "first"),
                ("last_click", "last")]
RECIPIENT_COLUMNS = [("recipient", "recipient"), ("delivered", "delivered"), ("last_delivered", "last delivered"),
                     ("opens", "opens"), ("clicks", "clicks"), ("human_clicks", "human clicks"),
                     ("last_engaged", "last engaged"), ("bounce_state", "bounce"), ("complaints", "complaints")]
_SUMMED = ("sent", "delivered", "bounced_permanent", "bounced_transient", "delayed", "complained", "rejected",
           "opens", "unique_opens", "human_opens", "machine_opens", "unique_human_opens", "clicks", "unique_clicks",
           "human_clicks", "machine_clicks", "unique_human_clicks")


def total_row(rows: list[dict]) -> dict:
    """The days summed (unique counts are per day, so their sum counts a copy once per day it engaged)."""
    out: dict = {"day": "total", "configuration_set": ""}
    for key in _SUMMED:
        out[key] = sum(r.get(key) or 0 for r in rows)
    for rate, num in (("open_rate", "unique_opens"), ("human_open_rate", "unique_human_opens"),
                      ("click_rate", "unique_clicks"), ("human_click_rate", "unique_human_clicks")):
        out[rate] = round(out[num] / out["delivered"], 4) if out["delivered"] else None
    return out


def event_line(row: tuple) -> str:
    """One line of `relay events tail`: time, type, set, message id, recipient and the event's detail."""
    _id, kind, when, message_id, recipient, set_name, record_json = row
    record = json.loads(record_json)
    detail = ""
    if kind == "Click":
        detail = record["click"].get("link", "")
    elif kind == "Bounce":
        detail = f"{record['bounce'].get('bounceType')}/{record['bounce'].get('bounceSubType')}"
    elif kind == "Delivery":
        detail = record["delivery"].get("smtpResponse", "")
    elif kind == "DeliveryDelay":
        detail = record["deliveryDelay"].get("delayType", "")
    elif kind == "Reject":
        detail = record.get("reject", {}).get("reason", "")
    return f"{when} {kind:<13} {set_name or '-'} {message_id} {recipient or '-'} {detail}".rstrip()


# --- the store (one Store per command; its SCHEMA adds the views to an older database) -------------------------

def _open(cfg: Config) -> store_module.Store:
    if not store_module.has_database(cfg.store_target):
        raise SystemExit(f"error: no database at {cfg.database_path} (has relay run with this configuration?)")
    return store_module.open_store(cfg.store_target)


def _read(store: store_module.Store, helper: Callable, *args):
    return store_module.configuration_read(store, helper, *args)


def _sets(store: store_module.Store, only: str | None) -> list[str | None]:
    """The set asked for, or every set that has events (sets since deleted included; None: no set)."""
    return [only] if only is not None else _read(store, store_module.sets_with_events)


def _load(path: str) -> Config:
    from relay import config as config_module

    return config_module.load(path)


# --- relay stats ---------------------------------------------------------------------------------------------

def stats(cfg: Config, by: str, set_name: str | None, since: datetime, limit: int) -> list[dict]:
    store = _open(cfg)
    try:
        if by == "day":
            rows = [r for s in _sets(store, set_name)
                    for r in _read(store, store_module.funnel_rows, s, iso(since)[:10])]
            return sorted(rows, key=lambda r: (r["day"], r["configuration_set"] or ""))
        if by == "link":
            rows = [r for s in _sets(store, set_name) for r in _read(store, store_module.link_rows, s, iso(since))]
            return sorted(rows, key=lambda r: -r["clicks"])
        return _read(store, store_module.recipient_rows, iso(since), limit)
    finally:
        store.close()


def stats_command(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    try:
        since = since_time(args.since, datetime.now(UTC))
    except ValueError:
        print(f"error: --since {args.since!r}: expected 7d, 24h, 2w or a date like 2026-11-01", file=sys.stderr)
        return 2
    if args.by == "reputation":  # each set's rates in its own window (the guard's view): --since does not apply
        from relay.reputation import REPUTATION_COLUMNS, reputation_rows

        store = _open(cfg)
        try:
            rows = reputation_rows(cfg, store, args.config_set)
        finally:
            store.close()
        print(json.dumps(rows, indent=2) if args.json else format_table(rows, REPUTATION_COLUMNS))
        return 0
    rows = stats(cfg, args.by, args.config_set, since, args.limit)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no events since {iso(since)}")
        return 0
    if args.by == "day":
        print(format_table(rows + ([total_row(rows)] if len(rows) > 1 else []), DAY_COLUMNS))
    else:
        print(format_table(rows, LINK_COLUMNS if args.by == "link" else RECIPIENT_COLUMNS))
    return 0


# --- relay events tail ---------------------------------------------------------------------------------------

def tail(cfg: Config, types: tuple[str, ...], set_name: str | None, out: Callable[[tuple], None],
         interval: float = 0.5, count: int = 0, from_id: int | None = None) -> int:
    """Follow new events (by id) until Ctrl-C, or until `count` events were shown; how many were shown."""
    store = _open(cfg)
    shown = 0
    try:
        after = _read(store, store_module.last_event_id) if from_id is None else from_id
        while True:
            rows = _read(store, store_module.events_after, after, types, set_name, 500)
            for row in rows:
                out(row)
                shown += 1
                if count and shown >= count:
                    return shown
            if rows:
                after = rows[-1][0]
            else:
                time.sleep(interval)
    except KeyboardInterrupt:
        return shown
    finally:
        store.close()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def first_event_since(time_of: Callable[[int], str | None], newest_id: int, since: str) -> int:
    """The id after which the events recorded at or after `since` (ISO time) start: a binary search over ids,
    since events are recorded in time order (`time_of(i)`: the time of the first event after id i, None when
    there is none). Needs no index on time: about 25 lookups by primary key for a hundred million events."""
    low, high = 0, newest_id  # the answer lies in [low, high]: every event after it is at or after `since`
    while low < high:
        middle = (low + high) // 2
        when = time_of(middle)
        if when is not None and when < since:
            low = middle + 1  # the first event after `middle` is older: start later
        else:
            high = middle
    return low


def _start_after(cfg: Config, since: datetime) -> int:
    store = _open(cfg)
    try:
        def time_of(after: int) -> str | None:
            rows = _read(store, store_module.events_after, after, (), None, 1)
            return rows[0][2] if rows else None

        return first_event_since(time_of, _read(store, store_module.last_event_id), iso(since))
    finally:
        store.close()


def tail_command(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    start = None
    if args.since:
        try:
            start = _start_after(cfg, since_time(args.since, datetime.now(UTC)))
        except ValueError:
            print(f"error: --since {args.since!r}: expected 1h, 7d, 2w or a date like 2026-11-01", file=sys.stderr)
            return 2
    # Ctrl-C and SIGTERM stop it, even when started in the background (where a shell ignores SIGINT)
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)

    def show(row: tuple) -> None:
        print(row[6] if args.json else event_line(row), flush=True)

    tail(cfg, tuple(args.type or ()), args.config_set, show, args.interval, args.count, from_id=start)
    return 0


# --- retention -----------------------------------------------------------------------------------------------

def _chunks(store: store_module.Store, helper: Callable, cutoff: str, budget: float) -> int:
    total, more, deadline = 0, True, time.monotonic() + budget
    while more and time.monotonic() < deadline:
        deleted, more = store.submit(lambda conn: helper(conn, cutoff, PURGE_CHUNK)).result()
        total += deleted
    return total


def purge(store: store_module.Store, days: int, now: datetime | None = None, budget: float = 600.0) -> dict:
    """Delete events, verdicts and message records older than `days`, chunk by chunk. Tracked links stay
    valid: they are signed tokens, and a click on a purged message records an event with a minimal mail
    object (relay/tracking.py)."""
    cutoff = purge_cutoff(days, now or datetime.now(UTC))
    if cutoff is None:
        return {"events": 0, "messages": 0}
    return {"events": _chunks(store, store_module.purge_events_chunk, cutoff, budget),
            "messages": _chunks(store, store_module.purge_messages_chunk, cutoff, budget),
            "inbound_reports": _chunks(store, store_module.purge_inbound_reports_chunk, cutoff, budget)}


def first_open_day(now: datetime) -> str:
    """The funnel's days before this one are closed (a few minutes' grace for events written late)."""
    return (now - timedelta(minutes=10)).astimezone(UTC).date().isoformat()


def rollup(store: store_module.Store, now: datetime | None = None, max_days: int = 3660) -> int:
    """Roll the closed days of the funnel and of link_clicks up into funnel_rollup and link_rollup, a day at a
    time: computed on this thread's reader connection, stored by a short store work. How many days were stored
    (the most of either rollup)."""
    open_day, most = first_open_day(now or datetime.now(UTC)), 0
    for mark_id, (_table, _columns, day_rows) in store_module.ROLLUPS.items():
        done = 0
        while done < max_days:
            nxt = _read(store, store_module.next_rollup_day, open_day, mark_id)
            if nxt is None:
                break
            mark, day = nxt
            rows = _read(store, day_rows, day)
            if not store.submit(lambda conn, i=mark_id, m=mark, d=day, r=rows:
                                store_module.store_rollup_day(conn, i, m, d, r)).result():
                break  # another process rolls up at the same time
            done += 1
        most = max(most, done)
    roll_recipients(store, now)
    return most


def roll_recipients(store: store_module.Store, now: datetime | None = None, chunk: int = 5000) -> int:
    """Add the events settled by `now` (a few minutes' grace, as for days) to recipient_rollup, `chunk` event
    ids per short store work; how many ids the mark moved."""
    cutoff = iso((now or datetime.now(UTC)) - timedelta(minutes=10))
    top = _read(store, store_module.settled_event_id, cutoff)
    start = mark = _read(store, store_module.recipient_mark)
    while mark < top:
        step = min(mark + chunk, top)
        if not store.submit(lambda conn, m=mark, t=step: store_module.roll_recipients(conn, m, t)).result():
            break  # another process rolls up at the same time
        mark = step
    return mark - start


def maintain(store: store_module.Store, days: int, bodies_s: float = 0.0) -> dict:
    """One round of the periodic work: funnel rollup, the retention purge, and the bodies kept after delivery
    (retention.message_bodies) that are older than that."""
    rolled = rollup(store)
    done = purge(store, days) if days > 0 else {"events": 0, "messages": 0}
    if bodies_s > 0:
        cutoff = iso(datetime.now(UTC) - timedelta(seconds=bodies_s))
        done["bodies"] = _chunks(store, store_module.purge_bodies_chunk, cutoff, 600.0)
    return {**done, "rolled_up_days": rolled}


async def retention_task(store: store_module.Store, get_config: Callable[[], Config]) -> None:
    """Roll up and purge now, then every `retention.interval` (re-read: SIGHUP changes apply); until cancelled.
    With several nodes on one database only the node leading "maintenance" does it; the others ask again every
    LEAD_POLL_S and the first to get it after the leader died starts with a round. (The marks and chunked
    deletes would bear two nodes at once, but each would do all the work.)"""
    due = 0.0  # monotonic time of the next round
    while True:
        cfg = get_config()
        leading = False
        try:
            leading = await asyncio.to_thread(store.try_lead, MAINTENANCE)
            if leading and time.monotonic() >= due:
                due = time.monotonic() + cfg.retention.interval
                done = await asyncio.to_thread(maintain, store, cfg.retention.days, cfg.retention.message_bodies)
                if any(done.values()):
                    log.info("maintenance retention_days=%d purged_events=%d purged_messages=%d purged_bodies=%d"
                             " rolled_up_days=%d", cfg.retention.days, done["events"], done["messages"],
                             done.get("bodies", 0), done["rolled_up_days"])
            elif leading:  # between rounds: keep recipient_engagement's live part small
                await asyncio.to_thread(roll_recipients, store)
            else:
                due = 0.0
        except store_module.StoreClosed:
            return
        except Exception:  # the next round tries again; never let the task die silently
            log.exception("maintenance failed")
        await asyncio.sleep(max(0.0, min(due - time.monotonic(), RECIPIENT_ROLL_EVERY)) if leading else LEAD_POLL_S)


def purge_command(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    days = cfg.retention.days if args.days is None else args.days
    if days <= 0:
        print("retention.days is 0: nothing is purged")
        return 0
    store = _open(cfg)
    try:
        done = purge(store, days)
        rollup(store)
    finally:
        store.close()
    print(f"purged {done['events']} events and {done['messages']} messages older than {days} days")
    return 0


# --- relay forget --------------------------------------------------------------------------------------------

def forget(store: store_module.Store, address: str) -> dict[str, int]:
    """Delete one recipient's personal data in one transaction (see store.forget_address)."""
    addresses = tuple(dict.fromkeys([address, address.lower()]))
    return store.submit(lambda conn: store_module.forget_address(conn, addresses, redactor(address))).result()


def forget_command(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    store = _open(cfg)
    try:
        done = forget(store, args.address)
    finally:
        store.close()
    print(" ".join(f"{k}={v}" for k, v in done.items()))
    return 0


def add_parsers(sub: argparse._SubParsersAction, funcs: dict[str, Callable]) -> None:
    """`stats`, `events tail`, `purge` and `forget` (relay/cli.py wires them)."""
    p = sub.add_parser("stats", help="the funnel, links or recipients from the inspection views")
    p.add_argument("--config", required=True)
    p.add_argument("--config-set")
    p.add_argument("--since", default="7d", help="7d, 24h, 2w or a date (default 7d)")
    p.add_argument("--by", choices=("day", "link", "recipient", "reputation"), default="day")
    p.add_argument("--limit", type=int, default=100, help="rows of --by recipient (default 100)")
    p.add_argument("--json", action="store_true", help="rows as JSON, for scripts")
    p.set_defaults(func=funcs["stats"])

    p = sub.add_parser("events", help="events: tail")
    events_sub = p.add_subparsers(dest="events_command", required=True)
    t = events_sub.add_parser("tail", help="follow events as they are recorded (Ctrl-C stops)")
    t.add_argument("--config", required=True)
    t.add_argument("--since", help="first show the events recorded since then: 1h, 7d, 2w or a date/time"
                   " (default: only new events)")
    t.add_argument("--type", action="append", help="only this eventType (repeatable), e.g. Click")
    t.add_argument("--config-set")
    t.add_argument("--json", action="store_true", help="print each SES event record as one JSON line")
    t.add_argument("--interval", type=float, default=0.5, help="seconds between polls when idle")
    t.add_argument("--count", type=int, default=0, help="stop after this many events (0: follow)")
    p.set_defaults(func=funcs["events"])

    p = sub.add_parser("purge", help="delete events and message records older than retention.days, once")
    p.add_argument("--config", required=True)
    p.add_argument("--days", type=int, help="override retention.days")
    p.set_defaults(func=funcs["purge"])

    p = sub.add_parser("forget", help="delete a recipient's personal data (events, verdicts, records)")
    p.add_argument("address")
    p.add_argument("--config", required=True)
    p.set_defaults(func=funcs["forget"])
