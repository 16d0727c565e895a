"""The console's pure parts (ranges, series, rates, reputation levels, the click heatmap, sessions, origins,
[console] settings) and its store reads on both backends, against the inspection views they stand beside."""

from __future__ import annotations

import json
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from relay import config as config_module
from relay import inspect as ops
from relay import store as store_module
from relay.config import ConfigError, ConsoleSettings
from relay.console import auth
from relay.core import console as core
from relay.core.heatmap import heatmap, html_part
from relay.core.settings import TrackingSettings
from relay.core.suppression import Suppression
from relay.store import console as reads
from relay.store.messages import EventRow, insert_events
from relay.store.tracking import VerdictRow, upsert_verdicts

NOW = datetime(2026, 11, 23, 12, 30, 0, tzinfo=UTC)
ROOT = Path(__file__).resolve().parent.parent


# --- ranges -------------------------------------------------------------------------------------------------

def test_range_presets_steps_and_limits():
    r = core.parse_range({}, NOW)
    assert (r.preset, r.by, r.since_day, r.until_day, len(r.buckets())) == ("7d", "day", "2026-11-17", "2026-11-23", 7)
    r = core.parse_range({"range": "24h"}, NOW)
    assert r.by == "hour" and r.buckets()[0] == "2026-11-22T13" and r.buckets()[-1] == "2026-11-23T12"
    assert r.hours()[0] == ("2026-11-22T13:00:00.000Z", "2026-11-22T14:00:00.000Z") and len(r.hours()) == 24
    r = core.parse_range({"from": "2026-11-20", "to": "2026-11-20"}, NOW)
    assert r.by == "hour" and len(r.buckets()) == 24 and r.query() == {"from": "2026-11-20", "to": "2026-11-20",
                                                                       "by": "hour"}
    r = core.parse_range({"from": "2026-11-20", "to": "2026-11-21", "by": "hour"}, NOW)  # 48 hours: by day
    assert r.by == "day" and "24 hours" in r.note and len(r.buckets()) == 2
    r = core.parse_range({"from": "2026-11-23", "to": "2026-11-01"}, NOW)  # swapped
    assert (r.since_day, r.until_day) == ("2026-11-01", "2026-11-23")
    r = core.parse_range({"from": "2020-01-01", "to": "2026-11-23"}, NOW)
    assert len(r.buckets()) == core.MAX_DAYS and r.until_day == "2026-11-23" and "366" in r.note
    r = core.parse_range({"range": "forever", "from": "not a date"}, NOW)
    assert r.preset == "7d" and "unknown range" in r.note


# --- series, rates, reputation ---------------------------------------------------------------------------------

def test_series_keep_human_machine_and_unjudged_apart():
    buckets = ["2026-11-22T10", "2026-11-22T11"]
    rows = [("2026-11-22T10", "Send", None, 5), ("2026-11-22T10", "Open", "human", 2),
            ("2026-11-22T10", "Open", "proxy", 1), ("2026-11-22T11", "Open", "machine", 4),
            ("2026-11-22T11", "Open", None, 1), ("2026-11-22T11", "Click", "proxy", 3),
            ("2026-11-22T11", "Click", "human", 1), ("2026-11-21T23", "Send", None, 9)]
    s = core.hour_series(rows, buckets)
    assert s["sent"] == [5, 0] and s["human_opens"] == [3, 0] and s["machine_opens"] == [0, 4]
    assert s["other_opens"] == [0, 1] and s["human_clicks"] == [0, 1] and s["other_clicks"] == [0, 3]
    day = {"day": "2026-11-22", "sent": 4, "delivered": 3, "bounced_permanent": 1, "bounced_transient": 0,
           "complained": 0, "opens": 6, "human_opens": 3, "machine_opens": 2, "clicks": 2, "human_clicks": 1,
           "machine_clicks": 0}
    s = core.day_series([day, {**day, "sent": 1}], ["2026-11-22"])
    assert s["sent"] == [5] and s["bounced"] == [2] and s["other_opens"] == [2] and s["other_clicks"] == [2]


