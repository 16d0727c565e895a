"""The accept stage's SMTP server (aiosmtpd): policy, authentication, and DATA handed to the pipeline.

- Never an open relay: a client outside `smtp.trusted_networks` must authenticate to send mail onwards (530 at
  RCPT). Reports for the bounce domain and the complaints addresses are accepted from anyone (issue 9) and go
  to the inbound stage, not the outbound pipeline; a forged report address is an unknown mailbox (550).
- AUTH PLAIN/LOGIN against salted scrypt hashes; offered only after STARTTLS, except from
  `smtp.plaintext_auth_networks` (loopback by default).
  Failed attempts are limited per client address.
- A message gets 250 only after the pipeline made it durable; a storage problem answers 451.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import re
import secrets
import ssl
import time
from collections import OrderedDict, defaultdict, deque

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from relay.config import SmtpSettings, check_password
from relay.core.headers import DOT_ATOM_ADDRESS
from relay.inbound import INBOUND, OUTBOUND, InboundMail
from relay.pipeline import Refusal, StorageUnavailable, Submission

log = logging.getLogger("relay.smtp")


def peer_ip(session: Session) -> str:
    peer = session.peer
    return peer[0] if isinstance(peer, tuple) else str(peer or "")


class Authenticator:
    """Checks SMTP credentials; limits failures per client address; caches recent successes.

    scrypt costs tens of milliseconds by design, so a client that authenticates on every connection would pay
    it each time; a keyed digest of recently verified credentials avoids that without keeping any password.
    """

    def __init__(self, settings: SmtpSettings, clock=time.monotonic):
        self.settings = settings
        self.clock = clock
        self._failures: dict[str, deque[float]] = defaultdict(deque)
        self._verified: OrderedDict[bytes, None] = OrderedDict()
        self._key = secrets.token_bytes(32)

    def blocked(self, ip: str) -> bool:
        window = self._failures.get(ip)
        if not window:
            return False
        horizon = self.clock() - self.settings.auth_fail_window
        while window and window[0] < horizon:
            window.popleft()
        return len(window) >= self.settings.auth_fail_limit

    def check(self, username: str, password: str) -> bool:
        digest = hmac.digest(self._key, f"{username}\0{password}".encode("utf-8", "surrogatepass"), "sha256")
        if digest in self._verified:
            self._verified.move_to_end(digest)
            return True
        user = next((u for u in self.settings.users if u.username == username), None)
        ok = user is not None and check_password(password, user.password_hash)
        if ok:
            self._verified[digest] = None
            if len(self._verified) > 1024:
                self._verified.popitem(last=False)
        return ok

    def __call__(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data) -> AuthResult:
        ip = peer_ip(session)
        if self.blocked(ip):
            log.warning("smtp auth ip=%s refused: too many failures", ip)
            return AuthResult(success=False, handled=False,
                              message="454 4.7.0 Temporary authentication failure: too many failed attempts")
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        username = auth_data.login.decode("utf-8", "replace")
        if self.check(username, auth_data.password.decode("utf-8", "surrogateescape")):
            log.info("smtp auth ip=%s user=%s ok", ip, username)
            return AuthResult(success=True, auth_data=username)
        self._failures[ip].append(self.clock())
        log.warning("smtp auth ip=%s user=%s failed", ip, username)
        return AuthResult(success=False, handled=False, message="535 5.7.8 Authentication credentials invalid")


# `<dot-atom@dot-atom>`, the form nearly every client sends in MAIL and RCPT: no quoting, comments or routes.
_PLAIN_PATH = re.compile(rf"<({DOT_ATOM_ADDRESS})>(?:\Z| +(?=[^\s(]))")


class RelaySMTP(SMTP):
    """aiosmtpd's server with AUTH-over-cleartext allowed on loopback only, and room for bare-LF messages."""

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """A plain `<local@domain>` path without the email package's full address parser (a tenth of a
        message's CPU at load); anything else goes to aiosmtpd's parser. Same result either way."""
        plain = _PLAIN_PATH.match(arg)
        if plain is None or (self.local_part_limit and plain.group(1).index("@") > self.local_part_limit):
            return super()._getaddr(arg)
        return plain.group(1), arg[plain.end():]

    def __init__(self, handler, *, data_size_limit: int, **kwargs):
        # aiosmtpd reads DATA by CRLF-terminated lines with this as the stream limit; a message sent with
        # bare LF line ends is one long "line", so allow up to the message size (commands keep their own limits).
        self.line_length_limit = data_size_limit + 1024
        super().__init__(handler, data_size_limit=data_size_limit, **kwargs)

    async def push(self, status: str | bytes) -> None:
        """Reply; while more pipelined commands wait in the input buffer, hold replies and send them together.

        RFC 2920 asks servers to batch pipelined responses; one write instead of one per command also saves a
        system call and a wake-up of the client per reply.
        """
        response = status.encode("utf-8" if self.enable_SMTPUTF8 else "ascii") if isinstance(status, str) else status
        self._held.append(response + b"\r\n")
        if not self._reader._buffer or response[:3] in (b"220", b"221", b"354"):
            self._writer.write(b"".join(self._held))
            self._held.clear()
            await self._writer.drain()

    async def smtp_DATA(self, arg: str) -> None:
        """DATA read in large chunks instead of one await per line (a 60 KB message has ~800 lines).

        Same protocol as aiosmtpd's: the end is CRLF.CRLF, leading dots are unstuffed, a message over the size
        limit is read to its end and then refused with 552, and pipelined commands after the end stay buffered.
        """
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        content = await read_message_data(self._reader, self.data_size_limit)
        if content is None:
            await self.push("552 5.3.4 Message is too long.")
        else:
            self.envelope.original_content = self.envelope.content = content
            self._in_data_hook = True
            try:
                status = await self._call_handler_hook("DATA")
            finally:
                self._in_data_hook = False
            await self.push(status)
            if self._input_ended:
                await self._close_after_input_ended()
                return
        self._set_post_data_state()

    def eof_received(self) -> bool | None:
        """A client may shut its sending side while its message is being stored: Exim pipelines QUIT behind
        the end of the message and then half-closes. aiosmtpd would cancel the transaction in progress, so
        the reply (a 250 for a message or report already durable) would be lost and the client would send
        it again, forever. The transaction finishes and is answered first (not over TLS: a TLS transport
        cannot stay half-open)."""
        if self._in_data_hook and self.session.ssl is None:
            self._input_ended = True
            return True
        return super().eof_received()

    async def _close_after_input_ended(self) -> None:
        """Answer a QUIT pipelined behind the message, send every held reply, and close. Anything else the
        client pipelined before closing is dropped unanswered, as a new transaction could not be finished."""
        if bytes(self._reader._buffer[:4]).upper() == b"QUIT":
            await self.push("221 Bye")
        self._reader._buffer.clear()  # nothing left for the command loop until the close cancels it
        self._writer.write(b"".join(self._held))
        self._held.clear()
        self.transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._held: list[bytes] = []
        self._in_data_hook = self._input_ended = False
        super().connection_made(transport)
        self._auth_require_tls = not self.event_handler.in_networks(
            peer_ip(self.session), self.event_handler.settings.plaintext_auth_networks)
        self.event_handler.sessions.add(self)

    def connection_lost(self, error: Exception | None) -> None:
        self.event_handler.sessions.discard(self)
        super().connection_lost(error)


