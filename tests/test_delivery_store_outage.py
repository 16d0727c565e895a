"""The store cannot write (a full disk) while the upstream accepts: no copy is sent twice, every outcome lands.

The full disk is RLIMIT_FSIZE lowered to 0 on the running relay (`prlimit`, as the util-linux tool does): every
write to a file fails (EFBIG; SQLite reports "disk I/O error", for ENOSPC "database or disk is full": both are
sqlite3.OperationalError), and raising the limit again is the operator freeing space. Relay's output goes
through a pipe (not subject to the limit) so its log lines during the outage are kept. The full disk is SQLite's
own failure (PostgreSQL going away is tests/test_nodes.py's); the queue's handling of a write that fails runs
on both backends, each failing with its own driver's error.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import signal
import smtplib
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import IO

import psycopg
import pytest

from relay.core.outcome import DELIVERED, Outcome
from relay.pipeline import OutcomeNotRecorded
from relay.queue import DeliveryQueue
from relay.store import open_store

from .harness import ROOT, RelayProcess, Upstream, UpstreamHandler, free_port, wait_port

MESSAGES = 6
CONCURRENCY = 2


class PipedRelay(RelayProcess):
    """A relay whose output reaches relay.log through a pipe this process copies."""

    def start(self) -> PipedRelay:
        self.write_config()
        cmd = [sys.executable, "-m", "relay.cli", "serve", "--config", str(self.config_path)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=self.workdir,
                                     env={**os.environ, "PYTHONPATH": str(ROOT), **self.env})
        threading.Thread(target=copy_lines, args=(self.proc.stdout, self.workdir / "relay.log"), daemon=True).start()
        wait_port(self.smtp_port, proc=self.proc)
        return self


def copy_lines(source: IO[bytes], path: Path) -> None:
    with open(path, "ab") as log:
        for line in source:
            log.write(line)
            log.flush()


class GatedHandler(UpstreamHandler):
    """Holds each DATA until `gate` opens, counting the copies held."""

    def __init__(self):
        super().__init__()
        self.gate = threading.Event()
        self.held = 0

    async def handle_DATA(self, server, session, envelope):
        self.held += 1
        while not self.gate.is_set():
            await asyncio.sleep(0.02)
        return await super().handle_DATA(server, session, envelope)


def disk_full(pid: int, full: bool) -> None:
    """Only the soft limit moves: no privilege is needed to raise it again."""
    soft = 0 if full else resource.RLIM_INFINITY
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (soft, resource.RLIM_INFINITY))


def submit(port: int, count: int) -> list[str]:
    ids = []
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test")
        for n in range(count):
            client.mail("app@example.com")
            client.rcpt(f"r{n}@example.org")
            code, reply = client.data(b"From: app@example.com\r\nSubject: m%d\r\n\r\nhello\r\n" % n)
            assert code == 250, reply
            ids.append(reply.decode().split()[1])
    return ids


def upstream_ids(upstream: Upstream) -> Counter:
    return Counter(re.search(rb" id (\S+)", m.data).group(1).decode() for m in upstream.messages)


def unrecorded_gauge(metrics_port: int) -> float | None:
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    m = re.search(r"^relay_delivery_outcomes_unrecorded (\S+)$", body, re.M)
    return float(m.group(1)) if m else None


def states(relay: RelayProcess) -> Counter:
    with contextlib.closing(relay.db()) as conn:
        return Counter(state for (state,) in conn.execute("SELECT state FROM recipients"))


def wait_until(check, timeout: float, what: str, relay: RelayProcess):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(sqlite3.OperationalError):
            if check():
                return
        time.sleep(0.05)
    raise TimeoutError(f"{what}\n{relay.log()[-4000:]}")


@pytest.fixture
def outage(tmp_path):
    """Relay (2 delivery slots) with 6 accepted messages, 2 of them held at the upstream's DATA, and a full disk."""
    upstream = Upstream()
    upstream.handler = GatedHandler()
    upstream.start()
    metrics_port = free_port()
    relay = PipedRelay(tmp_path / "r", upstream.port, delivery={"concurrency": CONCURRENCY},
                       extra=f'\n[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n').start()
    try:
        ids = submit(relay.smtp_port, MESSAGES)
        wait_until(lambda: upstream.handler.held == CONCURRENCY, 10, "copies held at the upstream", relay)
        disk_full(relay.proc.pid, True)
        upstream.handler.gate.set()  # the upstream accepts the two copies in flight
        upstream.wait_for(CONCURRENCY)
        yield relay, upstream, ids, metrics_port
    finally:
        if relay.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                disk_full(relay.proc.pid, False)
        relay.stop()
        upstream.stop()


