"""The deliver stage: hand one recipient's copy to the upstream and report what it said.

Two upstreams share one small interface (`send(mail_from, recipient, data) -> Reply`):
- `SmtpUpstream` relays over SMTP through a bounded pool of reused aiosmtplib connections; when the upstream
  announces PIPELINING (RFC 2920) a transaction takes two round trips: MAIL + RCPT + DATA, then the body;
- `CaptureUpstream` writes each copy as a file into a folder (the Quick start's and tests' real sink).
Connection problems and timeouts come back as a 4xx-class `Reply` with `connection_failed` set, so the queue
treats every temporary problem alike. Every `Reply` names the SMTP step it answered (MAIL FROM, RCPT TO, DATA, end
of DATA): a refusal means something else at each (relay.core.outcome reads it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import ssl
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import normalize_message_line_endings

from relay.config import UpstreamSettings
from relay.core.headers import DOT_ATOM_ADDRESS
from relay.core.outcome import CONNECT, DATA, END_OF_DATA, MAIL, RCPT

log = logging.getLogger("relay.deliver")


@dataclass(frozen=True)
class Reply:
    code: int
    message: str
    step: str  # the step this reply answered: CONNECT, MAIL, RCPT, DATA or END_OF_DATA (relay.core.outcome)
    remote_ip: str = ""
    connection_failed: bool = False
    local_ip: str = ""  # the address relay delivered from (SES's ses:outgoing-ip)

    @property
    def text(self) -> str:
        return f"{self.code} {self.message}".strip()

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300


class CaptureUpstream:
    """Writes every delivered copy to `<folder>/<message-id>.<n>.eml`, durably (fsync, then rename)."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    async def send(self, mail_from: str, recipient: str, data: bytes, message_id: str = "",
                   require_tls: bool = False) -> Reply:
        """`require_tls` is met: the copy never crosses a network."""
        return await asyncio.to_thread(self._write, mail_from, recipient, data, message_id)

    def _write(self, mail_from: str, recipient: str, data: bytes, message_id: str) -> Reply:
        safe = "".join(c if c.isalnum() or c in "-_.@" else "_" for c in recipient)[:100]
        stem = f"{message_id or 'message'}.{safe}"
        final = self.folder / f"{stem}.eml"
        tmp = self.folder / f".{stem}.{os.getpid()}.tmp"
        envelope = f"X-Relay-Envelope-From: <{mail_from}>\r\nX-Relay-Envelope-To: <{recipient}>\r\n".encode()
        try:
            with open(tmp, "wb") as f:
                f.write(envelope + data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except OSError as exc:
            return Reply(451, f"4.3.0 capture folder not writable: {exc.strerror}", CONNECT, connection_failed=True)
        return Reply(250, f"2.0.0 Ok: captured as {final.name}", END_OF_DATA)

    async def close(self) -> None:
        return None


class SmtpUpstream:
    """A bounded pool of reused aiosmtplib connections to one upstream host."""

    def __init__(self, settings: UpstreamSettings, local_hostname: str):
        self.settings = settings
        self.local_hostname = local_hostname
        self._idle: list[aiosmtplib.SMTP] = []
        self._slots = asyncio.Semaphore(settings.connections)

    def _tls_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.settings.ca_file) if self.settings.ca_file else None)
        if not self.settings.verify_certificate:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    async def _connect(self) -> aiosmtplib.SMTP:
        s = self.settings
        client = aiosmtplib.SMTP(
            hostname=s.host,
            port=s.port,
            local_hostname=self.local_hostname,
            timeout=s.timeout,
            use_tls=s.tls == "implicit",
            start_tls=False,
            tls_context=self._tls_context() if s.tls != "none" else None,
            validate_certs=s.verify_certificate,
        )
        await client.connect()
        await client.ehlo()
        if s.tls == "starttls" or (s.tls == "opportunistic" and client.supports_extension("starttls")):
            await client.starttls(tls_context=self._tls_context())
            await client.ehlo()
        if s.username:
            await client.login(s.username, s.password)
        return client

    async def send(self, mail_from: str, recipient: str, data: bytes, message_id: str = "",
                   require_tls: bool = False) -> Reply:
        """`require_tls` (a set's TlsPolicy REQUIRE): the copy goes over an encrypted connection or waits."""
        async with self._slots:
            client = self._idle.pop() if self._idle else None
            for attempt in (1, 2):
                fresh = client is None
                try:
                    if client is None:
                        client = await self._connect()
                    if require_tls and not _encrypted(client):
                        self._idle.append(client)  # good for mail that does not require TLS
                        return Reply(454, TLS_REQUIRED, CONNECT, _peer_ip(client), connection_failed=True)
                    reply = await self._transaction(client, mail_from, recipient, data)
                except aiosmtplib.SMTPServerDisconnected as exc:
                    client = await _discard(client)
                    if fresh or attempt == 2:
                        return Reply(421, f"4.4.2 upstream closed the connection: {exc}", CONNECT,
                                     connection_failed=True)
                    continue  # a pooled connection went stale: retry once on a fresh one
                except aiosmtplib.SMTPResponseException as exc:  # refused at connect, EHLO, STARTTLS or AUTH
                    client = await _discard(client)
                    return Reply(exc.code, exc.message, CONNECT, connection_failed=True)
                except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
                    client = await _discard(client)
                    text = str(exc) or type(exc).__name__
                    return Reply(421, f"4.4.1 upstream {self.settings.host}:{self.settings.port}: {text}",
                                 CONNECT, connection_failed=True)
                if client.is_connected:
                    self._idle.append(client)
                return reply
            raise AssertionError("unreachable")

    async def _transaction(self, client: aiosmtplib.SMTP, mail_from: str, recipient: str, data: bytes) -> Reply:
        options = []
        if client.supports_extension("size"):
            options.append(f"SIZE={len(data)}")
        if client.supports_extension("8bitmime") and not data.isascii():
            options.append("BODY=8BITMIME")
        if not (mail_from + recipient).isascii() and client.supports_extension("smtputf8"):
            options.append("SMTPUTF8")
        encoding = "utf-8" if "SMTPUTF8" in options else "ascii"
        sender, rcpt_to = _quoted(mail_from), _quoted(recipient)
        if _CONTROL.search(sender + rcpt_to):
            raise ValueError("Command arg contains a prohibited control character")  # as aiosmtplib checks
        envelope = [(MAIL, f"MAIL FROM:{sender}{''.join(' ' + o for o in options)}\r\n", (250,)),
                    (RCPT, f"RCPT TO:{rcpt_to}\r\n", (250, 251)),
                    (DATA, "DATA\r\n", (354,))]
        return await self._exchange(client, [(step, line.encode(encoding), ok) for step, line, ok in envelope], data,
                                    pipelined=client.supports_extension("pipelining"))

    async def _exchange(self, client: aiosmtplib.SMTP, envelope: list[tuple[str, bytes, tuple[int, ...]]],
                        data: bytes, pipelined: bool) -> Reply:
        """One transaction. With PIPELINING (RFC 2920) in two round trips: MAIL + RCPT + DATA, then the body;
        without it one command per round trip, stopping at the first refusal. A refusal is reported with the
        step it answered (the first one refused), the body's reply as END_OF_DATA."""
        with _ReplyReader(client, self.settings.timeout) as replies:
            refusal: tuple[str, aiosmtplib.SMTPResponse] | None = None
            if pipelined:
                replies.write(b"".join(line for _, line, _ in envelope))
            for step, line, ok in envelope:
                if not pipelined:
                    replies.write(line)
                answer = await replies.next()
                if answer.code not in ok:
                    refusal = refusal or (step, answer)
                    if not pipelined:
                        break
            if step == DATA and answer.code == 354:
                # RFC 2920: a DATA accepted after a refused envelope still needs its terminating dot
                replies.write(b".\r\n" if refusal else dot_stuffed(data))
                final = await replies.next()
                if refusal is None and final.code == 250:
                    return Reply(final.code, final.message, END_OF_DATA, _peer_ip(client), local_ip=_local_ip(client))
                refusal = refusal or (END_OF_DATA, final)
            closing = 421 in replies.codes
        assert refusal is not None  # a DATA not answered 354 is itself the refusal
        if closing:
            client.close()  # the upstream is closing the channel (as aiosmtplib does on a 421)
        else:
            await _reset(client)
        step, answer = refusal
        return Reply(answer.code, answer.message, step, _peer_ip(client))

    async def close(self) -> None:
        while self._idle:
            await _discard(self._idle.pop())


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def dot_stuffed(data: bytes) -> bytes:
    """The DATA payload for `data`: CRLF line endings, a leading "." doubled, ending in CRLF "." CRLF.

    Byte for byte what aiosmtplib sends; relay's copies are CRLF already, so the line-ending pass is skipped
    when the counts of CR, LF and CRLF show there is nothing to normalise."""
    crlf = data.count(b"\r\n")
    if data.count(b"\r") != crlf or data.count(b"\n") != crlf:
        data = normalize_message_line_endings(data)
    elif not data.endswith(b"\r\n"):
        data += b"\r\n"
    data = data.replace(b"\n.", b"\n..")
    return (b"." + data if data.startswith(b".") else data) + b".\r\n"


