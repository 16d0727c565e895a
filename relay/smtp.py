"""The accept stage's SMTP server (aiosmtpd): policy, authentication, and DATA handed to the pipeline.

- Never an open relay: a client outside `smtp.trusted_networks` must authenticate to send mail onwards (530 at
  RCPT). Reports for the bounce domain and the complaints addresses are accepted from anyone and go
  to the inbound stage, not the outbound pipeline; a forged report address is an unknown mailbox (550).
- AUTH PLAIN/LOGIN against salted scrypt hashes; offered only after STARTTLS, except from
  `smtp.plaintext_auth_networks` (loopback by default). Failed attempts are limited per client address; the
  check runs in a bounded pool of threads and takes as long for an unknown user name as for a wrong password.
- A message gets 250 only after the pipeline made it durable; a storage problem answers 451. Once the pipeline
  has it, a client that resets the connection cannot stop it from being queued.
- Limits an unauthenticated client meets: RFC 5321's command line lengths (a line never buffered beyond them),
  open connections in total and per client address (421), replies cut to a line and stripped of control
  characters whatever they echo.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import ipaddress
import logging
import re
import secrets
import ssl
import time
from collections import Counter, OrderedDict, defaultdict, deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from relay.config import SmtpSettings, SmtpUser, check_password
from relay.core.headers import DOT_ATOM_ADDRESS
from relay.core.replies import echo, reply_line
from relay.inbound import INBOUND, OUTBOUND, InboundMail
from relay.pipeline import Refusal, StorageUnavailable, Submission

log = logging.getLogger("relay.smtp")

# RFC 5321 4.5.3.1.4: a command line is at most 512 octets; extensions lengthen the commands they add to.
COMMAND_LINE_OCTETS = 512
MAIL_LINE_OCTETS = COMMAND_LINE_OCTETS + 26 + 10  # RFC 1870's SIZE=, RFC 6531's SMTPUTF8 (aiosmtpd's figures)
# RFC 4954 4: 12288 octets hold any deployed SASL response (Postfix's smtpd_sasl_response_limit, the same)
AUTH_LINE_OCTETS = 12288
# DATA is read in pieces of up to this size, which need no line end (a bare-LF message is one long "line"). The
# reader stops the socket at twice it; smaller pieces slowed a 20 MB message down by 15% (256 KiB and 1 MiB).
DATA_READ_OCTETS = 4 * 1024 * 1024
# A flood of refused connections is logged as one line per this many seconds, not one line each
REFUSAL_LOG_SECONDS = 60.0
PROXY_HEADER_TIMEOUT_S = 5.0  # a load balancer sends its PROXY header at once (HAProxy waits 5 s, timeout client)


def address_of(peer: Any) -> str:
    """The IP address in a socket's peer name (a tuple for TCP)."""
    return peer[0] if isinstance(peer, tuple) else str(peer or "")


def peer_ip(session: Session) -> str:
    """The client's address: the one a load balancer named in its PROXY header, else the connection's."""
    proxied = session.proxy_data.src_addr if session.proxy_data is not None else None
    return str(proxied) if proxied else address_of(session.peer)


def unmatchable_hash(users: Sequence[SmtpUser]) -> str | None:
    """A password hash of the same scheme and cost as the (first) user's that no password matches (its digest
    is random): checking an unknown user name against it takes as long as against a real user's hash."""
    if not users:
        return None  # no user names to tell apart
    try:
        scheme, n, r, p, _, _ = users[0].password_hash.split("$")
    except ValueError:
        return None  # a malformed hash fails at once for its user too
    salt, digest = (base64.b64encode(secrets.token_bytes(size)).decode() for size in (16, 32))
    return "$".join((scheme, n, r, p, salt, digest))


