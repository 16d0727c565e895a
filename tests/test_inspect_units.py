"""The pure parts of inspection and operations: durations, cut-offs, IP truncation, scrubbing, redaction,
tables; the store's purge and forget helpers on a small real database."""

from __future__ import annotations

import json
import tomllib
from datetime import UTC, datetime
from pathlib import Path

import pytest

from relay import config as config_module
from relay import inspect as ops
from relay import store as store_module
from relay.config import PrivacySettings
from relay.store.views import queries

NOW = datetime(2026, 11, 23, 12, 30, 0, tzinfo=UTC)


def test_since_and_cutoff():
    assert ops.iso(ops.since_time("7d", NOW)) == "2026-11-16T12:30:00.000Z"
    assert ops.iso(ops.since_time("24h", NOW)) == "2026-11-22T12:30:00.000Z"
    assert ops.iso(ops.since_time("2w", NOW)) == "2026-11-09T12:30:00.000Z"
    assert ops.iso(ops.since_time("2026-11-01", NOW)) == "2026-11-01T00:00:00.000Z"
    with pytest.raises(ValueError):
        ops.since_time("last week", NOW)
    assert ops.purge_cutoff(60, NOW) == "2026-09-24T12:30:00.000Z"
    assert ops.purge_cutoff(0, NOW) is None


@pytest.mark.parametrize(("ip", "truncated"), [
    ("192.0.2.77", "192.0.2.0"), ("2001:db8:1:2::5", "2001:db8:1::"), ("::ffff:198.51.100.9", "198.51.100.0"),
    ("", ""), ("not-an-ip", ""),
])
def test_truncate_ip(ip, truncated):
    assert ops.truncate_ip(ip) == truncated


def test_scrubber():
    record = {"eventType": "Click", "click": {"ipAddress": "203.0.113.9", "userAgent": "UA", "link": "x"}}
    ops.scrubber(PrivacySettings(truncate_ip=True))(record)
    assert record["click"] == {"ipAddress": "203.0.113.0", "userAgent": "UA", "link": "x"}
    ops.scrubber(PrivacySettings(drop_user_agent=True))(record)
    assert record["click"]["userAgent"] == ""
    untouched = {"open": {"ipAddress": "203.0.113.9", "userAgent": "UA"}}
    ops.scrubber(PrivacySettings())(untouched)
    assert untouched == {"open": {"ipAddress": "203.0.113.9", "userAgent": "UA"}}


def test_redactor():
    redact = ops.redactor("Ann@Example.org")
    doc = json.dumps({"destination": ["ann@example.org", "bob@example.org"],
                      "commonHeaders": {"to": ["Ann <ANN@example.org>"]}}, separators=(",", ":"))
    out = json.loads(redact(doc))
    assert out["destination"] == [ops.FORGOTTEN, "bob@example.org"]
    assert out["commonHeaders"]["to"] == [f"Ann <{ops.FORGOTTEN}>"]
    assert redact('{"a":"bob@example.org"}') == '{"a":"bob@example.org"}'


def test_format_table_and_total():
    rows = [{"day": "2026-11-22", "configuration_set": "m", "sent": 10, "delivered": 8, "unique_opens": 2,
             "unique_human_opens": 1, "unique_clicks": 1, "unique_human_clicks": 0, "open_rate": 0.25},
            {"day": "2026-11-23", "configuration_set": "m", "sent": 5, "delivered": 0, "open_rate": None}]
    total = ops.total_row(rows)
    assert (total["sent"], total["delivered"], total["open_rate"], total["human_click_rate"]) == (15, 8, 0.25, 0.0)
    text = ops.format_table(rows, [("day", "day"), ("sent", "sent"), ("open_rate", "open%")])
    assert text.splitlines() == ["day         sent  open%", "----------  ----  -----",
                                 "2026-11-22    10  25.0%", "2026-11-23     5      -"]


