"""The SMTP listener against hostile or careless clients, end to end: relay as a subprocess, raw sockets on
127.0.0.1, an aiosmtpd upstream. Command-line limits, connection caps, replies that echo client input, AUTH
timing and its cost to other sessions, and messages committed while their client resets the connection."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
import socket
import sqlite3
import statistics
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.config import ConfigError, SmtpSettings, hash_password
from relay.config import parse as parse_config
from relay.core.replies import ELLIPSIS, echo, reply_line
from relay.smtp import Authenticator, ConnectionCounts, RefusalLog, read_message_data

from .harness import RelayProcess, Upstream

MB = 1024 * 1024
USERS = f'[[smtp.users]]\nusername = "app"\npassword_hash = "{hash_password("s3cret")}"'


@pytest.fixture
def upstream():
    u = Upstream().start()
    yield u
    u.stop()


@pytest.fixture
def relay(tmp_path, upstream):
    with started(tmp_path, upstream) as r:
        yield r


@contextlib.contextmanager
def started(tmp_path: Path, upstream: Upstream, smtp_extra: str = "", extra: str = "") -> Iterator[RelayProcess]:
    r = RelayProcess(tmp_path / "relay", upstream.port, smtp_extra=smtp_extra, extra=extra).start()
    try:
        yield r
    finally:
        r.stop()


class Client:
    """A raw SMTP client on one socket: exactly the bytes a test writes, replies read line by line."""

    def __init__(self, port: int, source: str = "127.0.0.1", timeout: float = 30):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))
        self.file = self.sock.makefile("rb")

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def hello(self) -> Client:
        """Past the greeting and EHLO."""
        assert self.line().startswith(b"220")
        assert self.command(b"EHLO client.test").startswith(b"250 ")
        return self

    def line(self) -> bytes:
        return self.file.readline()

    def reply(self) -> bytes:
        """One whole reply (the last line of a multi-line one), CRLF included."""
        while (line := self.line())[3:4] == b"-":
            pass
        return line

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def command(self, data: bytes) -> bytes:
        self.send(data + b"\r\n")
        return self.reply()

    def reset(self) -> None:
        """Close with a TCP reset (SO_LINGER 0), as a client that crashed or timed out."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
            self.sock.close()


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024


def greeted(port: int, source: str = "127.0.0.1") -> Client:
    """A connection that got relay's greeting; retried for a moment, while the harness's own probe of the
    port (connect, close) may still count against a cap."""
    for _ in range(50):
        c = Client(port, source)
        if c.line().startswith(b"220"):
            return c
        c.close()
        time.sleep(0.05)
    raise AssertionError("no greeting")


def is_open(client: Client, wait: float = 0.3) -> bool:
    """Still connected: nothing to read but no end of stream either."""
    client.sock.settimeout(wait)
    try:
        return client.sock.recv(1, socket.MSG_PEEK) != b""
    except TimeoutError:
        return True
    except OSError:
        return False
    finally:
        client.sock.settimeout(30)


# --- A: command lines keep RFC 5321's limits ------------------------------------------------------------------

def transaction(c: Client, rcpt: bytes = b"b@example.org") -> None:
    """MAIL, RCPT and DATA, up to the 354."""
    assert c.command(b"MAIL FROM:<a@example.com>").startswith(b"250")
    assert c.command(b"RCPT TO:<" + rcpt + b">").startswith(b"250")
    assert c.command(b"DATA").startswith(b"354")


def test_endless_command_line_is_not_buffered_and_gets_500(relay):
    with Client(relay.smtp_port).hello() as c:
        before = rss_mb(relay.proc.pid)
        c.send(b"MAIL FROM:<")
        chunk = b"a" * MB
        for _ in range(40):  # relay's message size limit: what it used to buffer for one command line
            c.send(chunk)
        time.sleep(0.5)  # let relay read what is in flight
        grown = rss_mb(relay.proc.pid) - before
        reply = c.command(b">")
        assert grown < 16, f"relay grew by {grown:.0f} MB for one command line"
        assert reply.startswith(b"500 ") and b"too long" in reply
        assert c.command(b"NOOP").startswith(b"250")  # the session goes on, in step


def test_command_lines_within_their_limits_are_served(relay):
    with Client(relay.smtp_port).hello() as c:
        path = b"x" * 64 + b"@" + b"d" * 200 + b".example.com"
        assert c.command(b"MAIL FROM:<" + path + b"> SIZE=1000 SMTPUTF8 BODY=8BITMIME").startswith(b"250")
        assert c.command(b"RSET").startswith(b"250")
        assert c.command(b"MAIL FROM:<" + b"x" * 600 + b"@example.com>").startswith(b"500")
        assert c.command(b"NOOP " + b"n" * 600).startswith(b"500")
        assert c.command(b"NOOP").startswith(b"250")


