"""Pipelined delivery (RFC 2920) in SmtpUpstream against real upstreams on 127.0.0.1.

An aiosmtpd upstream that announces PIPELINING and one that does not must receive the same bytes and options;
a scripted raw upstream answers only once MAIL, RCPT and DATA have all arrived (so a client that did not
pipeline would time out), records every byte, and refuses, defers or drops where a test asks it to."""

from __future__ import annotations

import asyncio
import contextlib
import smtplib
import ssl
from dataclasses import dataclass, field

import pytest
from aiosmtpd.controller import Controller

from relay.config import UpstreamSettings
from relay.deliver import Reply, SmtpUpstream, dot_stuffed

from .harness import Received, RelayProcess, UpstreamHandler, free_port

BODIES = {
    "plain": b"From: a@example.com\r\nTo: b@example.org\r\nSubject: hi\r\n\r\nhello\r\n",
    "leading dots": b"Subject: dots\r\n\r\n.\r\n..two\r\n.hidden\r\nmid.dle\r\n.\r\n",
    "no final CRLF": b"Subject: open\r\n\r\nlast line without CRLF",
    "dot without final CRLF": b"Subject: open\r\n\r\n.",
    "starts with a dot": b".first line\r\n\r\nbody\r\n",
    "8 bit": "Subject: caf\u00e9\r\n\r\n.cr\u00e8me br\u00fbl\u00e9e\r\n".encode(),
}


def upstream_settings(port: int, timeout: float = 5.0) -> UpstreamSettings:
    return UpstreamSettings(type="smtp", host="127.0.0.1", port=port, tls="none", timeout=timeout, connections=1)


class PipeliningHandler(UpstreamHandler):
    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", responses[-1]]


async def deliver_all(port: int, sends: list[tuple[str, str, bytes]]) -> list[Reply]:
    upstream = SmtpUpstream(upstream_settings(port), "relay.test")
    try:
        return [await upstream.send(sender, recipient, data) for sender, recipient, data in sends]
    finally:
        await upstream.close()


def received_by(handler: UpstreamHandler, sends: list[tuple[str, str, bytes]]) -> list[Received]:
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, enable_SMTPUTF8=True, data_size_limit=None)
    controller.start()
    try:
        replies = asyncio.run(deliver_all(port, sends))
    finally:
        controller.stop()
    assert [r.code for r in replies] == [250] * len(sends), replies
    return handler.messages


def test_pipelining_and_plain_upstreams_receive_the_same_bytes_and_options():
    sends = [("a@example.com", "b@example.org", body) for body in BODIES.values()]
    sends.append(("a@example.com", "j\u00fcrgen@example.org", BODIES["8 bit"]))  # SMTPUTF8
    pipelined = received_by(PipeliningHandler(), sends)
    plain = received_by(UpstreamHandler(), sends)
    assert pipelined == plain
    for (_, recipient, data), got in zip(sends, pipelined, strict=True):
        assert got.data == (data if data.endswith(b"\r\n") else data + b"\r\n")
        assert got.rcpt_tos == [recipient]
    assert "BODY=8BITMIME" in pipelined[-2].mail_options and "SMTPUTF8" in pipelined[-1].mail_options
    assert "BODY=8BITMIME" not in pipelined[0].mail_options


@pytest.mark.parametrize("body", BODIES.values(), ids=BODIES.keys())
def test_dot_stuffing_matches_aiosmtplib(body):
    from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings

    assert dot_stuffed(body) == PERIOD_REGEX.sub(b"..", normalize_message_line_endings(body)) + b".\r\n"


@pytest.mark.parametrize("body", [b"lone\nLF\r\n.x\n", b"lone\rCR\r\n", b"", b"\r\n.\r\n", b"x\r"])
def test_dot_stuffing_normalises_stray_line_endings_as_aiosmtplib(body):
    from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings

    assert dot_stuffed(body) == PERIOD_REGEX.sub(b"..", normalize_message_line_endings(body)) + b".\r\n"


# --- a scripted upstream ----------------------------------------------------------------------------------

