"""Virus scanning through clamd ("Reject"): a real clamd started here with one test signature.

clamd loads a database folder holding only `relay-test.ndb` (a signature for TEST_STRING, no official
databases, no freshclam, no network), listens on a unix socket in a short temporary folder (and on TCP for
the TCP test). It starts in well under a second. Without `User` in its configuration clamd keeps the user
that started it, so this works as root (CI) and as any other user. Tests skip when clamd is not installed
(Debian: clamav-daemon) or cannot start.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pytest

from relay.config import ConfigError, ScanSettings, parse
from relay.core import clamd
from relay.scan import ClamdScanner, make_scanner

from .harness import ROOT, RelayProcess, Upstream, free_port
from .test_events import keys
from .test_relay_e2e import submit

CLAMD = shutil.which("clamd") or shutil.which("clamd", path="/usr/sbin:/usr/local/sbin")
TEST_STRING = b"RELAY-CLAMD-TEST-SIGNATURE-7f3a"
SIGNATURE = "Relay.Test.Signature.UNOFFICIAL"  # clamd adds .UNOFFICIAL to names from a non-official database
REFERENCE = Path(os.environ.get("RELAY_REFERENCE", ROOT.parent / "shared" / "reference")) / "ses-events"


def message(subject: str, attachment: bytes, set_name: str | None = "plain") -> bytes:
    """A multipart message with `attachment` base64-encoded (clamd decodes MIME before matching)."""
    head = f"X-SES-CONFIGURATION-SET: {set_name}\r\n" if set_name else ""
    return (f"{head}From: Sender <sender@example.com>\r\nTo: rcpt@example.org\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '-')}@example.com>\r\nMIME-Version: 1.0\r\n"
            'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
            "--b1\r\nContent-Type: text/plain\r\n\r\nsee attachment\r\n"
            "--b1\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
            'Content-Disposition: attachment; filename="a.bin"\r\n\r\n').encode() + \
        base64.encodebytes(attachment).replace(b"\n", b"\r\n") + b"--b1--\r\n"


INFECTED = message("infected", b"some bytes " + TEST_STRING + b" more bytes")
CLEAN = message("clean", b"nothing to see here")


class Clamd:
    """A clamd of the test's own: a tiny signature database, a unix socket (and optionally TCP)."""

    def __init__(self, folder: Path, tcp_port: int | None = None, stream_max: str = "1M"):
        self.folder, self.tcp_port = folder, tcp_port
        self.socket = folder / "clamd.sock"
        (folder / "db").mkdir(exist_ok=True)
        (folder / "db" / "relay-test.ndb").write_text(f"Relay.Test.Signature:0:*:{TEST_STRING.hex()}\n")
        tcp = f"TCPSocket {tcp_port}\nTCPAddr 127.0.0.1\n" if tcp_port else ""
        (folder / "clamd.conf").write_text(
            f"Foreground yes\nLocalSocket {self.socket}\nDatabaseDirectory {folder / 'db'}\n"
            f"TemporaryDirectory {folder}\nLogFile {folder / 'clamd.log'}\nBytecode no\n"
            f"StreamMaxLength {stream_max}\n{tcp}")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 15.0) -> Clamd:
        self.proc = subprocess.Popen([CLAMD, "-c", str(self.folder / "clamd.conf")], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if self.ping():
                return self
            time.sleep(0.05)
        self.stop()
        pytest.skip(f"clamd did not start: {self.log()[-500:]}")

    def ping(self) -> bool:
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
            s.settimeout(1)
            s.connect(str(self.socket))
            s.sendall(b"zPING\0")
            return s.recv(16) == b"PONG\0"
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=15)
        self.proc = None

    def log(self) -> str:
        path = self.folder / "clamd.log"
        return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture
def clamd_server():
    if CLAMD is None:
        pytest.skip("clamd is not installed (Debian: apt-get install clamav-daemon)")
    folder = Path(tempfile.mkdtemp(prefix="clamd-", dir="/tmp"))  # short: a unix socket path has ~107 bytes
    server = Clamd(folder, tcp_port=free_port()).start()
    yield server
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def upstream():
    u = Upstream().start()
    yield u
    u.stop()


