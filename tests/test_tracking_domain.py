"""`relay tracking-domain verify`: resolve through a tiny DNS server on 127.0.0.1, fetch a one-time challenge
through the name from the running listener, remember the verified domain. The command's runs are on SQLite
(most of their time is the listener's answer to an https attempt, the same on either backend); what it stores
is checked on both backends below."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from relay.core.challenge import challenge_answer, make_challenge
from relay.store import Store, open_store
from relay.tracking_domain import tracking_domain_command

from .dnsstub import StubDns
from .test_tracking_helpers import Listener, load, request, write_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def dns_server():
    server = StubDns(a={"track.example.test": "127.0.0.1", "elsewhere.example.test": "127.0.0.1"})
    yield server
    server.close()


def _args(domain: str, config: Path, dns_port: int) -> argparse.Namespace:
    return argparse.Namespace(tracking_domain_command="verify", domain=domain, config=str(config),
                              nameserver="127.0.0.1", port=dns_port)


def test_verify_through_dns_and_listener(tmp_path, dns_server, capsys):
    cfg_path = write_config(tmp_path)
    server = Listener(load(tmp_path))
    try:
        assert not server.store.is_tracking_domain_verified("track.example.test")
        code = tracking_domain_command(_args(f"track.example.test:{server.port}", cfg_path, dns_server.port))
        out = capsys.readouterr()
        assert code == 0, out.err
        assert "verified: track.example.test reaches this tracking listener over http (127.0.0.1)" in out.out
        assert server.store.is_tracking_domain_verified("Track.Example.Test")
        assert server.store.verified_tracking_domains() == {"track.example.test"}
    finally:
        server.stop()


def test_verify_command_line_refuses_what_does_not_reach_us(tmp_path, dns_server):
    cfg_path = write_config(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    stranger = Listener(load(other))  # a tracking listener with other keys: not ours
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run(domain: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "relay.cli", "tracking-domain", "verify", domain, "--config", str(cfg_path),
             "--nameserver", "127.0.0.1", "--port", str(dns_server.port)],
            capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)

    try:
        wrong = run(f"elsewhere.example.test:{stranger.port}")
        assert wrong.returncode == 1 and "does not reach this tracking listener" in wrong.stderr
        missing = run("missing.example.test")
        assert missing.returncode == 1 and "does not resolve" in missing.stderr
        bad = run("bad_name.example.test")
        assert bad.returncode == 1 and "InvalidTrackingOptions" in bad.stderr and "label 'bad_name'" in bad.stderr
    finally:
        stranger.stop()
    store = open_store(load(tmp_path).database_path)
    try:
        assert store.verified_tracking_domains() == set()
    finally:
        store.close()


def test_challenge_is_signed_and_expires(tmp_path):
    keyring = load(tmp_path).keyring()
    token = make_challenge(keyring, 1000)
    assert challenge_answer(keyring, token, 1000) is not None
    assert challenge_answer(keyring, token, 1000 + 301) is None
    assert challenge_answer(keyring, token[:-2] + "AA", 1000) is None
    assert challenge_answer(keyring, "nonsense", 1000) is None
    server = Listener(load(tmp_path))
    try:
        now = int(time.time())
        good = make_challenge(keyring, now)
        status, _, body = request(server.port, "GET", "/.well-known/relay-tracking/" + good)
        assert status == 200
        assert body.split() == [b"relay-tracking", challenge_answer(keyring, good, now).encode(), b"http"]
        assert request(server.port, "GET", "/.well-known/relay-tracking/" + token)[0] == 404
    finally:
        server.stop()


def test_a_verified_domain_is_remembered_once_in_lower_case(store_target):
    store = open_store(store_target)
    try:
        for address, scheme, when in (("127.0.0.1", "http", "2026-11-01T00:00:00.000Z"),
                                      ("192.0.2.7", "https", "2026-11-02T00:00:00.000Z")):  # verified again
            store.submit(Store.verified_domain_work("Track.Example.Test.", address, scheme, when)).result()
        assert store.is_tracking_domain_verified("track.example.test")
        assert store.is_tracking_domain_verified("TRACK.example.test.")
        assert not store.is_tracking_domain_verified("other.example.test")
        assert store.verified_tracking_domains() == {"track.example.test"}
        assert store.query("SELECT verified_at, address, scheme FROM tracking_domains") == [
            ("2026-11-02T00:00:00.000Z", "192.0.2.7", "https")]
    finally:
        store.close()
