"""Sending quotas with real parts: relay as a subprocess (SQLite, and two nodes on one PostgreSQL database),
SMTP clients on 127.0.0.1, an aiosmtpd upstream. Over a quota a message is refused with SES's 454 and nothing
of it is kept; the counters are in the store, so two nodes together never accept more than the quota."""

from __future__ import annotations

import contextlib
import json
import os
import smtplib
import subprocess
import sys
import threading
from collections import Counter

import pytest

from relay.config import hash_password

from .conftest import postgres_database
from .harness import ROOT, RelayProcess, Upstream
from .test_sending_control import send

pytestmark = pytest.mark.timeout(240)
DAILY = "Throttling failure: Daily message quota exceeded."
RATE = "Throttling failure: Maximum sending rate exceeded."


def stored(relay: RelayProcess, set_name: str | None = None) -> int:
    with contextlib.closing(relay.db()) as conn:
        if set_name is None:
            return conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
        return conn.execute("SELECT COUNT(*) FROM messages WHERE configuration_set = ?", (set_name,)).fetchone()[0]


def cli(relay: RelayProcess, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relay.cli", *args, "--config", str(relay.config_path)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)


def test_account_set_and_user_quotas(tmp_path):
    upstream = Upstream().start()
    users = f'[[smtp.users]]\nusername = "app"\npassword_hash = "{hash_password("s3cret")}"'
    quotas = """
[quotas]
max_24_hour_send = 8

[quotas.sets.marketing]
max_send_rate = 3

[quotas.sets.plain]
max_24_hour_send = 2

[quotas.users.app]
max_24_hour_send = 1
"""
    relay = RelayProcess(tmp_path / "r", upstream.port, extra=quotas, smtp_extra=users).start()
    try:
        # a set's rate: four recipients in one message are four in this second
        code, reply = send(relay.smtp_port, "marketing", rcpts=tuple(f"r{i}@example.org" for i in range(4)))
        assert (code, reply) == (454, f"4.7.0 {RATE}")
        assert send(relay.smtp_port, "marketing", rcpts=("a@example.org", "b@example.org"))[0] == 250
        # a set's own day
        assert send(relay.smtp_port, "plain", rcpts=("a@example.org", "b@example.org"))[0] == 250
        assert send(relay.smtp_port, "plain") == (454, f"4.7.0 {DAILY}")
        assert stored(relay, "plain") == 1  # nothing of the refused message is kept
        # an SMTP user's day
        with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=30) as client:
            client.login("app", "s3cret")
            codes = []
            for i in range(2):
                client.mail("news@example.com")
                client.rcpt(f"u{i}@example.org")
                codes.append(client.data(b"Subject: u\r\n\r\nhi\r\n"))
        assert [c for c, _ in codes] == [250, 454] and codes[1][1].decode() == f"4.7.0 {DAILY}"
        # the account's day: 2 + 2 + 1 accepted so far; three more fill it, in single recipients
        for i in range(3):
            assert send(relay.smtp_port, None, rcpts=(f"d{i}@example.org",))[0] == 250
        assert send(relay.smtp_port, None) == (454, f"4.7.0 {DAILY}")
        assert stored(relay) == 6  # six messages held the eight recipients
        shown = json.loads(cli(relay, "account", "show").stdout)["SendQuota"]
        assert shown == {"Max24HourSend": 8, "MaxSendRate": -1, "SentLast24Hours": 8}
    finally:
        relay.stop()
        upstream.stop()


def test_two_nodes_share_one_quota_on_postgresql(tmp_path):
    upstream = Upstream().start()
    quota, per_client = 20, 8
    with postgres_database() as url:
        nodes = [RelayProcess(tmp_path / name, upstream.port, store_url=url, node_id=name,
                              extra=f"[quotas]\nmax_24_hour_send = {quota}\n") for name in ("a", "b")]
        try:
            for n in nodes:
                n.start()
            answers: Counter = Counter()
            lock = threading.Lock()

            def client(port: int, first: int) -> None:
                for i in range(per_client):
                    code, _ = send(port, "marketing", rcpts=(f"n{first + i}@example.org",))
                    with lock:
                        answers[code] += 1

            # two clients per node, all at once: the nodes add to the same counters concurrently
            threads = [threading.Thread(target=client, args=(n.smtp_port, 100 * (2 * k + c)))
                       for k, n in enumerate(nodes) for c in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert answers == Counter({250: quota, 454: 4 * per_client - quota})
            assert stored(nodes[0]) == quota
        finally:
            for n in nodes:
                n.stop()
    upstream.stop()