class Authenticator:
    """Checks SMTP credentials; limits failures per client address; caches recent successes.

    scrypt costs tens of milliseconds by design, so a client that authenticates on every connection would pay
    it each time; a keyed digest of recently verified credentials avoids that without keeping any password.
    The check runs in a worker thread (the event loop serves every other session meanwhile), at most
    `auth_concurrency` at once, and takes as long for an unknown user name as for a wrong password.
    """

    def __init__(self, settings: SmtpSettings, clock=time.monotonic):
        self.settings = settings
        self.clock = clock
        self._failures: dict[str, deque[float]] = defaultdict(deque)
        self._verified: OrderedDict[bytes, None] = OrderedDict()
        self._key = secrets.token_bytes(32)
        self._slots = asyncio.Semaphore(settings.auth_concurrency)
        self._unknown_user_hash = unmatchable_hash(settings.users)

    def blocked(self, ip: str) -> bool:
        window = self._failures.get(ip)
        if not window:
            return False
        horizon = self.clock() - self.settings.auth_fail_window
        while window and window[0] < horizon:
            window.popleft()
        return len(window) >= self.settings.auth_fail_limit

    def _forget(self, ip: str, attempt: float) -> None:
        window = self._failures.get(ip)
        if window is not None and attempt in window:  # not already out of the window
            window.remove(attempt)
        if not window:
            self._failures.pop(ip, None)

    async def check(self, username: str, password: str) -> bool:
        digest = hmac.digest(self._key, f"{username}\0{password}".encode("utf-8", "surrogatepass"), "sha256")
        if digest in self._verified:
            self._verified.move_to_end(digest)
            return True
        ok = await self._in_thread(self._verify, username, password)
        if ok:
            self._verified[digest] = None
            if len(self._verified) > 1024:
                self._verified.popitem(last=False)
        return ok

    def _verify(self, username: str, password: str) -> bool:
        """scrypt against the user's hash; for a name that is no user's, against a hash of the same cost that
        nothing matches, so the answer takes as long and its timing does not tell which user names exist."""
        user = next((u for u in self.settings.users if u.username == username), None)
        stored = user.password_hash if user is not None else self._unknown_user_hash
        return stored is not None and check_password(password, stored) and user is not None

    async def _in_thread(self, work: Callable[..., bool], *args) -> bool:
        """work(*args) in a worker thread, at most `auth_concurrency` at once. A slot is held until its thread
        is done, even when the client went away meanwhile: the thread cannot be stopped, and a client that
        sends AUTH and resets, over and over, must not start more threads than the slots."""
        await self._slots.acquire()
        try:
            job = asyncio.get_running_loop().run_in_executor(None, work, *args)
        except BaseException:
            self._slots.release()
            raise
        job.add_done_callback(lambda _: self._slots.release())
        return await asyncio.shield(job)

    async def authenticate(self, ip: str, auth_data: LoginPassword) -> AuthResult:
        if self.blocked(ip):
            log.warning("smtp auth ip=%s refused: too many failures", ip)
            return AuthResult(success=False, handled=False,
                              message="454 4.7.0 Temporary authentication failure: too many failed attempts")
        username = auth_data.login.decode("utf-8", "replace")
        # The attempt counts as a failure while it is checked: attempts in parallel (one per connection, the
        # checks in threads) must not all pass blocked() before any of them failed.
        attempt = self.clock()
        self._failures[ip].append(attempt)
        if await self.check(username, auth_data.password.decode("utf-8", "surrogateescape")):
            self._forget(ip, attempt)
            log.info("smtp auth ip=%s user=%s ok", ip, username)
            return AuthResult(success=True, auth_data=username)
        log.warning("smtp auth ip=%s user=%s failed", ip, username)
        return AuthResult(success=False, handled=False, message="535 5.7.8 Authentication credentials invalid")


@dataclass(frozen=True)
class _Credentials:
    """What aiosmtpd decoded from AUTH PLAIN or LOGIN, on its way to the (asynchronous) check."""

    login_password: LoginPassword


