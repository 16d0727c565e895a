"""The inbound stage: reports that come back to relay become events.

    receive (SMTP DATA for the bounce domain or a complaints address) → parse → match → durable with its
    events → 250

Delivery status notifications and feedback-loop (ARF) reports arrive at the VERP envelope sender of a copy
(`bounce+<token>@<bounce domain>`), the mailto of List-Unsubscribe (`unsub+<token>@...`), or a complaints
address registered with ISPs. The signed token names the message and the recipient's position; a report sent
to a complaints address is matched through the original message's headers it quotes.

Every report is stored as received, with the events it produced, in one store work before the 250: a report
is never lost, and one that produced no event (an auto-reply, a delay notice, garbage, a report about a
purged message) stays for the operator to read (`inbound_reports`). Choices, following SES:
- one Bounce event per bounced recipient (relay delivers each recipient as its own copy, and the events'
  recipient column feeds the views); one Complaint per report, listing the complained recipients;
- a report received twice records its events twice: SES publishes every notification it gets;
- a delay notice records nothing: SES publishes DeliveryDelay only for its own retries, and the remote MTA
  that sent the notice reports the final failure (or nothing, on success) later.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import getaddresses

from relay.config import Config
from relay.core import events as ev
from relay.core.reports import Report, ReportRecipient, classify, original_header, parse_report
from relay.core.settings import TrackingSettings
from relay.core.suppression import Suppression, entries_for
from relay.core.tokens import AddressClaims, Keyring, verify_address
from relay.store import (
    EventRow,
    InboundReportRow,
    ReportedMessage,
    Store,
    message_by_header,
    record_report,
    record_unsubscribe,
    reported_message,
)

log = logging.getLogger("relay.inbound")
# Reports are parsed from their first MiB only: the status and feedback parts come before the returned
# original, and a report is no reason to spend unbounded time on a huge message (it is stored whole; parsing
# all of a 40 MB report took 1.6 s here, its first MiB 84 ms).
PARSE_LIMIT = 1 << 20

INBOUND, OUTBOUND, UNKNOWN_MAILBOX = "inbound", "outbound", "unknown"


@dataclass(frozen=True)
class InboundMail:
    mail_from: str
    rcpts: tuple[str, ...]
    data: bytes
    client_ip: str


@dataclass(frozen=True)
class Outcome:
    """What a report led to: its events and suppression entries, and a line for the operator."""

    text: str
    message: ReportedMessage | None = None
    recipient: str | None = None
    events: tuple[EventRow, ...] = ()
    entries: tuple[Suppression, ...] = ()
    unsubscribe: tuple[str, str] | None = None  # (message id, recipient): recorded as the one-click POST is


class InboundStage:
    def __init__(self, config: Config, store: Store, keyring: Keyring, clock: Callable[[], float] = time.time):
        self.config = config  # replaced on reload, as the keyring
        self.store = store
        self.keyring = keyring
        self.clock = clock

    # --- which recipients are ours ---------------------------------------------------------------------

    def recipient_kind(self, address: str) -> str:
        """INBOUND: a report address (accepted from anyone); UNKNOWN_MAILBOX: on the bounce domain but no
        valid token (forged, or for another key); OUTBOUND: mail to relay onwards."""
        address = address.strip().lower()
        if address in self.config.complaints_addresses:
            return INBOUND
        domain = self.config.feedback.bounce_domain
        local, _, address_domain = address.rpartition("@")
        if not domain or address_domain != domain:
            return OUTBOUND
        if local == "postmaster":  # RFC 5321 4.5.1: a domain that receives mail has a postmaster; kept for reading
            return INBOUND
        return INBOUND if verify_address(self.keyring, address) is not None else UNKNOWN_MAILBOX

    # --- receive ---------------------------------------------------------------------------------------

    async def receive(self, mail: InboundMail) -> str:
        """Store the report (one row per envelope recipient, each matched on its own) and its events in one
        store work; the SMTP reply (250 only once durable)."""
        now_ms = int(self.clock() * 1000)
        report = await asyncio.to_thread(parse_report, mail.data[:PARSE_LIMIT])  # ~80 ms for 1 MiB: off the loop
        outcomes = [await self._outcome(rcpt, report, now_ms) for rcpt in mail.rcpts]
        rows = [InboundReportRow(ev.iso_ms(now_ms), mail.client_ip, mail.mail_from, rcpt, mail.data, report.kind,
                                 o.text, o.message.id if o.message else None, o.recipient)
                for rcpt, o in zip(mail.rcpts, outcomes, strict=True)]

        def work(conn: sqlite3.Connection) -> list[int]:
            ids = []
            for row, o in zip(rows, outcomes, strict=True):
                if o.unsubscribe is not None:
                    record_unsubscribe(conn, *o.unsubscribe, now_ms)
                ids.append(record_report(conn, row, list(o.events), o.entries))
            return ids

        try:
            ids = await self.store.write(work)
        except Exception as exc:
            log.error("could not store an inbound report from %s: %s", mail.client_ip, exc)
            return "451 4.3.0 Temporary service failure: report not stored, try again later"
        for report_id, row in zip(ids, rows, strict=True):
            log.info("inbound ip=%s from=<%s> rcpt=<%s> size=%d kind=%s report=%d %s", mail.client_ip,
                     mail.mail_from, row.rcpt, len(mail.data), report.kind, report_id, row.outcome)
        return f"250 2.0.0 Ok report {' '.join(map(str, ids))}"

    async def _outcome(self, rcpt: str, report: Report, now_ms: int) -> Outcome:
        try:
            return await asyncio.to_thread(self.store.tracking_read, self._match, rcpt, report, now_ms)
        except Exception:  # a fault in matching must not lose the report: keep it without events
            log.exception("inbound rcpt=<%s>: matching failed", rcpt)
            return Outcome("matching failed (see the log)")

    def _match(self, conn: sqlite3.Connection, rcpt: str, report: Report, now_ms: int) -> Outcome:
        """Find the message and recipients the report is about and build its events (reads only)."""
        claims = verify_address(self.keyring, rcpt)
        if claims is not None and claims.kind == "unsub":
            return unsubscribe_outcome(conn, claims, now_ms)
        if report.kind not in ("bounce", "complaint"):
            return Outcome(f"{report.kind}: no event ({report.reason})")
        if report.kind == "bounce" and not report.recipients:  # a cut DSN, a bounce text naming nobody
            return Outcome(f"bounce naming no failed recipient: no event ({report.reason})")
        claims = claims or claims_in_original(self.keyring, report)
        if claims is not None:
            message = reported_message(conn, claims.message_id)
            recipients = [recipient_at(message, claims.position)] if message else []
        else:
            found = message_by_header(conn, original_header(report, "Message-ID") or "")
            message = reported_message(conn, found) if found else None
            recipients = complained_recipients(message, report) if message else []
        if message is None:
            return Outcome(f"{report.kind}: message not found (unknown, or purged by retention): no event")
        recipients = [r for r in recipients if r]
        if report.kind == "complaint":
            return complaint_outcome(message, recipients, report, now_ms)
        if claims is None:  # a DSN without VERP: the message's recipients it names as failed
            named = {a.lower() for r in failed(report) for a in (r.email, r.original_recipient or "")}
            recipients = [d for d in message.mail.get("destination", []) if d.lower() in named]
        return bounce_outcome(message, recipients, report, now_ms)


# --- matching ------------------------------------------------------------------------------------------------

def claims_in_original(keyring: Keyring, report: Report) -> AddressClaims | None:
    """The VERP token of the original message a report quotes: its Return-Path, else any relay address the
    report mentions."""
    for address in (original_header(report, "Return-Path") or "", report.original_mail_from or "",
                    *report.addresses_mentioned):
        claims = verify_address(keyring, address)
        if claims is not None and claims.kind == "bounce":
            return claims
    return None


def recipient_at(message: ReportedMessage, position: int) -> str | None:
    destination = message.mail.get("destination", [])
    return destination[position] if 0 <= position < len(destination) else None


def complained_recipients(message: ReportedMessage, report: Report) -> list[str]:
    """The message's recipients a report names (Original-Rcpt-To, else the original To). ISPs redact the
    address; then, as SES does, every recipient of the message on the named domain."""
    named = list(report.original_rcpt_to) or [a for _, a in getaddresses([original_header(report, "To") or ""])]
    named = [a.strip().lower() for a in named if "@" in a]
    destination = message.mail.get("destination", [])
    exact = [d for d in destination if d.lower() in named]
    if exact:
        return exact
    domains = {a.rpartition("@")[2] for a in named}
    on_domain = [d for d in destination if d.lower().rpartition("@")[2] in domains]
    return on_domain or (destination if len(destination) == 1 else [])


def failed(report: Report) -> list[ReportRecipient]:
    return [r for r in report.recipients if (r.action or "").lower() == "failed" or (r.status or "")[:1] == "5"]


def dsn_fields_for(report: Report, recipient: str) -> ReportRecipient | None:
    """The DSN's per-recipient fields about `recipient` (the address relay sent to; the report may name the
    final address after forwarding, so with one failed recipient that one is it)."""
    wanted = recipient.lower()
    candidates = failed(report) or list(report.recipients)
    for r in candidates:
        if wanted in (r.email.lower(), (r.original_recipient or "").lower()):
            return r
    return candidates[0] if len(candidates) == 1 else None


# --- events --------------------------------------------------------------------------------------------------

def bounce_outcome(message: ReportedMessage, recipients: list[str], report: Report, now_ms: int) -> Outcome:
    if not recipients:
        return Outcome("bounce: no recipient of the message named: no event", message)
    when, feedback = report.arrival_ms or now_ms, ev.feedback_id(message.id, now_ms)
    events, entries, types = [], [], []
    for recipient in recipients:
        fields = dsn_fields_for(report, recipient)
        bounced = {"emailAddress": recipient}
        if fields is not None:
            bounced.update({k: v for k, v in (("action", fields.action), ("status", fields.status),
                                              ("diagnosticCode", fields.diagnostic_code)) if v})
        bounce_type, sub_type = bounce_types(fields, report)
        record = ev.report_bounce_record(message.mail, [bounced], when, bounce_type, sub_type, feedback,
                                         report.reporting_mta)
        events.append(event_row(message, recipient, record, now_ms))
        entries += suppression_entries(message, record, recipient, now_ms)
        types.append(f"{bounce_type}/{sub_type}")
    return Outcome(f"Bounce {', '.join(types)} for {', '.join(recipients)}", message, recipients[0],
                   tuple(events), tuple(entries))


def bounce_types(fields: ReportRecipient | None, report: Report) -> tuple[str, str]:
    if fields is not None and fields.bounce_type and fields.bounce_sub_type:
        return fields.bounce_type, fields.bounce_sub_type
    if fields is not None:
        return classify(fields.status, fields.diagnostic_code, fields.action)
    return classify(None, report.reason)


def complaint_outcome(message: ReportedMessage, recipients: list[str], report: Report, now_ms: int) -> Outcome:
    if not recipients:
        return Outcome("complaint: no recipient of the message identified: no event", message)
    record = ev.complaint_record(message.mail, recipients, now_ms, ev.feedback_id(message.id, now_ms),
                                 report.feedback_type, report.user_agent, report.arrival_ms)
    event = event_row(message, recipients[0], record, now_ms)
    return Outcome(f"Complaint ({report.feedback_type or 'no type'}) for {', '.join(recipients)}", message,
                   recipients[0], (event,), tuple(suppression_entries(message, record, recipients[0], now_ms)))


def unsubscribe_outcome(conn: sqlite3.Connection, claims: AddressClaims, now_ms: int) -> Outcome:
    """Mail to the List-Unsubscribe mailto: the recipient unsubscribes (whatever the mail says, as list
    managers treat it), recorded exactly as the one-click POST (store.record_unsubscribe: once per copy)."""
    message = reported_message(conn, claims.message_id)
    recipient = recipient_at(message, claims.position) if message else None
    if message is None or recipient is None:
        return Outcome("unsubscribe: message not found (unknown, or purged by retention): no event")
    return Outcome(f"Subscription (unsubscribe by mail) for {recipient}", message, recipient,
                   unsubscribe=(message.id, recipient))


def event_row(message: ReportedMessage, recipient: str, record: dict, now_ms: int) -> EventRow:
    return EventRow(record["eventType"], ev.iso_ms(now_ms), message.id, recipient, message.configuration_set,
                    record)


def suppression_entries(message: ReportedMessage, record: dict, recipient: str, now_ms: int) -> list[Suppression]:
    reasons = TrackingSettings.from_json(message.settings).suppression_reasons
    return entries_for(record, recipient, reasons, ev.iso_ms(now_ms))
