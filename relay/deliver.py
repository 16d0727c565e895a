"""The deliver stage: hand one recipient's copy to the upstream and report what it said.

Two upstreams share one small interface (`send(mail_from, recipient, data) -> Reply`):
- `SmtpUpstream` relays over SMTP with aiosmtplib through a bounded pool of reused connections;
- `CaptureUpstream` writes each copy as a file into a folder (the Quick start's and tests' real sink).
Connection problems and timeouts come back as a 4xx-class `Reply` with `connection_failed` set, so the queue
treats every temporary problem alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib

from relay.config import UpstreamSettings

log = logging.getLogger("relay.deliver")


@dataclass(frozen=True)
class Reply:
    code: int
    message: str
    remote_ip: str = ""
    connection_failed: bool = False

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

    async def send(self, mail_from: str, recipient: str, data: bytes, message_id: str = "") -> Reply:
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
            return Reply(451, f"4.3.0 capture folder not writable: {exc.strerror}", connection_failed=True)
        return Reply(250, f"2.0.0 Ok: captured as {final.name}")

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

    async def send(self, mail_from: str, recipient: str, data: bytes, message_id: str = "") -> Reply:
        async with self._slots:
            client = self._idle.pop() if self._idle else None
            for attempt in (1, 2):
                fresh = client is None
                try:
                    if client is None:
                        client = await self._connect()
                    reply = await self._transaction(client, mail_from, recipient, data)
                except aiosmtplib.SMTPServerDisconnected as exc:
                    client = await _discard(client)
                    if fresh or attempt == 2:
                        return Reply(421, f"4.4.2 upstream closed the connection: {exc}", connection_failed=True)
                    continue  # a pooled connection went stale: retry once on a fresh one
                except aiosmtplib.SMTPResponseException as exc:  # refused at connect, EHLO, STARTTLS or AUTH
                    client = await _discard(client)
                    return Reply(exc.code, exc.message, connection_failed=True)
                except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
                    client = await _discard(client)
                    text = str(exc) or type(exc).__name__
                    return Reply(421, f"4.4.1 upstream {self.settings.host}:{self.settings.port}: {text}",
                                 connection_failed=True)
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
        try:
            await client.mail(mail_from, options=options, encoding=encoding)
            response = await client.rcpt(recipient, encoding=encoding)
            if not 200 <= response.code < 300:
                raise aiosmtplib.SMTPRecipientRefused(response.code, response.message, recipient)
            response = await client.data(data)
        except aiosmtplib.SMTPResponseException as exc:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                await client.rset()
            return Reply(exc.code, exc.message, _peer_ip(client))  # the connection stays usable
        return Reply(response.code, response.message, _peer_ip(client))

    async def close(self) -> None:
        while self._idle:
            await _discard(self._idle.pop())


def _peer_ip(client: aiosmtplib.SMTP) -> str:
    transport = getattr(client, "transport", None)
    peer = transport.get_extra_info("peername") if transport else None
    return peer[0] if peer else ""


async def _discard(client: aiosmtplib.SMTP | None) -> None:
    if client is not None:
        with contextlib.suppress(Exception):
            client.close()
    return None


def make_upstream(settings: UpstreamSettings, local_hostname: str) -> CaptureUpstream | SmtpUpstream:
    if settings.type == "capture":
        return CaptureUpstream(settings.capture_dir)
    return SmtpUpstream(settings, local_hostname)
