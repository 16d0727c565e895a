"""relay installed the documented way (docs/operating.md: a virtual environment, `pip install` of the checkout)
on this machine's Debian Python, then used as an operator would: `relay init`, `relay check --production`, a
port already in use; and the systemd unit simulated: a non-root service user, a read-only configuration folder,
a state folder of its own, READY=1 on the notify socket, a message delivered, a clean stop on SIGTERM.

Installing takes a minute or so (pip resolves and builds relay and its dependencies); the environment is made
once for the module.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import smtplib
import socket
import stat
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay import __version__

from .harness import ROOT, Upstream, free_port, wait_port

SERVICE_USER = "relaytest"  # made for the unit test when missing, removed after
MESSAGE = (b"From: News <news@example.com>\r\nTo: ann@example.org\r\nSubject: Hello\r\n"
           b"X-SES-CONFIGURATION-SET: marketing\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
           b'<html><body><p><a href="https://shop.example.com/sale">Sale</a></p></body></html>\r\n')


def checkout_files() -> list[str]:
    """The files a fresh clone of this checkout has (and new ones not yet committed), no build or test debris."""
    done = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                          capture_output=True, check=True)
    return [name for name in done.stdout.decode().split("\0") if name and (ROOT / name).is_file()]


def base_python() -> str:
    """Debian's own Python when this is Debian (what a fresh machine has), else the one running the tests."""
    debian = Path("/usr/bin/python3")
    if debian.exists() and subprocess.run([debian, "-c", "import sys, venv; assert sys.version_info >= (3, 11)"],
                                          capture_output=True).returncode == 0:
        return str(debian)
    return sys.executable


@pytest.fixture(scope="module")
def installed() -> Iterator[Path]:
    """A virtual environment with relay installed from a copy of this checkout, as docs/operating.md says:
    `python3 -m venv VENV && VENV/bin/pip install SRC`. World-readable, so a service user can run it."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the files of a fresh clone are unknown")
    base = Path(tempfile.mkdtemp(prefix="relay-install-"))
    base.chmod(0o755)
    try:
        src = base / "src"
        for name in checkout_files():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
        venv = base / "venv"
        subprocess.run([base_python(), "-m", "venv", str(venv)], check=True, timeout=300)
        done = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(src)], capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        yield venv
    finally:
        shutil.rmtree(base, ignore_errors=True)


def run(venv: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    """The installed `relay` (never this checkout's: no PYTHONPATH, no RELAY_CONFIG)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RELAY_CONFIG")}
    return subprocess.run([str(venv / "bin" / "relay"), *args], capture_output=True, text=True, timeout=120,
                          env=env, **kwargs)


def init(venv: Path, folder: Path, upstream_port: int, smtp_port: int, *extra: str) -> Path:
    done = run(venv, "init", str(folder / "etc"), "--domain", "example.com", "--tracking-host", "track.example.com",
               "--data-dir", str(folder / "state"), "--hostname", "mx.example.com", "--upstream",
               f"127.0.0.1:{upstream_port}", "--smtp-listen", f"127.0.0.1:{smtp_port}", *extra)
    assert done.returncode == 0, done.stderr
    assert "_domainkey.example.com. IN TXT" in done.stdout and "Next steps:" in done.stdout
    return folder / "etc" / "relay.toml"


def own_ports(config: Path, tracking_port: int) -> None:
    """The generated file with this test's tracking port and no metrics listener (other tests run beside)."""
    text = config.read_text()
    for old, new in (('listen = "127.0.0.1:8080"', f'listen = "127.0.0.1:{tracking_port}"'),
                     ('listen = "127.0.0.1:9108"', 'listen = ""')):
        assert old in text, old
        text = text.replace(old, new, 1)
    config.write_text(text)


def test_installed_relay_inits_checks_and_refuses_a_port_in_use(installed, tmp_path):
    assert run(installed, "--version").stdout.strip() == f"relay {__version__}"
    upstream = Upstream().start()
    try:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            smtp_port = taken.getsockname()[1]
            config = init(installed, tmp_path, upstream.port, smtp_port)
            example = installed.parent / "src" / "config.example.toml"
            refused = run(installed, "check", "--production", "--config", str(example), cwd=tmp_path)
            assert refused.returncode == 1
            assert "error: upstream.type:" in refused.stderr and "error: tracking.default_host:" in refused.stderr
            accepted = run(installed, "check", "--production", "--config", str(config))
            assert accepted.returncode == 0, accepted.stderr
            serve = run(installed, "serve", "--config", str(config))
        assert serve.returncode == 1
        assert serve.stderr.splitlines() == [f"error: smtp.listen: 127.0.0.1:{smtp_port}: address already in use"
                                             f" (`ss -ltnp 'sport = :{smtp_port}'` shows by what)"]
    finally:
        upstream.stop()


# --- the systemd unit, simulated ----------------------------------------------------------------------------------

@contextlib.contextmanager
def service_user() -> Iterator[pwd.struct_passwd]:
    """A system user without a login, as docs/operating.md makes `relay`; removed after when made here."""
    if os.geteuid() != 0:
        pytest.skip("simulating the unit needs root (to make a service user and switch to it)")
    made = False
    try:
        entry = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SERVICE_USER],
                       check=True, capture_output=True)
        made, entry = True, pwd.getpwnam(SERVICE_USER)
    try:
        yield entry
    finally:
        if made:
            subprocess.run(["userdel", SERVICE_USER], capture_output=True)


