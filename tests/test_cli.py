"""The `relay` command as an operator meets it: one-line errors naming the key or path (tracebacks only with -v),
RELAY_CONFIG for every subcommand, --version and --help, `relay events tail --since`, and `relay instrument`
reading the set and the recipient from the message. Every command runs as a subprocess of this checkout."""

from __future__ import annotations

import json
import os
import smtplib
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from relay import __version__

from .harness import ROOT, RelayProcess, Upstream, config_text, free_port

HTML = (b"From: News <news@example.com>\r\nTo: Ann <ann@example.org>, bob@example.org\r\nSubject: Hi\r\n"
        b"X-SES-CONFIGURATION-SET: marketing\r\nContent-Type: text/html\r\n\r\n"
        b'<html><body><a href="https://shop.example.com/sale">Sale</a></body></html>\r\n')


def relay_cli(*args: str, env: dict | None = None, stdin: bytes | None = None, cwd: Path | None = None,
              timeout: float = 60) -> subprocess.CompletedProcess:
    """`relay ARGS` from this checkout, with RELAY_CONFIG unset unless `env` sets it."""
    base = {k: v for k, v in os.environ.items() if k != "RELAY_CONFIG"}
    return subprocess.run([sys.executable, "-m", "relay.cli", *args], input=stdin, capture_output=True,
                          timeout=timeout, cwd=cwd or ROOT, env={**base, "PYTHONPATH": str(ROOT), **(env or {})})


def config_file(tmp_path: Path, smtp_port: int | None = None, tracking_port: int | None = None,
                extra: str = "") -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(config_text(tmp_path / "data", smtp_port or free_port(), tracking_port or free_port(), None,
                                extra=extra))
    return path