def test_auth_initial_response_up_to_rfc_4954s_limit(tmp_path, upstream):
    with started(tmp_path, upstream, f"auth_fail_limit = 100\n{USERS}") as r, Client(r.smtp_port).hello() as c:
        long_password = base64.b64encode(b"\0app\0" + b"p" * 9000)  # ~12 KB: over 512, within 12288
        assert c.command(b"AUTH PLAIN " + long_password).startswith(b"535")
        assert c.command(b"AUTH PLAIN " + base64.b64encode(b"\0app\0s3cret")).startswith(b"235")


def test_bare_lf_message_far_over_the_command_limits_is_accepted(relay, upstream):
    # 9 MB: more than two of the pieces DATA is read in, and not one CRLF before its end
    body = b"".join(b"line %d of a message sent with bare LF line ends\n" % i for i in range(180000))
    with Client(relay.smtp_port).hello() as c:
        transaction(c)
        c.send(b"Subject: bare\n\n" + body + b"\r\n.\r\n")
        reply = c.reply()
        assert reply.startswith(b"250 Ok"), reply
        assert c.command(b"NOOP").startswith(b"250")
    got = upstream.wait_for(1)[0]
    assert got.data.endswith(body.replace(b"\n", b"\r\n") + b"\r\n")  # its last line ended with the CRLF of .


# --- A: connection caps ----------------------------------------------------------------------------------------

def test_connections_over_the_per_client_cap_get_421_and_are_closed(tmp_path, upstream):
    extra = "trusted_networks = []\nmax_connections_per_client = 3\nmax_connections = 10"
    with started(tmp_path, upstream, extra) as r, contextlib.ExitStack() as clients:
        held = [clients.enter_context(greeted(r.smtp_port)) for _ in range(3)]
        with Client(r.smtp_port) as over:
            reply = over.line()
            assert reply.startswith(b"421 4.7.0 ") and b"too many connections" in reply, reply
            assert over.line() == b""  # closed
        other = clients.enter_context(Client(r.smtp_port, source="127.0.0.2"))  # another address, its own count
        assert other.line().startswith(b"220")
        held.pop(0).command(b"QUIT")
        time.sleep(0.2)
        again = clients.enter_context(Client(r.smtp_port))  # a closed connection frees its place
        assert again.line().startswith(b"220")
        assert all(is_open(c) for c in held + [other])


def test_clients_that_connect_and_close_at_once_leave_nothing_open(relay):
    def open_files() -> int:
        return len(list(Path(f"/proc/{relay.proc.pid}/fd").iterdir()))

    greeted(relay.smtp_port).command(b"QUIT")
    time.sleep(0.3)
    before = open_files()
    for _ in range(20):  # port probes, health checks: gone before their greeting
        socket.create_connection(("127.0.0.1", relay.smtp_port)).close()
    time.sleep(0.5)
    # aiosmtpd left each one half-open (and counted against the connection caps) until the idle timeout
    assert open_files() <= before + 2, f"{open_files() - before} more files open"


def test_total_connection_cap_and_trusted_clients(tmp_path, upstream):
    # 127.0.0.1 is trusted (the default): exempt from the per-client cap, as Postfix exempts $mynetworks, but
    # not from the total.
    extra = "max_connections_per_client = 2\nmax_connections = 4"
    with started(tmp_path, upstream, extra) as r, contextlib.ExitStack() as clients:
        for _ in range(4):
            clients.enter_context(greeted(r.smtp_port))
        for source in ("127.0.0.1", "127.0.0.9"):
            with Client(r.smtp_port, source=source) as over:
                reply = over.line()
            assert reply.startswith(b"421 4.7.0 ") and b"too many connections" in reply, reply


def test_a_flood_of_refused_connections_is_logged_once(tmp_path, upstream):
    extra = "trusted_networks = []\nmax_connections_per_client = 1"
    with started(tmp_path, upstream, extra) as r, greeted(r.smtp_port) as held:
        for _ in range(200):
            with Client(r.smtp_port) as c:
                assert c.line().startswith(b"421")
        assert is_open(held)
        time.sleep(0.3)
        lines = [line for line in r.log().splitlines() if "too many connections" in line]
        assert len(lines) == 1, lines