def scan_config(socket_path: Path | str, **keys: str | int) -> str:
    lines = "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())
    return f'\n[scan]\nclamd_socket = "{socket_path}"\ntimeout = "5s"\n{lines}'


def reference(name: str) -> dict:
    path = REFERENCE / f"{name}.json"
    if not path.exists():
        pytest.skip(f"SES reference examples not found at {REFERENCE} (set RELAY_REFERENCE)")
    return json.loads(path.read_text())


# --- the protocol and the policy (pure) ----------------------------------------------------------------------

@pytest.mark.parametrize("reply,status,detail", [
    (b"stream: OK\0", clamd.CLEAN, ""),
    (b"stream: OK", clamd.CLEAN, ""),
    (b"1: stream: OK\0", clamd.CLEAN, ""),
    (b"stream: Eicar-Test-Signature FOUND\0", clamd.INFECTED, "Eicar-Test-Signature"),
    (b"stream: Win.Test.EICAR_HDB-1 FOUND\0trailing", clamd.INFECTED, "Win.Test.EICAR_HDB-1"),
    (b"Can't allocate memory ERROR\0", clamd.FAILED, "Can't allocate memory"),
    (b"", clamd.FAILED, "clamd closed the connection without an answer"),
    (b"stream:  FOUND\0", clamd.FAILED, "unexpected answer from clamd: 'stream:  FOUND'"),
    (b"UNKNOWN COMMAND\0", clamd.FAILED, "unexpected answer from clamd: 'UNKNOWN COMMAND'"),
])
def test_replies_are_parsed(reply, status, detail):
    assert clamd.parse_reply(reply) == clamd.ScanResult(status, detail)


def test_clamd_size_limit_is_a_failure_that_names_the_setting():
    result = clamd.parse_reply(b"INSTREAM size limit exceeded. ERROR\0")
    assert result.status == clamd.FAILED and "StreamMaxLength" in result.detail and "max_scan_size" in result.detail


def test_instream_framing():
    data = bytes(range(256)) * 3
    frames = b"".join(clamd.instream_frames(data, chunk=300))
    assert frames == (b"\0\0\x01\x2c" + data[:300] + b"\0\0\x01\x2c" + data[300:600] + b"\0\0\0\xa8" + data[600:]
                      + b"\0\0\0\0")
    assert b"".join(clamd.instream_frames(b"")) == b"\0\0\0\0"


def test_policy():
    virus = clamd.ScanResult(clamd.INFECTED, "Eicar-Test-Signature")
    failed = clamd.ScanResult(clamd.FAILED, "no socket")
    for on_error in ("tempfail", "accept"):
        assert clamd.refusal(virus, on_error) == ("554 5.7.1 Message rejected: Bad content:"
                                                  " virus Eicar-Test-Signature found")
        assert clamd.refusal(clamd.ScanResult(clamd.CLEAN), on_error) is None
        assert clamd.refusal(clamd.ScanResult(clamd.TOO_LARGE, "big"), on_error) is None
    assert clamd.refusal(failed, "tempfail") == "451 4.7.0 Temporary failure: virus scan unavailable"
    assert clamd.refusal(failed, "accept") is None
    odd = clamd.refusal(clamd.ScanResult(clamd.INFECTED, "A\r\nB\x00é"), "tempfail")
    assert odd == "554 5.7.1 Message rejected: Bad content: virus A??B?? found"


def test_scan_configuration(tmp_path):
    assert not parse({}, tmp_path).scan.enabled and make_scanner(parse({}, tmp_path).scan) is None
    cfg = parse({"scan": {"clamd_socket": "clamd.ctl", "timeout": "10s", "on_error": "accept",
                          "max_scan_size": 1000}}, tmp_path)
    assert cfg.scan == ScanSettings(clamd_socket=tmp_path / "clamd.ctl", timeout=10.0, on_error="accept",
                                    max_scan_size=1000)
    cfg = parse({"scan": {"clamd_address": "[::1]:3311"}}, tmp_path)
    assert (cfg.scan.clamd_host, cfg.scan.clamd_port, cfg.scan.on_error) == ("::1", 3311, "tempfail")
    assert repr(make_scanner(cfg.scan)) == "ClamdScanner(::1:3311)"
    with pytest.raises(ConfigError) as err:
        parse({"scan": {"clamd_socket": "/s", "clamd_address": "127.0.0.1:3310", "on_error": "drop",
                        "max_scan_size": 0, "timeout": "0s", "socket": "/x"}}, tmp_path)
    assert sorted(err.value.problems) == [
        "scan.clamd_socket / scan.clamd_address: give one of them",
        "scan.max_scan_size: must be a positive number",
        "scan.on_error: 'drop' is not one of tempfail, accept",
        "scan.socket: unknown key",
        "scan.timeout: must be a positive duration",
    ]
    with pytest.raises(ConfigError, match="scan.clamd_address: 'clamd' is not host:port"):
        parse({"scan": {"clamd_address": "clamd"}}, tmp_path)