@dataclass
class Script:
    """Replies of the scripted upstream; "drop" closes the connection instead of replying."""
    pipelining: bool = True
    mail: str = "250 2.1.0 Ok"
    rcpt: str = "250 2.1.5 Ok"
    data: str = "354 End data with <CR><LF>.<CR><LF>"
    final: str = "250 2.0.0 Ok: queued"
    dropped_connections: set[int] = field(default_factory=set)  # connection numbers (from 1) that drop
    close_when_done: bool = False  # close each connection after its first transaction


class ScriptedUpstream:
    def __init__(self, script: Script):
        self.script = script
        self.connections = 0
        self.commands: list[bytes] = []
        self.payloads: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> ScriptedUpstream:
        self.server = await asyncio.start_server(self._session, "127.0.0.1", 0, limit=2**26)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            await self._converse(reader, writer, self.connections in self.script.dropped_connections)
        writer.close()

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, drop: bool) -> None:
        s = self.script
        writer.write(b"220 scripted ESMTP\r\n")
        while line := await reader.readline():
            self.commands.append(line)
            verb = line[:4].upper()
            if verb == b"EHLO":
                extensions = b"250-PIPELINING\r\n" if s.pipelining else b""
                writer.write(b"250-scripted\r\n" + extensions + b"250-8BITMIME\r\n250 SIZE 1000000\r\n")
            elif verb in (b"MAIL", b"RCPT", b"DATA"):
                group = [line]
                if s.pipelining and verb == b"MAIL":  # answer nothing before the whole group is in
                    group += [await reader.readline(), await reader.readline()]
                    self.commands += group[1:]
                    assert [c[:4] for c in group] == [b"MAIL", b"RCPT", b"DATA"], group
                answers = {b"MAIL": s.mail, b"RCPT": s.rcpt, b"DATA": s.data}
                if drop:
                    writer.write(f"{answers[verb]}\r\n".encode())  # one reply, then the line goes dead
                    await writer.drain()
                    return
                writer.write("".join(f"{answers[c[:4].upper()]}\r\n" for c in group).encode())
                if group[-1][:4].upper() == b"DATA" and s.data.startswith("354"):
                    await writer.drain()
                    self.payloads.append(await self._payload(reader))
                    if not s.final:  # a silent upstream
                        await asyncio.sleep(2)
                        return
                    writer.write(f"{s.final}\r\n".encode())
                    if s.close_when_done:
                        await writer.drain()
                        return
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                return
            else:  # RSET, NOOP
                writer.write(b"250 2.0.0 Ok\r\n")
            await writer.drain()

    @staticmethod
    async def _payload(reader: asyncio.StreamReader) -> bytes:
        first = await reader.readline()
        return first if first == b".\r\n" else first + await reader.readuntil(b"\r\n.\r\n")


async def scripted(script: Script, *bodies: bytes) -> tuple[list[Reply], ScriptedUpstream, int]:
    async with ScriptedUpstream(script) as server:
        upstream = SmtpUpstream(upstream_settings(server.port, timeout=3), "relay.test")
        replies = [await upstream.send("a@example.com", "b@example.org", body) for body in bodies]
        pooled = len(upstream._idle)
        await upstream.close()
    return replies, server, pooled


def test_envelope_and_body_each_go_in_one_round_trip_with_exact_bytes():
    bodies = list(BODIES.values())
    replies, server, pooled = asyncio.run(scripted(Script(), *bodies))
    assert [r.code for r in replies] == [250] * len(bodies)
    assert replies[0].message == "2.0.0 Ok: queued" and replies[0].remote_ip == "127.0.0.1"
    assert server.payloads == [dot_stuffed(b) for b in bodies]
    assert server.payloads[1] == b"Subject: dots\r\n\r\n..\r\n...two\r\n..hidden\r\nmid.dle\r\n..\r\n.\r\n"
    assert server.connections == 1 and pooled == 1
    assert server.commands[1] == b"MAIL FROM:<a@example.com> SIZE=%d\r\n" % len(bodies[0])
    assert b"BODY=8BITMIME" in server.commands[-3]