# --- B: replies never carry client input beyond a reply line ----------------------------------------------------

def check_reply_line(reply: bytes) -> None:
    assert reply.endswith(b"\r\n") and len(reply) <= 512, (len(reply), reply[:100])
    assert not re.search(rb"[\x00-\x1f\x7f]", reply[:-2]), reply


def test_a_huge_bad_tag_value_is_refused_with_a_short_clean_reply(relay, upstream):
    # 100 KB with control characters in it (a bare CR would end the field: acceptance makes it a line end)
    value = b"bad" + b"\x0b\x0c\x1b" + b"x\x01y\x7f" * 25000
    with Client(relay.smtp_port).hello() as c:
        transaction(c)
        c.send(b"X-SES-MESSAGE-TAGS: ok=1, name=" + value + b"\r\nSubject: t\r\n\r\nbody\r\n.\r\n")
        reply = c.line()
        check_reply_line(reply)
        assert reply.startswith(b"554 ") and b"message tag 'name'" in reply, reply
        assert c.command(b"RSET") == b"250 OK\r\n"  # nothing of the refusal left in the stream
    assert upstream.messages == []


def test_unknown_command_with_control_characters_is_not_echoed_raw(relay):
    with Client(relay.smtp_port).hello() as c:
        reply = c.command(b"FO\rO\x07\x1b[2J" + b"Z" * 400)
        check_reply_line(reply)
        assert reply.startswith(b"500 ")
        assert c.command(b"NOOP") == b"250 OK\r\n"


# --- C: AUTH timing and cost -------------------------------------------------------------------------------------

def auth_plain(c: Client, user: bytes, password: bytes) -> tuple[float, bytes]:
    """(seconds to the reply, the reply)"""
    token = base64.b64encode(b"\0" + user + b"\0" + password)
    start = time.perf_counter()
    reply = c.command(b"AUTH PLAIN " + token)
    return time.perf_counter() - start, reply


def test_auth_takes_as_long_for_an_unknown_user_as_for_a_wrong_password(tmp_path, upstream):
    with started(tmp_path, upstream, f"auth_fail_limit = 1000\n{USERS}") as r, Client(r.smtp_port).hello() as c:
        known, unknown = [], []
        for i in range(9):  # alternating, so load on the machine falls on both alike
            for user, password, times in ((b"app", b"wrong%d" % i, known), (b"nobody%d" % i, b"wrong", unknown)):
                seconds, reply = auth_plain(c, user, password)
                assert reply.startswith(b"535")
                times.append(seconds)
        k, u = statistics.median(known), statistics.median(unknown)
        assert u > 0.6 * k and k > 0.6 * u, f"wrong password {k * 1000:.1f} ms, unknown user {u * 1000:.1f} ms"


def test_password_checks_do_not_stall_other_sessions(tmp_path, upstream):
    with started(tmp_path, upstream, f"auth_fail_limit = 1000\n{USERS}") as r, contextlib.ExitStack() as stack:
        pinger = stack.enter_context(Client(r.smtp_port).hello())
        attackers = [stack.enter_context(Client(r.smtp_port).hello()) for _ in range(8)]
        stop = threading.Event()

        def attack(a: Client) -> None:
            while not stop.is_set():
                assert auth_plain(a, b"app", b"wrong")[1].startswith(b"535")

        threads = [threading.Thread(target=attack, args=(a,)) for a in attackers]
        for t in threads:
            t.start()
        time.sleep(0.2)
        waits = []
        for _ in range(40):
            start = time.perf_counter()
            assert pinger.command(b"NOOP").startswith(b"250")
            waits.append(time.perf_counter() - start)
            time.sleep(0.01)
        stop.set()
        for t in threads:
            t.join()
        # scrypt costs ~40 ms of a core: on the event loop, 8 clients' checks in a row held every NOOP for half a
        # second or more; off it, a NOOP waits for nothing but CPU time shared with the checks (a few ms).
        assert statistics.median(waits) < 0.1, [round(w * 1000) for w in waits]


def test_parallel_auth_attempts_cannot_outrun_the_failure_limit(tmp_path, upstream):
    with started(tmp_path, upstream, f"auth_fail_limit = 3\n{USERS}") as r, contextlib.ExitStack() as stack:
        clients = [stack.enter_context(Client(r.smtp_port).hello()) for _ in range(10)]
        token = base64.b64encode(b"\0app\0guess")
        for c in clients:  # ten guesses at once, each on its own connection
            c.send(b"AUTH PLAIN " + token + b"\r\n")
        codes = sorted(c.reply()[:3] for c in clients)
        assert codes == [b"454"] * 7 + [b"535"] * 3, codes