# --- the client against a real clamd (and a silent one) ---------------------------------------------------------

def test_scanner_against_clamd(clamd_server):
    unix = ClamdScanner(ScanSettings(clamd_socket=clamd_server.socket, timeout=10.0))
    tcp = ClamdScanner(ScanSettings(clamd_host="127.0.0.1", clamd_port=clamd_server.tcp_port, timeout=10.0))

    async def run():
        return [await s.scan(m) for s in (unix, tcp) for m in (CLEAN, INFECTED, b"")]

    assert asyncio.run(run()) == [clamd.ScanResult(clamd.CLEAN), clamd.ScanResult(clamd.INFECTED, SIGNATURE),
                                  clamd.ScanResult(clamd.CLEAN)] * 2


def test_over_clamds_stream_limit_fails_and_over_relays_is_not_sent(clamd_server):
    big = message("big", os.urandom(1_200_000))  # clamd's StreamMaxLength is 1M here
    result = asyncio.run(ClamdScanner(ScanSettings(clamd_socket=clamd_server.socket, timeout=10.0)).scan(big))
    assert result.status == clamd.FAILED and "StreamMaxLength" in result.detail, result
    nowhere = ScanSettings(clamd_socket=clamd_server.folder / "absent.sock", max_scan_size=len(big) - 1)
    result = asyncio.run(ClamdScanner(nowhere).scan(big))  # never connects: the socket does not exist
    assert result.status == clamd.TOO_LARGE
    result = asyncio.run(ClamdScanner(replace(nowhere, max_scan_size=len(big))).scan(big))
    assert result.status == clamd.FAILED and "absent.sock" in result.detail


def test_silent_clamd_times_out(tmp_path):
    async def run():
        async def swallow(reader, writer):
            await reader.read()  # reads everything, never answers
        path = Path(tempfile.mkdtemp(prefix="silent-", dir="/tmp")) / "s.sock"
        server = await asyncio.start_unix_server(swallow, path)
        try:
            start = time.monotonic()
            result = await ClamdScanner(ScanSettings(clamd_socket=path, timeout=0.3)).scan(CLEAN)
            return result, time.monotonic() - start
        finally:
            server.close()
            shutil.rmtree(path.parent, ignore_errors=True)

    result, took = asyncio.run(run())
    assert result.status == clamd.FAILED and "did not answer within 0.3s" in result.detail
    assert took < 5


# --- end to end: relay as a subprocess, a real clamd, an aiosmtpd upstream ----------------------------------------

def test_virus_is_refused_with_a_reject_event_and_clean_mail_is_delivered(tmp_path, clamd_server, upstream):
    relay = RelayProcess(tmp_path / "relay", upstream.port, extra=scan_config(clamd_server.socket)).start()
    try:
        code, reply = submit(relay.smtp_port, INFECTED)
        assert (code, reply) == (554, f"5.7.1 Message rejected: Bad content: virus {SIGNATURE} found".encode())
        code, _ = submit(relay.smtp_port, message("no set", TEST_STRING, set_name=None))
        assert code == 554  # refused all the same; no set, so no event (as SES: events belong to a set)
        assert submit(relay.smtp_port, CLEAN)[0] == 250
        delivered = upstream.wait_for(1)
        relay.wait_events("Delivery", 1)
        reject, = relay.events("Reject")
        time.sleep(0.3)
        assert len(upstream.messages) == 1 and b"Subject: clean" in delivered[0].data
        assert [json.loads(e[4])["mail"]["destination"] for e in relay.events("Send")] == [["rcpt@example.org"]]
        assert "virus=Relay.Test.Signature.UNOFFICIAL refused" in relay.log()
    finally:
        relay.stop()
    assert reject[2:4] == (None, "plain")
    record, ref = json.loads(reject[4]), reference("reject")
    assert record["eventType"] == ref["eventType"] == "Reject"
    assert keys(ref) <= keys(record) and keys(record["reject"]) == keys(ref["reject"])
    assert record["reject"] == ref["reject"] == {"reason": "Bad content"}
    mail = record["mail"]
    assert mail["messageId"] == reject[1] and mail["source"] == "sender@example.com"
    assert mail["destination"] == ["rcpt@example.org"] and mail["commonHeaders"]["subject"] == "infected"
    assert mail["tags"]["ses:configuration-set"] == ["plain"] and mail["tags"]["ses:source-ip"] == ["127.0.0.1"]
    with contextlib.closing(relay.db()) as conn:
        assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 1  # nothing kept of the virus