def test_config_keys(tmp_path: Path):
    cfg = config_module.parse(tomllib.loads(
        '[metrics]\nlisten = "127.0.0.1:9108"\n[retention]\ndays = 0\ninterval = "10m"\n'
        '[privacy]\ntruncate_ip = true\ndrop_user_agent = true\n'), tmp_path)
    assert (cfg.metrics.listen_host, cfg.metrics.listen_port) == ("127.0.0.1", 9108)
    assert (cfg.retention.days, cfg.retention.interval) == (0, 600.0)
    assert cfg.privacy == PrivacySettings(True, True)
    default = config_module.parse({}, tmp_path)
    assert default.metrics.listen_host is None and default.retention.days == 60 and not default.privacy.truncate_ip
    with pytest.raises(config_module.ConfigError) as err:
        config_module.parse(tomllib.loads('[retention]\ndays = -1\n[privacy]\ntruncate = true\n'), tmp_path)
    assert any("retention.days" in p for p in err.value.problems)
    assert any("privacy.truncate: unknown key" in p for p in err.value.problems)


def test_example_config_is_valid():
    cfg = config_module.load(Path(__file__).resolve().parent.parent / "config.example.toml")
    assert cfg.retention.days == 60


def _event(kind: str, time: str, message_id: str, recipient: str) -> tuple:
    return (kind, time, message_id, recipient, "m", json.dumps({"eventType": kind, "mail": {
        "messageId": message_id, "destination": ["ann@example.org", "zed@example.org"]}}))


def test_purge_in_chunks_and_forget(store_target, tmp_path: Path):
    store = store_module.open_store(store_target)
    try:
        old, new = "2020-01-01T00:00:00.000Z", "2026-11-23T00:00:00.000Z"
        rows = [_event("Send", old, f"m{i}", f"u{i}@example.org") for i in range(12)]
        rows += [_event("Send", new, "n1", "ann@example.org"), _event("Send", new, "n1", "zed@example.org")]
        store.submit(lambda conn: store_module.insert_events_json(conn, rows)).result()
        deleted = ops._chunks(store, lambda conn, cutoff, _n: store_module.purge_events_chunk(conn, cutoff, 5),
                              "2026-01-01T00:00:00.000Z", 30.0)
        assert deleted == 12
        assert [r[0] for r in store.query("SELECT message_id FROM events")] == ["n1", "n1"]
        done = ops.forget(store, "Ann@example.org")
        assert done["events"] == 1 and done["other_events"] == 1
        (record,) = [json.loads(r[0]) for r in store.query("SELECT record FROM events")]
        assert record["mail"]["destination"] == [ops.FORGOTTEN, "zed@example.org"]
    finally:
        store.close()


def test_funnel_rollup_gives_the_live_numbers(store_target, tmp_path: Path):
    """Closed days are computed once into funnel_rollup; funnel_daily shows the same rows either way."""
    store = store_module.open_store(store_target)
    try:
        rows = []
        for day, n in (("2026-11-20", 3), ("2026-11-21", 2), ("2026-11-23", 1)):
            for i in range(n):
                rows.append(_event("Send", f"{day}T10:00:00.000Z", f"{day}-{i}", f"u{i}@example.org"))
                kind = "Permanent" if day == "2026-11-20" else "Transient"
                rows.append(("Bounce" if i == 0 else "Delivery", f"{day}T10:00:01.000Z", f"{day}-{i}",
                             f"u{i}@example.org", None if day == "2026-11-21" else "m",
                             json.dumps({"bounce": {"bounceType": kind}})))
                rows.append(("Open", f"{day}T11:00:00.000Z", f"{day}-{i}", f"u{i}@example.org", "m", "{}"))
        ids = store.submit(lambda conn: store_module.insert_events_json(conn, rows)).result()
        verdicts = [store_module.VerdictRow(i, "GET", "human", "[]", "", "", "", "2026-11-23T00:00:00.000Z")
                    for i, row in zip(ids, rows, strict=True) if row[0] == "Open"]
        store.submit(lambda conn: store_module.upsert_verdicts(conn, verdicts)).result()

        def funnel() -> list[tuple]:
            return store.query("SELECT * FROM funnel_daily ORDER BY day, configuration_set")

        live = funnel()
        assert ops.rollup(store, datetime(2026, 11, 23, 0, 5, tzinfo=UTC)) == 2  # the 22nd is not closed yet
        assert store.query("SELECT day FROM funnel_rollup_mark ORDER BY id") == [("2026-11-21",)] * 2
        assert ops.rollup(store, NOW) == 0  # the 22nd has no events; the 23rd stays open
        assert len(store.query("SELECT * FROM funnel_rollup")) == 3
        assert funnel() == live
        marketing = {r["day"]: r for r in store.read(store_module.funnel_rows, "m", "2026-11-01")}
        assert (marketing["2026-11-20"]["bounced_permanent"], marketing["2026-11-20"]["delivered"]) == (1, 2)
        assert marketing["2026-11-20"]["unique_human_opens"] == 3
    finally:
        store.close()


