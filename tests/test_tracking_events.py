"""Events and verdicts recorded by the running listener: recorded user agents of Apple MPP, Gmail's and Yahoo's
proxies and scanners, timing rules, unique opens, recomputation, and no event lost on SIGTERM under load.
Each runs on both store backends (SQLite, PostgreSQL), but the one that counts SQLite's own work (and the
SIGTERM test runs on PostgreSQL with two workers only)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from relay.core import events as events_module
from relay.store import open_store
from relay.tracking import recompute_verdicts

from .harness import db_connection
from .test_tracking_helpers import (
    CHROME,
    MID,
    RCPT,
    Listener,
    free_port,
    load,
    request,
    store_delivery,
    store_message,
    stored,
    verdict_of,
    write_config,
)

ROOT = Path(__file__).resolve().parent.parent
# User agents as recorded in the wild (see ../shared/reference/tracking-pitfalls.md, item 19).
APPLE_MPP = "Mozilla/5.0"
GMAIL_PROXY = "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
YAHOO_PROXY = "YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html"
IPHONE = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
          "Mobile/15E148")
APPLE_CSV = "17.58.0.0/16,US,US-CA,Cupertino,\n172.224.224.0/27,US,US-NY,New York,\n"


def _config(tmp: Path, extra: str = "", store_url: str | None = None):
    (tmp / "apple.csv").write_text(APPLE_CSV)
    (tmp / "scanner-uas.txt").write_text("mimecast: Mimecast\nbarracuda: Barracuda\n")
    return load(tmp, 'trusted_proxies = ["127.0.0.0/8"]\napple_egress_file = "apple.csv"\n'
                     f'scanner_user_agents_file = "scanner-uas.txt"\n{extra}', store_url=store_url)


@pytest.fixture
def listener(tmp_path, store_url):
    server = Listener(_config(tmp_path, store_url=store_url))
    yield server
    server.stop()


def _hit(server: Listener, path: str, ua: str, ip: str, method: str = "GET") -> int:
    return request(server.port, method, path, {"User-Agent": ua, "X-Forwarded-For": ip})[0]


def _verdicts(server: Listener, message_id: str = MID) -> list[tuple[str, str, list[str]]]:
    return [(v["type"], v["verdict"], [r["code"] for r in v["reasons"]]) for v in verdict_of(server.store, message_id)]


def test_recorded_user_agents_get_their_verdicts(listener):
    store_message(listener.store)
    pixel = "/o/" + listener.open_token()
    _hit(listener, pixel, APPLE_MPP, "17.58.10.20")  # Apple Mail Privacy Protection prefetch
    _hit(listener, pixel, APPLE_MPP, "198.51.100.20")  # bare UA, but not from Apple: no claim
    _hit(listener, pixel, GMAIL_PROXY, "66.249.84.10")
    _hit(listener, pixel, YAHOO_PROXY, "98.136.1.1")
    _hit(listener, pixel, IPHONE, "203.0.113.5")
    _hit(listener, pixel, IPHONE, "203.0.113.5", method="HEAD")
    link = "/c/" + listener.click_token("https://shop.example/a")
    _hit(listener, link, CHROME, "40.92.3.4")  # Microsoft Safe Links network (default list)
    _hit(listener, link, "Mozilla/5.0 (compatible; Mimecast-URL-Protect)", "198.51.100.9")
    listener.flush()
    assert _verdicts(listener) == [
        ("Open", "machine", ["apple-mpp"]),
        ("Open", "human", []),
        ("Open", "proxy", ["google-image-proxy"]),
        ("Open", "proxy", ["yahoo-image-proxy"]),
        ("Open", "human", []),
        ("Open", "machine", ["head-request"]),
        ("Click", "machine", ["scanner-network"]),
        ("Click", "machine", ["scanner-user-agent"]),
    ]
    rows = verdict_of(listener.store)
    assert rows[2]["device"]["kind"] == "proxy"
    assert rows[4]["device"] == {"client": "Mobile Safari UI/WKWebView", "os": "iOS 17.1", "kind": "mobile"}
    assert rows[5]["method"] == "HEAD"
    # the raw events stay as SES records them: every hit, with the client's own address and agent
    opens = stored(listener.store, "Open")
    assert [o["open"]["ipAddress"] for o in opens][:2] == ["17.58.10.20", "198.51.100.20"]
    assert all(set(o) == {"eventType", "mail", "open"} for o in opens)
    assert set(opens[0]["open"]) == {"ipAddress", "timestamp", "userAgent"}


def test_click_seconds_after_delivery_is_a_scanner(listener):
    mail = store_message(listener.store)
    store_delivery(listener.store, mail, RCPT, int(time.time() * 1000) - 2000)
    _hit(listener, "/c/" + listener.click_token("https://shop.example/a"), CHROME, "198.51.100.1")
    listener.flush()
    [(kind, verdict, codes)] = _verdicts(listener)
    assert (kind, verdict, codes) == ("Click", "machine", ["early-click"])
    assert "after delivery" in verdict_of(listener.store)[0]["reasons"][0]["detail"]


def test_every_link_clicked_at_once_marks_all_of_them(listener):
    store_message(listener.store)
    for i, url in enumerate(["https://shop.example/a", "https://shop.example/b", "https://shop.example/c"]):
        _hit(listener, "/c/" + listener.click_token(url, i), CHROME, "198.51.100.1")
        listener.flush()  # separate batches: the first clicks are judged again when the burst shows
    assert [v[1:] for v in _verdicts(listener)] == [("machine", ["link-burst"])] * 3


def test_unique_opens_and_click_counts_as_open(listener):
    mid = "0100018c1a2b3c4d-11111111-2222-3333-4444-555555555555-000000"
    rcpts = ("blocked@example.org", "apple@example.org", "gmail@example.org", "nobody@example.org")
    store_message(listener.store, mid, rcpts)
    link = "https://shop.example/a"
    _hit(listener, "/c/" + listener.click_token(link, message_id=mid, recipient=rcpts[0]), CHROME, "198.51.100.1")
    _hit(listener, "/o/" + listener.open_token(mid, rcpts[1]), APPLE_MPP, "17.58.0.1")
    _hit(listener, "/o/" + listener.open_token(mid, rcpts[2]), GMAIL_PROXY, "66.249.84.1")
    _hit(listener, "/o/" + listener.open_token(mid, rcpts[2]), GMAIL_PROXY, "66.249.84.1")
    listener.flush()
    rows = listener.store.query(
        "SELECT recipient, opens, real_opens, clicks, human_clicks, opened, opened_by_click_only"
        " FROM tracking_engagement WHERE message_id = ? ORDER BY recipient", (mid,))
    assert rows == [
        ("apple@example.org", 1, 0, 0, 0, 0, 0),
        ("blocked@example.org", 0, 0, 1, 1, 1, 1),
        ("gmail@example.org", 2, 2, 0, 0, 1, 0),
    ]
    unique = listener.store.query("SELECT COUNT(*) FROM tracking_engagement WHERE message_id = ? AND opened = 1",
                                  (mid,))
    assert unique == [(2,)]


def test_verdicts_recompute_when_lists_change_raw_events_untouched(tmp_path, store_url):
    server = Listener(load(tmp_path, 'trusted_proxies = ["127.0.0.0/8"]', store_url=store_url))  # no Apple list yet
    try:
        store_message(server.store)
        _hit(server, "/o/" + server.open_token(), APPLE_MPP, "17.58.10.20")
        _hit(server, "/c/" + server.click_token("https://shop.example/a"), CHROME, "198.51.100.1")
        server.flush()
        assert [v[1] for v in _verdicts(server)] == ["human", "human"]
        before = server.store.query("SELECT id, record FROM events ORDER BY id")
    finally:
        server.stop()
    cfg = _config(tmp_path, store_url=store_url)
    store = open_store(cfg.store_target)
    try:
        assert recompute_verdicts(store, cfg) == 2
        rows = store.tracking_verdicts(MID)
        assert [(r["verdict"], [x["code"] for x in r["reasons"]]) for r in rows] == [
            ("machine", ["apple-mpp"]), ("human", [])]
        assert store.query("SELECT id, record FROM events ORDER BY id") == before
    finally:
        store.close()


# --- SIGTERM under load ----------------------------------------------------------------------------------

def _load(port: int, paths: list[str], stop_at: float, results: list, limit: int) -> None:
    """Keep-alive GETs (20 per connection) until refused or out of time/count; counts answers and attempts."""
    ok = sent = 0
    conn = None
    while sent < limit and time.monotonic() < stop_at:
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            sent += 1
            conn.request("GET", paths[sent % len(paths)], headers={"User-Agent": CHROME})
            resp = conn.getresponse()
            resp.read()
            if resp.status in (200, 302):
                ok += 1
            if sent % 20 == 0:  # new connections now and then, so every worker gets its share
                conn.close()
                conn = None
        except (OSError, http.client.HTTPException):
            if conn is not None:
                conn.close()
            conn = None
            time.sleep(0.01)
    if conn is not None:
        conn.close()
    results.append((ok, sent))


# On PostgreSQL with two workers only: the two processes writing to one database is the case that differs.
@pytest.mark.parametrize(("workers", "store_target"), [(1, "sqlite"), (2, "sqlite"), (2, "postgresql")],
                         indirect=["store_target"])
def test_no_event_lost_on_sigterm_under_load(tmp_path, workers, store_url):
    port = free_port()
    # a long flush interval keeps plenty of hits buffered in memory when the signal arrives
    path = write_config(tmp_path, f"flush_interval = 0.25\nflush_batch = 100000\nworkers = {workers}",
                        listen=f"127.0.0.1:{port}", store_url=store_url)
    from relay import config as config_module

    cfg = config_module.load(path)
    keyring = cfg.keyring()
    store = open_store(cfg.store_target)
    store_message(store)
    store.close()
    from relay.core import tokens

    now = int(time.time())
    paths = ["/o/" + tokens.sign_open(keyring, MID, RCPT, now),
             "/c/" + tokens.sign_click(keyring, MID, RCPT, now, 0, "https://shop.example/x#y", {})]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    err_path = tmp_path / "track.err"  # a file, not a pipe: read while the workers run
    with open(err_path, "wb") as err_file:
        proc = subprocess.Popen([sys.executable, "-m", "relay.cli", "track", "--config", str(path)], cwd=tmp_path,
                                env=env, stdout=subprocess.DEVNULL, stderr=err_file)
    try:
        deadline = time.monotonic() + 30  # every worker up (on a loaded machine a worker takes seconds)
        while err_path.read_bytes().count(b"relay track: listening") < workers:
            assert proc.poll() is None and time.monotonic() < deadline, err_path.read_text()
            time.sleep(0.05)
        results: list = []
        stop_at = time.monotonic() + 6
        threads = [threading.Thread(target=_load, args=(port, paths, stop_at, results, 3000)) for _ in range(8)]
        for t in threads:
            t.start()
        time.sleep(1.5)  # every worker takes its share of the load
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(10)
        proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = err_path.read_bytes()
    assert proc.returncode == 0, err.decode()
    ok = sum(r[0] for r in results)
    sent = sum(r[1] for r in results)
    with contextlib.closing(db_connection(cfg.store_target)) as db:
        recorded = db.execute("SELECT COUNT(*) FROM events WHERE type IN ('Open', 'Click')").fetchone()[0]
        judged = db.execute("SELECT COUNT(*) FROM tracking_verdicts").fetchone()[0]
    assert ok > 200, (ok, sent, err.decode())
    assert ok <= recorded <= sent, (ok, recorded, sent)
    assert judged == recorded
    # every worker that got as far as serving reports that it lost nothing
    assert err.count(b"relay track: listening") == err.count(b"events written, 0 lost") >= 1, err.decode()
    if workers > 1:  # the extra worker really served
        written = [int(n) for n in re.findall(rb"stopped \(pid \d+\), (\d+) events written", err)]
        assert len(written) == workers and min(written) > 0, err.decode()


def test_reload_takes_new_lists_for_new_hits(tmp_path, store_url):
    server = Listener(load(tmp_path, 'trusted_proxies = ["127.0.0.0/8"]', store_url=store_url))
    try:
        store_message(server.store)
        pixel = "/o/" + server.open_token()
        _hit(server, pixel, APPLE_MPP, "17.58.10.20")
        server.flush()  # verdicts are computed when the buffer is written, with the lists of that moment
        new_cfg = _config(tmp_path, store_url=store_url)  # the same file, now with Apple's list

        async def reload() -> None:
            server.server.reload(new_cfg)

        server.call(reload())
        _hit(server, pixel, APPLE_MPP, "17.58.10.20")
        server.flush()
        assert [v[1:] for v in _verdicts(server)] == [("human", []), ("machine", ["apple-mpp"])]
    finally:
        server.stop()


@pytest.mark.sqlite_only("counts SQLite's virtual-machine steps with its progress handler")
def test_copy_lookups_do_not_grow_with_the_message(tmp_path):
    """The verdict lookups of one copy (its Delivery, its recent clicks) walk the recipient's index to their
    LIMIT: their cost must not grow with the events of the message (a bulk message, a flood of clicks)."""
    from relay import store as store_module

    store = open_store(tmp_path / "relay.sqlite3")
    try:
        mail = store_message(store, recipients=(RCPT, "other@example.org"))
        now = int(time.time() * 1000)
        store_delivery(store, mail, RCPT, now - 600_000)

        def steps(n_clicks: int) -> tuple[int, int]:
            rows = [("Click", events_module.iso_ms(now - 1000 + i % 900), MID, r, "marketing", "{}")
                    for i in range(n_clicks) for r in (RCPT, "other@example.org")]
            store.submit(lambda conn: store_module.insert_events_json(conn, rows)).result()
            conn = sqlite3.connect(store.path)
            counted = [0]
            conn.set_progress_handler(lambda: counted.__setitem__(0, counted[0] + 1), 100)
            assert store_module.copy_delivery_time(conn, MID, RCPT, mail["timestamp"]) is not None
            assert store_module.copy_delivery_time(conn, MID, "other@example.org", mail["timestamp"]) is None
            delivery, counted[0] = counted[0], 0
            clicks = store_module.copy_clicks(conn, MID, RCPT, events_module.iso_ms(now - 5000),
                                              events_module.iso_ms(now), 64)
            assert len(clicks) == 64 and clicks[0][0] < clicks[-1][0]
            conn.close()
            return delivery, counted[0]

        small = steps(100)
        large = steps(5000)  # 100 times more events in the message
        assert large[0] <= small[0] + 2 and large[1] <= small[1] + 2, (small, large)
    finally:
        store.close()


@pytest.mark.parametrize("privacy", [(False, False), (True, True)])
def test_stored_records_are_the_core_records_encoded_whole(store_target, privacy):
    """Records are written from a template per pixel or link: each stored record must be, byte for byte, the
    core's open/click record (scrubbed when privacy asks) encoded whole with the stored mail, whatever the IP,
    User-Agent, link and tags hold (quotes, non-ASCII, control characters, a tag spelling a template slot)."""
    from relay import store as store_module
    from relay.config import PrivacySettings
    from relay.core import tokens, verdicts
    from relay.inspect import scrubber
    from relay.tracking import EventWriter

    store = open_store(store_target)
    try:
        mail = store_message(store)
        writer = EventWriter("123456789012", verdicts.Lists(), verdicts.Thresholds(),
                             read=lambda helper, *args: store.submit(lambda conn: helper(conn, *args)).result())
        writer.scrub = scrubber(PrivacySettings(*privacy))  # as TrackingServer sets it
        odd_ua = 'Mozilla "q" caf\u00e9 \u2028 \\ \x01 \x00ua\x00'
        link = 'https://shop.example/?q="1"&w=caf\u00e9'
        tags = {"campaign": ["\x00ip\x00", "autumn"], 'k"': ["\x00time\x00"]}
        now = int(time.time() * 1000)
        hits = [("Open", "GET", tokens.OpenClaims(MID, RCPT, 0), "2001:db8::7", odd_ua, now),
                ("Click", "GET", tokens.ClickClaims(MID, RCPT, 0, 1, link, tags), "198.51.100.9", odd_ua, now + 1),
                ("Click", "GET", tokens.ClickClaims(MID, RCPT, 0, 2, link, {}), "198.51.100.9", "", now + 2),
                ("Open", "HEAD", tokens.OpenClaims(MID, RCPT, 0), "192.0.2.1", "UA", now + 1003)]
        assert store.submit(writer.prepare(hits)).result() == 4
        expected = [events_module.open_record(mail, now, "2001:db8::7", odd_ua),
                    events_module.click_record(mail, now + 1, "198.51.100.9", odd_ua, link, tags),
                    events_module.click_record(mail, now + 2, "198.51.100.9", "", link, {}),
                    events_module.open_record(mail, now + 1003, "192.0.2.1", "UA")]
        for record in expected:
            writer.scrub(record)
        rows = store.submit(lambda conn: conn.execute(
            "SELECT time, record FROM events WHERE type IN ('Open', 'Click') ORDER BY id").fetchall()).result()
        mail_json = store.submit(lambda conn: store_module.tracking_mail(conn, MID)).result()[0]
        assert json.loads(mail_json) == mail
        for (stamp, text), record in zip(rows, expected, strict=True):
            assert stamp == record[events_module.DETAIL_KEY[record["eventType"]]]["timestamp"]
            assert text == json.dumps(dict(record, mail=json.loads(mail_json)), separators=(",", ":"))
    finally:
        store.close()
