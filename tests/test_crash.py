"""Failure tests: kill -9 under load, and a full disk. Every message answered 250 must be delivered."""

from __future__ import annotations

import re
import resource
import signal
import smtplib
import threading
import time
from collections import Counter

import pytest

from .harness import RelayProcess, Upstream

CLIENTS = 6
MAX_MESSAGES = 5000  # bounded load
MAX_SECONDS = 60
KILL_AFTER = 2000


def message(n: int, size: int = 2000) -> bytes:
    body = (b"x" * 76 + b"\r\n") * (size // 78)
    return b"From: load@example.com\r\nTo: sink@example.org\r\nSubject: load %d\r\n\r\n" % n + body


def load(port: int, stop: threading.Event, accepted: list[str], counter, lock: threading.Lock) -> None:
    try:
        client = smtplib.SMTP("127.0.0.1", port, timeout=10)
        client.ehlo("load")
        while not stop.is_set():
            with lock:
                n = next(counter)
            if n >= MAX_MESSAGES:
                return
            client.mail("load@example.com")
            client.rcpt("sink@example.org")
            code, reply = client.data(message(n))
            if code == 250:
                with lock:
                    accepted.append(reply.decode().split()[1])
    except (OSError, smtplib.SMTPException):
        return  # the relay was killed under us: whatever was not answered 250 is the client's to retry


def relay_ids(upstream: Upstream) -> list[str]:
    return [re.search(rb" id (\S+)", m.data).group(1).decode() for m in upstream.messages]


def test_kill_9_under_load_loses_nothing(tmp_path):
    upstream = Upstream().start()
    relay = RelayProcess(tmp_path / "r", upstream.port).start()
    stop, lock, accepted = threading.Event(), threading.Lock(), []
    counter = iter(range(10**9))
    threads = [threading.Thread(target=load, args=(relay.smtp_port, stop, accepted, counter, lock))
               for _ in range(CLIENTS)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + MAX_SECONDS
        while len(accepted) < KILL_AFTER and time.monotonic() < deadline:
            time.sleep(0.01)
        relay.proc.send_signal(signal.SIGKILL)  # mid-load: deliveries and acceptances in flight
        relay.proc.wait()
        stop.set()
        for t in threads:
            t.join(15)
        acked = set(accepted)
        assert len(acked) >= KILL_AFTER, "load did not get going"
        relay.start()
        deadline = time.monotonic() + 90
        while not acked <= set(relay_ids(upstream)) and time.monotonic() < deadline:
            time.sleep(0.1)
        delivered = Counter(relay_ids(upstream))
        lost = acked - set(delivered)
        twice = sum(1 for n in delivered.values() if n > 1)
        print(f"\nkill -9 under load: {len(acked)} answered 250, {len(lost)} lost, {twice} delivered twice")
        assert not lost
    finally:
        stop.set()
        relay.stop()
        upstream.stop()


def limit_file_size() -> None:
    # Python ignores SIGXFSZ, so a write past this limit fails with EFBIG, as it would on a full disk.
    resource.setrlimit(resource.RLIMIT_FSIZE, (3 * 1024 * 1024, 3 * 1024 * 1024))


@pytest.mark.sqlite_only("a full disk through the SQLite file's size limit")
def test_full_disk_answers_4xx_never_250(tmp_path):
    upstream = Upstream().start()
    upstream.handler.delay = 3.0  # a slow upstream: the spool fills faster than it drains
    relay = RelayProcess(tmp_path / "r", upstream.port, delivery={"concurrency": 1})
    relay.preexec = limit_file_size
    relay.start()
    codes, accepted = [], []
    try:
        with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=30) as client:
            client.ehlo("x")
            for n in range(40):
                client.mail("load@example.com")
                client.rcpt("sink@example.org")
                code, reply = client.data(message(n, size=200_000))
                codes.append(code)
                if code == 250:
                    accepted.append(reply.decode().split()[1])
                else:
                    assert code == 451, (code, reply)
                    break
        assert 451 in codes, f"the limit was never reached: {codes}"
        assert relay.proc.poll() is None, "relay died on a full disk"
        relay.stop()
        upstream.handler.delay = 0
        relay.preexec = None
        relay.start()
        deadline = time.monotonic() + 60
        while not set(accepted) <= set(relay_ids(upstream)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert set(accepted) <= set(relay_ids(upstream))
    finally:
        relay.stop()
        upstream.stop()