def _click(time: str, message_id: str, recipient: str, link: str, set_name: str | None = "m") -> tuple:
    return ("Click", time, message_id, recipient, set_name, json.dumps({"eventType": "Click", "click": {
        "link": link, "linkTags": {"slot": ["hero"]} if link.endswith("a") else {}}}))


def test_link_rollup_gives_the_live_numbers(store_target, tmp_path: Path):
    """Closed days of link_clicks are rolled up into link_rollup; the view shows what one pass over every click
    shows (LINK_CLICKS): a copy clicking a link on several days, and again today after its days were rolled
    up (a late click of old mail), is one unique click; humans are counted from their first human click."""
    store = store_module.open_store(store_target)

    def add(rows: list[tuple], verdicts: list[str]) -> None:
        ids = store.submit(lambda conn: store_module.insert_events_json(conn, rows)).result()
        store.submit(lambda conn: store_module.upsert_verdicts(conn, [
            store_module.VerdictRow(i, "GET", v, "[]", "", "", "", "2026-11-23T00:00:00.000Z")
            for i, v in zip(ids, verdicts, strict=True)])).result()

    def links() -> list[tuple]:
        return store.query("SELECT * FROM link_clicks ORDER BY configuration_set, link, link_tags")

    def one_pass() -> list[tuple]:
        return store.query(f"SELECT * FROM ({queries(store.dialect).link_clicks.format(where='')}) one_pass"
                           " ORDER BY configuration_set, link, link_tags")

    try:
        add([_click("2026-11-20T10:00:00.000Z", "m1", "ann@example.org", "https://x.example/a"),
             _click("2026-11-20T11:00:00.000Z", "m1", "ann@example.org", "https://x.example/a"),  # a bot first
             _click("2026-11-21T09:00:00.000Z", "m1", "ann@example.org", "https://x.example/a"),
             _click("2026-11-21T09:00:01.000Z", "m1", "ann@example.org", "https://x.example/b"),
             _click("2026-11-21T09:00:02.000Z", "m1", "bob@example.org", "https://x.example/a"),
             _click("2026-11-21T10:00:00.000Z", "m2", "ann@example.org", "https://x.example/a"),
             _click("2026-11-21T10:00:00.000Z", "m3", "cy@example.org", "https://x.example/a", None)],
            ["machine", "human", "human", "human", "proxy", "human", "human"])
        before = one_pass()
        assert links() == before
        assert ops.rollup(store, NOW) == 2  # the 20th and 21st; the 22nd has no events
        assert store.query("SELECT COUNT(DISTINCT day) FROM link_rollup") == [(2,)]
        assert links() == before
        # today: late clicks of a copy whose clicks are rolled up, a new copy, a click on an unrolled day
        add([_click("2026-11-23T08:00:00.000Z", "m1", "ann@example.org", "https://x.example/a"),
             _click("2026-11-23T08:00:00.000Z", "m1", "bob@example.org", "https://x.example/a"),
             _click("2026-11-23T08:00:00.000Z", "m4", "dee@example.org", "https://x.example/b")],
            ["human", "human", "machine"])
        assert links() == one_pass()
        a = next(r for r in links() if r[0] == "m" and r[1] == "https://x.example/a")
        assert a[3:] == (7, 3, 5, 3, "2026-11-20T10:00:00.000Z", "2026-11-23T08:00:00.000Z")
        marketing = store.read(store_module.link_rows, "m", "2026-11-21T00:00:00.000Z")
        assert [(r["link"], r["clicks"], r["unique_clicks"]) for r in marketing] == [
            ("https://x.example/a", 5, 3), ("https://x.example/b", 2, 2)]
    finally:
        store.close()