def test_rates_and_reputation_levels():
    r = core.with_rates({"sent": 200, "delivered": 190, "bounced_permanent": 8, "bounced_transient": 2,
                         "complained": 1, "unique_opens": 95, "unique_human_opens": 76, "unique_clicks": 19,
                         "unique_human_clicks": 0})
    assert (r["bounced"], r["bounce_rate"], r["delivery_rate"], r["open_rate"]) == (10, 0.05, 0.95, 0.5)
    assert (r["human_open_rate"], r["click_rate"], r["human_click_rate"]) == (0.4, 0.1, 0.0)
    assert core.with_rates({"sent": 0})["delivery_rate"] is None
    cases = [(4, 1000, 0, "ok", "ok"), (50, 1000, 1, "review", "review"), (100, 1000, 5, "pause", "pause"),
             (0, 0, 0, "ok", "ok")]
    for bounced, sent, complained, bounce_level, complaint_level in cases:
        rep = core.reputation({"sent": sent, "delivered": sent, "bounced_permanent": bounced,
                               "complained": complained})
        assert (rep["bounce_level"], rep["complaint_level"]) == (bounce_level, complaint_level), rep
    assert core.percent(0.12345) == "12.3%" and core.percent(None) == "-"


# --- the heatmap ------------------------------------------------------------------------------------------------

def message(html: str, charset: str = "utf-8") -> bytes:
    return (f"From: a@example.com\r\nSubject: s\r\nMIME-Version: 1.0\r\nContent-Type: multipart/alternative;"
            f' boundary="b"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nplain\r\n--b\r\nContent-Type: text/html;'
            f" charset={charset}\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n").encode() \
        + html.encode(charset).replace(b"=", b"=3D") + b"\r\n--b--\r\n"


SETTINGS = TrackingSettings(open_tracking=True, click_tracking=True, host="t.example.com").to_json()


def test_heatmap_marks_the_links_the_instrumenter_tracked_with_their_clicks():
    raw = message('<p><a href="https://s.example/a" ses:tags="slot:top;">A</a> <a href=https://s.example/a>B</a>'
                  ' <a href="https://s.example/a">C</a> <a href="https://s.example/x" ses:no-track>D</a>'
                  ' <a href="mailto:x@example.com">E</a>{{ses:openTracker}}</p>')
    clicks = [{"link": "https://s.example/a", "link_tags": '{"slot":["top"]}', "clicks": 4, "unique_clicks": 2,
               "human_clicks": 3},
              {"link": "https://s.example/a", "link_tags": None, "clicks": 1, "unique_clicks": 1, "human_clicks": 0}]
    h = heatmap(raw, SETTINGS, "MID", "r@example.org", clicks)
    assert [(link.number, link.clicks, link.tags) for link in h.links] == [(1, 4, {"slot": ["top"]}), (2, 1, {}),
                                                                           (3, 1, {})]
    assert 'href="#relay-link-1" data-relay-link="1" data-relay-clicks="4" data-relay-heat="5"' in h.html
    assert "href=#relay-link-2 data-relay-link=\"2\"" in h.html  # an unquoted value keeps the tag well formed
    assert 'data-relay-link="3" data-relay-clicks="1" data-relay-heat="1"' in h.html
    assert "ses:no-track" not in h.html and "ses:tags" not in h.html  # as delivered: markers removed
    assert 'href="https://s.example/x"' in h.html and 'href="mailto:x@example.com"' in h.html  # not tracked
    assert "t.example.com" not in h.html and "openTracker" not in h.html  # no tracking URL, no pixel


def test_heatmap_without_html_or_click_tracking():
    plain = b"From: a@example.com\r\nSubject: s\r\nContent-Type: text/plain\r\n\r\nhello\r\n"
    assert html_part(plain) is None and heatmap(plain, SETTINGS, "M", "r", []) is None
    off = TrackingSettings(open_tracking=True, click_tracking=False, host="t.example.com").to_json()
    h = heatmap(message('<a href="https://s.example/a">A</a>'), off, "M", "r", [])
    assert h.links == [] and 'href="https://s.example/a"' in h.html


def test_heatmap_of_a_latin1_part():
    h = heatmap(message('<p>Caf\u00e9 <a href="https://s.example/ete">A</a></p>', "iso-8859-1"),
                SETTINGS, "M", "r", [])
    assert "Caf\u00e9" in h.html and len(h.links) == 1


# --- sessions, origins, settings -----------------------------------------------------------------------------

def test_sessions_end_when_idle_or_too_old():
    now = [1000.0]
    sessions = auth.Sessions(clock=lambda: now[0])
    settings = ConsoleSettings(session_idle=60, session_lifetime=300)
    token, session = sessions.create("ann")
    for _ in range(5):  # a request every 50 s keeps it alive ...
        now[0] += 50
        assert sessions.get(token, settings) is session
    now[0] += 50  # ... until 300 s after the login
    assert sessions.get(token, settings) is None and len(sessions) == 0
    token, _ = sessions.create("ann")
    now[0] += 61
    assert sessions.get(token, settings) is None
    token, _ = sessions.create("ann")
    sessions.drop(token)
    assert sessions.get(token, settings) is None and sessions.get("", settings) is None


