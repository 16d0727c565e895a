"""The path of one message, top to bottom:

    accept → resolve configuration → queue (durable, then 250) → instrument → sign → deliver → events

`accept` runs inside the SMTP DATA command; everything after the queue runs in the delivery workers, once per
recipient copy. Instrumentation happens after queueing, at delivery time, because:
- the spool then holds exactly what the client sent (one copy for all recipients, not one per recipient), so a
  fault in instrumentation can never damage the only copy of a message that was answered 250;
- acceptance stays fast: the 250 waits only for the group-committed fsync, not for HTML rewriting;
- rendering is deterministic for a message, recipient, settings snapshot and key, so a retried copy carries
  the same links as the first attempt.
The tracking settings are resolved at acceptance and stored with the message, so a queued message is
delivered the way it was configured when it was accepted.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime

from relay import offload
from relay.config import Config
from relay.control import OverQuota, counted
from relay.core import clamd
from relay.core import events as ev
from relay.core.control import ENABLED, Refused, paused
from relay.core.headers import (
    CONFIG_SET_HEADER,
    HeaderBlock,
    HeaderError,
    domain_of,
    from_domain,
    split_header_block,
    to_crlf,
)
from relay.core.identities import is_verified, unverified_reply
from relay.core.intake import INLINE_BYTES, Intake, heavy, intake, mail_facts
from relay.core.outcome import BOUNCED, DELIVERED, Outcome, RetryPolicy, decide
from relay.core.resolve import UnknownSet, sender_identity
from relay.core.settings import TrackingSettings
from relay.core.suppression import entries_for
from relay.core.tokens import sign_address
from relay.deliver import Reply
from relay.scan import ClamdScanner
from relay.store import (
    EventRow,
    MessageRow,
    Store,
    configuration_version,
    mail_json,
    suppressed_among,
    with_suppression,
)

log = logging.getLogger("relay.pipeline")


class Refusal(Exception):
    """An SMTP reply refusing a message; `reply` is the full line, e.g. `554 Configuration Set ...`. Sending
    control's refusals also carry the API's error (`code` as relay/api/errors.py knows it, and its message)."""

    def __init__(self, reply: str, code: str | None = None, message: str | None = None):
        super().__init__(reply)
        self.reply = reply
        self.code, self.message = code, message


class StorageUnavailable(Exception):
    """The message could not be made durable; the client must try again (4xx)."""


class _Stale(Exception):
    """A message prepared on the fast path was not queued: the configuration changed since the cached model, or
    a recipient is on the suppression list. Nothing was written; prepare it again with fresh reads. `scanned`:
    whether the virus scan already passed (it is not repeated; it is not skipped either)."""

    def __init__(self, scanned: bool):
        super().__init__()
        self.scanned = scanned


def _unchanged_guard(version: int | None, recipients: list[str], reasons: tuple[str, ...]):
    """A check run inside the transaction that queues a message prepared on the fast path."""

    def guard(conn) -> bool:
        return configuration_version(conn) == version and not suppressed_among(conn, recipients, reasons)

    return guard


@dataclass(frozen=True)
class Submission:
    mail_from: str
    recipients: list[str]
    data: bytes
    client_ip: str
    helo: str
    auth_user: str | None
    tls: bool
    operation: str = "SendSmtpEmail"  # ses:operation (the API's operation for mail sent through it)
    api_key: str | None = None  # the access key that sent it through the API
    # The API's ConfigurationSetName and tags, which SES prefers to the message's X-SES-* headers (None: those)
    configuration_set: str | None = None
    tags: dict[str, list[str]] | None = None

    @property
    def caller_identity(self) -> str:
        """ses:caller-identity: who sent it, as SES names the IAM identity. The SMTP user, the API's access key, and
        for a trusted client that sent without AUTH, its address (the only name relay knows it by)."""
        return self.auth_user or self.api_key or self.client_ip


@dataclass
class QueuedMessage:
    id: str
    mail_from: str
    raw: bytes
    mail: dict
    configuration_set: str | None
    settings: TrackingSettings
    received_ms: int
    suppressed: frozenset[str] = frozenset()  # recipients final at acceptance (suppression list): never delivered
    mail_json: str | None = None  # `mail` serialised (store.mail_json), spliced into each event record

    def to_deliver(self, recipients: list[str]) -> list[str]:
        return [r for r in recipients if r not in self.suppressed]


def recipient_position(msg: QueuedMessage, recipient: str) -> int:
    """The recipient's index in the message's recipient list (mail.destination); -1 if absent."""
    try:
        return msg.mail["destination"].index(recipient)
    except (KeyError, ValueError):
        return -1


@dataclass(frozen=True)
class _Accepted:
    """A message read at acceptance, with what queueing it needs (once more if the fast path proves stale)."""

    sub: Submission
    item: Intake
    identity: str  # the sender identity (resolve.sender_identity)
    header_set: str | None  # X-SES-CONFIGURATION-SET
    message_id: str
    now_ms: int
    off_loop: bool  # its CPU work runs in a thread (relay.offload)


def _read(data: bytes, mail_from: str, message_id: str, hostname: str, received: str | None,
          date: str) -> tuple[Intake, str]:
    """The message as relay queues it (`date`: its Date field when it has none), and its sender identity."""
    item = intake(data, mail_from, message_id, hostname, received, date=date)
    return item, sender_identity(item.block, mail_from)


def _read_refused(data: bytes, mail_from: str) -> tuple[HeaderBlock, str, str]:
    """The header block, sender identity and From domain of a message intake refused."""
    block = split_header_block(to_crlf(data))
    return block, sender_identity(block, mail_from), from_domain(block, mail_from)


def _send_records(facts: ev.MailFacts, set_name: str | None, when: str) -> tuple[dict, str, list[EventRow]]:
    """SES's mail object, its JSON (once per message: the message row and every event splice it) and the
    message's one Send event, as SES records it: its mail.destination lists every recipient (consumers fan it out
    over them)."""
    mail = ev.mail_object(facts)
    mail_text = mail_json(mail)
    return mail, mail_text, [EventRow(ev.SEND, when, facts.message_id, None, set_name, ev.send_record(mail), mail_text)]


class Pipeline:
    def __init__(self, config: Config, store: Store, resolver, instrumenter, signer, upstream,
                 clock: Callable[[], float] = time.time, scanner: ClamdScanner | None = None):
        self.config = config
        self.store = store
        self.resolver = resolver  # relay.resolve.Resolver: the set and tracking settings of a message
        self.instrumenter = instrumenter
        self.signer = signer
        self.upstream = upstream
        self.clock = clock
        self.scanner = scanner  # None: messages are not scanned (no [scan] clamd configured)
        # (node, until) written with an accepted message's copies (DeliveryQueue.lease_for_new); None: no lease,
        # any node's queue claims them
        self.lease_for_new: Callable[[], tuple[str, str] | None] = lambda: None

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    # --- accept, resolve, queue ------------------------------------------------------------------------

    async def accept(self, sub: Submission) -> QueuedMessage:
        """Make the message durable and return it for delivery; raises Refusal or StorageUnavailable.

        The work over the message's bytes (reading it, its mail object and events) runs in a thread for a big
        message (relay.offload), so the loop keeps serving everyone else meanwhile."""
        now_ms = self.now_ms()
        message_id = ev.mint_message_id(now_ms)
        off_loop = heavy(sub.data)
        try:
            item, identity = await offload.run(off_loop, _read, sub.data, sub.mail_from, message_id,
                                               self.config.hostname, self._received(sub, message_id),
                                               format_datetime(datetime.fromtimestamp(now_ms / 1000, UTC)))
        except HeaderError as exc:
            mail, set_name = await self._refused_mail(sub, message_id, now_ms, exc, off_loop)
            await self._record_reject(mail, set_name, now_ms, str(exc))
            raise Refusal(f"554 {exc}") from exc
        if sub.configuration_set is not None:
            item.control.configuration_set = sub.configuration_set
        if sub.tags is not None:
            item.control.tags = sub.tags
        header_set = item.control.configuration_set
        # Fast path: the cached configuration and no suppressed recipient, both verified by the queueing
        # transaction itself (no read per message before it). When either proves wrong, the message is prepared
        # again from what the database holds now: it is queued as configured when it was committed.
        accepted = _Accepted(sub, item, identity, header_set, message_id, now_ms, off_loop)
        try:
            return await self._queue(accepted, fresh=False, scanned=False)
        except _Stale as stale:
            return await self._queue(accepted, fresh=True, scanned=stale.scanned)

    async def _queue(self, accepted: _Accepted, fresh: bool, scanned: bool) -> QueuedMessage:
        sub, item, message_id, now_ms = accepted.sub, accepted.item, accepted.message_id, accepted.now_ms
        try:
            resolved = self.resolver.resolve_or_refuse(accepted.header_set, accepted.identity,
                                                       check=fresh)  # issue 6
        except Refusal:
            if fresh:
                raise
            raise _Stale(scanned=False) from None  # perhaps a set created since the cached model was built
        version = self.resolver.version
        set_name, settings = resolved.set_name, resolved.settings
        self._check_sending(set_name, accepted.identity, fresh)
        item.control.configuration_set = set_name  # a default set shows in mail.tags as SES shows it
        facts = mail_facts(
            item, message_id=message_id, now_ms=now_ms, mail_from=sub.mail_from, recipients=sub.recipients,
            source_ip=sub.client_ip, caller_identity=sub.caller_identity, account_id=self.config.account_id,
            region=self.config.region, operation=sub.operation,
        )
        when = ev.iso_ms(now_ms)
        mail, mail_text, sends = await offload.run(accepted.off_loop, _send_records, facts, set_name, when)
        if not scanned:
            await self._scan(sub, mail, set_name, now_ms)  # issue 9: refuses a virus (554) or, clamd down, 451
        row = MessageRow(message_id, when, sub.mail_from, set_name, item.subject, item.message_id_header,
                         len(item.raw), sub.client_ip, sub.auth_user, mail, settings.to_json(), mail_text)
        # SES accepts a message to a suppressed address and records a Send and a Bounce for it at once.
        suppressed = self._suppressed(sub.recipients, settings) if fresh else {}
        bounces = [EventRow(ev.BOUNCE, when, message_id, r, set_name,
                            ev.suppressed_record(mail, r, now_ms, self.config.hostname), mail_text)
                   for r in suppressed]
        final = {r: (BOUNCED, f"not sent: on the suppression list ({reason})") for r, reason in suppressed.items()}
        guard = None if fresh else _unchanged_guard(version, sub.recipients, settings.suppression_reasons)
        work = Store.accept_work(row, sub.recipients, item.raw, sends + bounces, final, guard, self.lease_for_new())
        scopes = self.config.quotas.scopes(set_name, sub.auth_user)
        try:
            written = await self.store.write(counted(work, scopes, len(sub.recipients), now_ms // 1000))
        except OverQuota as exc:  # the whole work was rolled back: nothing of the message is kept
            raise Refusal(exc.refused.reply, exc.refused.code, exc.refused.message) from None
        except Exception as exc:  # disk full, I/O error, locked database: never answer 250
            log.error("could not queue message from %s: %s", sub.client_ip, exc)
            raise StorageUnavailable(str(exc)) from exc
        if not written:
            raise _Stale(scanned=True)
        return QueuedMessage(message_id, sub.mail_from, item.raw, mail, set_name, settings, now_ms,
                             frozenset(suppressed), mail_text)

    def _check_sending(self, set_name: str | None, identity: str, fresh: bool) -> None:
        """Refuse a message while its account or set is paused, or its sender identity is not verified (when
        sending.require_verified_identity). Either read from the cached model may be over already: the message
        is then prepared again from what the database holds (a change made since the model was cached is caught
        by the queueing transaction's version check)."""
        model = self.resolver.model(check=False)
        refused = paused(model.account_sending, set_name, model.sets[set_name].sending if set_name else ENABLED)
        if refused is None and self.config.sending.require_verified_identity \
                and not is_verified(model.verified_identities, identity):
            reply, text = unverified_reply(identity, self.config.region)
            refused = Refused(reply, "MessageRejected", text)
        if refused is None:
            return
        if not fresh:
            raise _Stale(scanned=False)
        raise Refusal(refused.reply, refused.code, refused.message)

    def _suppressed(self, recipients: list[str], settings: TrackingSettings) -> dict[str, str]:
        """The recipients on the suppression list for a reason the message's set applies -> that reason."""
        listed = self.store.tracking_read(suppressed_among, recipients, settings.suppression_reasons)
        return {r: listed[r.strip().lower()] for r in recipients if r.strip().lower() in listed}

    async def _refused_mail(self, sub: Submission, message_id: str, now_ms: int, exc: HeaderError,
                            off_loop: bool) -> tuple[dict, str | None]:
        """The mail object and set of a message refused before intake could read it (bad X-SES-* headers). Its
        set: the header's; without that header, the sender identity's default (a malformed name names none)."""
        block, identity, domain = await offload.run(off_loop, _read_refused, sub.data, sub.mail_from)
        set_name = exc.configuration_set
        if set_name is None and block.get(CONFIG_SET_HEADER) is None:
            with contextlib.suppress(UnknownSet):
                set_name = self.resolver.resolve(None, identity).set_name
        facts = ev.MailFacts(
            message_id=message_id, timestamp_ms=now_ms, source=sub.mail_from, destination=sub.recipients,
            headers=block.fields, configuration_set=set_name, source_ip=sub.client_ip,
            from_domain=domain, caller_identity=sub.caller_identity,
            account_id=self.config.account_id, region=self.config.region,
        )
        return await offload.run(off_loop, ev.mail_object, facts), set_name

    async def record_rendering_failure(self, sub: Submission, template: str, error: str) -> str:
        """A message that was not sent because its template could not be rendered (or does not exist): its set's
        Rendering Failure event, with a message id as SES gives one. Nothing is queued. The set: the request's, or
        the sender identity's default; an unknown set has no events (the send itself says so)."""
        now_ms = self.now_ms()
        message_id = ev.mint_message_id(now_ms)
        set_name = None
        with contextlib.suppress(UnknownSet):
            set_name = self.resolver.resolve(sub.configuration_set, sender_identity(
                split_header_block(b""), sub.mail_from)).set_name
        mail = ev.mail_object(ev.MailFacts(
            message_id=message_id, timestamp_ms=now_ms, source=sub.mail_from, destination=sub.recipients, headers=[],
            configuration_set=set_name, tags=sub.tags or {}, source_ip=sub.client_ip,
            from_domain=domain_of(sub.mail_from), caller_identity=sub.caller_identity,
            account_id=self.config.account_id, region=self.config.region, operation=sub.operation,
        ))
        log.info("api id=%s from=<%s> rcpts=%d set=%s rendering failure: %s", message_id, sub.mail_from,
                 len(sub.recipients), set_name or "-", error)
        if set_name in self.resolver.model().sets:
            record = ev.rendering_failure_record(mail, template, error)
            await self.store.write(Store.events_work(
                [EventRow(ev.RENDERING_FAILURE, ev.iso_ms(now_ms), message_id, None, set_name, record)]))
        return message_id

    async def _record_reject(self, mail: dict, set_name: str | None, now_ms: int, reason: str) -> None:
        """A refusal of a message whose configuration set is known is that set's Reject event."""
        if set_name not in self.resolver.model().sets:
            return
        message_id = mail["messageId"]
        record = ev.reject_record(mail, reason)
        try:
            await self.store.write(Store.events_work(
                [EventRow(ev.REJECT, ev.iso_ms(now_ms), message_id, None, set_name, record)]))
        except Exception as err:  # the refusal stands either way
            log.error("could not record a Reject event: %s", err)

    async def _scan(self, sub: Submission, mail: dict, set_name: str | None, now_ms: int) -> None:
        """The optional virus scan of the message as received, before it is made durable. A virus: 554 and the
        set's Reject event ("Bad content", SES's reason). clamd unreachable, slow or failing: `scan.on_error`
        (451 by default: the client keeps the message). Over `scan.max_scan_size`: accepted unscanned."""
        if self.scanner is None:
            return
        result = await self.scanner.scan(sub.data)
        reply = clamd.refusal(result, self.scanner.settings.on_error)
        facts = f"id={mail['messageId']} ip={sub.client_ip} from=<{sub.mail_from}> size={len(sub.data)}"
        if result.status == clamd.INFECTED:
            log.warning("scan %s virus=%s refused", facts, result.detail)
            await self._record_reject(mail, set_name, now_ms, clamd.REJECT_REASON)
        elif result.status == clamd.FAILED:
            log.error("scan %s failed, %s: %s", facts, "answered 451" if reply else "accepted unscanned",
                      result.detail)
        elif result.status == clamd.TOO_LARGE:
            log.warning("scan %s accepted unscanned: %s", facts, result.detail)
        if reply is not None:
            raise Refusal(reply)

    def _received(self, sub: Submission, message_id: str) -> str | None:
        if not self.config.smtp.add_received_header:
            return None
        proto = "HTTP" if sub.api_key else "ESMTP" + ("S" if sub.tls else "") + ("A" if sub.auth_user else "")
        helo = "".join(c for c in sub.helo if c.isprintable() and c not in "()\r\n")[:100] or "unknown"
        rcpt = f"\r\n\tfor <{sub.recipients[0]}>" if len(sub.recipients) == 1 else ""
        date = format_datetime(datetime.fromtimestamp(self.clock(), UTC))
        return (f"Received: from {helo} ([{sub.client_ip}])\r\n\tby {self.config.hostname} (relay) with {proto}"
                f" id {message_id}{rcpt};\r\n\t{date}")

    # --- instrument, sign, deliver, events -------------------------------------------------------------

    async def deliver_copy(self, msg: QueuedMessage, recipient: str, attempts: int) -> Outcome:
        """One attempt for one recipient; records its events and the recipient's new state."""
        warnings: list[tuple[str, str]] = []
        position = recipient_position(msg, recipient)
        rendered = await self.instrumenter.copy_async(msg.id, msg.raw, msg.settings, recipient, msg.received_ms // 1000,
                                          position=position)
        warnings += [("instrument", w) for w in rendered.warnings]
        fallback = self._fallback_domain(msg.configuration_set)
        # signing hashes the whole copy: a big one is signed off the loop, as it was rendered
        data = await offload.run(len(rendered.data) > INLINE_BYTES, self._sign, rendered.data, msg, fallback, warnings)
        reply: Reply = await self.upstream.send(self._return_path(msg, position), recipient, data, msg.id,
                                                require_tls=msg.settings.require_tls)
        now_ms = self.now_ms()
        outcome = decide(reply.code, reply.message, reply.connection_failed, attempts, msg.received_ms, now_ms,
                         self.retry_policy(msg.settings), step=reply.step)
        mail, mail_text = msg.mail, msg.mail_json
        if outcome.state == DELIVERED:  # SES tags a Delivery with the address it delivered from
            mail, mail_text = ev.with_outgoing_ip(mail, mail_text, reply.local_ip)
        record = self._event_for(msg, mail, recipient, reply, outcome, now_ms)
        event = EventRow(record["eventType"], ev.iso_ms(now_ms), msg.id, recipient, msg.configuration_set, record,
                         mail_text)
        next_at = ev.iso_ms(outcome.next_attempt_ms) if outcome.next_attempt_ms else None
        # a permanent bounce puts the address on the suppression list in the same transaction as its event
        entries = entries_for(record, recipient, msg.settings.suppression_reasons, ev.iso_ms(now_ms))
        work = with_suppression(Store.recipient_work(
            msg.id, recipient, outcome.state, attempts, next_at, reply.text, ev.iso_ms(now_ms), [event], warnings,
            keep_body=self.config.retention.message_bodies > 0), entries)
        log.info("delivery id=%s rcpt=%s attempt=%d state=%s reply=%r step=%s", msg.id, recipient, attempts,
                 outcome.state, reply.text[:200], reply.step)
        try:
            await self.store.write(work)
        except Exception as exc:  # disk full, I/O error: the upstream has answered, so it is the write that waits
            raise OutcomeNotRecorded(outcome, work, exc) from exc
        return outcome

    def _return_path(self, msg: QueuedMessage, position: int) -> str:
        """The copy's envelope sender: a signed VERP address on the bounce domain when the set uses one, so a
        bounce report arriving later names the message and recipient; else the client's MAIL FROM. A null
        sender (<>, itself a bounce) stays null."""
        domain = msg.settings.return_path_domain
        if not domain or not msg.mail_from or position < 0:
            return msg.mail_from
        try:
            return sign_address(self.instrumenter.keyring, "bounce", msg.id, position, domain)
        except ValueError:  # not an SES-format id (never for relay's own ids)
            return msg.mail_from

    def _sign(self, data: bytes, msg: QueuedMessage, fallback: str | None, warnings: list) -> bytes:
        """Relay's DKIM signature; a signing fault sends the copy unsigned (with a warning), never holds it."""
        try:
            signed = self.signer.sign(data, original=msg.raw, fallback_domain=fallback)
        except Exception as exc:
            log.exception("signing %s failed; delivering it unsigned", msg.id)
            warnings.append(("sign", f"not signed: {type(exc).__name__}: {exc}"))
            return data
        warnings += [("sign", w) for w in signed.warnings]
        return signed.data

    def retry_policy(self, settings: TrackingSettings | None = None) -> RetryPolicy:
        """delivery's retries; a set's MaxDeliverySeconds (SES's DeliveryOptions) in place of max_age."""
        d = self.config.delivery
        own = settings.max_delivery_seconds if settings is not None else None
        return RetryPolicy(d.retry_initial, d.retry_max, float(own) if own else d.max_age)

    def _fallback_domain(self, set_name: str | None) -> str | None:
        """A DKIM fallback domain is a TOML key of a set (sets made with the CLI or the API have none)."""
        cs = self.config.configuration_sets.get(set_name) if set_name else None
        return cs.dkim_fallback_domain if cs else None

    def _event_for(self, msg: QueuedMessage, mail: dict, recipient: str, reply: Reply, outcome: Outcome,
                   now_ms: int) -> dict:
        mta = self.config.hostname
        if outcome.state == DELIVERED:
            return ev.delivery_record(mail, recipient, now_ms, reply.text, mta, reply.remote_ip)
        if outcome.state == BOUNCED:
            return ev.bounce_record(mail, recipient, now_ms, outcome.bounce_type, outcome.bounce_sub_type,
                                    outcome.diagnostic, outcome.status, mta, reply.remote_ip)
        return ev.delay_record(mail, recipient, now_ms, outcome.delay_type, outcome.status, outcome.diagnostic,
                               outcome.expires_ms or now_ms, reply.remote_ip)


class OutcomeNotRecorded(Exception):
    """The upstream answered for a copy but the store did not take the outcome (`error`: disk full, I/O error).
    `work` writes it; the copy must not be delivered again because relay could not write down that it was."""

    def __init__(self, outcome: Outcome, work: Callable, error: Exception):
        super().__init__(f"outcome not recorded: {error}")
        self.outcome, self.work, self.error = outcome, work, error