def test_clamd_down_answers_451_and_the_retry_is_delivered_once(tmp_path, clamd_server, upstream):
    relay = RelayProcess(tmp_path / "relay", upstream.port, extra=scan_config(clamd_server.socket)).start()
    try:
        clamd_server.stop()
        code, reply = submit(relay.smtp_port, CLEAN)
        assert (code, reply) == (451, b"4.7.0 Temporary failure: virus scan unavailable")
        assert "failed, answered 451" in relay.log()
        time.sleep(0.3)
        assert upstream.messages == [] and relay.events() == []
        clamd_server.start()
        assert submit(relay.smtp_port, CLEAN)[0] == 250  # the client's retry
        upstream.wait_for(1)
        relay.wait_events("Delivery", 1)
        time.sleep(0.5)
        assert len(upstream.messages) == 1 and len(relay.events("Send")) == 1
    finally:
        relay.stop()


def test_on_error_accept_and_max_scan_size_let_mail_through_unscanned(tmp_path, clamd_server, upstream):
    big_virus = message("big virus", TEST_STRING + os.urandom(8000))
    relay = RelayProcess(tmp_path / "relay", upstream.port,
                         extra=scan_config(clamd_server.socket, max_scan_size=8000)).start()
    try:
        assert submit(relay.smtp_port, INFECTED)[0] == 554  # small enough: scanned
        assert submit(relay.smtp_port, big_virus)[0] == 250  # over max_scan_size: accepted unscanned, logged
        assert b"Subject: big virus" in upstream.wait_for(1)[0].data
        assert "accepted unscanned" in relay.log()
    finally:
        relay.stop()
    relay = RelayProcess(tmp_path / "relay2", upstream.port,
                         extra=scan_config(clamd_server.folder / "absent.sock", on_error="accept")).start()
    try:
        assert submit(relay.smtp_port, CLEAN)[0] == 250
        upstream.wait_for(2)
        assert "failed, accepted unscanned" in relay.log()
    finally:
        relay.stop()


def test_header_refusals_record_a_reject_in_the_identity_default_set(tmp_path, upstream):
    """Bad X-SES-MESSAGE-TAGS without X-SES-CONFIGURATION-SET: the sender identity's default set is the
    message's set, so the refusal is that set's Reject. A malformed set name names no set: no event."""
    identities = '\n[identities."sender@example.com"]\ndefault_configuration_set = "plain"\n'
    relay = RelayProcess(tmp_path / "relay", upstream.port, extra=identities).start()
    try:
        bad_tag = b"X-SES-MESSAGE-TAGS: bad=x.y\r\n" + CLEAN.split(b"\r\n", 1)[1]  # no set header
        code, reply = submit(relay.smtp_port, bad_tag)
        assert code == 554 and b"x.y" in reply
        reject, = relay.wait_events("Reject", 1)
        code, _ = submit(relay.smtp_port, b"X-SES-CONFIGURATION-SET: not a name\r\n" + bad_tag)
        assert code == 554
        time.sleep(0.3)
        assert len(relay.events("Reject")) == 1 and relay.events("Send") == [] and upstream.messages == []
    finally:
        relay.stop()
    record = json.loads(reject[4])
    assert reject[3] == "plain" and record["mail"]["tags"]["ses:configuration-set"] == ["plain"]
    assert "x.y" in record["reject"]["reason"] and record["mail"]["commonHeaders"]["subject"] == "clean"