def test_a_body_larger_than_the_socket_buffers_arrives_exact():
    """Some 20 MB: the transport pauses and resumes writing during the pipelined exchange."""
    huge = b"Subject: huge\r\n\r\n" + b".a dotted line, repeated until the body is over 20 MB\r\n" * 400000
    replies, server, pooled = asyncio.run(scripted(Script(), huge, BODIES["plain"]))
    assert [r.code for r in replies] == [250, 250] and pooled == 1
    assert server.payloads == [dot_stuffed(huge), dot_stuffed(BODIES["plain"])]


def test_multiline_replies_split_across_segments():
    script = Script(mail="250-2.1.0 sender\r\n250 2.1.0 Ok", final="250-2.0.0 queued\r\n250 2.0.0 as X")
    replies, server, _ = asyncio.run(scripted(script, BODIES["plain"]))
    assert (replies[0].code, replies[0].message) == (250, "2.0.0 queued\n2.0.0 as X")


@pytest.mark.parametrize(("script", "expected"), [
    (Script(mail="550 5.7.1 sender refused", rcpt="503 5.5.1 no sender", data="503 5.5.1 no recipients"),
     (550, "5.7.1 sender refused")),
    (Script(rcpt="550 5.1.1 no such user", data="554 5.5.1 no valid recipients"), (550, "5.1.1 no such user")),
    (Script(data="451 4.3.0 try later"), (451, "4.3.0 try later")),
    (Script(final="452 4.3.1 out of storage"), (452, "4.3.1 out of storage")),
    (Script(final="554 5.7.1 spam"), (554, "5.7.1 spam")),
], ids=["5xx MAIL", "5xx RCPT", "4xx DATA", "4xx final", "5xx final"])
def test_refusals_map_to_the_reply_and_the_connection_is_reset_and_kept(script, expected):
    replies, server, pooled = asyncio.run(scripted(script, BODIES["plain"], BODIES["plain"]))
    assert [(r.code, r.message) for r in replies] == [expected, expected]
    assert not any(r.connection_failed for r in replies)
    assert [c for c in server.commands if c.startswith(b"RSET")] == [b"RSET\r\n"] * 2
    assert server.connections == 1 and pooled == 1


def test_data_accepted_after_a_refused_recipient_gets_an_empty_terminating_dot():
    replies, server, _ = asyncio.run(scripted(Script(rcpt="550 5.1.1 no such user"), BODIES["plain"]))
    assert (replies[0].code, replies[0].message) == (550, "5.1.1 no such user")
    assert server.payloads == [b".\r\n"]


def test_421_closes_the_connection_and_it_leaves_the_pool():
    script = Script(mail="421 4.3.2 shutting down", rcpt="421 4.3.2 shutting down", data="421 4.3.2 shutting down")
    replies, server, pooled = asyncio.run(scripted(script, BODIES["plain"]))
    assert (replies[0].code, replies[0].permanent) == (421, False)
    assert pooled == 0


def test_a_connection_dropped_mid_pipeline_is_temporary_and_discarded():
    replies, server, pooled = asyncio.run(scripted(Script(dropped_connections={1}), BODIES["plain"]))
    assert replies[0].code == 421 and replies[0].connection_failed and not replies[0].permanent
    assert pooled == 0 and server.payloads == []


def test_a_pooled_connection_dropped_mid_pipeline_is_retried_once_on_a_fresh_one():
    script = Script(dropped_connections={1})
    replies, server, pooled = asyncio.run(scripted(script, BODIES["plain"], BODIES["leading dots"]))
    assert replies[0].connection_failed
    assert replies[1].code == 250 and server.payloads == [dot_stuffed(BODIES["leading dots"])]
    assert server.connections == 2 and pooled == 1


def test_a_pooled_connection_the_upstream_closed_while_idle_is_replaced():
    async def run() -> tuple[list[Reply], int]:
        async with ScriptedUpstream(Script(close_when_done=True)) as server:
            upstream = SmtpUpstream(upstream_settings(server.port), "relay.test")
            replies = [await upstream.send("a@example.com", "b@example.org", BODIES["plain"])]
            await asyncio.sleep(0.2)  # the close reaches the idle connection
            replies.append(await upstream.send("a@example.com", "b@example.org", BODIES["leading dots"]))
            await upstream.close()
            return replies, server.connections

    replies, connections = asyncio.run(run())
    assert [r.code for r in replies] == [250, 250] and connections == 2