def test_auth_login_is_checked_off_the_loop_too(tmp_path, upstream):
    extra = f"trusted_networks = []\n{USERS}"
    with started(tmp_path, upstream, extra) as r, Client(r.smtp_port).hello() as c:
        for password, code in ((b"wrong", b"535"), (b"s3cret", b"235")):
            assert c.command(b"AUTH LOGIN").startswith(b"334 ")
            assert c.command(base64.b64encode(b"app")).startswith(b"334 ")
            assert c.command(base64.b64encode(password)).startswith(code)
        assert c.command(b"MAIL FROM:<a@example.com>").startswith(b"250")
        assert c.command(b"RCPT TO:<b@example.org>").startswith(b"250")  # authenticated: may relay


# --- D: a reset right after the end of the message ---------------------------------------------------------------

def send_and_reset(port: int, subject: str, rcpt: bytes = b"b@example.org", delay: float = 0.0) -> None:
    """A whole message, then a reset `delay` seconds after its end: at once, or while relay stores it."""
    c = Client(port).hello()
    try:
        transaction(c, rcpt)
        c.send(b"Subject: " + subject.encode() + b"\r\nFrom: a@example.com\r\n\r\n" + b"body line\r\n" * 50
               + b".\r\n")
        time.sleep(delay)
    finally:
        c.reset()


def settled(query, timeout: float = 10.0):
    """The value of `query()` once it stopped changing for a second."""
    deadline = time.monotonic() + timeout
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        with contextlib.suppress(sqlite3.OperationalError):
            value = query()
            if value != last:
                last, since = value, time.monotonic()
            elif time.monotonic() - since > 1.0:
                return value
        time.sleep(0.1)
    return last


def test_a_message_committed_while_its_client_resets_is_delivered(relay, upstream):
    for i in range(100):
        send_and_reset(relay.smtp_port, f"reset-{i}", delay=i % 5 / 1000)

    def committed() -> set[str]:
        with contextlib.closing(relay.db()) as db:
            return {row[0] for row in db.execute("SELECT subject FROM messages")}

    stored = settled(committed)
    assert stored, "no message was committed: the resets came too early to test anything"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        delivered = {re.search(rb"Subject: (\S+)", m.data).group(1).decode() for m in upstream.messages}
        if stored <= delivered:
            break
        time.sleep(0.1)
    assert stored <= delivered, f"{len(stored - delivered)} of {len(stored)} committed messages not delivered"


def test_a_report_stored_while_its_client_resets_is_logged(tmp_path, upstream):
    with started(tmp_path, upstream, extra='\n[bounces]\ndomain = "bounces.test"\n') as r:
        for i in range(60):
            send_and_reset(r.smtp_port, f"report-{i}", rcpt=b"postmaster@bounces.test", delay=i % 10 / 1000)

        def stored() -> int:
            with contextlib.closing(r.db()) as db:
                return db.execute("SELECT count(*) FROM inbound_reports").fetchone()[0]

        count = settled(stored)
        assert count, "no report survived its client's reset"
        time.sleep(0.5)
        logged = len(re.findall(r"inbound ip=\S+ .* report=\d+", r.log()))
        assert logged == count, f"{count} reports stored, {logged} logged"


# --- the pure parts -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stream,message", [
    (b".\r\n", b""),
    (b"one line\r\n.\r\n", b"one line\r\n"),
    (b"a\r\n..b\r\n...\r\nc.\r\n.\r\n", b"a\r\n.b\r\n..\r\nc.\r\n"),
    (b"bare\nlf\n.\r\n" * 20 + b".\r\n", b"bare\nlf\n.\r\n" * 20),
    (b"x" * 1000 + b"\r\n.\r\n", b"x" * 1000 + b"\r\n"),
])
@pytest.mark.parametrize("piece", [6, 7, 16, 64])
def test_data_is_read_in_pieces_of_the_streams_limit(stream, message, piece):
    """The DATA reader on a stream whose limit is far below the message (relay's is the piece size): the end
    and the dot-stuffing are found across piece boundaries, pipelined bytes after the end stay."""
    async def main():
        reader = asyncio.StreamReader(limit=piece)
        reader.feed_data(stream + b"QUIT\r\n")
        reader.feed_eof()
        return await read_message_data(reader, 10_000), await reader.read()

    assert asyncio.run(main()) == (message, b"QUIT\r\n")