_DOT_ATOM = re.compile(DOT_ATOM_ADDRESS)
# Retried as any temporary failure (then a Transient bounce after the set's MaxDeliverySeconds or max_age): the
# upstream may offer STARTTLS again later, and a copy must not go out in clear against its set's policy.
TLS_REQUIRED = ("4.7.10 TLS required: the configuration set's TlsPolicy is REQUIRE and the connection to the"
                " upstream is not encrypted (it offers no STARTTLS, or upstream.tls is \"none\")")


def _encrypted(client: aiosmtplib.SMTP) -> bool:
    return client.get_transport_info("sslcontext") is not None


def _quoted(address: str) -> str:
    """`<address>` as aiosmtplib's quote_address makes it; a plain dot-atom address needs no parser for that."""
    return f"<{address}>" if _DOT_ATOM.fullmatch(address) else quote_address(address)


class _ReplyReader(asyncio.Protocol):
    """Stands in for aiosmtplib's protocol on the connection during one transaction.

    aiosmtplib's protocol parses one reply per command written and drops bytes that arrive past it, so several
    replies in one segment would be lost; this reader queues every complete reply. (It also carries the plain,
    one-command-at-a-time transaction: aiosmtplib's `data()` does not tell a refused DATA from a refused body.)
    The connection's own protocol is put back on leaving, and still hears of a lost connection."""

    def __init__(self, client: aiosmtplib.SMTP, timeout: float):
        if client.protocol is None or client.protocol.transport is None:
            raise aiosmtplib.SMTPServerDisconnected("Server not connected")
        self._protocol = client.protocol
        self._transport: asyncio.Transport = client.protocol.transport  # type: ignore[assignment]
        self._timeout = timeout
        self._buffer = bytearray()
        self._lines: list[bytes] = []
        self._replies: deque[aiosmtplib.SMTPResponse] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._failure: Exception | None = None
        self.codes: list[int] = []

    def __enter__(self) -> _ReplyReader:
        self._transport.set_protocol(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._transport.set_protocol(self._protocol)

    def write(self, data: bytes) -> None:
        if self._transport.is_closing():
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        self._transport.write(data)

    async def next(self) -> aiosmtplib.SMTPResponse:
        while not self._replies:
            if self._failure is not None:
                raise self._failure
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(self._timeout):
                    await self._waiter
            except TimeoutError as exc:
                raise aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response") from exc
        return self._replies.popleft()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while (end := self._buffer.find(b"\n")) != -1:
            line = bytes(self._buffer[:end + 1])
            del self._buffer[:end + 1]
            if not line[:3].isdigit():
                self._fail(aiosmtplib.SMTPException(f"Malformed SMTP response line: {line[:100]!r}"))
                return
            self._lines.append(line[4:].strip(b" \t\r\n"))
            if line[3:4] != b"-":
                message = b"\n".join(self._lines).decode("utf-8", "surrogateescape")
                self._lines.clear()
                self.codes.append(int(line[:3]))
                self._replies.append(aiosmtplib.SMTPResponse(int(line[:3]), message))
        if len(self._buffer) > _MAX_LINE:
            self._fail(aiosmtplib.SMTPException("Response too long"))
        self._wake()

    def pause_writing(self) -> None:  # flow control stays with the connection's own protocol
        self._protocol.pause_writing()

    def resume_writing(self) -> None:
        self._protocol.resume_writing()

    def eof_received(self) -> bool:
        self._fail(aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(aiosmtplib.SMTPServerDisconnected("Connection lost"))
        self._protocol.connection_lost(exc)

    def _fail(self, exc: Exception) -> None:
        self._failure = self._failure or exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


_MAX_LINE = 8192


async def _reset(client: aiosmtplib.SMTP) -> None:
    with contextlib.suppress(aiosmtplib.SMTPException, OSError):
        await client.rset()


def _peer_ip(client: aiosmtplib.SMTP) -> str:
    transport = getattr(client, "transport", None)
    peer = transport.get_extra_info("peername") if transport else None
    return peer[0] if peer else ""


def _local_ip(client: aiosmtplib.SMTP) -> str:
    transport = getattr(client, "transport", None)
    local = transport.get_extra_info("sockname") if transport else None
    return local[0] if local else ""


async def _discard(client: aiosmtplib.SMTP | None) -> None:
    if client is not None:
        with contextlib.suppress(Exception):
            client.close()
    return None


def make_upstream(settings: UpstreamSettings, local_hostname: str) -> CaptureUpstream | SmtpUpstream:
    if settings.type == "capture":
        return CaptureUpstream(settings.capture_dir)
    return SmtpUpstream(settings, local_hostname)