def _copy(day: str, n: int, rcpt: str, outcome: str, verdicts: tuple[str, ...] = ()) -> list[tuple]:
    mid = f"{day}-{n}-{rcpt}"
    rows = [_event("Send", f"{day}T10:00:00.000Z", mid, rcpt)]
    if outcome in ("Permanent", "Transient"):
        rows.append(("Bounce", f"{day}T10:00:01.000Z", mid, rcpt, "m", json.dumps({"bounce": {"bounceType": outcome}})))
    else:
        rows.append(_event(outcome, f"{day}T10:00:01.000Z", mid, rcpt))
    for i, verdict in enumerate(verdicts):
        kind = "Click" if verdict.startswith("click") else "Open"
        rows.append((kind, f"{day}T1{i + 1}:00:00.000Z", mid, rcpt, "m",
                     json.dumps({"click": {"link": "https://x.example/a"}} if kind == "Click" else {})))
    return rows


def test_recipient_rollup_gives_the_live_numbers(store_target, tmp_path: Path):
    """recipient_engagement from recipient_rollup plus the events after its mark gives the numbers of one pass
    over every event: rolled part way, with new events after the mark (a bounce after a rolled delivery, an
    address seen only after it, opens of a rolled copy), after a purge and after `relay forget`."""
    store = store_module.open_store(store_target)
    verdict_of = {"open-human": "human", "open-proxy": "proxy", "open-machine": "machine",
                  "click-human": "human", "click-proxy": "proxy", "click-machine": "machine"}

    def add(rows: list[tuple], verdicts: list[str | None]) -> None:
        ids = store.submit(lambda conn: store_module.insert_events_json(conn, rows)).result()
        store.submit(lambda conn: store_module.upsert_verdicts(conn, [
            store_module.VerdictRow(i, "GET", verdict_of[v], "[]", "", "", "", "2026-11-23T00:00:00.000Z")
            for i, v in zip(ids, verdicts, strict=True) if v])).result()

    def batch(*copies: tuple) -> None:
        rows, verdicts = [], []
        for day, n, rcpt, outcome, engaged in copies:
            rows += _copy(day, n, rcpt, outcome, engaged)
            verdicts += [None, None, *engaged]
        add(rows, verdicts)

    def check() -> None:
        by_seeks = store.query(queries(store.dialect).recipients_by_seeks + " ORDER BY recipient")
        assert store.query("SELECT * FROM recipient_engagement ORDER BY recipient") == by_seeks

    try:
        batch(("2020-01-02", 0, "old@example.org", "Delivery", ("open-human",)),
              ("2020-01-02", 0, "gone@example.org", "Permanent", ()),
              ("2026-11-01", 0, "ann@example.org", "Delivery", ("open-human", "open-machine", "click-human")),
              ("2026-11-02", 1, "ann@example.org", "Transient", ()),
              ("2026-11-02", 0, "bob@example.org", "Delivery", ("click-proxy", "open-proxy")),
              ("2026-11-03", 0, "cy@example.org", "Permanent", ()),
              ("2026-11-03", 0, "old@example.org", "Delivery", ()))
        check()
        assert ops.roll_recipients(store, NOW, chunk=5) == 20
        assert store.query("SELECT COUNT(*) FROM recipient_rollup") == [(5,)]
        check()
        batch(("2026-11-20", 0, "bob@example.org", "Permanent", ()),  # after a rolled delivery: bounces now
              ("2026-11-20", 1, "ann@example.org", "Delivery", ("open-machine", "click-machine")),  # after a bounce
              ("2026-11-21", 0, "dee@example.org", "Delivery", ("open-human",)))  # only after the mark
        check()
        people = {r[0]: r for r in store.query("SELECT recipient, bounce_state FROM recipient_engagement")}
        assert (people["bob@example.org"][1], people["ann@example.org"][1]) == ("Permanent", None)
        assert ops.roll_recipients(store, NOW, chunk=3) == 9
        check()
        assert ops.purge(store, 60, NOW)["events"] == 5  # the copies of 2020
        check()
        assert store.query("SELECT opens, last_engaged FROM recipient_rollup WHERE recipient = 'old@example.org'") \
            == [(0, None)]
        assert store.query("SELECT COUNT(*) FROM recipient_rollup WHERE recipient = 'gone@example.org'") == [(0,)]
        ops.forget(store, "ann@example.org")
        check()
        assert store.query("SELECT COUNT(*) FROM recipient_rollup WHERE recipient = 'ann@example.org'") == [(0,)]
    finally:
        store.close()