def as_service(user: pwd.struct_passwd) -> dict:
    """What the unit's User=, Group=, UMask= and WorkingDirectory-free environment give ExecStart."""
    return dict(user=user.pw_uid, group=user.pw_gid, extra_groups=os.getgrouplist(user.pw_name, user.pw_gid),
                umask=0o077, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})


def read_only(folder: Path) -> None:
    for path in [folder, *folder.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        path.chmod(mode & ~0o222)


def test_the_unit_runs_relay_as_a_service_user_with_a_read_only_configuration(installed):
    base = Path(tempfile.mkdtemp(prefix="relay-unit-"))
    base.chmod(0o755)
    upstream = Upstream().start()
    try:
        with service_user() as user:
            state = base / "state"  # StateDirectory=relay, StateDirectoryMode=0750: the user's own
            state.mkdir(mode=0o750)
            os.chown(state, user.pw_uid, user.pw_gid)
            smtp_port, tracking_port = free_port(), free_port()
            config = init(installed, base, upstream.port, smtp_port, "--user", user.pw_name)
            own_ports(config, tracking_port)
            read_only(base / "etc")  # ProtectSystem=strict: /etc/relay cannot be written, not even by root's files
            assert (base / "etc").stat().st_uid == 0 and stat.S_IMODE(config.stat().st_mode) == 0o440
            relay = str(installed / "bin" / "relay")
            pre = subprocess.run([relay, "check", "--production", "--config", str(config)], capture_output=True,
                                 text=True, timeout=120, cwd=state, **as_service(user))
            assert pre.returncode == 0, pre.stderr  # ExecStartPre
            run_service(relay, config, state, user, upstream, base, smtp_port)
            unreadable_keys_stop_the_start(relay, config, state, user, base)
    finally:
        upstream.stop()
        shutil.rmtree(base, ignore_errors=True)


def run_service(relay: str, config: Path, state: Path, user, upstream: Upstream, base: Path, smtp_port: int) -> None:
    """ExecStart: READY=1 once listening, a message delivered DKIM-signed with tracked links, exit 0 on SIGTERM."""
    notify = base / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sd:
        sd.bind(str(notify))
        notify.chmod(0o777)
        sd.settimeout(60)
        service = as_service(user)
        service["env"]["NOTIFY_SOCKET"] = str(notify)
        proc = subprocess.Popen([relay, "serve", "--config", str(config)], cwd=state, stderr=subprocess.PIPE,
                                text=True, **service)
        try:
            assert sd.recv(256) == b"READY=1"
            wait_port(smtp_port, proc=proc)
            with smtplib.SMTP("127.0.0.1", smtp_port) as s:
                s.sendmail("news@example.com", ["ann@example.org"], MESSAGE)
            (received,) = upstream.wait_for(1, timeout=60)
            assert received.data.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;")
            assert b"d=example.com" in received.data and b"https://track.example.com/c/" in received.data
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "stopped" in err
    owned = {p.stat().st_uid for p in state.iterdir()}
    assert owned == {user.pw_uid}, owned  # the database and its journals belong to the service user


def unreadable_keys_stop_the_start(relay: str, config: Path, state: Path, user, base: Path) -> None:
    """A key the service user cannot read: one line naming its key and path, exit 1, no traceback."""
    keys = base / "etc" / "tracking-keys"
    keys.chmod(0o400)  # root's alone
    done = subprocess.run([relay, "serve", "--config", str(config)], capture_output=True, text=True, timeout=120,
                          cwd=state, **as_service(user))
    assert done.returncode == 1
    assert done.stderr.splitlines() == [f"error: tracking.keys_file: {keys}: {user.pw_name} cannot read it"]


# --- the distributions --------------------------------------------------------------------------------------------

def test_the_sdist_and_wheel_build_and_install_with_pipx(installed, tmp_path):
    """`python -m build` makes the sdist and then the wheel from it (so the sdist holds all a build needs); the
    sdist is a clone without git (docs, example, unit, tests); pipx installs the wheel and its `relay` runs."""
    pip = str(installed / "bin" / "pip")
    tools = subprocess.run([pip, "install", "-q", "build", "pipx"], capture_output=True, text=True, timeout=600)
    assert tools.returncode == 0, tools.stderr[-3000:]
    dist = tmp_path / "dist"
    built = subprocess.run([str(installed / "bin" / "python"), "-m", "build", "--outdir", str(dist),
                            str(installed.parent / "src")], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (sdist,) = dist.glob(f"relay-{__version__}.tar.gz")
    (wheel,) = dist.glob(f"relay-{__version__}-py3-none-any.whl")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[-1] for name in archive.getnames()}
    assert {"config.example.toml", "systemd/relay.service", "docs/operating.md", "tests/harness.py",
            "relay/data/scanner-networks.txt"} <= names
    env = {**{k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RELAY_CONFIG")},
           "PIPX_HOME": str(tmp_path / "pipx"), "PIPX_BIN_DIR": str(tmp_path / "bin")}
    done = subprocess.run([str(installed / "bin" / "pipx"), "install", str(wheel)], capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    relay = tmp_path / "bin" / "relay"
    assert subprocess.run([relay, "--version"], capture_output=True, text=True, env=env).stdout.strip() == (
        f"relay {__version__}")
    check = subprocess.run([relay, "check", "--config", str(installed.parent / "src" / "config.example.toml")],
                           capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert check.returncode == 0, check.stderr