class FakeRequest:
    def __init__(self, headers: dict, host: str = "console.example:8082"):
        self.headers, self.host = headers, host


def test_same_origin():
    assert auth.same_origin(FakeRequest({"Origin": "http://console.example:8082"}), False)
    assert not auth.same_origin(FakeRequest({"Origin": "http://console.example:8082"}), True)
    assert not auth.same_origin(FakeRequest({"Origin": "null"}), False)
    assert auth.same_origin(FakeRequest({"Referer": "https://console.example:8082/suppression"}), True)
    assert not auth.same_origin(FakeRequest({"Referer": "https://evil.example/"}), True)
    assert not auth.same_origin(FakeRequest({}), False)


def test_console_settings(tmp_path):
    cfg = config_module.parse(tomllib.loads(
        '[console]\nlisten = "127.0.0.1:8082"\nsecure_cookies = true\ntrusted_proxies = ["10.0.0.0/8"]\n'
        'session_idle = "10m"\nsession_lifetime = "12h"\nauth_fail_limit = 3\nauth_fail_window = "1m"\n'
        'domain_sample = 500\n[[console.users]]\nusername = "ann"\npassword_hash = "scrypt$1$2$3$4$5"\n'
        'role = "admin"\n[[console.users]]\nusername = "bob"\npassword_hash = "scrypt$1$2$3$4$5"\n'), tmp_path)
    c = cfg.console
    assert c.enabled and (c.listen_host, c.listen_port) == ("127.0.0.1", 8082) and c.secure_cookies
    assert (c.session_idle, c.session_lifetime, c.auth_fail_limit, c.auth_fail_window) == (600, 43200, 3, 60)
    assert [(u.username, u.role) for u in c.users] == [("ann", "admin"), ("bob", "viewer")] and c.domain_sample == 500
    assert "scrypt" not in repr(c.users[0])
    default = config_module.parse({}, tmp_path).console
    assert not default.enabled and default.listen_host is None
    assert (default.session_idle, default.session_lifetime, default.domain_sample) == (1800, 28800, 2000)
    assert (default.auth_fail_limit, default.auth_fail_window) == (5, 300)
    assert not config_module.parse(tomllib.loads('[console]\nlisten = "127.0.0.1:8082"\n'), tmp_path).console.enabled
    with pytest.raises(ConfigError) as err:
        config_module.parse(tomllib.loads(
            '[console]\nlisten = "nowhere"\nsession_idle = "0s"\ncolour = 1\n[[console.users]]\nusername = "a"\n'
            'password_hash = "plain"\nrole = "root"\n[[console.users]]\nusername = "a"\n'
            'password_hash = "scrypt$x"\n'), tmp_path)
    text = str(err.value)
    for expected in ("console.listen", "console.session_idle", "console.colour: unknown key",
                     "console.users[0].password_hash", "console.users[0].role", "console.users[1].username"):
        assert expected in text, text


def test_example_configuration_has_a_console_on_loopback_without_users():
    cfg = config_module.load(ROOT / "config.example.toml")
    assert cfg.console.listen_host == "127.0.0.1" and not cfg.console.enabled


# --- the store's reads, on both backends -------------------------------------------------------------------

def _events(today: datetime) -> list[EventRow]:
    """Two days of one set: copies sent, delivered, bounced; opens and clicks with verdicts."""
    out = []
    for day in (today - timedelta(days=1), today):
        for n, rcpt in enumerate(["ann@Example.org", "bob@example.net", "cat@example.org", "dan_x@example.com"]):
            mid = f"0100-{day:%d}-{n}"
            t = day.replace(hour=9, minute=n)
            mail = {"messageId": mid, "source": "news@example.com", "destination": [rcpt],
                    "commonHeaders": {"subject": f"Sale {day:%d}"}}

            def ev(kind, at, body=None, mid=mid, rcpt=rcpt, mail=mail):
                key = kind[0].lower() + kind[1:]
                return EventRow(kind, ops.iso(at), mid, None if kind == "Send" else rcpt, "marketing",
                                {"eventType": kind, "mail": mail, key: body or {}})
            out.append(ev("Send", t))  # one per message, as relay records it
            if n == 3:
                out.append(ev("Bounce", t + timedelta(seconds=5), {"bounceType": "Permanent"}))
                continue
            out.append(ev("Delivery", t + timedelta(seconds=5)))
            out.append(ev("Open", t + timedelta(hours=1)))
            if n == 0:
                out.append(ev("Click", t + timedelta(hours=2), {"link": "https://s.example/a",
                                                                "linkTags": {"slot": ["top"]}}))
                out.append(ev("Click", t + timedelta(hours=2, minutes=1), {"link": "https://s.example/a",
                                                                           "linkTags": {"slot": ["top"]}}))
    return out


