"""A real MTA bounces relay's mail later: Exim accepts the message from relay, then fails it and sends
its own RFC 3464 DSN to the VERP envelope sender, i.e. back to relay's SMTP listener, which records the Bounce.

Exim runs from the test as a foreground daemon on 127.0.0.1 with a configuration written here: it accepts
example.org; `gone@` is a `:fail:` redirect (Exim's own "no such user" DSN), `refused@` goes on to an aiosmtpd
server answering 550 5.1.1 (a DSN with the remote MTA's Diagnostic-Code); bounces.test is routed to relay.
Skipped when Exim is not installed or cannot start here.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import pwd
import shutil
import smtplib
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import RelayProcess, Upstream, free_port, wait_port
from .test_inbound import EXTRA, SMTP_EXTRA, message

EXIM = shutil.which("exim4") or shutil.which("exim") or next(
    (p for p in ("/usr/sbin/exim4", "/usr/sbin/exim") if Path(p).exists()), None)
REFUSAL = "550 5.1.1 <refused@example.org>: Recipient address rejected: User unknown"

# A private daemon: its own spool, log and port on 127.0.0.1, no DNS, ident or TLS; example.org is local.
EXIM_MAIN = """
primary_hostname = mx.example.org
exim_user = {user}
exim_group = {group}
never_users =
trusted_users = {user}
spool_directory = {base}/spool
log_file_path = {base}/log/%slog
pid_file_path = {base}/exim.pid
daemon_smtp_ports = {port}
local_interfaces = 127.0.0.1
domainlist local_domains = example.org
host_lookup =
rfc1413_hosts =
tls_advertise_hosts =
deliver_drop_privilege = true
split_spool_directory = false
"""

CONFIG = EXIM_MAIN + """acl_smtp_rcpt = acl_check_rcpt

begin acl
acl_check_rcpt:
  accept domains = +local_domains
  deny message = relay not permitted

begin routers
bounces:
  driver = manualroute
  domains = bounces.test
  transport = remote_smtp
  route_list = * 127.0.0.1::{relay_port}
  self = send
gone:
  driver = redirect
  domains = +local_domains
  local_parts = gone
  allow_fail
  data = :fail: no such user here
refused:
  driver = manualroute
  domains = +local_domains
  local_parts = refused
  transport = remote_smtp
  route_list = * 127.0.0.1::{refusing_port}
  self = send
others:
  driver = accept
  domains = +local_domains
  transport = devnull

begin transports
remote_smtp:
  driver = smtp
  hosts_avoid_tls = *
devnull:
  driver = appendfile
  file = /dev/null
  user = {user}

begin retry
* * F,1m,10s
"""


def exim_identity() -> tuple[str, str]:
    """Root runs Exim's deliveries as its system user (root may not deliver); anyone else as themselves."""
    if os.geteuid() != 0:
        return getpass.getuser(), getpass.getuser()
    for name in ("Debian-exim", "exim", "mail"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name, name
    pytest.skip("running as root and no exim system user to run Exim's deliveries as")


@pytest.fixture
def refusing():
    u = Upstream().start()
    u.handler.reply = REFUSAL
    yield u
    u.stop()


@contextlib.contextmanager
def exim_daemon(config: str, **fields) -> Iterator[tuple[int, Path]]:
    """A foreground Exim daemon with `config` (EXIM_MAIN and more; {user} {group} {base} {port} and `fields` are
    filled in): yields its port and folder. Skips the test when Exim is not installed or cannot start here."""
    if EXIM is None:
        pytest.skip("exim4 is not installed (CI installs exim4-daemon-light)")
    user, group = exim_identity()
    # Exim drops to its own user for deliveries: the spool must be reachable by it (pytest's tmp is 0700)
    base = Path(tempfile.mkdtemp(prefix="relay-exim-"))
    base.chmod(0o755)
    port = free_port()
    for sub in ("spool", "log"):
        (base / sub).mkdir()
        shutil.chown(base / sub, user, group)
    conf = base / "exim.conf"
    conf.write_text(config.format(user=user, group=group, base=base, port=port, **fields))
    conf.chmod(0o644)
    with open(base / "daemon.out", "wb") as out:
        proc = subprocess.Popen([EXIM, "-C", str(conf), "-bdf"], stdout=out, stderr=subprocess.STDOUT)
    try:
        try:
            wait_port(port, timeout=10, proc=proc)
        except (RuntimeError, TimeoutError) as exc:
            pytest.skip(f"exim could not start here ({exc}): {(base / 'daemon.out').read_text()[-500:]}")
        yield port, base
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def exim(refusing, tmp_path):
    relay = RelayProcess(tmp_path / "relay", extra=EXTRA, smtp_extra=SMTP_EXTRA)
    with exim_daemon(CONFIG, relay_port=relay.smtp_port, refusing_port=refusing.port) as (port, base):
        relay.upstream_port = port
        try:
            yield relay, base
        finally:
            relay.stop()


def exim_log(base: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((base / "log").glob("*")))


def test_exim_bounces_later_and_its_dsn_becomes_a_bounce_event(exim):
    relay, base = exim
    relay.start()
    rcpts = ["gone@example.org", "refused@example.org"]
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=30) as c:
        c.login("app", "s3cret")
        c.sendmail("news@example.com", rcpts, message(rcpts, "<exim-test@example.com>"))
    deadline, bounces = time.monotonic() + 30, []
    while time.monotonic() < deadline and len(bounces) < 2:
        bounces = relay.events("Bounce")
        time.sleep(0.1)
    assert len(bounces) == 2, f"{relay.log()[-3000:]}\n--- exim:\n{exim_log(base)[-3000:]}"
    # relay handed both copies over: exim said 250, the failure came later
    assert sorted(r[2] for r in relay.events("Delivery")) == rcpts
    by_recipient = {r[2]: json.loads(r[4]) for r in bounces}
    assert sorted(by_recipient) == rcpts

    gone = by_recipient["gone@example.org"]["bounce"]
    assert (gone["bounceType"], gone["reportingMTA"]) == ("Permanent", "dns; mx.example.org")
    (recipient,) = gone["bouncedRecipients"]
    assert recipient["emailAddress"] == "gone@example.org"
    assert (recipient["action"], recipient["status"]) == ("failed", "5.0.0")  # Exim's status for a :fail:

    refused = by_recipient["refused@example.org"]["bounce"]
    assert (refused["bounceType"], refused["reportingMTA"]) == ("Permanent", "dns; mx.example.org")
    (recipient,) = refused["bouncedRecipients"]
    # Exim writes Status: 5.0.0 here too; a parser may take the finer code of the remote reply instead
    assert recipient["emailAddress"] == "refused@example.org" and recipient["status"] in ("5.0.0", "5.1.1")
    assert recipient["diagnosticCode"] == f"smtp; {REFUSAL}"

    with contextlib.closing(relay.db()) as conn:
        listed = {r[0] for r in conn.execute("SELECT email_address FROM suppressed_destinations WHERE reason ="
                                             " 'BOUNCE'")}
        senders = [r[0] for r in conn.execute("SELECT mail_from FROM inbound_reports")]
    assert listed == set(rcpts) and senders == ["", ""]  # the DSNs came with the null sender
    assert "R=bounces T=remote_smtp" in exim_log(base)  # Exim delivered its DSNs to relay