class _CommandLineLimits(dict):
    """aiosmtpd's per-command line limits (it answers a longer line 500). aiosmtpd keeps them in one dict
    shared by all sessions and adds SIZE's and SMTPUTF8's octets to MAIL's at every EHLO, so repeated EHLOs
    raised the limit for everyone; these are fixed, and ignore that addition."""

    def __init__(self):
        super().__init__(MAIL=MAIL_LINE_OCTETS, AUTH=AUTH_LINE_OCTETS)

    def __missing__(self, command: str) -> int:
        return COMMAND_LINE_OCTETS

    def __setitem__(self, command: str, octets: int) -> None:
        pass


# `<dot-atom@dot-atom>`, the form nearly every client sends in MAIL and RCPT: no quoting, comments or routes.
_PLAIN_PATH = re.compile(rf"<({DOT_ATOM_ADDRESS})>(?:\Z| +(?=[^\s(]))")


class RelaySMTP(SMTP):
    """aiosmtpd's server with AUTH-over-cleartext allowed on loopback only, command lines held to their
    limits, DATA read in large pieces, and connections over the caps refused."""

    # aiosmtpd reads command lines with a StreamReader of this limit: a longer line is read and discarded up to
    # its end and answered 500, and a line that never ends costs no more memory than this (twice: the reader
    # stops reading at twice its limit). DATA has its own reader, read_message_data.
    line_length_limit = AUTH_LINE_OCTETS

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """A plain `<local@domain>` path without the email package's full address parser (a tenth of a
        message's CPU at load); anything else goes to aiosmtpd's parser. Same result either way."""
        plain = _PLAIN_PATH.match(arg)
        if plain is None or (self.local_part_limit and plain.group(1).index("@") > self.local_part_limit):
            return super()._getaddr(arg)
        return plain.group(1), arg[plain.end():]

    def __init__(self, handler, **kwargs):
        super().__init__(handler, **kwargs)
        self.command_size_limits = _CommandLineLimits()
        self._refused = False
        self._client_ip: str | None = None  # while this connection counts against the caps

    async def push(self, status: str | bytes) -> None:
        """Reply; while more pipelined commands wait in the input buffer, hold replies and send them together.

        RFC 2920 asks servers to batch pipelined responses; one write instead of one per command also saves a
        system call and a wake-up of the client per reply. Every reply is made one clean line here, whatever
        client input it echoes (reply_line).
        """
        text = status if isinstance(status, str) else status.decode("utf-8", "surrogateescape")
        response = reply_line(text).encode("utf-8" if self.enable_SMTPUTF8 else "ascii", "replace")
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
        self._reader._limit = DATA_READ_OCTETS  # the stream's limit is the piece size read_message_data gets
        try:
            content = await read_message_data(self._reader, self.data_size_limit)
        finally:
            self._reader._limit = self.line_length_limit
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
        cannot stay half-open).

        Otherwise aiosmtpd cancels the session's task and leaves closing to it; a task cancelled before it
        first ran (a client that connects and closes at once: a port probe, a health check) never does, and the
        connection stayed open, and counted against the caps, until the idle timeout. Returning False makes the
        transport close itself."""
        if self._in_data_hook and self.session.ssl is None:
            self._input_ended = True
            return True
        super().eof_received()
        return False

    async def _close_after_input_ended(self) -> None:
        """Answer a QUIT pipelined behind the message, send every held reply, and close. Anything else the
        client pipelined before closing is dropped unanswered, as a new transaction could not be finished."""
        if bytes(self._reader._buffer[:4]).upper() == b"QUIT":
            await self.push("221 Bye")
        self._reader._buffer.clear()  # nothing left for the command loop until the close cancels it
        self._writer.write(b"".join(self._held))
        self._held.clear()
        self.transport.close()

    def _authenticate(self, mechanism: str, auth_data: Any) -> _Credentials:
        """aiosmtpd calls this synchronously once auth_PLAIN or auth_LOGIN has decoded the credentials. Checking
        them here would run scrypt on the event loop, stalling every session; they are passed on instead, to
        be checked in a thread by the auth_PLAIN and auth_LOGIN below."""
        return _Credentials(auth_data)

    async def auth_PLAIN(self, _, args: list[str]) -> AuthResult:
        return await self._checked(await super().auth_PLAIN(_, args))

    async def auth_LOGIN(self, _, args: list[str]) -> AuthResult:
        return await self._checked(await super().auth_LOGIN(_, args))

    async def _checked(self, result: AuthResult | _Credentials) -> AuthResult:
        if isinstance(result, _Credentials):
            return await self._authenticator.authenticate(peer_ip(self.session), result.login_password)
        return result  # refused before a check (bad base64, "*" abort): aiosmtpd answered already

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:  # a new connection (STARTTLS calls this again with the TLS transport)
            ip = address_of(transport.get_extra_info("peername"))
            refusal = self.event_handler.admit(ip, behind_proxy=self._proxy_timeout is not None)
            if refusal is not None:
                self._refuse(transport, refusal)
                return
            self._client_ip = ip
            self.event_handler.sessions.add(self)
        self._held: list[bytes] = []
        self._in_data_hook = self._input_ended = False
        super().connection_made(transport)
        self._auth_require_tls = not self.event_handler.in_networks(
            peer_ip(self.session), self.event_handler.settings.plaintext_auth_networks)

    def proxied(self, client_ip: str) -> str | None:
        """The balancer named the client (PROXY header): count the connection as the client's from now on and
        judge it by that address; or say why it is refused."""
        balancer = self._client_ip
        refusal = self.event_handler.admit_proxied(balancer, client_ip)
        if refusal is None:
            self._client_ip = client_ip
            self._auth_require_tls = not self.event_handler.in_networks(
                client_ip, self.event_handler.settings.plaintext_auth_networks)
        return refusal

    def _refuse(self, transport: asyncio.BaseTransport, reason: str) -> None:
        """421 and close, before aiosmtpd sees the connection: no session, no greeting, nothing read."""
        self._refused = True
        transport.write(f"421 4.7.0 {self.hostname} Error: {reason}\r\n".encode())
        transport.close()

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:  # aiosmtpd's own would look for the session it never had
            asyncio.StreamReaderProtocol.connection_lost(self, error)
            return
        self.event_handler.sessions.discard(self)
        if self._client_ip is not None:  # once: aiosmtpd calls this itself when a TLS handshake fails
            self.event_handler.release(self._client_ip)
            self._client_ip = None
        super().connection_lost(error)


TERMINATOR = b"\r\n.\r\n"


async def read_message_data(reader: asyncio.StreamReader, limit: int | None) -> bytes | None:
    """The message up to the lone-dot line, dot-unstuffed; None when it exceeds `limit` (read and discarded).

    The data starts after a virtual CRLF, so the end is always CRLF.CRLF, even for an empty message. While
    what was read ends with the start of that sequence (at the very beginning, or when a piece was cut at the
    stream's limit), the few bytes that complete or refute it are read; otherwise readuntil() reads up to the
    end, or a piece of the stream's limit when the end is further. A message costs a few awaits, however many
    lines it has, and needs no line end (a bare-LF message is one long "line").
    """
    data = bytearray(b"\r\n")
    too_big = False
    while not data.endswith(TERMINATOR):
        pending = next((n for n in (4, 3, 2, 1) if data.endswith(TERMINATOR[:n])), 0)
        try:
            data += await (reader.readexactly(5 - pending) if pending else reader.readuntil(TERMINATOR))
        except asyncio.LimitOverrunError as exc:  # no end within the stream's limit yet: take what came, read on
            data += await reader.readexactly(exc.consumed)
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


class ConnectionCounts:
    """Open connections, in total and per client address, held to smtp.max_connections(_per_client)."""

    def __init__(self):
        self.total = 0
        self.per_client: Counter[str] = Counter()

    def admit(self, ip: str, settings: SmtpSettings, exempt: bool) -> str | None:
        """Count a new connection from `ip`, or say why it must be refused (then it is not counted)."""
        if self.total >= settings.max_connections:
            return "too many connections"
        if not exempt and self.per_client[ip] >= settings.max_connections_per_client:
            return f"too many connections from {ip}"
        self.total += 1
        self.per_client[ip] += 1
        return None

    def release(self, ip: str) -> None:
        self.total -= 1
        self.per_client[ip] -= 1
        if not self.per_client[ip]:
            del self.per_client[ip]


class RefusalLog:
    """Refused connections in the log without a line each, which a flood would turn into gigabytes: the first
    is logged at once, then the ones of each following `interval` as one line with their count."""

    def __init__(self, interval: float = REFUSAL_LOG_SECONDS):
        self.interval = interval
        self._quiet: asyncio.TimerHandle | None = None  # set while refusals are being counted, not logged
        self._count = 0
        self._last = ""

    def refused(self, ip: str, reason: str) -> None:
        if self._quiet is None:
            log.warning("smtp ip=%s refused: %s", ip, reason)
            self._quiet = asyncio.get_running_loop().call_later(self.interval, self._summarize)
        else:
            self._count += 1
            self._last = f"the last from {ip}: {reason}"

    def _summarize(self) -> None:
        if not self._count:
            self._quiet = None
            return
        log.warning("smtp refused %d more connections in %.0f s (%s)", self._count, self.interval, self._last)
        self._count = 0
        self._quiet = asyncio.get_running_loop().call_later(self.interval, self._summarize)


class Handler:
    """aiosmtpd hooks: the policy checks and the hand-off to the pipeline."""

    def __init__(self, settings: SmtpSettings, pipeline, on_accepted, inbound=None):
        self.settings = settings
        self.pipeline = pipeline
        self.inbound = inbound  # relay.inbound.InboundStage: reports for the bounce domain
        self.on_accepted = on_accepted  # called with (QueuedMessage, recipients) after a durable accept
        self.sessions: set[RelaySMTP] = set()
        self.busy = 0  # transactions between end of DATA and the reply, or the end of their work
        self.connections = ConnectionCounts()
        self.refusals = RefusalLog()
        self._finishing: set[asyncio.Task] = set()  # accepts whose client went away: kept until they end

    def admit(self, ip: str, behind_proxy: bool = False) -> str | None:
        """None to serve a new connection from `ip`; else why not (for its 421). Behind a load balancer only the
        balancers may connect, and the per-client cap waits for the client's address (handle_PROXY)."""
        if behind_proxy and not self.in_networks(ip, self.settings.proxy_networks):
            refusal: str | None = "not a load balancer of smtp.proxy_networks"
        else:
            refusal = self.connections.admit(ip, self.settings, exempt=behind_proxy or self.trusted(ip))
        if refusal is not None:
            self.refusals.refused(ip, refusal)
        return refusal

    def admit_proxied(self, balancer: str, client: str) -> str | None:
        """Move a counted connection from its balancer to the client the balancer named, within the caps."""
        self.connections.release(balancer)
        refusal = self.connections.admit(client, self.settings, exempt=self.trusted(client))
        if refusal is not None:
            self.connections.admit(balancer, self.settings, exempt=True)  # released as the balancer's again
            self.refusals.refused(client, refusal)
        return refusal

    async def handle_PROXY(self, server: RelaySMTP, session: Session, envelope: Envelope, proxy_data) -> bool:
        """A PROXY header: serve the connection as the client's when its balancer is trusted and the client
        within its caps (421 and close otherwise). PROXY UNKNOWN (a balancer's health check) names no client."""
        client = peer_ip(session)
        refusal = server.proxied(client)
        if refusal is not None:
            server.transport.write(f"421 4.7.0 {server.hostname} Error: {refusal}\r\n".encode())
        return refusal is None

    def release(self, ip: str) -> None:
        self.connections.release(ip)

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
            return f"553 5.1.3 <{echo(address)}> Invalid email address"
        kind = self.inbound.recipient_kind(address) if self.inbound is not None else OUTBOUND
        if kind == OUTBOUND and not session.authenticated and not self.trusted(peer_ip(session)):
            return "530 5.7.0 Authentication required"
        if kind not in (INBOUND, OUTBOUND):
            return f"550 5.1.1 <{echo(address)}> Recipient address rejected: mailbox unavailable"
        # Reports and outgoing mail take different paths: one transaction carries one kind. 452 makes the
        # client deliver what was accepted and send this recipient again in a new transaction (RFC 5321
        # 4.5.3.1.10), so nothing is lost; a 5xx would bounce it.
        if envelope.rcpt_tos and getattr(envelope, "inbound", False) != (kind == INBOUND):
            return f"452 4.5.3 <{echo(address)}> Send reports and other mail in separate transactions"
        envelope.inbound = kind == INBOUND
        if address not in envelope.rcpt_tos:  # one copy per distinct recipient
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server, session, envelope):
        ip = peer_ip(session)
        if getattr(envelope, "inbound", False):
            mail = InboundMail(reverse_path(envelope), tuple(envelope.rcpt_tos), envelope.original_content or b"", ip)
            return await self._to_the_end(self._receive_reports(mail))
        sub = Submission(
            mail_from=reverse_path(envelope),
            recipients=list(envelope.rcpt_tos),
            data=envelope.original_content or b"",
            client_ip=ip,
            helo=session.host_name or "",
            auth_user=session.auth_data if session.authenticated else None,
            tls=session.ssl is not None,
        )
        return await self._to_the_end(self._accept(sub))

    async def _to_the_end(self, work: Coroutine[Any, Any, str]) -> str:
        """`work`'s reply; `work` runs to its end even when the client resets the connection meanwhile.

        aiosmtpd then cancels the session's task. A message the store committed by then must still be queued
        for delivery (else it waits for a restart, and goes out again beside the client's retry), and a stored
        report still logged. `busy` counts the work until it ends: a shutdown waits for it.
        """
        self.busy += 1
        task = asyncio.ensure_future(work)
        self._finishing.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(self._finished)
        return await asyncio.shield(task)

    def _finished(self, task: asyncio.Task) -> None:
        self._finishing.discard(task)
        self.busy -= 1

    async def _accept(self, sub: Submission) -> str:
        ip = sub.client_ip
        try:
            msg = await self.pipeline.accept(sub)
        except Refusal as exc:
            reply = reply_line(exc.reply)  # it may quote the message's header values, at any length
            log.info("smtp ip=%s from=<%s> rcpts=%d refused=%r", ip, sub.mail_from, len(sub.recipients), reply)
            return reply
        except StorageUnavailable:
            return "451 4.3.0 Temporary service failure: message not queued, try again later"
        except Exception:  # a bug must not cost a message: the client keeps it and retries
            log.exception("smtp ip=%s: unexpected error accepting a message", ip)
            return "451 4.3.0 Temporary service failure"
        self.on_accepted(msg, msg.to_deliver(sub.recipients))  # suppressed ones are final
        log.info("smtp ip=%s from=<%s> rcpts=%d size=%d id=%s set=%s accepted", ip, sub.mail_from,
                 len(sub.recipients), len(sub.data), msg.id, msg.configuration_set or "-")
        return f"250 Ok {msg.id}"

    async def _receive_reports(self, mail: InboundMail) -> str:
        try:
            return await self.inbound.receive(mail)
        except Exception:  # a bug must not cost a report: the sending MTA keeps it and retries
            log.exception("smtp ip=%s: unexpected error receiving a report", mail.client_ip)
            return "451 4.3.0 Temporary service failure"


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
            # the header is a balancer's first bytes: a few seconds, as HAProxy's accept-proxy timeout
            proxy_protocol_timeout=PROXY_HEADER_TIMEOUT_S if settings.proxy_protocol else None,
            auth_require_tls=True,
            authenticator=authenticator,
            auth_exclude_mechanism=["CRAM-MD5"],
        )

    return await loop.create_server(factory, host=settings.listen_host, port=settings.listen_port,
                                    reuse_address=True)