def test_purge_keeps_queued_messages(store_target, tmp_path: Path):
    store = store_module.open_store(store_target)
    try:
        old = "2020-01-01T00:00:00.000Z"
        for message_id, state in (("done", "delivered"), ("waiting", "queued")):
            msg = store_module.MessageRow(message_id, old, "a@example.com", "m", "s", None, 1, "127.0.0.1", None,
                                          {"messageId": message_id}, {})
            store.submit(store_module.Store.accept_work(msg, ["r@example.org"], b"raw", [])).result()
            if state != "queued":
                store.submit(store_module.Store.recipient_work(message_id, "r@example.org", state, 1, None, "250",
                                                               old, [])).result()
        assert ops.purge(store, 60, NOW) == {"events": 0, "messages": 1, "inbound_reports": 0}
        assert store.query("SELECT id FROM messages") == [("waiting",)]
        assert store.query("SELECT message_id, state FROM recipients") == [("waiting", "queued")]
    finally:
        store.close()


def test_kept_bodies_go_after_their_time_and_with_forget_but_a_queued_one_stays(store_target):
    store = store_module.open_store(store_target)
    try:
        for message_id, received, state in (("old", "2026-11-01T00:00:00.000Z", "delivered"),
                                            ("new", "2026-12-07T00:00:00.000Z", "delivered"),
                                            ("waiting", "2026-11-01T00:00:00.000Z", "queued")):
            msg = store_module.MessageRow(message_id, received, "a@example.com", "m", "s", None, 3, "127.0.0.1",
                                          None, {"messageId": message_id}, {})
            store.submit(store_module.Store.accept_work(msg, [f"{message_id}@example.org"], b"raw", [])).result()
            if state != "queued":
                store.submit(store_module.Store.recipient_work(message_id, f"{message_id}@example.org", state, 1,
                                                               None, "250", received, [], keep_body=True)).result()
        assert sorted(store.query("SELECT message_id FROM spool")) == [("new",), ("old",), ("waiting",)]
        cutoff = "2026-12-01T00:00:00.000Z"
        assert store.submit(lambda c: store_module.purge_bodies_chunk(c, cutoff, 100)).result() == (1, False)
        assert sorted(store.query("SELECT message_id FROM spool")) == [("new",), ("waiting",)]
        gone = ops.forget(store, "new@example.org")
        assert gone["bodies"] == 1 and store.query("SELECT message_id FROM spool") == [("waiting",)]
    finally:
        store.close()