def test_connection_and_auth_settings_are_read_and_checked(tmp_path):
    cfg = parse_config({"smtp": {"max_connections": 7, "max_connections_per_client": 3, "auth_concurrency": 1}},
                       tmp_path)
    assert (cfg.smtp.max_connections, cfg.smtp.max_connections_per_client, cfg.smtp.auth_concurrency) == (7, 3, 1)
    defaults = parse_config({}, tmp_path).smtp
    assert (defaults.max_connections, defaults.max_connections_per_client, defaults.auth_concurrency) == (100, 50, 2)
    with pytest.raises(ConfigError) as err:
        parse_config({"smtp": {"max_connections": 0, "auth_concurrency": -1}}, tmp_path)
    assert "smtp.max_connections: must be a positive number" in err.value.problems
    assert "smtp.auth_concurrency: must be a positive number" in err.value.problems


@pytest.mark.parametrize("text", [
    "250 Ok",
    "554 " + "x" * 100_000,
    "554 Invalid value 'a\r\nb\x00c\x7fd\x85e' for message tag 'n'",
    "550 <" + "é" * 300 + "> rejected",  # 2 octets a character, cut anywhere
    "553 <" + "\U0001f600" * 200 + "> invalid",  # 4 octets
    "500 \udcff\udcfe undecodable client bytes",
])
def test_reply_line_is_one_clean_line_of_at_most_512_octets(text):
    line = reply_line(text)
    raw = line.encode("utf-8")  # encodes: no lone surrogates left
    assert len(raw) + 2 <= 512
    assert not re.search(r"[\x00-\x1f\x7f-\x9f]", line)
    assert line[:3] == text[:3]
    if len(text.encode("utf-8", "surrogatepass")) <= 510:
        assert len(line) == len(text)  # only replaced, never cut
    else:
        assert ELLIPSIS in line and line.endswith(text[-5:])  # the end (the explanation) stays


def test_echo_shortens_and_cleans_a_value():
    assert echo("a@example.com") == "a@example.com"
    assert echo("a\rb") == "a?b"
    assert len(echo("x" * 1000)) == 256 and echo("x" * 1000).endswith(ELLIPSIS)


def test_connection_counts():
    counts, settings = ConnectionCounts(), SmtpSettings(max_connections=3, max_connections_per_client=2)
    assert counts.admit("10.0.0.1", settings, exempt=False) is None
    assert counts.admit("10.0.0.1", settings, exempt=False) is None
    assert counts.admit("10.0.0.1", settings, exempt=False) == "too many connections from 10.0.0.1"
    assert counts.admit("10.0.0.1", settings, exempt=True) is None  # trusted: only the total applies
    assert counts.admit("10.0.0.2", settings, exempt=False) == "too many connections"
    for _ in range(3):
        counts.release("10.0.0.1")
    assert counts.total == 0 and not counts.per_client


def test_refusal_log_summarizes_a_flood(caplog):
    async def main():
        refusals = RefusalLog(interval=0.2)
        for i in range(500):
            refusals.refused(f"10.0.0.{i % 7}", "too many connections")
        await asyncio.sleep(0.3)
        refusals.refused("10.0.0.9", "too many connections")  # still counted: a flood goes on
        await asyncio.sleep(0.3)
        await asyncio.sleep(0.3)  # a quiet interval ends the summaries
        refusals.refused("10.0.0.8", "too many connections")

    with caplog.at_level(logging.WARNING, logger="relay.smtp"):
        asyncio.run(main())
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "smtp ip=10.0.0.0 refused: too many connections",
        "smtp refused 499 more connections in 0 s (the last from 10.0.0.2: too many connections)",
        "smtp refused 1 more connections in 0 s (the last from 10.0.0.9: too many connections)",
        "smtp ip=10.0.0.8 refused: too many connections",
    ]


def test_password_checks_hold_their_thread_slots_even_when_abandoned():
    running, most = 0, 0
    lock = threading.Lock()

    def slow_check() -> bool:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.05)
        with lock:
            running -= 1
        return False

    async def main():
        auth = Authenticator(SmtpSettings(auth_concurrency=2))
        abandoned = [asyncio.create_task(auth._in_thread(slow_check)) for _ in range(6)]
        await asyncio.sleep(0.01)
        for task in abandoned:  # clients that reset while their check runs or waits
            task.cancel()
        await asyncio.gather(*(auth._in_thread(slow_check) for _ in range(6)))

    asyncio.run(main())
    assert most == 2
