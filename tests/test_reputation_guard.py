"""The reputation guard with real bounces: relay as a subprocess, an aiosmtpd upstream answering `550 5.1.1` for
unknown users, a webhook destination of the set. The guard does nothing before the set's minimum volume, pauses
the set at its threshold (the refusal names the rate), tells the set's destinations, logs it, counts it in the
metrics; `relay config-set resume` resumes it with a fresh start. On SQLite and on PostgreSQL (where events are
summed once settled, ten seconds on)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import urllib.request

import pytest

from relay.core import control as core

from .conftest import postgres_database
from .harness import ROOT, RelayProcess, Upstream, free_port, wait_port
from .test_destinations import Receiver, wait_until
from .test_sending_control import send

MIN_VOLUME = 10


def guard_toml(hook_port: int, metrics_port: int) -> str:
    return f"""
[configuration_sets.guarded]
[[configuration_sets.guarded.destinations]]
name = "ops"
type = "webhook"
url = "http://127.0.0.1:{hook_port}/ops"
event_types = ["DELIVERY"]

[reputation]
check_interval = "0.2s"
window = "1h"
min_volume = {MIN_VOLUME}
bounce_rate = 0.2

[metrics]
listen = "127.0.0.1:{metrics_port}"
"""


def cli(relay: RelayProcess, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relay.cli", *args, "--config", str(relay.config_path)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)


def reputation(relay: RelayProcess) -> dict:
    out = cli(relay, "stats", "--by", "reputation", "--config-set", "guarded", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)[0]


def summed(relay: RelayProcess, column: str) -> int:
    with contextlib.closing(relay.db()) as conn:
        return conn.execute(f"SELECT COALESCE(SUM({column}), 0) FROM send_statistics"
                            " WHERE configuration_set = 'guarded'").fetchone()[0]


def sending(relay: RelayProcess) -> dict:
    return json.loads(cli(relay, "config-set", "show", "guarded").stdout)["Sending"]


@pytest.fixture(params=["sqlite", "postgresql"])
def guarded(tmp_path, request):
    upstream = Upstream().start()
    upstream.handler.refuse = {f"gone{i}@example.org" for i in range(20)}
    hook = Receiver().start()
    metrics_port = free_port()
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(postgres_database()) if request.param == "postgresql" else None
        relay = RelayProcess(tmp_path / "r", upstream.port, extra=guard_toml(hook.port, metrics_port),
                             store_url=url).start()
        try:
            wait_port(metrics_port, proc=relay.proc)
            yield relay, hook, metrics_port
        finally:
            relay.stop()
            hook.stop()
            upstream.stop()


def test_the_guard_waits_for_the_minimum_volume_then_pauses_the_set_and_says_why(guarded):
    relay, hook, metrics_port = guarded
    for i in range(MIN_VOLUME - 1):
        assert send(relay.smtp_port, "guarded", rcpts=(f"gone{i}@example.org",))[0] == 250
    relay.wait_events("Bounce", MIN_VOLUME - 1)
    wait_until(lambda: reputation(relay)["permanent"] == MIN_VOLUME - 1, 60, what="the bounces summed")
    for _ in range(5):  # every pass sees 100 % bounces, but below the minimum volume
        assert sending(relay)["SendingEnabled"] is True
    assert relay.events("SendingPaused") == []

    assert send(relay.smtp_port, "guarded", rcpts=(f"gone{MIN_VOLUME}@example.org",))[0] == 250
    wait_until(lambda: sending(relay)["SendingEnabled"] is False, 60, what="the set paused")
    code, reply = send(relay.smtp_port, "guarded", rcpts=("fine@example.org",))
    assert code == 554, reply
    assert reply.startswith(f"Message rejected: {core.SET_PAUSED} Configuration set <guarded>: bounce rate 100 %"
                            f" ({MIN_VOLUME} permanent bounces of {MIN_VOLUME} messages in 1h) reached the"
                            " threshold of 20 %"), reply
    state = sending(relay)
    assert state["ChangedBy"] == core.GUARD and state["History"][0]["ChangedBy"] == core.GUARD
    assert "reputation guard paused configuration set guarded: bounce rate 100 %" in relay.log()

    record = json.loads(relay.events("SendingPaused")[0][4])
    assert record["eventType"] == "SendingPaused"
    assert record["sendingPaused"]["bounceRate"] == 1.0 and record["sendingPaused"]["changedBy"] == core.GUARD
    wait_until(lambda: any(b"SendingPaused" in got[1] for got in hook.got), what="the destination told")
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    assert 'relay_set_sending_enabled{configuration_set="guarded"} 0.0' in metrics
    assert 'relay_sets_paused_total{configuration_set="guarded"} 1.0' in metrics
    assert 'relay_reputation_bounce_rate{configuration_set="guarded"} 1.0' in metrics

    out = cli(relay, "config-set", "resume", "guarded", "--reason", "unknown addresses removed")
    assert out.returncode == 0, out.stderr
    assert send(relay.smtp_port, "guarded", rcpts=("fine@example.org",))[0] == 250
    wait_until(lambda: summed(relay, "delivered") == 1, 60, what="the delivery summed")
    for _ in range(3):  # the old bounces are before its fresh start: the guard passes over them
        assert sending(relay)["SendingEnabled"] is True
    wait_until(lambda: any(b"SendingResumed" in got[1] for got in hook.got), what="the destination told")
