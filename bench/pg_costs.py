"""PostgreSQL's side of bench_relay.py: a fresh database per run, the CPU time of the server processes that
served it, PostgreSQL's own counters around it, and the model that turns per-message costs into how many relay
nodes one database server carries.

Everything here reads what PostgreSQL and Linux already count: pg_stat_database (transactions and rows of the
run's database), the WAL insert position (bytes of WAL), pg_stat_wal (WAL flushes and full-page images, PG 14+),
the next transaction id (write transactions), pg_database_size, and /proc/PID/stat for CPU time (only when the
server runs on this machine).

The model ("on paper"): a database server runs out of one of three things first.
- CPU: its cores × 1000 ms per second, over the backends' CPU ms per message.
- WAL volume: the bytes per second its WAL disk sustains beside the checkpoints that write the same pages again,
  over the WAL bytes per message.
- WAL flushes: with synchronous_commit on, every writing transaction waits for a flush of the WAL; a node's
  group commit already folds many messages into one, and counting one flush per writing transaction ignores
  PostgreSQL sharing a flush between nodes' concurrent commits (so this limit is pessimistic). A node's batches
  grow with its load, so writing transactions per message measured on nodes short of their limit (several nodes
  sharing this machine's cores) overstate what saturated nodes cost.
The smallest of the three, in messages per second, over what one relay node delivers (one Python process: about
one core, so 1000 / its CPU ms per message) is the number of nodes one server carries.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import psycopg

CLK_TCK = os.sysconf("SC_CLK_TCK")
# A backend that falls idle publishes the counters of its last transactions only PGSTAT_IDLE_INTERVAL (10 s)
# later: the run's "before" waits that out after the nodes listen, so their start-up (schema check, views
# replaced: hundreds of catalog rows) is not counted as the run's.
SETTLE_S = 11.0
SAMPLE_S = 0.25  # how often backends that come and go during a run (pool growth, autovacuum) are looked at
# The schema, made by the relay being measured (as its first node would) in a process of its own: its backend
# exits, so its counters are published before the run starts.
MAKE_SCHEMA = "import sys; from relay.store import open_store; open_store(sys.argv[1]).close()"


def database_url(server_url: str, name: str) -> str:
    """`server_url` with its database replaced by `name` (user, host, port and parameters kept; written out by
    hand because urllib drops the `//` of a URL without a host, postgresql:///db?host=/run/postgresql)."""
    parts = urlsplit(server_url)
    return f"{parts.scheme}://{parts.netloc}/{name}" + (f"?{parts.query}" if parts.query else "")


def unreachable(server_url: str) -> str | None:
    """Why the bench cannot use the server (first line of psycopg's error), or None."""
    try:
        psycopg.connect(server_url, connect_timeout=5).close()
    except psycopg.Error as exc:
        return str(exc).strip().splitlines()[0]
    return None


# --- CPU time from /proc ----------------------------------------------------------------------------------------

def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name: [state, ppid, ...]; None when the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()


def _command(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/comm").read_text().strip()
    return ""


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far; None when it is gone."""
    fields = _stat_fields(pid)
    return None if fields is None else (int(fields[11]) + int(fields[12])) / CLK_TCK


def local_postmaster(backend_pid: int) -> int | None:
    """The postmaster's pid when the server runs on this machine (the backend is a process here, named postgres,
    whose parent is too); None for a remote server, whose CPU this bench cannot see."""
    fields = _stat_fields(backend_pid)
    if fields is None or _command(backend_pid) != "postgres":
        return None
    parent = int(fields[1])
    return parent if _command(parent) == "postgres" else None


def server_cpu_seconds(postmaster: int) -> float:
    """CPU time of the whole server: the postmaster, every live child (backends, WAL writer, checkpointer,
    autovacuum) and every child that already exited (the kernel adds those to the postmaster's cutime/cstime)."""
    fields = _stat_fields(postmaster) or ["0"] * 15
    total = sum(int(fields[i]) for i in (11, 12, 13, 14)) / CLK_TCK
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            child = _stat_fields(int(entry.name))
            if child is not None and child[1] == str(postmaster):
                total += (int(child[11]) + int(child[12])) / CLK_TCK
    return total


class BackendCpu:
    """CPU time of the backends serving one database during a run: those alive at the start, and those that
    come and go meanwhile (a pool connection opened under load, an autovacuum worker), looked at every SAMPLE_S;
    one that ends between two looks loses only what it spent since the last."""

    def __init__(self, server_url: str, dbname: str):
        self.dbname = dbname
        self.conn = psycopg.connect(server_url, autocommit=True)  # in the server's own database, not the run's
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _backends(self) -> list[int]:
        return [r[0] for r in self.conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s",
                                                (self.dbname,))]

    def _look(self, baseline: bool) -> None:
        for pid in self._backends():
            cpu = process_cpu_seconds(pid)
            if cpu is not None:
                # a backend born during the run spent all its CPU time in it
                self.first.setdefault(pid, cpu if baseline else 0.0)
                self.last[pid] = cpu

    def _watch(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self._look(baseline=False)

    def start(self) -> None:
        self._look(baseline=True)
        self._thread.start()

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self._look(baseline=False)
        self.conn.close()
        return sum(self.last[pid] - self.first[pid] for pid in self.last)


# --- PostgreSQL's counters ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Counters:
    """What PostgreSQL counts, read at one moment. The first five are the run's database's own; the WAL figures
    and transaction ids are the whole server's (so `other_rows` says how much other databases wrote)."""

    transactions: int  # committed and rolled back, reads included (each autocommit SELECT is one)
    inserted: int
    updated: int
    deleted: int
    database_bytes: int  # pg_database_size: deleted rows (a delivered message's body) hold space until vacuum
    wal_bytes: int  # the WAL insert position
    wal_flushes: int | None  # pg_stat_wal.wal_sync (PostgreSQL 14+)
    wal_full_pages: int | None  # pg_stat_wal.wal_fpi: whole pages logged after a checkpoint
    next_xid: int  # only writing transactions take an id
    other_rows: dict[int, int]  # rows written so far by each other database, by oid


COUNTERS_SQL = """
SELECT d.xact_commit + d.xact_rollback, d.tup_inserted, d.tup_updated, d.tup_deleted, pg_database_size(d.datid),
       pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint, {wal_sync}, {wal_fpi},
       pg_snapshot_xmax(pg_current_snapshot())::text::bigint
FROM pg_stat_database d {wal_from} WHERE d.datname = %s
"""


def read_counters(conn: psycopg.Connection, dbname: str) -> Counters:
    with_wal = conn.info.server_version >= 140000  # pg_stat_wal came with PostgreSQL 14
    sql = COUNTERS_SQL.format(wal_sync="w.wal_sync" if with_wal else "NULL",
                              wal_fpi="w.wal_fpi" if with_wal else "NULL",
                              wal_from=", pg_stat_wal w" if with_wal else "")
    row = conn.execute(sql, (dbname,)).fetchone()
    others = conn.execute("SELECT datid, tup_inserted + tup_updated + tup_deleted FROM pg_stat_database"
                          " WHERE datname IS DISTINCT FROM %s", (dbname,)).fetchall()
    return Counters(*row, other_rows=dict(others))


def other_activity(before: Counters, after: Counters) -> tuple[int, int]:
    """(rows other databases wrote between the two readings, databases created or dropped meanwhile)."""
    rows = sum(after.other_rows[d] - before.other_rows.get(d, 0) for d in after.other_rows)
    return rows, len(set(before.other_rows) ^ set(after.other_rows))


def costs_per_message(before: Counters, after: Counters, messages: int, own_reads: int = 0) -> dict[str, float]:
    """Per delivered message: the run's database's transactions and rows, the server's WAL and write
    transactions, and the database's growth. `own_reads`: transactions the bench itself ran on the database."""

    def per(a: int | None, b: int | None) -> float:
        return math.nan if a is None or b is None else (b - a) / max(1, messages)

    rows, databases = other_activity(before, after)
    return {
        "pg_transactions": per(before.transactions + own_reads, after.transactions),
        "pg_write_transactions": per(before.next_xid, after.next_xid),
        "pg_inserted": per(before.inserted, after.inserted),
        "pg_updated": per(before.updated, after.updated),
        "pg_deleted": per(before.deleted, after.deleted),
        "pg_wal_bytes": per(before.wal_bytes, after.wal_bytes),
        "pg_wal_flushes": per(before.wal_flushes, after.wal_flushes),
        "pg_wal_full_pages": per(before.wal_full_pages, after.wal_full_pages),
        "pg_growth_bytes": per(before.database_bytes, after.database_bytes),
        "pg_other_rows": float(rows),
        "pg_other_databases": float(databases),
    }


# --- one run's database -------------------------------------------------------------------------------------------

class PostgresRun:
    """A run's own database on the server: made with relay's schema, watched around the run, dropped after.

        with PostgresRun(server_url, root) as pg:   # pg.url goes into every node's [store] url
            ...start the nodes...; pg.begin()
            ...the load, until pg.queued() == 0...; cpu = pg.cpu_per_message(delivered)
            ...stop the nodes...; costs = pg.costs_per_message(delivered)
    """

    def __init__(self, server_url: str, root: Path):
        self.server_url, self.root = server_url, root
        self.name = f"relay_bench_{uuid.uuid4().hex[:12]}"
        self.url = database_url(server_url, self.name)
        self.admin: psycopg.Connection | None = None
        self.watch: psycopg.Connection | None = None  # in the run's database, for the queue's length
        self.own_reads = 0
        self.postmaster: int | None = None

    def __enter__(self) -> PostgresRun:
        self.admin = psycopg.connect(self.server_url, autocommit=True)
        self.admin.execute(f"CREATE DATABASE {self.name}")
        try:
            subprocess.run([sys.executable, "-c", MAKE_SCHEMA, self.url], cwd=self.root, check=True,
                           env={**os.environ, "PYTHONPATH": str(self.root)})
        except BaseException:
            self.__exit__()
            raise
        self.postmaster = local_postmaster(self.admin.info.backend_pid)
        return self

    def __exit__(self, *exc) -> None:
        if self.watch is not None:
            self.watch.close()
        self.admin.execute(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")
        self.admin.close()

    def begin(self) -> None:
        """The start of the measured window: the nodes listen and their start-up is published."""
        self.watch = psycopg.connect(self.url, autocommit=True)  # first: its own start is published meanwhile
        time.sleep(SETTLE_S)
        self.before = read_counters(self.admin, self.name)
        self.backends = BackendCpu(self.server_url, self.name) if self.postmaster else None
        if self.backends is not None:
            self.backends.start()
        self.server_before = server_cpu_seconds(self.postmaster) if self.postmaster else math.nan

    def queued(self) -> int:
        self.own_reads += 1  # subtracted from the database's transactions
        return self.watch.execute("SELECT COUNT(*) FROM recipients WHERE state = 'queued'").fetchone()[0]

    def cpu_per_message(self, delivered: int) -> dict[str, float]:
        """CPU ms per message of the backends that served the run, and of the whole server (its background
        processes and other clients' backends too)."""
        if self.backends is None:
            return {"cpu_pg_ms": math.nan, "cpu_pg_server_ms": math.nan}
        backends = self.backends.stop()
        server = server_cpu_seconds(self.postmaster) - self.server_before
        return {"cpu_pg_ms": 1000 * backends / max(1, delivered), "cpu_pg_server_ms": 1000 * server / max(1, delivered)}

    def costs_per_message(self, delivered: int) -> dict[str, float]:
        """Once the nodes stopped: their backends publish their counters as they exit, so wait for them."""
        self.watch.close()
        self.watch = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.admin.execute(
                "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = %s", (self.name,)).fetchone()[0]:
            time.sleep(0.05)
        after = read_counters(self.admin, self.name)
        return costs_per_message(self.before, after, delivered, self.own_reads)


# --- on paper ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ServerCapacity:
    """What one database server sustains (see the module's docstring for the model)."""

    cores: float
    wal_bytes_s: float
    flushes_s: float

    def describe(self) -> str:
        return f"{self.cores:g} cores, {self.wal_bytes_s / 1e6:g} MB/s of WAL, {self.flushes_s:g} WAL flushes/s"


def server_limits(costs: dict[str, float], capacity: ServerCapacity) -> dict[str, float]:
    """Messages per second one server carries, resource by resource (NaN where the cost is unknown)."""

    def over(available: float, per_message: float) -> float:
        if math.isnan(per_message):
            return math.nan
        return math.inf if per_message <= 0 else available / per_message

    return {
        "CPU": over(capacity.cores * 1000, costs["cpu_pg_ms"]),
        "WAL volume": over(capacity.wal_bytes_s, costs["pg_wal_bytes"]),
        "WAL flushes": over(capacity.flushes_s, costs["pg_write_transactions"]),
    }


def nodes_carried(limits: dict[str, float], node_rate: float) -> tuple[float, str]:
    """How many nodes of `node_rate` msg/s one server carries, and the resource that runs out first."""
    known = {name: rate for name, rate in limits.items() if not math.isnan(rate)}
    if not known or not node_rate or math.isnan(node_rate):
        return math.nan, "unknown"
    binding = min(known, key=known.get)
    return known[binding] / node_rate, binding


def print_model(capacity: ServerCapacity) -> None:
    print(f"  on paper: one PostgreSQL server ({capacity.describe()}) carries the least of {capacity.cores:g}"
          " × 1000 / PostgreSQL's CPU ms per message (CPU), WAL bytes/s / WAL bytes per message (WAL volume) and"
          " flushes/s / writing transactions per message (WAL flushes, one each: pessimistic) in msg/s; a node"
          " delivers 1000 / its CPU ms per message (one Python process: one core)")


def print_paper(label: str, row: dict[str, float], capacity: ServerCapacity) -> None:
    """The per-message costs of one PostgreSQL setup and what they mean for one server."""
    kb = 1024
    flushes, full_pages = row["pg_wal_flushes"], row["pg_wal_full_pages"]
    flushed = "" if math.isnan(flushes) else f", {flushes:.2f} WAL flushes on the server"
    pages = "" if math.isnan(full_pages) else f" ({full_pages:.2f} full-page images)"
    print(f"  on paper, {label}, per delivered message: {row['pg_transactions']:.2f} transactions"
          f" ({row['pg_write_transactions']:.2f} writing{flushed}), rows {row['pg_inserted']:.1f} inserted,"
          f" {row['pg_updated']:.1f} updated, {row['pg_deleted']:.1f} deleted; WAL {row['pg_wal_bytes'] / kb:.1f} KB"
          f"{pages}, database +{row['pg_growth_bytes'] / kb:.1f} KB (deleted rows too, until vacuum)")
    limits = server_limits(row, capacity)
    shown = ", ".join(f"{name} {rate:.0f}" for name, rate in limits.items() if not math.isnan(rate))
    node_rate = 1000 / row["cpu_server_ms"] if row["cpu_server_ms"] > 0 else math.nan
    nodes, binding = nodes_carried(limits, node_rate)
    print(f"    one server carries msg/s: {shown}; a node (one core: 1000 /"
          f" {row['cpu_server_ms']:.2f} ms) delivers {node_rate:.0f} msg/s, so one server carries {nodes:.1f}"
          f" nodes, bound by {binding}")
    if row["pg_other_rows"] or row["pg_other_databases"]:
        print(f"    NOTE: meanwhile other databases on the server wrote {row['pg_other_rows']:.0f} rows"
              f" ({row['pg_other_databases']:.0f} created or dropped): WAL, writing transactions and whole-server"
              " CPU include their work")
