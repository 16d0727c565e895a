"""Benchmark of the inspection views (issue 8) on a generated database of N events (default 10 million).

    python3 bench/bench_views.py [--events 10000000] [--db /tmp/relay-bench.sqlite3] [--keep]

Generation: the events table is filled without its indexes (executemany, 200k rows per transaction), then
relay's own schema builds every index and view, as on a real upgrade. Shape: 3 configuration sets, 60 days,
200k recipient addresses; per copy a Send, then a Delivery (97 %), Bounce (2 %) or DeliveryDelay (1 %);
30 % of copies opened 1-3 times, 5 % clicked on one of 20 links; each open and click has a verdict row.
Records are short SES-shaped JSON (real ones carry the full mail object and are larger, which only matters
for json_extract over many rows).
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay import store as store_module  # noqa: E402
from relay.inspect import roll_recipients, rollup  # noqa: E402
from relay.store import LINK_CLICKS, RECIPIENTS_BY_SEEKS, open_store  # noqa: E402
from relay.store.schema import BASELINE  # noqa: E402
from relay.store.sqlite import connect as sqlite_connect  # noqa: E402

SETS = ("marketing", "transactional", "newsletter")
DAYS = 60
RECIPIENTS = 200_000
LINKS = [f"https://shop.example.com/p/{i}" for i in range(20)]
VERDICTS = ("human", "human", "proxy", "machine")
BATCH = 200_000
RUNS = 5  # each query's median of this many runs, after one to warm the page cache


def iso(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def copy_events(rng: random.Random, n: int, start: datetime) -> list[tuple]:
    """The events of copy n: (type, time, message_id, recipient, set, record, verdict or None)."""
    cs = SETS[n % len(SETS)]
    rcpt = f"user{rng.randrange(RECIPIENTS)}@example.org"
    sent = start + timedelta(seconds=rng.uniform(0, DAYS * 86400 - 3 * 86400))
    mid = f"0100{int(sent.timestamp() * 1000):012x}-{n:08x}-0000-0000-0000-000000000000-000000"
    mail = {"messageId": mid, "timestamp": iso(sent), "destination": [rcpt], "tags": {"ses:configuration-set": [cs]}}
    out = [("Send", iso(sent), mid, rcpt, cs, {"eventType": "Send", "mail": mail, "send": {}}, None)]
    t = sent + timedelta(seconds=rng.uniform(1, 30))
    roll = rng.random()
    if roll < 0.02:
        kind = "Permanent" if rng.random() < 0.7 else "Transient"
        out.append(("Bounce", iso(t), mid, rcpt, cs, {"eventType": "Bounce", "mail": mail,
                                                      "bounce": {"bounceType": kind, "bounceSubType": "General"}},
                    None))
        return out
    if roll < 0.03:
        out.append(("DeliveryDelay", iso(t), mid, rcpt, cs, {"eventType": "DeliveryDelay", "mail": mail,
                                                             "deliveryDelay": {"delayType": "MailboxFull"}}, None))
        t += timedelta(hours=1)
    out.append(("Delivery", iso(t), mid, rcpt, cs, {"eventType": "Delivery", "mail": mail,
                                                    "delivery": {"smtpResponse": "250 ok"}}, None))
    if rng.random() < 0.30:
        for _ in range(rng.randint(1, 3)):
            t += timedelta(seconds=rng.uniform(5, 86400))
            out.append(("Open", iso(t), mid, rcpt, cs, {"eventType": "Open", "mail": mail, "open": {
                "ipAddress": "192.0.2.1", "timestamp": iso(t), "userAgent": "Mozilla/5.0"}}, rng.choice(VERDICTS)))
    if rng.random() < 0.05:
        link = rng.choice(LINKS)
        for _ in range(rng.randint(1, 2)):
            t += timedelta(seconds=rng.uniform(5, 3600))
            out.append(("Click", iso(t), mid, rcpt, cs, {"eventType": "Click", "mail": mail, "click": {
                "ipAddress": "192.0.2.1", "timestamp": iso(t), "userAgent": "Mozilla/5.0", "link": link,
                "linkTags": {"slot": ["hero"]}}}, rng.choice(VERDICTS[:2] + ("machine",))))
    return out


def generate(path: Path, total: int, seed: int = 8) -> datetime:
    rng = random.Random(seed)
    start = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=DAYS - 1)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")
    # the events table alone: its indexes are built after the bulk load
    conn.execute(next(s for s in BASELINE if "CREATE TABLE IF NOT EXISTS events (" in s))
    conn.execute("CREATE TABLE IF NOT EXISTS tracking_verdicts (event_id INTEGER PRIMARY KEY, method TEXT NOT NULL,"
                 " verdict TEXT NOT NULL, reasons TEXT NOT NULL, client TEXT, os TEXT, device TEXT,"
                 " computed_at TEXT NOT NULL)")
    next_id, n = 1, 0
    while next_id <= total:
        events, verdicts = [], []
        while len(events) < BATCH and next_id <= total:
            for kind, when, mid, rcpt, cs, record, verdict in copy_events(rng, n, start):
                if next_id > total:
                    break
                events.append((next_id, kind, when, mid, rcpt, cs, json.dumps(record, separators=(",", ":"))))
                if verdict:
                    verdicts.append((next_id, "GET", verdict, "[]", "Chrome", "Linux", "desktop", when))
                next_id += 1
            n += 1
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO events (id, type, time, message_id, recipient, configuration_set, record)"
                         " VALUES (?,?,?,?,?,?,?)", events)
        conn.executemany("INSERT INTO tracking_verdicts VALUES (?,?,?,?,?,?,?,?)", verdicts)
        conn.execute("COMMIT")
    conn.close()
    open_store(path).close()  # the rest of the schema, its indexes and views, as on a real upgrade
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("ANALYZE")
    conn.close()
    return start


def timed(conn: sqlite3.Connection, sql: str, params: tuple = ()) -> tuple[float, int]:
    t0 = time.perf_counter()
    rows = conn.execute(sql, params).fetchall()
    return time.perf_counter() - t0, len(rows)


def median_ms(conn: sqlite3.Connection, sql: str, params: tuple = ()) -> tuple[float, int]:
    timed(conn, sql, params)  # warm the page cache: the figure is the steady state of a running system
    runs = [timed(conn, sql, params) for _ in range(RUNS)]
    return statistics.median(r[0] for r in runs) * 1000, runs[0][1]


def queries(start: datetime) -> list[tuple[str, str, tuple]]:
    week = (start + timedelta(days=DAYS - 7)).strftime("%Y-%m-%d")
    month = (start + timedelta(days=DAYS - 30)).strftime("%Y-%m-%d")
    return [
        ("funnel: one set, last 7 days", "SELECT * FROM funnel_daily WHERE configuration_set = ? AND day >= ?"
         " ORDER BY day", ("marketing", week)),
        ("funnel: one set, today (live, not rolled up)", "SELECT * FROM funnel_daily WHERE configuration_set = ?"
         " AND day = ?", ("marketing", (start + timedelta(days=DAYS - 1)).strftime("%Y-%m-%d"))),
        ("funnel: one set, one day", "SELECT * FROM funnel_daily WHERE configuration_set = ? AND day = ?",
         ("marketing", week)),
        ("links: one set, all time", "SELECT * FROM link_clicks WHERE configuration_set = ?"
         " ORDER BY clicks DESC LIMIT 20", ("marketing",)),
        ("  baseline: one pass over the set's clicks (link_clicks before link_rollup)", LINK_CLICKS.format(
            where="AND e.configuration_set = ?") + " ORDER BY clicks DESC LIMIT 20", ("marketing",)),
        ("links: one set, last 7 days (relay stats --by link)", LINK_CLICKS.format(
            where="AND e.time >= ? AND e.configuration_set = ?") + " ORDER BY clicks DESC", (week, "marketing")),
        ("recipient: one address", "SELECT * FROM recipient_engagement WHERE recipient = ?",
         ("user4242@example.org",)),
        ("  baseline: by seeks (recipient_engagement before recipient_rollup)",
         f"SELECT * FROM ({RECIPIENTS_BY_SEEKS}) WHERE recipient = ?", ("user4242@example.org",)),
        ("recipients: engaged in the last 30 days (whole list)", "SELECT recipient FROM recipient_engagement"
         " WHERE last_engaged >= ?", (month,)),
        ("  baseline: by seeks (recipient_engagement before recipient_rollup)",
         f"SELECT recipient FROM ({RECIPIENTS_BY_SEEKS}) WHERE last_engaged >= ?", (month,)),
        ("timeline: one message", "SELECT * FROM message_timeline WHERE message_id ="
         " (SELECT message_id FROM events WHERE id = 5000000 % (SELECT MAX(id) FROM events) + 1) ORDER BY event_id",
         ()),
    ]


def unrolled(conn: sqlite3.Connection, start: datetime) -> None:
    """The whole-list and one-address queries with the newest events not rolled up yet (at 10M events in 60
    days): a quarter of an hour is what a running relay leaves (rolled every 5 minutes, 10 minutes' grace);
    a day, what a relay stopped for a day has until its first rollup at start. Rolled back."""
    month = (start + timedelta(days=DAYS - 30)).strftime("%Y-%m-%d")
    top = conn.execute("SELECT MAX(id) FROM events").fetchone()[0]
    for label, behind in (("15 minutes", top // (DAYS * 96)), ("1 hour", top // (DAYS * 24)), ("1 day", top // DAYS)):
        conn.execute("BEGIN")
        conn.execute("UPDATE recipient_rollup_mark SET last_event_id = last_event_id - ?", (behind,))
        ms, rows = median_ms(conn, "SELECT recipient FROM recipient_engagement WHERE last_engaged >= ?", (month,))
        one, _ = median_ms(conn, "SELECT * FROM recipient_engagement WHERE recipient = ?", ("user4242@example.org",))
        conn.execute("ROLLBACK")
        print(f"{ms:9.1f} ms  {rows:7d} rows  recipients: engaged in 30 days, {behind:,} events ({label}) not rolled"
              f" up; one address {one:.2f} ms", flush=True)


def writes(conn: sqlite3.Connection, start: datetime) -> None:
    """Bare inserts of events into the full database (batches of 2,000, rolled back), one chunk of the
    recipient rollup, and one purge chunk of 5,000 ids with and without rolled-up recipients to take out."""
    rng = random.Random(9)
    rows = [(kind, when, mid, rcpt, cs, json.dumps(record, separators=(",", ":")))
            for n in range(10_000_000, 10_008_000) for kind, when, mid, rcpt, cs, record, _v
            in copy_events(rng, n, start)][:20_000]
    conn.execute("BEGIN")
    t0 = time.perf_counter()
    for i in range(0, len(rows), 2000):
        store_module.insert_events_json(conn, rows[i:i + 2000])
    rate = len(rows) / (time.perf_counter() - t0)
    conn.execute("ROLLBACK")
    print(f"inserts: {rate:,.0f} events/s ({len(rows):,} events, batches of 2,000)", flush=True)
    mark = store_module.recipient_mark(conn)
    conn.execute("BEGIN")
    conn.execute("UPDATE recipient_rollup_mark SET last_event_id = ?", (mark - 5000,))
    t0 = time.perf_counter()
    store_module.roll_recipients(conn, mark - 5000, mark)  # once more: only the time matters, rolled back
    ms = (time.perf_counter() - t0) * 1000
    conn.execute("ROLLBACK")
    print(f"recipient rollup: one chunk of 5,000 event ids in {ms:.0f} ms (one short store work)", flush=True)
    cutoff = iso(start + timedelta(days=30))
    for label, mark in (("recipients rolled up", None), ("baseline: none rolled up", 0)):
        conn.execute("BEGIN")
        if mark is not None:
            conn.execute("UPDATE recipient_rollup_mark SET last_event_id = ?", (mark,))
        t0 = time.perf_counter()
        deleted, _more = store_module.purge_events_chunk(conn, cutoff, 5000)
        ms = (time.perf_counter() - t0) * 1000
        conn.execute("ROLLBACK")
        print(f"purge: one chunk of 5,000 ids ({deleted:,} events deleted) in {ms:.0f} ms ({label})", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--db", default="/tmp/relay-bench-views.sqlite3")
    parser.add_argument("--keep", action="store_true", help="reuse an existing database of that path")
    args = parser.parse_args()
    path = Path(args.db)
    if path.exists() and args.keep:
        conn = sqlite3.connect(path, isolation_level=None)
        first = conn.execute("SELECT MIN(time) FROM events").fetchone()[0]
        conn.close()
        start = datetime.strptime(first[:10], "%Y-%m-%d").replace(tzinfo=UTC)
    else:
        for suffix in ("", "-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)
        t0 = time.perf_counter()
        start = generate(path, args.events)
        print(f"generated {args.events:,} events in {time.perf_counter() - t0:.1f} s ({path})", flush=True)
    store = open_store(path)  # replaces the views of an older relay with this one's
    t0 = time.perf_counter()
    moved = roll_recipients(store)  # the first time: every event; then what came in since the last hour
    print(f"recipient rollup of {moved:,} event ids in {time.perf_counter() - t0:.1f} s", flush=True)
    t0 = time.perf_counter()
    days = rollup(store)  # what the running relay does hourly: closed days of the funnel and links, computed once
    store.close()
    print(f"funnel and link rollups of {days} closed days in {time.perf_counter() - t0:.1f} s", flush=True)
    conn = sqlite_connect(path)  # relay's own SQLite connection: the store's helpers read its dialect
    print(f"median of {RUNS} runs each:", flush=True)
    for name, sql, params in queries(start):
        ms, rows = median_ms(conn, sql, params)
        print(f"{ms:9.1f} ms  {rows:7d} rows  {name}", flush=True)
    unrolled(conn, start)
    writes(conn, start)
    conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