@pytest.mark.sqlite_only("a full disk through the SQLite file's size limit")
def test_a_full_disk_holds_the_outcomes_and_sends_no_copy_twice(outage):
    relay, upstream, ids, metrics_port = outage
    time.sleep(4)  # three writes refused (after 1 s, 2 s, 4 s)
    assert len(upstream.messages) == CONCURRENCY, "a copy started while outcomes could not be written"
    assert unrecorded_gauge(metrics_port) == CONCURRENCY
    assert f"{CONCURRENCY} delivery outcome(s) wait for the store (disk I/O error)" in relay.log()
    # one line per round of writes (0 s, 1 s, 3 s), not one per outcome: REPORT_EVERY_S
    assert 2 <= relay.log().count("wait for the store (") <= 4

    disk_full(relay.proc.pid, False)  # the operator frees space
    wait_until(lambda: states(relay) == Counter({DELIVERED: MESSAGES}), 60, "every outcome recorded", relay)
    assert len(relay.events("Delivery")) == MESSAGES
    assert upstream_ids(upstream) == Counter(dict.fromkeys(ids, 1))  # each copy reached the upstream once
    assert unrecorded_gauge(metrics_port) == 0
    assert "the store took the outcome of" in relay.log()


@pytest.mark.sqlite_only("a full disk through the SQLite file's size limit")
def test_a_crash_while_outcomes_wait_sends_those_copies_again_after_restart(outage):
    """At-least-once stays: outcomes held in memory die with the process; the store still lists the copies."""
    relay, upstream, ids, _ = outage
    wait_until(lambda: "wait for the store" in relay.log(), 10, "outcomes waiting", relay)
    relay.proc.send_signal(signal.SIGKILL)
    relay.proc.wait()
    relay.proc = None
    relay.start()
    wait_until(lambda: states(relay) == Counter({DELIVERED: MESSAGES}), 60, "every outcome recorded", relay)
    sent = upstream_ids(upstream)
    assert set(sent) == set(ids) and sorted(sent.values()) == [1] * (MESSAGES - CONCURRENCY) + [2] * CONCURRENCY


# --- the queue on its own: which write failures wait ------------------------------------------------------------

def failing_work(error: Exception, failures: int, calls: list):
    """A recipient outcome's write that fails `failures` times with `error`, then succeeds."""

    def work(conn) -> None:
        calls.append(time.monotonic())
        if len(calls) <= failures:
            raise error

    return work


async def run_queue(store_target: Path | str, error: Exception, failures: int) -> tuple[list, list, int]:
    """One copy whose outcome's write fails; a second copy queued behind it. Returns (write calls, deliveries,
    outcomes waiting seen while the first write was failing)."""
    store = open_store(store_target)
    calls: list[float] = []
    delivered: list[str] = []

    async def deliver(msg, recipient: str, attempts: int) -> Outcome:
        delivered.append(recipient)
        outcome = Outcome(DELIVERED, "2.0.0", "smtp; 250 ok")
        if recipient == "first@example.org":
            work = failing_work(error, failures, calls)
            try:
                await store.write(work)
            except Exception as exc:
                raise OutcomeNotRecorded(outcome, work, exc) from exc
        return outcome

    queue = DeliveryQueue(store, deliver, concurrency=1, store_retry_s=(0.05, 0.2))
    from relay.core.settings import TrackingSettings
    from relay.pipeline import QueuedMessage

    msg = QueuedMessage("m1", "a@example.com", b"x", {}, None, TrackingSettings(False, False, ""), 0)
    await queue.start()
    queue.add(msg, ["first@example.org", "second@example.org"])
    waiting = 0
    for _ in range(200):
        waiting = max(waiting, queue.unrecorded)
        if len(delivered) == 2 and queue.unrecorded == 0:
            break
        if queue.unrecorded:  # the second copy does not start while the first outcome waits
            assert delivered == ["first@example.org"]
        await asyncio.sleep(0.01)
    await queue.stop()
    store.close()
    return calls, delivered, waiting


def database_error(store_target: Path | str) -> Exception:
    """What the backend's driver raises when the database cannot take a write for now."""
    if isinstance(store_target, str):
        return psycopg.OperationalError("server closed the connection unexpectedly")
    return sqlite3.OperationalError("disk I/O error")


def test_a_store_error_is_written_again_until_it_passes(store_target):
    calls, delivered, waiting = asyncio.run(run_queue(store_target, database_error(store_target), 3))
    assert len(calls) == 4 and delivered == ["first@example.org", "second@example.org"] and waiting == 1
    gaps = [b - a for a, b in zip(calls, calls[1:], strict=False)]
    assert gaps[0] >= 0.04 and gaps[-1] >= 0.15  # backoff: 0.05 s, 0.1 s, 0.2 s


def test_a_fault_in_the_record_itself_is_not_retried_and_does_not_hold_the_queue(store_target):
    calls, delivered, waiting = asyncio.run(run_queue(store_target, TypeError("not serialisable"), 100))
    assert len(calls) == 1 and delivered == ["first@example.org", "second@example.org"] and waiting == 0
