"""bench/pg_costs.py, the PostgreSQL side of bench/bench_relay.py: the model's arithmetic, and with a real relay
node on the real server, that a run's counters hold the run's rows and nothing of the node's start-up."""

from __future__ import annotations

import contextlib
import math
import smtplib
import sys
import time

import psycopg
import pytest

from .conftest import PG_ADMIN_URL, postgres_unavailable
from .harness import ROOT, RelayProcess, Upstream

sys.path.insert(0, str(ROOT / "bench"))
from pg_costs import (  # noqa: E402
    Counters,
    PostgresRun,
    ServerCapacity,
    costs_per_message,
    database_url,
    nodes_carried,
    server_limits,
)


def counters(transactions=0, inserted=0, wal_bytes=0, flushes: int | None = 0, next_xid=0, others=None) -> Counters:
    return Counters(transactions, inserted, 0, 0, 1000, wal_bytes, flushes, flushes, next_xid, others or {1: 5})


def test_database_url_replaces_only_the_database():
    assert database_url("postgresql://u:pw@db.example.com:6432/postgres?sslmode=require", "b") == \
        "postgresql://u:pw@db.example.com:6432/b?sslmode=require"
    assert database_url("postgresql:///postgres?host=/run/postgresql", "b") == "postgresql:///b?host=/run/postgresql"
    assert database_url("postgres://127.0.0.1", "b") == "postgres://127.0.0.1/b"


def test_costs_per_message_subtract_the_benchs_own_reads_and_say_what_is_unknown():
    before = counters(transactions=10, inserted=100, wal_bytes=1000, flushes=None, next_xid=50, others={1: 5, 2: 7})
    after = counters(transactions=40, inserted=300, wal_bytes=41000, flushes=None, next_xid=60, others={1: 9, 3: 1})
    costs = costs_per_message(before, after, messages=20, own_reads=10)
    assert costs["pg_transactions"] == 1.0  # (40 - 10 - 10) / 20
    assert costs["pg_inserted"] == 10.0
    assert costs["pg_wal_bytes"] == 2000.0
    assert costs["pg_write_transactions"] == 0.5
    assert math.isnan(costs["pg_wal_flushes"])  # PostgreSQL 13: no pg_stat_wal
    assert costs["pg_other_rows"] == 5  # database 1 wrote 4, database 3 (new) 1
    assert costs["pg_other_databases"] == 2  # 2 dropped, 3 created


def test_the_server_carries_the_least_of_its_limits_over_a_nodes_rate():
    capacity = ServerCapacity(cores=8, wal_bytes_s=60e6, flushes_s=1000)
    costs = {"cpu_pg_ms": 2.0, "pg_wal_bytes": 30_000.0, "pg_write_transactions": 0.25}
    limits = server_limits(costs, capacity)
    assert limits == {"CPU": 4000.0, "WAL volume": 2000.0, "WAL flushes": 4000.0}
    assert nodes_carried(limits, node_rate=250.0) == (8.0, "WAL volume")
    # a remote server: its CPU is unknown, the other limits still decide
    unknown_cpu = server_limits({**costs, "cpu_pg_ms": math.nan}, capacity)
    assert math.isnan(unknown_cpu["CPU"])
    assert nodes_carried(unknown_cpu, node_rate=250.0) == (8.0, "WAL volume")
    assert math.isnan(nodes_carried(limits, node_rate=math.nan)[0])


def relay_rows(url: str) -> int:
    """Rows in every table of relay's schema."""
    with contextlib.closing(psycopg.connect(url, autocommit=True)) as conn:
        tables = [r[0] for r in conn.execute("SELECT relname FROM pg_stat_user_tables")]
        return sum(conn.execute(f'SELECT COUNT(*) FROM "{t}"').fetchone()[0] for t in tables)


def rows_inserted_outside_catalogs(url: str) -> int:
    """What PostgreSQL counts as inserted into relay's tables (TOAST included), leaving out its own catalogs."""
    with contextlib.closing(psycopg.connect(url, autocommit=True)) as conn:
        return conn.execute("SELECT SUM(n_tup_ins) FROM pg_stat_all_tables"
                            " WHERE schemaname NOT IN ('pg_catalog', 'information_schema')").fetchone()[0]


@pytest.mark.timeout(120)
def test_a_run_counts_its_own_rows_and_not_the_node_start_up(tmp_path):
    """A node replaces the inspection views when it starts (hundreds of catalog rows inserted and deleted), and
    PostgreSQL publishes an idle backend's counters up to 10 s late: none of that may land in the run, whose
    inserted rows are all relay's. And rows inserted less rows deleted is exactly what relay's tables gained."""
    reason = postgres_unavailable()
    if reason:
        pytest.skip(reason)
    upstream = Upstream().start()
    with PostgresRun(PG_ADMIN_URL, ROOT) as pg:
        node = RelayProcess(tmp_path / "node", upstream.port, store_url=pg.url, node_id="bench0").start()
        try:
            pg.begin()
            rows_before, relay_inserted_before = relay_rows(pg.url), rows_inserted_outside_catalogs(pg.url)
            sent = 30
            with smtplib.SMTP("127.0.0.1", node.smtp_port, timeout=30) as client:
                for n in range(sent):
                    client.sendmail("load@example.com", ["sink@example.org"],
                                    b"From: load@example.com\r\nSubject: %d\r\n\r\nhello\r\n" % n)
            upstream.wait_for(sent)
            deadline = time.monotonic() + 20
            while pg.queued() and time.monotonic() < deadline:
                time.sleep(0.05)
            cpu = pg.cpu_per_message(sent)
        finally:
            node.stop()
        costs = pg.costs_per_message(sent)
        gained = relay_rows(pg.url) - rows_before
        relay_inserted = rows_inserted_outside_catalogs(pg.url) - relay_inserted_before
    upstream.stop()
    assert round(costs["pg_inserted"] * sent) == relay_inserted, "rows of PostgreSQL's catalogs counted"
    assert round((costs["pg_inserted"] - costs["pg_deleted"]) * sent) == gained
    assert costs["pg_inserted"] >= 4  # at least the message, its recipient copy, its Send and Delivery events
    assert costs["pg_transactions"] > 0 and costs["pg_wal_bytes"] > 0
    if pg.postmaster is not None:  # the server runs on this machine
        assert cpu["cpu_pg_ms"] > 0 and cpu["cpu_pg_server_ms"] > 0
