"""Benchmark of the web console: each page's answer time on the database of bench/bench_views.py.

    python3 bench/bench_console.py [--events 10000000] [--db /tmp/relay-bench-views.sqlite3] [--keep] [--runs 5]

The database is bench_views.py's (3 sets, 60 days, 200k addresses; built here, or reused with --keep) with its
rollups brought up to date, as a running relay keeps them. The console runs in this process on 127.0.0.1 (its
aiohttp server, the store's reads in worker threads) and each page is fetched over HTTP with a session: the
figure is the median of --runs fetches after one that warms the page cache, the whole answer (queries,
template, transfer). The generated events thin out over the last three days (no copy is sent then), so the
hourly and "today" pages are also timed on a full day in the middle of the data, and once more with that day
not rolled up (computed from its events, as the running relay computes today).
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_views import SETS, generate  # noqa: E402

from relay import config as config_module  # noqa: E402
from relay.config import hash_password  # noqa: E402
from relay.console import ConsoleServer  # noqa: E402
from relay.inspect import roll_recipients, rollup  # noqa: E402
from relay.store import open_store  # noqa: E402

BUDGET_MS = 300.0
PASSWORD = "bench-console-pw"


def pages(start: datetime, message_id: str, recipient: str) -> list[tuple[str, str]]:
    dense = (start + timedelta(days=30)).strftime("%Y-%m-%d")
    week = (start + timedelta(days=24)).strftime("%Y-%m-%d")
    return [
        ("overview, every set, last 7 days (default)", "/"),
        ("overview, every set, last 30 days", "/?range=30d"),
        ("overview, every set, last 90 days", "/?range=90d"),
        ("overview, one set, last 7 days", "/?set=marketing"),
        ("overview, every set, a full day by hour", f"/?from={dense}&to={dense}&by=hour"),
        ("overview, one set, a full day by hour", f"/?set=marketing&from={dense}&to={dense}&by=hour"),
        ("overview, every set, 7 full days", f"/?from={week}&to={dense}"),
        ("set, last 7 days", "/sets/marketing"),
        ("set, 7 full days", f"/sets/marketing?from={week}&to={dense}"),
        ("set, last 90 days", "/sets/marketing?range=90d"),
        ("messages, by recipient", f"/messages?by=recipient&q={recipient}&range=90d"),
        ("messages, by time (a full day)", f"/messages?by=time&from={dense}&to={dense}"),
        ("message", f"/messages/{message_id}"),
        ("queue", "/queue"),
        ("destinations", "/destinations"),
        ("suppression list", "/suppression"),
        ("reputation, last 30 days", "/reputation"),
        ("data: overview as JSON", "/data/overview?range=30d"),
    ]


class Console:
    """The console on its own event loop in a thread, over the bench database."""

    def __init__(self, db: Path):
        cfg = config_module.parse({
            "console": {"listen": "127.0.0.1:0",
                        "users": [{"username": "bench", "password_hash": hash_password(PASSWORD), "role": "admin"}]},
            "configuration_sets": {name: {} for name in SETS},
        }, Path(tempfile.mkdtemp()))
        self.store = open_store(db)
        self.server = ConsoleServer(lambda: cfg, self.store)
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(30)
        self.base = f"http://127.0.0.1:{self.server.port}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.store.close()


async def timings(base: str, wanted: list[tuple[str, str]], runs: int) -> list[tuple[str, float, int, int]]:
    """(name, median ms, status, bytes) of each page, fetched with a logged-in session."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        async with http.get(base + "/login") as r:
            await r.read()
        token = next(c.value for c in http.cookie_jar if c.key == "relay_console_login")
        async with http.post(base + "/login", data={"username": "bench", "password": PASSWORD, "csrf": token},
                             headers={"Origin": base}, allow_redirects=False) as r:
            assert r.status == 303, await r.text()
        out = []
        for name, path in wanted:
            times, status, size = [], 0, 0
            for i in range(runs + 1):
                t0 = time.perf_counter()
                async with http.get(base + path, allow_redirects=False) as r:
                    body = await r.read()
                    status, size = r.status, len(body)
                if i:  # the first warms the page cache
                    times.append(time.perf_counter() - t0)
            out.append((name, statistics.median(times) * 1000, status, size))
    return out