def listening_socket() -> socket.socket:
    """A port some other program holds."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def stderr_lines(done: subprocess.CompletedProcess) -> list[str]:
    text = done.stderr.decode() if isinstance(done.stderr, bytes) else done.stderr
    return text.strip().splitlines()


# --- one line per operator error ------------------------------------------------------------------------------

@pytest.mark.parametrize("listener", ["smtp", "tracking"])
def test_a_port_in_use_is_one_line_naming_the_key(tmp_path, listener):
    with listening_socket() as taken:
        port = taken.getsockname()[1]
        cfg = config_file(tmp_path, **{f"{listener}_port": port})
        done = relay_cli("serve", "--config", str(cfg), timeout=60)
    assert done.returncode == 1
    assert stderr_lines(done) == [f"error: {listener}.listen: 127.0.0.1:{port}: address already in use"
                                  f" (`ss -ltnp 'sport = :{port}'` shows by what)"], done.stderr


def test_a_keys_file_that_cannot_be_read_is_one_line_and_the_traceback_comes_with_v(tmp_path):
    (tmp_path / "keys").mkdir()  # a folder where the keys file should be: read() fails as for a bad mode
    cfg = config_file(tmp_path, extra="")
    cfg.write_text(cfg.read_text().replace("[tracking]\n", f'[tracking]\nkeys_file = "{tmp_path}/keys"\n', 1))
    done = relay_cli("serve", "--config", str(cfg))
    assert done.returncode == 1
    assert stderr_lines(done) == [f"error: tracking.keys_file: {tmp_path}/keys: Is a directory"], done.stderr
    verbose = relay_cli("serve", "-v", "--config", str(cfg))
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr.decode()
    assert stderr_lines(verbose)[-1] == stderr_lines(done)[0]


def test_a_data_dir_that_cannot_be_made_is_one_line(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    cfg = tmp_path / "relay.toml"
    cfg.write_text(config_text(tmp_path / "file" / "data", free_port(), free_port(), None))
    done = relay_cli("serve", "--config", str(cfg))
    assert done.returncode == 1
    assert stderr_lines(done) == [f"error: relay.data_dir: {tmp_path}/file/data: {tmp_path}/file is not a folder"]


def test_a_missing_configuration_file_is_one_line(tmp_path):
    done = relay_cli("stats", "--config", str(tmp_path / "nowhere.toml"))
    assert done.returncode == 1
    assert stderr_lines(done) == [f"error: {tmp_path}/nowhere.toml: No such file or directory"]


# --- RELAY_CONFIG, --version, --help --------------------------------------------------------------------------

def test_every_subcommand_takes_its_configuration_from_relay_config(tmp_path):
    cfg = config_file(tmp_path)
    env = {"RELAY_CONFIG": str(cfg)}
    for args in (["check"], ["config-set", "list"], ["suppression", "list"], ["tracking", "show", "--sender",
                                                                               "news@example.com"]):
        done = relay_cli(*args, env=env)
        assert done.returncode == 0, (args, done.stderr)
    done = relay_cli("instrument", env=env, stdin=HTML)
    assert done.returncode == 0, done.stderr
    assert b"/c/" in done.stdout
    without = relay_cli("check")
    assert without.returncode == 2 and b"--config" in without.stderr


def test_every_config_option_falls_back_on_the_default(monkeypatch):
    from relay.cli import _parsers, build_parser

    monkeypatch.setenv("RELAY_CONFIG", "/srv/relay.toml")
    options = [a for p in _parsers(build_parser()) for a in p._actions if "--config" in a.option_strings]
    assert len(options) > 25  # every subcommand that reads a configuration
    assert all(a.default == "/srv/relay.toml" and not a.required for a in options)


def test_default_configuration_is_relay_config_else_the_system_file(tmp_path):
    from relay.config import default_config_path

    system = tmp_path / "relay.toml"
    assert default_config_path({}, system) is None
    system.write_text("")
    assert default_config_path({}, system) == str(system)
    assert default_config_path({"RELAY_CONFIG": "/x.toml"}, system) == "/x.toml"


def test_version_and_help_for_an_operator():
    done = relay_cli("--version")
    assert done.returncode == 0 and done.stdout.decode().strip() == f"relay {__version__}"
    text = relay_cli("--help").stdout.decode()
    description = text.split("\n\n")[1]
    assert description.startswith("relay: an SMTP relay") and "function" not in description
    assert "relay init" in text and "RELAY_CONFIG" in text


# --- relay events tail --since ----------------------------------------------------------------------------------

def test_first_event_since_finds_the_boundary():
    from relay.inspect import first_event_since

    times = ["2026-11-01T00:00:00.000Z", "2026-11-01T00:10:00.000Z", "2026-11-01T01:00:00.000Z",
             "2026-11-01T02:00:00.000Z"]  # ids 1..4
    lookups = []

    def time_of(after: int) -> str | None:
        lookups.append(after)
        return times[after] if after < len(times) else None

    assert first_event_since(time_of, 4, "2026-11-01T00:30:00.000Z") == 2  # events 3 and 4
    assert first_event_since(time_of, 4, "2026-10-01T00:00:00.000Z") == 0  # everything
    assert first_event_since(time_of, 4, "2026-12-01T00:00:00.000Z") == 4  # nothing yet
    assert first_event_since(time_of, 0, "2026-11-01T00:30:00.000Z") == 0  # no events at all
    assert len(lookups) <= 3 * 3


def test_events_tail_since_shows_recent_history_then_follows(tmp_path):
    upstream = Upstream().start()
    relay = RelayProcess(tmp_path, upstream_port=upstream.port).start()
    try:
        with smtplib.SMTP("127.0.0.1", relay.smtp_port) as s:
            s.sendmail("news@example.com", ["ann@example.org"], HTML)
        relay.wait_events("Delivery", 1)
        tail = ["events", "tail", "--config", str(relay.config_path), "--json", "--interval", "0.1"]
        follow = subprocess.Popen([sys.executable, "-m", "relay.cli", *tail, "--since", "1h", "--count", "3"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            history = [json.loads(follow.stdout.readline()) for _ in range(2)]  # at once, before anything new
            assert [(r["eventType"], r["mail"]["destination"]) for r in history] == [
                ("Send", ["ann@example.org"]), ("Delivery", ["ann@example.org"])]
            with smtplib.SMTP("127.0.0.1", relay.smtp_port) as s:
                s.sendmail("news@example.com", ["bob@example.org"], HTML)
            out, err = follow.communicate(timeout=30)
        finally:
            if follow.poll() is None:
                follow.kill()
                follow.wait()
        assert follow.returncode == 0, err
        (new,) = [json.loads(line) for line in out.decode().splitlines()]
        assert (new["eventType"], new["mail"]["destination"]) == ("Send", ["bob@example.org"])
        done = relay_cli(*tail, "--since", "1h", "--count", "2", timeout=30)
        assert done.returncode == 0, done.stderr
        assert [json.loads(line)["mail"]["destination"] for line in done.stdout.decode().splitlines()] == [
            ["ann@example.org"]] * 2
        bad = relay_cli(*tail, "--since", "yesterday-ish")
        assert bad.returncode == 2 and b"--since" in bad.stderr
    finally:
        relay.stop()
        upstream.stop()


# --- relay instrument ---------------------------------------------------------------------------------------------

def test_instrument_reads_the_set_and_the_first_recipient_from_the_message(tmp_path):
    cfg = config_file(tmp_path, extra='[identities."example.net"]\ndefault_configuration_set = "marketing"\n')
    report = tmp_path / "report.json"
    done = relay_cli("instrument", "--config", str(cfg), "--report-json", str(report), stdin=HTML)
    assert done.returncode == 0, done.stderr
    data = json.loads(report.read_text())
    assert (data["configuration_set"], data["recipient"]) == ("marketing", "ann@example.org")
    assert data["parts"][0]["links"][0]["original"] == "https://shop.example.com/sale"
    # No header: the sender's default set; an explicit recipient wins over To
    default_set = HTML.replace(b"X-SES-CONFIGURATION-SET: marketing\r\n", b"").replace(b"news@example.com",
                                                                                     b"news@example.net")
    done = relay_cli("instrument", "--config", str(cfg), "--recipient", "carol@example.org", "--report-json",
                     str(report), stdin=default_set)
    assert done.returncode == 0, done.stderr
    data = json.loads(report.read_text())
    assert (data["configuration_set"], data["recipient"]) == ("marketing", "carol@example.org")
    nobody = HTML.replace(b"To: Ann <ann@example.org>, bob@example.org\r\n", b"")
    done = relay_cli("instrument", "--config", str(cfg), stdin=nobody)
    assert done.returncode == 1
    assert stderr_lines(done) == ["error: --recipient: the message has no To, Cc or Bcc address; name the recipient"]