def test_a_silent_upstream_times_out_as_a_temporary_failure():
    async def run() -> tuple[Reply, int]:
        async with ScriptedUpstream(Script(final="")) as server:
            upstream = SmtpUpstream(upstream_settings(server.port, timeout=0.3), "relay.test")
            reply = await upstream.send("a@example.com", "b@example.org", BODIES["plain"])
            pooled = len(upstream._idle)
            await upstream.close()
            return reply, pooled

    reply, pooled = asyncio.run(run())
    assert reply.code == 421 and reply.connection_failed and "Timed out" in reply.message
    assert pooled == 0


def test_without_pipelining_commands_go_one_at_a_time():
    replies, server, pooled = asyncio.run(scripted(Script(pipelining=False), BODIES["leading dots"]))
    assert replies[0].code == 250 and server.payloads == [dot_stuffed(BODIES["leading dots"])]
    assert pooled == 1


# --- TLS -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    ca_path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    return server_ctx, ca_path


class CountingUpstream(SmtpUpstream):
    pipelined = 0

    async def _exchange(self, *args, pipelined: bool) -> Reply:
        self.pipelined += pipelined
        return await super()._exchange(*args, pipelined=pipelined)


# about 3 MB: more than the transport's write buffer holds before it pauses the protocol
LARGE = b"Subject: large\r\n\r\n" + b".a line with a leading dot, long enough to make a body of megabytes\r\n" * 45000


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_pipelining_over_tls_with_a_large_body(tls, mode):
    server_ctx, ca_path = tls
    handler = PipeliningHandler()
    port = free_port()
    server_tls = {"tls_context": server_ctx, "require_starttls": True} if mode == "starttls" else \
        {"ssl_context": server_ctx}
    controller = Controller(handler, hostname="127.0.0.1", port=port, data_size_limit=None, **server_tls)
    controller.start()
    bodies = [LARGE, BODIES["leading dots"]]

    async def run() -> tuple[list[Reply], int]:
        upstream = CountingUpstream(UpstreamSettings(type="smtp", host="127.0.0.1", port=port, tls=mode,
                                                     ca_file=ca_path, timeout=10, connections=1), "relay.test")
        try:
            return [await upstream.send("a@example.com", "b@example.org", b) for b in bodies], upstream.pipelined
        finally:
            await upstream.close()

    try:
        replies, pipelined = asyncio.run(run())
    finally:
        controller.stop()
    assert [r.code for r in replies] == [250, 250] and pipelined == 2
    assert [m.data for m in handler.messages] == bodies


# --- end to end: relay as a subprocess ----------------------------------------------------------------------

class RefusingPipeliningHandler(PipeliningHandler):
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("nobody@"):
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"


def test_relay_delivers_through_a_pipelining_upstream(tmp_path):
    handler = RefusingPipeliningHandler()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, enable_SMTPUTF8=True, data_size_limit=None)
    controller.start()
    body = "\r\n.\r\n..two dots\r\n.one dot\r\ncaf\u00e9 \u00e0 la cr\u00e8me\r\n".encode()
    message = (b"From: a@example.com\r\nTo: b@example.org\r\nSubject: dots\r\n"
               b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n" + body)
    relay = RelayProcess(tmp_path / "r", port)
    try:
        relay.start()
        with smtplib.SMTP("127.0.0.1", relay.smtp_port) as client:
            client.sendmail("a@example.com", ["b@example.org", "nobody@example.org"], message)
        relay.wait_events("Delivery", 1)
        bounces = relay.wait_events("Bounce", 1)
    finally:
        relay.stop()
        controller.stop()
    assert bounces[0][2] == "nobody@example.org" and "5.1.1 no such user" in bounces[0][4]
    (got,) = handler.messages
    assert got.rcpt_tos == ["b@example.org"] and "BODY=8BITMIME" in got.mail_options
    assert got.data.endswith(body)
