"""Sending control's SQL on both backends (SQLite and PostgreSQL, tests/conftest.py's store_target): pauses and
their history, quota counters, the events summed per set and minute (in batches, settled on PostgreSQL),
identity rows; and the identity checks' DNS timeout against a server that never answers."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from relay import config as config_module
from relay.api.account import MAX_DELIVERY_SECONDS, MIN_DELIVERY_SECONDS, max_delivery
from relay.identities import lookup_txt
from relay.reputation import SETTLE_S, sum_events
from relay.sets import SesError
from relay.store import EventRow, Store, open_store
from relay.store import control as sql
from relay.store import identities as ids

MINUTE_MS = 60_000
NOW_MS = 1_796_000_000_000 - 1_796_000_000_000 % MINUTE_MS  # a whole minute, in 2026


@pytest.fixture
def store(store_target) -> Store:
    s = open_store(store_target)
    yield s
    s.close()


def iso(ms: int) -> str:
    from relay.core.events import iso_ms

    return iso_ms(ms)


def event(kind: str, ms: int, set_name: str | None, recipient: str | None = "r@example.org", **detail) -> EventRow:
    record = {"eventType": kind, "mail": {"destination": ["a@example.org", "b@example.org", "c@example.org"]}}
    if kind == "Bounce":
        record["bounce"] = detail
    return EventRow(kind, iso(ms), "m1", recipient, set_name, record)


def test_pauses_keep_who_and_why_and_a_resume_starts_afresh(store):
    write = lambda work: store.submit(work).result()  # noqa: E731
    assert write(lambda c: sql.put_sending(c, "news", False, "too many bounces", "cli:ops", iso(NOW_MS)))
    assert not write(lambda c: sql.put_sending(c, "news", False, "again", "cli:ops", iso(NOW_MS)))
    assert write(lambda c: sql.put_sending(c, "news", True, "fixed", "api:AKID", iso(NOW_MS + 1000)))
    assert store.read(sql.sending_states) == [("news", 1, "fixed", "api:AKID", iso(NOW_MS + 1000),
                                               iso(NOW_MS + 1000))]
    assert store.read(sql.sending_history, "news") == [(iso(NOW_MS + 1000), True, "fixed", "api:AKID"),
                                                       (iso(NOW_MS), False, "too many bounces", "cli:ops")]
    write(lambda c: sql.forget_set_control(c, "news"))
    assert store.read(sql.sending_states) == [] and len(store.read(sql.sending_history, "news")) == 2


def test_quota_counters_count_the_second_and_the_day_and_prune(store):
    now_s = NOW_MS // 1000
    add = lambda n, t: store.submit(lambda c: sql.add_to_quota(c, "account", n, t)).result()  # noqa: E731
    assert add(3, now_s) == (3, 3)
    assert add(2, now_s) == (5, 5)
    assert add(1, now_s + 1) == (1, 6)
    assert add(1, now_s + 86_400) == (1, 1)  # a day later: the old minutes are out of the window, and pruned
    assert store.query("SELECT COUNT(*) FROM send_counts WHERE unit = 'm'") == [(1,)]
    assert store.read(sql.quota_sent, "account", now_s + 86_400) == 1


def test_events_are_summed_per_set_and_minute_in_batches(store):
    events = [event("Send", NOW_MS, "s"), event("Send", NOW_MS + 5, "s", recipient=None),  # one per message: 3
              event("Delivery", NOW_MS + 10, "s"), event("Bounce", NOW_MS + 20, "s", bounceType="Permanent",
                                                         bounceSubType="General"),
              event("Bounce", NOW_MS + 30, "s", bounceType="Permanent", bounceSubType="OnAccountSuppressionList"),
              event("Complaint", NOW_MS + MINUTE_MS, "s"), event("Reject", NOW_MS, None), event("Open", NOW_MS, "s")]
    store.submit(Store.events_work(events)).result()
    later = NOW_MS + int(SETTLE_S * 1000) + MINUTE_MS  # settled on PostgreSQL too
    assert sum_events(store, later, batch=3) == 7  # the Open is not counted
    assert sum_events(store, later, batch=3) == 0  # summed once
    rows = store.query("SELECT configuration_set, minute, attempts, delivered, bounced, permanent, complaints,"
                       " rejects FROM send_statistics ORDER BY configuration_set, minute")
    minute = NOW_MS // MINUTE_MS
    assert rows == [("", minute, 0, 0, 0, 0, 0, 1), ("s", minute, 4, 1, 1, 1, 0, 0),
                    ("s", minute + 1, 0, 0, 0, 0, 1, 0)]
    assert store.read(sql.outcomes_since, minute) == {"": (0, 0, 0, 0), "s": (1, 1, 1, 1)}


def test_identity_rows_round_trip_and_checks_report_changes(store):
    row = ids.IdentityRow("news.example", "DOMAIN", iso(NOW_MS), dkim_selector="s1", dkim_key="aesgcm:k:xyz",
                          dkim_status="PENDING", dkim_signing=True)
    store.submit(lambda c: ids.put_identity(c, row)).result()
    assert store.read(ids.identity_row, "news.example") == row
    assert "aesgcm" not in repr(row)  # a sealed key never reaches a log line through a repr either
    check = lambda v, d: store.submit(  # noqa: E731
        lambda c: ids.record_check(c, "news.example", iso(NOW_MS), v, d, "ok")).result()
    assert check("SUCCESS", "SUCCESS") and not check("SUCCESS", "SUCCESS")
    assert store.read(ids.identity_row, "news.example").verified_at == iso(NOW_MS)
    assert store.submit(lambda c: ids.delete_identity(c, "news.example")).result()
    assert store.read(ids.identity_rows) == []


def test_the_dns_timeout_bounds_a_lookup_to_a_silent_server(tmp_path: Path):
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))  # takes queries, never answers
    try:
        cfg = config_module.parse({"sending": {"nameservers": [f"127.0.0.1:{silent.getsockname()[1]}"],
                                               "dns_timeout": "0.5s"}}, tmp_path)
        started = time.monotonic()
        found = lookup_txt("s._domainkey.example.com", cfg.sending)
        assert found.error and "timeout" in found.error.lower() and time.monotonic() - started < 3
    finally:
        silent.close()


def test_max_delivery_seconds_is_ses_range():
    assert max_delivery(MIN_DELIVERY_SECONDS, "m") == 300 and max_delivery(MAX_DELIVERY_SECONDS, "m") == 50400
    for bad in (MIN_DELIVERY_SECONDS - 1, MAX_DELIVERY_SECONDS + 1, "600", True):
        with pytest.raises(SesError):
            max_delivery(bad, "m")