@pytest.fixture
def store(store_target):
    s = store_module.open_store(store_target)
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)

    def fill(conn):
        events = _events(today)
        for send in (e for e in events if e.type == "Send"):  # the message records beside the events
            mail, final = send.record["mail"], "bounced" if send.message_id.endswith("-3") else "delivered"
            rcpt = mail["destination"][0]
            row = store_module.MessageRow(send.message_id, send.time, mail["source"], "marketing",
                                          mail["commonHeaders"]["subject"], None, 10, "127.0.0.1", None, mail, {})
            store_module.Store.accept_work(row, [rcpt], b"", [], {rcpt: (final, "250")})(conn)
        insert_events(conn, events)
        ids = [r[0] for r in conn.execute("SELECT id FROM events WHERE type IN ('Open', 'Click') ORDER BY id")]
        upsert_verdicts(conn, [VerdictRow(i, "GET", "machine" if k % 3 == 2 else "human", [], "", "", "",
                                          ops.iso(today)) for k, i in enumerate(ids)])
    s.submit(fill).result()
    try:
        yield s, today
    finally:
        s.close()


def test_funnel_days_and_hours_match_the_views(store):
    s, today = store
    since, until = (today - timedelta(days=3)).date().isoformat(), today.date().isoformat()
    oracle = s.read(store_module.funnel_rows, "marketing", since)
    for _pass in ("live", "rolled up"):
        got = s.read(reads.funnel_days, reads.EVERY_SET, since, until)
        assert [{k: r[k] for k in ("day", "sent", "delivered", "bounced_permanent", "unique_opens", "clicks")}
                for r in got] == [{k: r[k] for k in ("day", "sent", "delivered", "bounced_permanent",
                                                     "unique_opens", "clicks")} for r in oracle]
        ops.rollup(s, now=today + timedelta(hours=1))  # yesterday is closed now: read from funnel_rollup
    assert s.read(reads.funnel_days, None, since, until) == []  # no mail without a set
    r = core.parse_range({"from": until, "to": until}, today)
    counted = core.hour_series(s.read(reads.funnel_hours, reads.EVERY_SET, r.hours()), r.buckets())
    one_set = core.hour_series(s.read(reads.funnel_hours, "marketing", r.hours()), r.buckets())
    assert counted == one_set
    assert sum(counted["sent"]) == 4 and counted["sent"][9] == 4
    assert sum(counted["human_clicks"]) + sum(counted["machine_clicks"]) == 2
    assert sum(counted["human_opens"]) + sum(counted["machine_opens"]) == 3
    assert s.read(reads.funnel_hours, "other", r.hours()) == []