TERMINATOR = b"\r\n.\r\n"


async def read_message_data(reader: asyncio.StreamReader, limit: int | None) -> bytes | None:
    """The message up to the lone-dot line, dot-unstuffed; None when it exceeds `limit` (read and discarded).

    The data starts after a virtual CRLF, so the end is always CRLF.CRLF, even for an empty message. While
    what was read ends with the start of that sequence (only at the very beginning, or when it was cut at a
    size limit), the few bytes that complete or refute it are read; otherwise one readuntil() reads up to the
    end. A message costs a few awaits, however many lines it has.
    """
    data = bytearray(b"\r\n")
    too_big = False
    while not data.endswith(TERMINATOR):
        pending = next((n for n in (4, 3, 2, 1) if data.endswith(TERMINATOR[:n])), 0)
        try:
            data += await (reader.readexactly(5 - pending) if pending else reader.readuntil(TERMINATOR))
        except asyncio.LimitOverrunError as exc:  # no end within the stream limit: discard what came so far
            data += await reader.readexactly(exc.consumed)
            too_big = True
        if too_big or (limit and len(data) > limit + 5):
            too_big = True
            del data[:-5]  # keep only what could hold or begin the end sequence: bounded memory
    if too_big:
        return None
    # RFC 5321 4.5.2: a client doubles a dot that starts a line; remove one leading dot from every line.
    return bytes(data[:-3]).replace(b"\r\n.", b"\r\n")[2:]


def reverse_path(envelope: Envelope) -> str:
    """MAIL FROM's address; "" for the null reverse-path (<>, a bounce's), which aiosmtpd keeps as "<>"."""
    return "" if envelope.mail_from in (None, "<>") else envelope.mail_from


