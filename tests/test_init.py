"""`relay init` and `relay check --production` with this checkout: the first real configuration (absolute paths,
keys, owners and modes, DNS records), paths that follow data_dir, and what production refuses."""

from __future__ import annotations

import os
import pwd
import shutil
import smtplib
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from relay import config as config_module

from .harness import ROOT, Upstream, free_port, wait_port

EXAMPLE = ROOT / "config.example.toml"
MESSAGE = (b"From: News <news@example.com>\r\nTo: ann@example.org\r\nSubject: Hi\r\n"
           b"X-SES-CONFIGURATION-SET: marketing\r\nContent-Type: text/html\r\n\r\n"
           b'<html><body><a href="https://shop.example.com/sale">Sale</a></body></html>\r\n')


def relay_cli(*args: str, cwd: Path = ROOT, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RELAY_CONFIG"}
    return subprocess.run([sys.executable, "-m", "relay.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env={**env, "PYTHONPATH": str(ROOT)})


def init(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    return relay_cli("init", str(tmp_path / "etc"), "--domain", "example.com", "--tracking-host",
                     "track.example.com", "--data-dir", str(tmp_path / "state"), "--hostname", "mx.example.com",
                     *extra)


def example_with(tmp_path: Path, data_dir: Path, smtp_port: int, tracking_port: int) -> Path:
    """The example, copied elsewhere with only data_dir and the ports changed, as the old README told."""
    text = EXAMPLE.read_text()
    for old, new in (('data_dir = "relay-data"', f'data_dir = "{data_dir}"'),
                     ('listen = "127.0.0.1:2525"', f'listen = "127.0.0.1:{smtp_port}"'),
                     ('listen = "127.0.0.1:8080"', f'listen = "127.0.0.1:{tracking_port}"'),
                     ('listen = "127.0.0.1:9108"', 'listen = ""')):
        assert old in text, old
        text = text.replace(old, new, 1)
    path = tmp_path / "etc" / "relay.toml"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    return path


# --- relay init -------------------------------------------------------------------------------------------------

def test_init_writes_a_production_configuration_with_keys_and_dns_records(tmp_path):
    upstream = Upstream().start()
    try:
        done = init(tmp_path, "--upstream", f"127.0.0.1:{upstream.port}", "--bounce-domain", "bounces.example.com")
        assert done.returncode == 0, done.stderr
        path = tmp_path / "etc" / "relay.toml"
        cfg = config_module.load(path)
        assert cfg.data_dir == tmp_path / "state" and cfg.hostname == "mx.example.com"
        assert (cfg.upstream.type, cfg.upstream.host, cfg.upstream.port) == ("smtp", "127.0.0.1", upstream.port)
        assert (cfg.tracking.default_host, cfg.tracking.https_hosts) == ("track.example.com", ("track.example.com",))
        assert cfg.feedback.bounce_domain == "bounces.example.com"
        written = [line.split("=", 1)[1].split("#")[0].strip().strip('"') for line in path.read_text().splitlines()
                   if line.split("=")[0].strip() in ("data_dir", "keys_file", "private_key_file")]
        assert len(written) == 3 and all(Path(p).is_absolute() for p in written), written
        (key,) = cfg.dkim.keys
        assert (key.domain, key.selector, key.private_key_file) == (
            "example.com", "relay1", tmp_path / "etc" / "dkim" / "example.com.relay1.pem")
        from relay.core.dkim import key_record
        from relay.sign import load_key_file

        record = key_record(load_key_file(key))
        published = done.stdout.replace('" "', "")  # the zone-file line splits the value into 255-byte strings
        assert "relay1._domainkey.example.com. IN TXT" in done.stdout and record in published
        assert "bounces.example.com. IN MX 10 mx.example.com." in done.stdout
        assert "Next steps:" in done.stdout and "check --production" in done.stdout
        cfg.keyring()  # the tracking keys exist and read
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (path, key.private_key_file,
                                                                   cfg.tracking.keys_file, tmp_path / "etc")}
        assert modes == {"relay.toml": 0o600, "example.com.relay1.pem": 0o600, "tracking-keys": 0o600, "etc": 0o700}
        check = relay_cli("check", "--production", "--config", str(path))
        assert check.returncode == 0, check.stderr
    finally:
        upstream.stop()


def test_init_never_overwrites_and_names_bad_options(tmp_path):
    assert init(tmp_path).returncode == 0
    key = (tmp_path / "etc" / "dkim" / "example.com.relay1.pem").read_bytes()
    again = init(tmp_path)
    assert again.returncode == 1
    assert again.stderr.strip().splitlines() == [
        f"error: {tmp_path}/etc/relay.toml exists: relay init never overwrites a configuration (move it away, or"
        " edit it)"]
    assert (tmp_path / "etc" / "dkim" / "example.com.relay1.pem").read_bytes() == key
    bad = [(["--tracking-host", "localhost"], "--tracking-host"), (["--upstream", "a:b"], "--upstream"),
           (["--domain", "not a domain"], "--domain"), (["--hostname", "relay.localhost"], "--hostname"),
           (["--user", "no-such-user-here"], "--user")]
    for args, key_name in bad:
        done = relay_cli("init", str(tmp_path / "other"), "--domain", "example.com", "--tracking-host",
                         "track.example.com", "--hostname", "mx.example.com", *args)
        assert done.returncode == 1 and done.stderr.startswith(f"error: {key_name}: "), done.stderr
        assert len(done.stderr.strip().splitlines()) == 1


def test_init_without_an_upstream_captures_and_production_refuses_it(tmp_path):
    assert init(tmp_path).returncode == 0
    check = relay_cli("check", "--production", "--config", str(tmp_path / "etc" / "relay.toml"))
    assert check.returncode == 1
    assert [line for line in check.stderr.splitlines() if line.startswith("error:")] == [
        f'error: upstream.type: "capture" writes every message to {tmp_path}/state/delivered and delivers none:'
        ' set type = "smtp" and the host of your mail provider or smarthost']


# --- relay check --production ---------------------------------------------------------------------------------

def test_check_production_refuses_the_example_and_plain_check_accepts_it(tmp_path):
    production = relay_cli("check", "--production", "--config", str(EXAMPLE), cwd=tmp_path)
    assert production.returncode == 1
    errors = [line.split(":")[1].strip() for line in production.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["upstream.type", "tracking.default_host"], production.stderr
    plain = relay_cli("check", "--config", str(EXAMPLE), cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr


def test_check_warns_about_the_example_once_smtp_serves_other_machines(tmp_path):
    text = EXAMPLE.read_text().replace('listen = "127.0.0.1:2525"', 'listen = "0.0.0.0:2525"', 1)
    (tmp_path / "relay.toml").write_text(text)
    done = relay_cli("check", "--config", str(tmp_path / "relay.toml"))
    assert done.returncode == 0
    warnings = [line.split(":")[1].strip() for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert "upstream.type" in warnings and "tracking.default_host" in warnings


def test_check_production_names_what_the_service_user_cannot_use(tmp_path):
    assert init(tmp_path, "--upstream", "127.0.0.1:2600").returncode == 0
    path = tmp_path / "etc" / "relay.toml"
    if os.geteuid() == 0:  # root reads anything: ask for another user, who cannot enter root's 0700 folders
        args, who = ["--user", "nobody"], "nobody"
    else:
        (tmp_path / "state").chmod(0o500)
        args, who = [], None
    done = relay_cli("check", "--production", "--config", str(path), *args)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    if who:
        assert errors[0].startswith(f"error: --config: {path}: nobody cannot enter /"), errors
        assert any(e.startswith(f"error: relay.data_dir: {tmp_path}/state: nobody cannot") for e in errors), errors
    else:
        me = pwd.getpwuid(os.geteuid()).pw_name
        assert errors == [f"error: relay.data_dir: {tmp_path}/state: {me} cannot read and write and enter it"]
    missing = relay_cli("check", "--production", "--config", str(path), "--user", "no-such-user-here")
    assert missing.returncode == 1 and missing.stderr.startswith("error: --user: no user 'no-such-user-here'")


# --- paths that follow data_dir ---------------------------------------------------------------------------------

def test_paths_derived_from_data_dir_follow_it(tmp_path):
    path = example_with(tmp_path, tmp_path / "state", 2525, 8080)
    cfg = config_module.load(path)
    assert cfg.tracking.keys_file == tmp_path / "state" / "tracking-keys"
    assert cfg.upstream.capture_dir == tmp_path / "state" / "delivered"


def test_the_example_under_a_config_folder_keeps_its_data_in_data_dir(tmp_path):
    """The old systemd steps: the example in /etc/relay with only data_dir changed. Every file relay makes
    lands in data_dir; nothing in the configuration folder."""
    smtp_port, tracking_port = free_port(), free_port()
    path = example_with(tmp_path, tmp_path / "state", smtp_port, tracking_port)
    proc = subprocess.Popen([sys.executable, "-m", "relay.cli", "serve", "--config", str(path)], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE)
    try:
        wait_port(smtp_port, proc=proc)
        with smtplib.SMTP("127.0.0.1", smtp_port) as s:
            s.sendmail("news@example.com", ["ann@example.org"], MESSAGE)
        deadline = 200
        while not list((tmp_path / "state" / "delivered").glob("*.eml")) and deadline:
            deadline -= 1
            subprocess.run(["sleep", "0.1"])
        assert list((tmp_path / "state" / "delivered").glob("*.eml"))
        assert (tmp_path / "state" / "tracking-keys").is_file()
        assert sorted(p.name for p in (tmp_path / "etc").iterdir()) == ["relay.toml"]
    finally:
        proc.terminate()
        assert proc.wait(60) == 0


def test_pure_loopback_and_permission_rules():
    from relay.core.production import ENTER, READ, WRITE, Owner, is_loopback_host, permits, reaches_beyond_loopback

    assert all(is_loopback_host(h) for h in ("localhost:8080", "relay.localhost", "127.0.0.2", "[::1]:80", "::1"))
    assert not any(is_loopback_host(h) for h in ("track.example.com", "192.0.2.1:80", "[2001:db8::1]:8080"))
    assert reaches_beyond_loopback("0.0.0.0") and reaches_beyond_loopback("::") and reaches_beyond_loopback("")
    assert reaches_beyond_loopback("192.0.2.1") and not reaches_beyond_loopback("127.0.0.1")
    owned = Owner(stat.S_IFREG | 0o640, uid=0, gid=100)
    assert permits(owned, 1000, frozenset({100}), READ) and not permits(owned, 1000, frozenset({100}), WRITE)
    assert not permits(owned, 1000, frozenset({5}), READ)
    assert permits(owned, 0, frozenset(), READ | WRITE)
    # One class decides: the owner of a 0o077 file may not read it although everyone else may
    assert not permits(Owner(stat.S_IFREG | 0o077, 1000, 100), 1000, frozenset({100}), READ)
    assert permits(Owner(stat.S_IFDIR | 0o700, 1000, 100), 0, frozenset(), ENTER)  # root enters any folder
    assert not permits(Owner(stat.S_IFDIR | 0o700, 1000, 100), 1001, frozenset({100}), ENTER)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_the_unit_runs_the_documented_install(tmp_path):
    """The unit's ExecStartPre and ExecStart are the relay of /opt/relay/venv that docs/operating.md installs;
    with that path pointing at this checkout's command, systemd-analyze accepts the unit."""
    unit = (ROOT / "systemd" / "relay.service").read_text()
    assert "ExecStart=/opt/relay/venv/bin/relay serve --config /etc/relay/relay.toml" in unit
    assert "ExecStartPre=/opt/relay/venv/bin/relay check --production --config /etc/relay/relay.toml" in unit
    operating = (ROOT / "docs" / "operating.md").read_text()
    assert "python3 -m venv /opt/relay/venv" in operating
    command = tmp_path / "relay"
    command.write_text(f"#!/bin/sh\nexec {sys.executable} -m relay.cli \"$@\"\n")
    command.chmod(0o755)
    (tmp_path / "relay.service").write_text(unit.replace("/opt/relay/venv/bin/relay", str(command)))
    done = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "relay.service")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