def test_domains_links_messages_and_suppression_search(store):
    s, today = store
    day = today.date().isoformat()
    domains = {d["domain"]: d for d in s.read(reads.domain_rows, "marketing", day, day, 100)}
    assert {k: (d["sent"], d["delivered"], d["bounced"], d["opened"]) for k, d in domains.items()} == {
        "example.org": (2, 2, 0, 2), "example.net": (1, 1, 0, 1), "example.com": (1, 0, 1, 0)}
    assert sum(d["sent"] for d in s.read(reads.domain_rows, "marketing", day, day, 2)) == 2  # the newest two
    links = s.read(reads.link_range_rows, "marketing", (today - timedelta(days=1)).date().isoformat(), day)
    assert [(r["link"], r["clicks"], r["unique_clicks"]) for r in links] == [("https://s.example/a", 4, 2)]
    found = s.read(lambda conn: reads.find_messages(conn, recipient="ann@Example.org"))  # as it was sent to
    assert [m["message_id"] for m in found] == [f"0100-{today:%d}-0", f"0100-{today - timedelta(days=1):%d}-0"]
    assert found[0]["subject"] == f"Sale {today:%d}" and found[0]["recipients"] == 1  # from the events' mail
    found = s.read(lambda conn: reads.find_messages(conn, since=ops.iso(today), until=ops.iso(today + timedelta(1))))
    assert len(found) == 4
    assert s.read(lambda conn: reads.find_messages(conn, message_id=f"0100-{today:%d}-3"))[0]["time"]
    s.submit(lambda conn: conn.execute(
        "INSERT INTO messages (id, received_at, mail_from, configuration_set, subject, message_id_header, size,"
        " mail_json, settings_json) VALUES ('kept', ?, 'news@example.com', 'marketing', ?, '<abc@example.com>', 10,"
        " '{}', '{}')", (ops.iso(today), "Big 50% SALE_now"))).result()
    window = {"since": ops.iso(today), "until": ops.iso(today + timedelta(days=1))}
    for text, found in (("50% sale_", ["kept"]), ("50_ sale", []), ("big", ["kept"]), ("nothing", [])):
        got = s.read(lambda conn, t=text: reads.find_messages(conn, subject=t, **window))
        assert [m["message_id"] for m in got] == found, text
    for wanted in ("kept", "abc@example.com", "<abc@example.com>"):
        assert [m["subject"] for m in s.read(lambda conn, w=wanted: reads.find_messages(conn, message_id=w))] == [
            "Big 50% SALE_now"], wanted
    detail = s.read(reads.message_detail, f"0100-{today:%d}-0")
    assert [e["type"] for e in detail["timeline"]] == ["Send", "Delivery", "Open", "Click", "Click"]
    assert detail["links"][0]["clicks"] == 2 and detail["message"]["has_body"] is False
    assert s.read(reads.message_detail, "nothing") is None

    s.submit(lambda conn: store_module.suppress(conn, [Suppression(a, "BOUNCE", "2026-11-01T00:00:00.000Z")
                                                       for a in ("a_b@example.org", "axb@example.org",
                                                                 "100%@example.org", "c@example.org")])).result()
    assert [e.email_address for e in s.read(reads.suppression_search, "a_b", None, None, 10)] == ["a_b@example.org"]
    assert [e.email_address for e in s.read(reads.suppression_search, "100%", None, None, 10)] == [
        "100%@example.org"]
    first = s.read(reads.suppression_search, "", "BOUNCE", None, 2)
    rest = s.read(reads.suppression_search, "", "BOUNCE", (first[-1].email_address, first[-1].reason), 10)
    assert len(first) == 2 and len(rest) == 2 and s.read(reads.suppression_counts) == {"BOUNCE": 4}
    assert json.loads(json.dumps(s.read(reads.destination_states))) == []


def test_lists_are_paged_and_capped(store):
    """SUPPRESSION_PAGE entries a page (keyset: the next page starts after the last address shown),
    MESSAGES_SHOWN messages a search, QUEUE_SHOWN copies and replies on the queue page."""
    from relay.console import pages

    s, today = store
    n = pages.SUPPRESSION_PAGE + 7
    s.submit(lambda conn: store_module.suppress(conn, [Suppression(f"u{i:04d}@example.org", "BOUNCE", ops.iso(today))
                                                       for i in range(n)])).result()

    def view(query: dict):
        cfg = config_module.parse({}, Path("."))
        return pages.View(cfg, s, query, {}, today)

    first = pages.suppression_list(view({}))
    assert len(first["entries"]) == pages.SUPPRESSION_PAGE and first["next"] == "u0099@example.org BOUNCE"
    rest = pages.suppression_list(view({"after": first["next"]}))
    assert [e["email_address"] for e in rest["entries"]][0] == "u0100@example.org"
    assert len(rest["entries"]) == 7 and rest["next"] == ""
    assert len(s.read(lambda conn: reads.find_messages(conn, since=ops.iso(today - timedelta(days=2)), limit=3))) == 3

    def queued(conn):
        for i in range(3):
            conn.execute("INSERT INTO messages (id, received_at, mail_from, size, mail_json, settings_json)"
                         " VALUES (?, ?, 'a@example.com', 1, '{}', '{}')", (f"q{i}", ops.iso(today)))
            conn.execute("INSERT INTO recipients (message_id, recipient, position, state, updated_at, last_response)"
                         " VALUES (?, 'r@example.org', 0, 'queued', ?, ?)", (f"q{i}", ops.iso(today), f"451 {i % 2}"))
    s.submit(queued).result()
    assert [c["message_id"] for c in s.read(reads.queue_oldest, 2)] == ["q0", "q1"]
    assert [(r["last_response"], r["copies"]) for r in s.read(reads.queue_replies, 1)] == [("451 0", 2)]
    page = pages.queue(view({}))
    assert page["depth"] == 3 and len(page["copies"]) == 3 and page["shown"] == pages.QUEUE_SHOWN