def baselines(db: Path, start: datetime, runs: int) -> None:
    """The console's reads beside the plain queries on the views they replace, in the same run: funnel_daily of
    every set at once (the planner bounds the live part by the range's first day, not by the rollup mark) and
    the set's links of the range from its clicks (link_rows: every click of the range, no rollup)."""
    from relay.inspect import iso
    from relay.store import console as reads
    from relay.store import link_rows

    store = open_store(db)
    first, last = (start + timedelta(days=1)).strftime("%Y-%m-%d"), (start + timedelta(days=59)).strftime("%Y-%m-%d")
    pairs = [
        ("funnel of every set, 59 days", lambda c: reads.funnel_days(c, reads.EVERY_SET, first, last),
         lambda c: c.execute("SELECT * FROM funnel_daily WHERE day >= ? AND day <= ?", (first, last)).fetchall()),
        ("links of one set, 59 days", lambda c: reads.link_range_rows(c, "marketing", first, last),
         lambda c: link_rows(c, "marketing", iso(datetime.strptime(first, "%Y-%m-%d").replace(tzinfo=UTC)))),
    ]
    print(f"\nreads, median of {runs} (ms): the console's / the plain view query it replaces")
    for name, ours, plain in pairs:
        medians = []
        for read in (ours, plain):
            store.read(read)
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                store.read(read)
                times.append(time.perf_counter() - t0)
            medians.append(statistics.median(times) * 1000)
        print(f"{medians[0]:9.1f} / {medians[1]:9.1f}  {name}", flush=True)
    store.close()


def report(rows: list[tuple[str, float, int, int]], label: str) -> None:
    print(f"\n{label}")
    for name, ms, status, size in rows:
        flag = "" if ms < BUDGET_MS and status == 200 else "  <-- over 300 ms" if status == 200 else f"  <-- {status}"
        print(f"{ms:9.1f} ms  {size / 1024:7.1f} KiB  {name}{flag}", flush=True)


def sample(db: Path, start: datetime) -> tuple[str, str]:
    conn = sqlite3.connect(db)
    try:
        mid, rcpt = conn.execute("SELECT message_id, recipient FROM events WHERE type = 'Click' AND time >= ?"
                                 " ORDER BY time LIMIT 1", ((start + timedelta(days=30)).isoformat(),)).fetchone()
        return mid, rcpt
    finally:
        conn.close()


def with_day_live(db: Path, day: str):
    """The rollup marks moved back before `day` (so that day is computed from its events, as today is), and
    put back after."""
    conn = sqlite3.connect(db, isolation_level=None)
    saved = conn.execute("SELECT id, day FROM funnel_rollup_mark").fetchall()
    before = (datetime.strptime(day, "%Y-%m-%d") - timedelta(days=1)).strftime("%Y-%m-%d")
    conn.execute("UPDATE funnel_rollup_mark SET day = ?", (before,))
    conn.close()

    def restore() -> None:
        c = sqlite3.connect(db, isolation_level=None)
        c.executemany("UPDATE funnel_rollup_mark SET day = ? WHERE id = ?", [(d, i) for i, d in saved])
        c.close()
    return restore


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--db", default="/tmp/relay-bench-views.sqlite3")
    parser.add_argument("--keep", action="store_true", help="reuse an existing database of that path")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    db = Path(args.db)
    if db.exists() and args.keep:
        conn = sqlite3.connect(db)
        first = conn.execute("SELECT MIN(time) FROM events").fetchone()[0]
        conn.close()
        start = datetime.strptime(first[:10], "%Y-%m-%d").replace(tzinfo=UTC)
    else:
        for suffix in ("", "-wal", "-shm"):
            Path(str(db) + suffix).unlink(missing_ok=True)
        t0 = time.perf_counter()
        start = generate(db, args.events)
        print(f"generated {args.events:,} events in {time.perf_counter() - t0:.1f} s ({db})", flush=True)
    store = open_store(db)
    t0 = time.perf_counter()
    roll_recipients(store)
    days = rollup(store)  # what the running relay keeps up to date hourly
    store.close()
    print(f"rollups brought up to date ({days} days) in {time.perf_counter() - t0:.1f} s", flush=True)
    events = sqlite3.connect(db).execute("SELECT COUNT(*) FROM events").fetchone()[0]
    message_id, recipient = sample(db, start)
    wanted = pages(start, message_id, recipient)
    baselines(db, start, args.runs)
    console = Console(db)
    try:
        rows = asyncio.run(timings(console.base, wanted, args.runs))
        report(rows, f"{events:,} events; median of {args.runs} fetches each (budget {BUDGET_MS:.0f} ms):")
        dense = (start + timedelta(days=30)).strftime("%Y-%m-%d")
        restore = with_day_live(db, dense)
        try:
            live = [(f"{name} [{dense} not rolled up]", path) for name, path in wanted
                    if dense in path]
            rows = asyncio.run(timings(console.base, live, args.runs))
            report(rows, f"the same with {dense} computed from its events (as today is, until its rollup):")
        finally:
            restore()
    finally:
        console.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