class Handler:
    """aiosmtpd hooks: the policy checks and the hand-off to the pipeline."""

    def __init__(self, settings: SmtpSettings, pipeline, on_accepted, inbound=None):
        self.settings = settings
        self.pipeline = pipeline
        self.inbound = inbound  # relay.inbound.InboundStage: reports for the bounce domain (issue 9)
        self.on_accepted = on_accepted  # called with (QueuedMessage, recipients) after a durable accept
        self.sessions: set[RelaySMTP] = set()
        self.busy = 0  # transactions between end of DATA and the reply

    @staticmethod
    def in_networks(ip: str, networks) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in networks)

    def trusted(self, ip: str) -> bool:
        return self.in_networks(ip, self.settings.trusted_networks)

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        # Anyone may start a transaction: reports come from any MTA. RCPT decides (the relay stays closed).
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if len(envelope.rcpt_tos) >= self.settings.max_recipients:
            return f"452 4.5.3 Too many recipients (at most {self.settings.max_recipients} per message)"
        if "@" not in address or any(c in address for c in " <>\r\n"):
            return f"553 5.1.3 <{address}> Invalid email address"
        kind = self.inbound.recipient_kind(address) if self.inbound is not None else OUTBOUND
        if kind == OUTBOUND and not session.authenticated and not self.trusted(peer_ip(session)):
            return "530 5.7.0 Authentication required"
        if kind not in (INBOUND, OUTBOUND):
            return f"550 5.1.1 <{address}> Recipient address rejected: mailbox unavailable"
        # Reports and outgoing mail take different paths: one transaction carries one kind. 452 makes the
        # client deliver what was accepted and send this recipient again in a new transaction (RFC 5321
        # 4.5.3.1.10), so nothing is lost; a 5xx would bounce it.
        if envelope.rcpt_tos and getattr(envelope, "inbound", False) != (kind == INBOUND):
            return f"452 4.5.3 <{address}> Send reports and other mail in separate transactions"
        envelope.inbound = kind == INBOUND
        if address not in envelope.rcpt_tos:  # one copy per distinct recipient
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server, session, envelope):
        ip = peer_ip(session)
        if getattr(envelope, "inbound", False):
            return await self._receive_reports(ip, envelope)
        sub = Submission(
            mail_from=reverse_path(envelope),
            recipients=list(envelope.rcpt_tos),
            data=envelope.original_content or b"",
            client_ip=ip,
            helo=session.host_name or "",
            auth_user=session.auth_data if session.authenticated else None,
            tls=session.ssl is not None,
        )
        self.busy += 1
        try:
            msg = await self.pipeline.accept(sub)
        except Refusal as exc:
            log.info("smtp ip=%s from=<%s> rcpts=%d refused=%r", ip, sub.mail_from, len(sub.recipients), exc.reply)
            return exc.reply
        except StorageUnavailable:
            return "451 4.3.0 Temporary service failure: message not queued, try again later"
        except Exception:  # a bug must not cost a message: the client keeps it and retries
            log.exception("smtp ip=%s: unexpected error accepting a message", ip)
            return "451 4.3.0 Temporary service failure"
        finally:
            self.busy -= 1
        self.on_accepted(msg, msg.to_deliver(sub.recipients))  # suppressed ones are final
        log.info("smtp ip=%s from=<%s> rcpts=%d size=%d id=%s set=%s accepted", ip, sub.mail_from,
                 len(sub.recipients), len(sub.data), msg.id, msg.configuration_set or "-")
        return f"250 Ok {msg.id}"

    async def _receive_reports(self, ip: str, envelope: Envelope) -> str:
        self.busy += 1
        try:
            return await self.inbound.receive(InboundMail(reverse_path(envelope), tuple(envelope.rcpt_tos),
                                                          envelope.original_content or b"", ip))
        except Exception:  # a bug must not cost a report: the sending MTA keeps it and retries
            log.exception("smtp ip=%s: unexpected error receiving a report", ip)
            return "451 4.3.0 Temporary service failure"
        finally:
            self.busy -= 1


def tls_context(settings: SmtpSettings) -> ssl.SSLContext | None:
    if not settings.tls_certificate or not settings.tls_key:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(settings.tls_certificate), str(settings.tls_key))
    return ctx


async def start_server(settings: SmtpSettings, hostname: str, handler: Handler) -> asyncio.base_events.Server:
    loop = asyncio.get_running_loop()
    context = tls_context(settings)
    authenticator = Authenticator(settings)

    def factory() -> RelaySMTP:
        return RelaySMTP(
            handler,
            data_size_limit=settings.max_message_size,
            enable_SMTPUTF8=True,
            hostname=hostname,
            ident="relay ESMTP",
            tls_context=context,
            timeout=settings.timeout,
            auth_require_tls=True,
            authenticator=authenticator,
            auth_exclude_mechanism=["CRAM-MD5"],
        )

    return await loop.create_server(factory, host=settings.listen_host, port=settings.listen_port,
                                    reuse_address=True)

