"""Incoming reports: delivery status notifications, feedback-loop complaints, auto-replies.

Pure: `parse_report(raw)` turns the bytes of a message received on the bounce domain (or a complaints address)
into a `Report`; it never raises, whatever the bytes. What it recognises, in this order:

1. ARF complaints (RFC 5965): a message/feedback-report part (AOL's and Yahoo's loops are ARF too); feedback
   loops that only forward the message with "This is an email abuse report" wording count as "abuse".
2. Read receipts (RFC 8098, message/disposition-notification): "unknown", they are neither bounces nor complaints.
3. DSNs (RFC 3464, RFC 6533): message/delivery-status or message/global-delivery-status parts, one field block
   per recipient; also when the MTA forgot the blank line between blocks.
4. Bounces without a DSN part (qmail, Exim, Postfix without DSN, Exchange, Office 365, Gmail, Sun, MailSite...):
   a small table of text patterns, each naming the MTA that writes it.
5. Auto-replies (RFC 3834 Auto-Submitted, X-Autoreply, out-of-office subjects and bodies): not bounces.

`classify(status, diagnostic, action)` maps a DSN's status and diagnostic to SES's bounceType/bounceSubType.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC
from email import policy
from email.message import Message
from email.parser import BytesParser, Parser
from email.utils import collapse_rfc2231_value, parsedate_to_datetime

from relay.core.headers import decoded

SCAN_LIMIT = 256 * 1024  # characters of notification text searched for non-standard bounce patterns
# An address in free text; the look-behind starts matches only at a token's start (linear time on hostile text).
_ADDR = r"(?<![\w.!#$%&'*+/=?^`{|}~-])[\w.!#$%&'*+/=?^`{|}~-]+@[\w-]+(?:\.[\w-]+)+"
_ADDR_RE = re.compile(_ADDR)

STATUS_TYPES = ("message/delivery-status", "message/global-delivery-status")
FEEDBACK_TYPES = ("message/feedback-report",)
DISPOSITION_TYPES = ("message/disposition-notification", "message/global-disposition-notification")
ORIGINAL_TYPES = ("message/rfc822", "message/global", "message/rfc822-headers", "message/global-headers",
                  "text/rfc822-headers")

# SES's complaintFeedbackType values; ARF types SES does not know (opt-out, dmarc...) are "other".
FEEDBACK_TYPES_SES = ("abuse", "auth-failure", "fraud", "not-spam", "other", "virus")


@dataclass(frozen=True)
class ReportRecipient:
    email: str
    action: str | None = None
    status: str | None = None
    diagnostic_code: str | None = None
    original_recipient: str | None = None
    remote_mta: str | None = None
    bounce_type: str | None = None
    bounce_sub_type: str | None = None


@dataclass(frozen=True)
class Report:
    kind: str  # bounce | delay | delivered | complaint | autoreply | unknown
    reason: str
    recipients: tuple[ReportRecipient, ...] = ()  # only those the kind is about (failed ones for a bounce)
    reporting_mta: str | None = None
    arrival_ms: int | None = None
    feedback_type: str | None = None
    user_agent: str | None = None
    original_mail_from: str | None = None
    original_rcpt_to: tuple[str, ...] = ()
    original_headers: tuple[tuple[str, str], ...] = ()
    addresses_mentioned: tuple[str, ...] = ()


def original_header(report: Report, name: str) -> str | None:
    wanted = name.lower()
    return next((value for key, value in report.original_headers if key.lower() == wanted), None)


def parse_report(raw: bytes) -> Report:
    try:
        return _parse(bytes(raw))
    except Exception as exc:  # noqa: BLE001 - hostile input must never reach the SMTP session as an exception
        return Report("unknown", f"unparseable ({type(exc).__name__})")


# ---------------------------------------------------------------------------------------------------- parsing


def _parse(raw: bytes) -> Report:
    msg = BytesParser(policy=policy.compat32).parsebytes(raw)
    parts = list(_parts(msg))
    report_type = _clean(collapse_rfc2231_value(msg.get_param("report-type", "") or "")).strip().lower()
    original = _original_headers(parts)
    mentioned = _addresses_mentioned(raw, msg, original)
    feedback = [p for p in parts if p.get_content_type() in FEEDBACK_TYPES]
    if feedback:
        return _arf(feedback, original, mentioned)
    if report_type == "disposition-notification" or any(p.get_content_type() in DISPOSITION_TYPES for p in parts):
        return Report("unknown", "disposition notification", original_headers=original,
                      addresses_mentioned=mentioned)
    status_parts = [p for p in parts if p.get_content_type() in STATUS_TYPES]
    if status_parts:
        dsn = _dsn(status_parts, _notification_text(parts), original, mentioned)
        if dsn is not None:
            return dsn
    report = _non_standard(msg, parts, report_type, original, mentioned)
    if status_parts and report.kind == "unknown":
        return replace(report, reason="delivery-status part without recipient fields")
    return report


def _parts(msg: Message, depth: int = 0) -> Iterator[Message]:
    """The report's own parts, not those inside the returned original message (a bounce of a bounce)."""
    yield msg
    payload = msg.get_payload()
    # message/* bodies (the returned original, status fields) are split into Messages too: not walked into
    if depth > 20 or not isinstance(payload, list) or msg.get_content_maintype() == "message":
        return
    for part in payload:
        if isinstance(part, Message):
            yield from _parts(part, depth + 1)


def _clean(text: str) -> str:
    """Undo the email package's surrogate escapes (8-bit bytes in headers) into readable text."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


_FOLD = re.compile(r"\r?\n[ \t]+")


def _unfold(value: str) -> str:
    return _FOLD.sub(" ", _clean(str(value))).strip()


def _field_items(msg: Message) -> list[tuple[str, str]]:
    return [(_clean(name), _unfold(value)) for name, value in msg.raw_items()]


_FIELD = re.compile(r"([A-Za-z][A-Za-z0-9-]*)[ \t]*:[ \t]*(.*)")


def _text_blocks(text: str) -> list[list[tuple[str, str]]]:
    """Blocks of `Name: value` fields in a text; blank lines separate blocks, folded lines are unfolded (each
    field joined once: a report may be folded a million times, and anyone may send one)."""
    blocks: list[list[tuple[str, str]]] = []
    block: list[tuple[str, list[str]]] = []

    def close() -> None:
        if block:
            blocks.append([(name, " ".join(pieces).strip()) for name, pieces in block])

    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if not line.strip():
            close()
            block = []
        elif line[0] in " \t" and block:
            block[-1][1].append(line.strip())
        elif match := _FIELD.fullmatch(line.rstrip()):
            block.append((match[1], [match[2].strip()]))
    close()
    return blocks


def _field_blocks(part: Message) -> list[list[tuple[str, str]]]:
    """The field blocks of a message/delivery-status (or feedback-report) part, however the parser split it."""
    payload = part.get_payload()
    if isinstance(payload, str):
        return _text_blocks(_part_text(part))
    blocks: list[list[tuple[str, str]]] = []
    encoding = ""
    for block in payload if isinstance(payload, list) else ():
        if not isinstance(block, Message):
            continue
        fields = _field_items(block)
        blocks.append(fields)
        encoding = next((v.lower() for k, v in fields if k.lower() == "content-transfer-encoding"), encoding)
        body = block.get_payload()
        if isinstance(body, list):
            blocks.extend(_field_blocks(block))
        elif isinstance(body, str) and body.strip():  # as bytes: get_payload() would turn 8-bit text into "?"
            blocks.extend(_text_blocks(_block_body(encoding, block.get_payload(decode=True) or b"")))
    return blocks


def _block_body(encoding: str, body: bytes) -> str:
    """A status block's trailing text; base64 when a filter re-encoded the recipient fields (Proofpoint does,
    announcing it with a Content-Transfer-Encoding field among the per-message fields)."""
    if encoding == "base64":
        try:
            return base64.b64decode(b"".join(body.split()), validate=False).decode("utf-8", "replace")
        except (binascii.Error, ValueError):
            return ""
    return body.decode("utf-8", "replace")


def _part_text(part: Message) -> str:
    """A leaf part's text, transfer-decoded and charset-decoded with replacement."""
    payload = part.get_payload()
    if isinstance(payload, list):
        return ""
    data = part.get_payload(decode=True)
    if not isinstance(data, bytes):
        return _clean(str(payload))
    charset = part.get_content_charset() or "utf-8"
    try:
        return data.decode(charset, "replace")
    except (LookupError, ValueError):
        return data.decode("utf-8", "replace")


def _epoch_ms(value: str | None) -> int | None:
    if not value:
        return None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # RFC 5322 "-0000": time zone unknown, taken as UTC
        when = when.replace(tzinfo=UTC)
    try:
        return int(when.timestamp() * 1000)
    except (OverflowError, ValueError, OSError):
        return None


# ---------------------------------------------------------------------------------------------------- DSN

# Fields of a per-recipient block (RFC 3464 §2.3); every other field is per-message (§2.2).
_RECIPIENT_FIELDS = frozenset({
    "original-recipient", "final-recipient", "action", "status", "remote-mta", "diagnostic-code",
    "last-attempt-date", "final-log-id", "will-retry-until", "x-display-name", "x-supplementary-info",
})
_ADDRESS_FIELDS = ("final-recipient", "original-recipient")
_SUCCESS_ACTIONS = ("delivered", "relayed", "expanded")


def _recipient_groups(blocks: list[list[tuple[str, str]]]) -> tuple[dict[str, str], list[dict[str, str]]]:
    """Per-message fields and per-recipient field groups. A blank line ends a recipient; so does a field that
    repeats, for MTAs that forget the blank line between blocks (field order within a block is free)."""
    per_message: dict[str, str] = {}
    groups: list[dict[str, str]] = []
    for block in blocks:
        current: dict[str, str] | None = None
        for name, value in block:
            key = name.lower()
            if key not in _RECIPIENT_FIELDS:
                per_message.setdefault(key, value)
                continue
            if current is None or key in current:
                current = {}
                groups.append(current)
            current[key] = value
    return per_message, [g for g in groups if any(g.get(k) for k in _ADDRESS_FIELDS)]


def _address_value(value: str | None) -> str | None:
    """`rfc822; <a@b>` → `a@b` (the address type is dropped; other types keep their text)."""
    if not value:
        return None
    text = value.split(";", 1)[1] if ";" in value else value
    text = text.strip().strip("<>").strip()
    return text or None


_ENHANCED_STATUS = re.compile(r"(?<![\d.])([245]\.\d{1,3}\.\d{1,3})(?![\d.]*\d)")
_SMTP_CODE = re.compile(r"(?<![\d.\w])([245]\d\d)(?=[ -]|$)", re.M)


def _enhanced_status(text: str | None) -> str | None:
    match = _ENHANCED_STATUS.search(text or "")
    return match[1] if match else None


def _recipient(group: dict[str, str], text_hints: dict[str, str]) -> ReportRecipient:
    final = _address_value(group.get("final-recipient"))
    original = _address_value(group.get("original-recipient"))
    status_field = group.get("status") or ""
    status = _enhanced_status(status_field)
    diagnostic = group.get("diagnostic-code") or None
    action = (group.get("action") or "").strip().split(" ")[0].lower() or None
    # "Status: 5.0.0 (recipient reached disk quota)": the comment is the only diagnostic some MTAs give; with
    # no Diagnostic-Code at all, the notification text's words for this recipient classify it (Exim's
    # "source@domain.com\n    Unknown user"), though diagnostic_code stays what the DSN wrote
    status_comment = status_field.replace(status or "", "", 1).strip(" ()")
    hint = "" if diagnostic else text_hints.get((final or original or "").lower(), "")
    bounce_type, sub_type = (None, None) if action in _SUCCESS_ACTIONS else \
        classify(status, " ".join(filter(None, (diagnostic, status_comment, hint))), action)
    return ReportRecipient(
        email=final or original or "", action=action, status=status, diagnostic_code=diagnostic,
        original_recipient=original, remote_mta=group.get("remote-mta") or None,
        bounce_type=bounce_type, bounce_sub_type=sub_type,
    )


def _effective_action(recipient: ReportRecipient) -> str:
    """The Action, or when an MTA left it out, what the status class says (RFC 3464 makes Action required)."""
    if recipient.action:
        return recipient.action
    status = recipient.status or ""
    return "delivered" if status.startswith("2") else "delayed" if status.startswith("4") else "failed"


def _dsn(status_parts: list[Message], text: str, original: tuple[tuple[str, str], ...],
         mentioned: tuple[str, ...]) -> Report | None:
    blocks = [block for part in status_parts for block in _field_blocks(part)]
    per_message, groups = _recipient_groups(blocks)
    text_hints = {address.lower(): diagnostic for address, diagnostic in _text_recipients(text)[1]}
    recipients = [_recipient(group, text_hints) for group in groups]
    if not recipients:
        return None
    by_action: dict[str, list[ReportRecipient]] = {}
    for recipient in recipients:
        by_action.setdefault(_effective_action(recipient), []).append(recipient)
    if by_action.get("failed"):
        kind, chosen = "bounce", by_action["failed"]
    elif by_action.get("delayed"):
        kind, chosen = "delay", by_action["delayed"]
    elif success := [r for r in recipients if _effective_action(r) in _SUCCESS_ACTIONS]:
        kind, chosen = "delivered", success
    else:
        return None
    counts = ", ".join(f"{len(v)} {k}" for k, v in by_action.items())
    return Report(
        kind=kind, reason=f"RFC 3464 delivery status ({counts})", recipients=tuple(chosen),
        reporting_mta=per_message.get("reporting-mta") or None,
        arrival_ms=_epoch_ms(per_message.get("arrival-date")),
        original_headers=original, addresses_mentioned=mentioned,
    )


# ---------------------------------------------------------------------------------------------------- ARF


def _feedback_type(value: str | None) -> str:
    kind = (value or "").strip().lower()
    return kind if kind in FEEDBACK_TYPES_SES else "other"


def _arf(feedback_parts: list[Message], original: tuple[tuple[str, str], ...], mentioned: tuple[str, ...]) -> Report:
    fields = [field for part in feedback_parts for block in _field_blocks(part) for field in block]
    first: dict[str, str] = {}
    for name, value in fields:
        first.setdefault(name.lower(), value)
    rcpt_to = tuple(dict.fromkeys(
        address.lower() for name, value in fields if name.lower() == "original-rcpt-to"
        if (address := _address_value(value))
    ))
    feedback_type = _feedback_type(first.get("feedback-type"))
    return Report(
        kind="complaint", reason=f"ARF feedback report ({feedback_type})",
        recipients=tuple(ReportRecipient(email=address) for address in rcpt_to),
        reporting_mta=first.get("reporting-mta") or None,
        # Arrival-Date per RFC 5965; AOL and Yahoo write Received-Date
        arrival_ms=_epoch_ms(first.get("arrival-date") or first.get("received-date")),
        feedback_type=feedback_type, user_agent=first.get("user-agent") or None,
        original_mail_from=_address_value(first.get("original-mail-from")),
        original_rcpt_to=rcpt_to, original_headers=original, addresses_mentioned=mentioned,
    )


# ---------------------------------------------------------------------------------------------------- original


def _original_headers(parts: list[Message]) -> tuple[tuple[str, str], ...]:
    """Header fields of the returned original message, from its own part or, failing that, quoted in the text."""
    for part in parts:
        ctype = part.get_content_type()
        if ctype not in ORIGINAL_TYPES:
            continue
        payload = part.get_payload()
        if isinstance(payload, list) and payload and isinstance(payload[0], Message):
            return tuple(_field_items(payload[0]))
        if isinstance(payload, str):
            headers = Parser(policy=policy.compat32).parsestr(_part_text(part), headersonly=True)
            return tuple(_field_items(headers))
    for part in parts:
        if part.get_content_type() == "text/plain":
            quoted = _quoted_headers(_part_text(part)[:SCAN_LIMIT])
            if quoted:
                return quoted
    return ()


_QUOTED_FIELD = re.compile(r"[ \t>]*([A-Za-z][A-Za-z0-9-]{1,40}):[ \t]*(\S.*)")
_IDENTIFYING = frozenset({"message-id", "from", "to", "subject", "date"})


def _quoted_headers(text: str) -> tuple[tuple[str, str], ...]:
    """Header lines a non-standard bounce quotes in its text (Sun's "This report relates to a message you sent
    with the following header fields:"): the first run of field lines holding a Message-ID or two of
    From/To/Subject/Date. A folded field is joined once, however often it is folded."""
    run: list[tuple[str, list[str]]] = []
    for line in [*text.splitlines(), ""]:
        match = _QUOTED_FIELD.fullmatch(line.rstrip())
        if match:
            run.append((match[1], [match[2]]))
            continue
        if run and line[:1] in (" ", "\t") and line.strip():  # a folded field
            run[-1][1].append(line.strip())
            continue
        names = {name.lower() for name, _ in run}
        if "message-id" in names or len(names & _IDENTIFYING) >= 2:
            return tuple((name, " ".join(pieces)) for name, pieces in run)
        run = []
    return ()


# VERP addresses relay signs (core.tokens.sign_address); the caller verifies each.
_VERP_ADDRESS = re.compile(r"(?<![\w.+-])((?:bounce|unsub)\+[A-Za-z0-9]+@[A-Za-z0-9.-]+[A-Za-z0-9])", re.I)
# Where a report names the envelope it answers: the outer envelope, the returned message's Return-Path,
# Postfix's DSN X-Postfix-Sender and ARF's Original-Mail-From (read in the raw text, any part).
_ENVELOPE_FIELDS = ("to", "delivered-to", "x-original-to", "envelope-to")
_ENVELOPE_LINE = re.compile(r"^(?:Return-Path|X-Postfix-Sender|Original-Mail-From):[ \t]*(.*)$", re.I | re.M)


def _addresses_mentioned(raw: bytes, msg: Message, original: tuple[tuple[str, str], ...]) -> tuple[str, ...]:
    text = raw[: 4 * SCAN_LIMIT].decode("latin-1")
    found = [m[1] for m in _VERP_ADDRESS.finditer(text)]
    for name in _ENVELOPE_FIELDS:
        for value in msg.get_all(name, []):
            found.extend(_addresses_in(value))
    found.extend(_address_value(v) or "" for k, v in original if k.lower() == "return-path")
    found.extend(_address_value(m[1]) or "" for m in _ENVELOPE_LINE.finditer(text))
    unique: dict[str, str] = {}
    for address in found:
        address = address.strip().strip("<>")
        if "@" in address and " " not in address:
            unique.setdefault(address.lower(), address)
    return tuple(unique.values())


# ---------------------------------------------------------------------------------------------------- non-standard

_BLOCK_END = r"(?=\n[ \t]*\n|\Z)"  # the diagnostic runs to the next blank line


@dataclass(frozen=True)
class _TextPattern:
    writer: str
    regex: re.Pattern[str]  # group "addr": the failed recipient; optional group "diag": what the remote said


_TEXT_RECIPIENTS = (
    # Postfix bounce(8) text ("<a@b>: host mx[1.2.3.4] said: 550 5.1.1 ..."), qmail-send and Yahoo
    # ("<a@b>:\n1.2.3.4 does not like recipient.\nRemote host said: 550 ..."): the address alone at a line start
    _TextPattern("Postfix/qmail", re.compile(rf"^<(?P<addr>{_ADDR})>:[ \t]*\n?(?P<diag>.*?){_BLOCK_END}", re.M | re.S)),
    # Exim: "The following address(es) failed:\n\n  a@b\n    host ... SMTP error ...: 550 5.1.1 ..."
    _TextPattern("Exim", re.compile(
        rf"following address\(es\) failed:\s*<?(?P<addr>{_ADDR})>?[^\n]*\n(?P<diag>.*?){_BLOCK_END}", re.I | re.S)),
    # sendmail without DSN: "----- The following addresses had permanent fatal errors -----\n<a@b>\n (reason: ...)"
    _TextPattern("sendmail", re.compile(
        rf"had permanent fatal errors -*\s*<?(?P<addr>{_ADDR})>?[^\n]*\n(?P<diag>.*?){_BLOCK_END}", re.I | re.S)),
    # Gmail: "Delivery to the following recipient failed permanently:\n\n     a@b"
    _TextPattern("Gmail", re.compile(rf"following recipients? failed permanently:\s*(?P<addr>{_ADDR})", re.I)),
    # Gmail (since 2015): "Your message wasn't delivered to a@b because the address couldn't be found"
    _TextPattern("Gmail", re.compile(rf"wasn't delivered to (?P<addr>{_ADDR})(?P<diag>[^\n]*)", re.I)),
    # Office 365 (since 2017): "Your message to a@b couldn't be delivered."
    _TextPattern("Office 365", re.compile(rf"Your message to (?P<addr>{_ADDR}) couldn't be delivered", re.I)),
    # Exchange 2007-2016: "Delivery has failed to these recipients or groups:\n\nName (a@b)" or "a@b"
    _TextPattern("Exchange", re.compile(
        rf"failed to these recipients or groups:\s*(?:[^\n(<]*[(<])?(?P<addr>{_ADDR})", re.I)),
    # Exchange 2003: "  a@b on 1/2/2008 3:04 PM\n    The e-mail address could not be found...\n    <x #5.1.1>"
    _TextPattern("Exchange 2003", re.compile(rf"^[ \t]*(?P<addr>{_ADDR}) on [^\n]*\n(?P<diag>.*?){_BLOCK_END}",
                                             re.M | re.S)),
    # Sun Java System Messaging Server: "Recipient address: a@b\n  Reason: ..."
    _TextPattern("Sun Messaging", re.compile(rf"Recipient address:\s*(?P<addr>{_ADDR})\s*Reason:(?P<diag>[^\n]*)",
                                             re.I)),
    # MailSite: "abh\n(Was addressed to a@b)\nDelivery failed\nUser's mailbox quota exceeded"
    _TextPattern("MailSite", re.compile(rf"\(Was addressed to (?P<addr>{_ADDR})\)\s*\n(?P<diag>.*?){_BLOCK_END}",
                                        re.I | re.S)),
    # Netscape Messaging Server, Lotus Domino: "The message was not delivered to: \n\n     a@b"
    _TextPattern("Netscape/Domino", re.compile(rf"was not delivered to:?\s*(?P<addr>{_ADDR})", re.I)),
)

# Whole-message diagnostics, for recipients whose own text gave none
_TEXT_DIAGNOSTICS = (
    re.compile(r"Remote Server returned '([^'\n]+)'", re.I),  # Exchange 2010+, Office 365 (old layout)
    re.compile(r"Reported error:[ \t]*([^\n]+)", re.I),  # Office 365 "More Info for Email Admins"
    re.compile(r"Remote host said:[ \t]*([^\n]+)", re.I),  # qmail, Yahoo
    re.compile(r"response from the remote server was:\s*([^\n]+)", re.I),  # Gmail
    re.compile(r"error that the other server returned was:\s*([^\n]+)", re.I),  # Gmail (2010-2015)
    re.compile(r"Technical details of (?:permanent|temporary) failure:\s*([^\n]+)", re.I),  # Gmail (old)
    re.compile(r"<[^\s<>]{1,255} #(\d\.\d{1,3}\.\d{1,3}[^<>\n]*)>"),  # Exchange 2003 "<mx #5.1.1 smtp;550 ...>"
    re.compile(r"Status code:[ \t]*([^\n]+)", re.I),  # Office 365 (new layout)
)

# Subjects of bounces without a DSN part (and of DSNs, which carry one anyway)
_BOUNCE_SUBJECTS = (
    "undelivered mail returned to sender",  # Postfix
    "delivery status notification",  # Gmail, Exchange, SES
    "undeliverable",  # Exchange, Office 365 ("Undeliverable: <subject>")
    "undelivered:",  # Exchange 2003
    "failure notice",  # qmail
    "returned mail",  # sendmail ("Returned mail: see transcript for details")
    "mail delivery failed",  # Exim ("Mail delivery failed: returning message to sender")
    "delivery failure",  # MailSite, Lotus Domino ("DELIVERY FAILURE: User x not listed")
    "delivery has failed",  # Sun ("Delivery Notification: Delivery has failed")
    "mail system error",  # Netscape, InterMail ("Mail System Error - Returned Mail")
    "nondeliverable", "non-deliverable", "unzustellbar", "non remis", "non recapitabile", "onbestelbaar",
    "email delivery error", "delivery notification",
)
_DELAY_SUBJECTS = (
    "delayed mail",  # Postfix ("Delayed Mail (still being retried)")
    "warning: could not send message",  # sendmail
    "delivery status notification (delay)",  # Gmail, Exchange
    "delivery delayed", "mail delivery delayed",  # Exchange, Exim ("Warning: message ... delayed")
)
# Text only a bounce says
_FAILURE_PHRASES = (
    "could not be delivered", "couldn't be delivered", "could not deliver", "undeliverable", "delivery has failed",
    "permanent error", "delivery failed", "was not delivered", "failed permanently", "returned to sender",
    "does not like recipient", "address(es) failed", "unable to deliver", "delivery to the following",
    "message was undeliverable", "not be delivered", "permanent fatal errors",
)
_DAEMON_LOCALS = frozenset({"mailer-daemon", "mailerdaemon", "mail-daemon", "maildaemon", "postmaster"})
_DAEMON_NAMES = ("mail delivery", "mailer-daemon", "mail administrator", "post office", "mail system")


def _subject(msg: Message) -> str:
    return " ".join(decoded(_unfold(msg.get("subject", "") or "")).split()).lower()


def _addresses_in(value: str) -> list[str]:
    # a pattern, not email.utils.getaddresses: that one recurses per address and overflows on hostile headers
    return _ADDR_RE.findall(_unfold(value))


def _from_daemon(msg: Message) -> bool:
    value = _unfold(msg.get("from", "") or "").lower()
    locals_ = {address.rpartition("@")[0] for address in _addresses_in(value)}
    return bool(locals_ & _DAEMON_LOCALS) or value in _DAEMON_LOCALS or any(hint in value for hint in _DAEMON_NAMES)


def _notification_text(parts: list[Message]) -> str:
    """The human-readable text of the report (not of the returned message), HTML only when there is no plain."""
    plain = [p for p in parts if p.get_content_type() == "text/plain"
             or (p.get_content_maintype() == "multipart" and isinstance(p.get_payload(), str))]
    chosen = plain or [p for p in parts if p.get_content_type() == "text/html"]
    text = "\n\n".join(_part_text(p) for p in chosen)[:SCAN_LIMIT]
    if not plain and chosen:
        text = re.sub(r"<[^<>]*>", " ", text).replace("&lt;", "<").replace("&gt;", ">")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _text_recipients(text: str) -> tuple[str, list[tuple[str, str]]]:
    """(writer, [(address, diagnostic)]) from the first pattern of the table that matches."""
    for pattern in _TEXT_RECIPIENTS:
        found = [(m["addr"], _one_line(m.groupdict().get("diag") or "")) for m in pattern.regex.finditer(text)]
        if found:
            return pattern.writer, found
    return "", []


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _text_diagnostic(text: str) -> str:
    for regex in _TEXT_DIAGNOSTICS:
        match = regex.search(text)
        if match:
            return _one_line(match[1])
    return ""


def _status_in(text: str) -> str | None:
    """An enhanced status in a diagnostic text, else the class of its SMTP reply code ("550 ..." → 5.0.0)."""
    status = _enhanced_status(text)
    if status:
        return status
    code = _SMTP_CODE.search(text)
    return f"{code[1][0]}.0.0" if code else None


def _non_standard(msg: Message, parts: list[Message], report_type: str, original: tuple[tuple[str, str], ...],
                  mentioned: tuple[str, ...]) -> Report:
    subject = _subject(msg)
    bounce_subject = next((s for s in _BOUNCE_SUBJECTS + _DELAY_SUBJECTS if s in subject), "")
    oof = _autoreply_subject(subject, bounce_subject)
    if oof:
        return Report("autoreply", f"auto-reply subject ({oof})", original_headers=original,
                      addresses_mentioned=mentioned)
    text = _notification_text(parts)
    daemon = _from_daemon(msg)
    writer, found = _text_recipients(text) if (daemon or bounce_subject or report_type) else ("", [])
    failure_text = any(phrase in text.lower() for phrase in _FAILURE_PHRASES)
    has_original = any(p.get_content_type() in ORIGINAL_TYPES for p in parts)
    clearly = bool(daemon or bounce_subject) and bool((daemon and bounce_subject) or failure_text or has_original)
    if found or clearly:
        delay = any(s in subject for s in _DELAY_SUBJECTS)
        recipients = _text_bounce_recipients(msg, found, text, delay)
        how = f"{writer} text" if writer else "sender and subject"
        kind = "delay" if delay else "bounce"
        return Report(kind, f"non-standard {kind} ({how}; no DSN part)", recipients=recipients,
                      original_headers=original, addresses_mentioned=mentioned)
    autoreply = _autoreply_headers(msg) or _autoreply_body(msg, text)
    if autoreply:
        return Report("autoreply", autoreply, original_headers=original, addresses_mentioned=mentioned)
    if _complaint_text(text) and has_original:  # an abuse report with no Feedback-Type: SES's "abuse"
        return Report("complaint", "non-standard feedback loop (abuse report text with the original attached)",
                      feedback_type="abuse", original_headers=original, addresses_mentioned=mentioned)
    why = {"delivery-status": "delivery-status report without a status part",
           "feedback-report": "feedback-report without a feedback-report part"}.get(report_type) or \
        (f"multipart/report ({report_type}) of no known kind" if report_type else
         "no report part, no bounce or auto-reply signs")
    return Report("unknown", why, original_headers=original, addresses_mentioned=mentioned)


def _text_bounce_recipients(msg: Message, found: list[tuple[str, str]], text: str,
                            delay: bool) -> tuple[ReportRecipient, ...]:
    # Exim also names the failed recipients in a header
    failed = [(address, "") for value in msg.get_all("x-failed-recipients", []) for address in _addresses_in(value)]
    general = _text_diagnostic(text)
    action = "delayed" if delay else "failed"
    out: dict[str, ReportRecipient] = {}
    for address, diagnostic in found + failed:
        diagnostic = diagnostic or general
        status = _status_in(diagnostic)
        bounce_type, sub_type = classify(status, diagnostic, action)
        out.setdefault(address.lower(), ReportRecipient(
            email=address, action=action, status=status, diagnostic_code=diagnostic or None,
            bounce_type=bounce_type, bounce_sub_type=sub_type,
        ))
    return tuple(out.values())


# ---------------------------------------------------------------------------------------------------- auto-replies

_OOF_PREFIXES = (
    "automatic reply", "auto:", "autoreply", "auto-reply", "auto reply", "out of office", "out of the office",
    "abwesenheitsnotiz", "automatische antwort", "réponse automatique", "respuesta automática",
    "risposta automatica", "automatisch antwoord", "autosvar", "resposta automática", "odpowiedź automatyczna",
)
_OOF_PHRASES = ("out of office", "out of the office", "on vacation", "on holiday", "abwesenheit", "away from my mail")
_VACATION_BODY = (
    "out of the office", "out of office", "on vacation", "on holiday", "on leave", "away from my desk",
    "away from the office", "limited access to email", "limited access to e-mail", "i am currently away",
    "i'm currently away", "bin abwesend", "nicht im büro", "en congés", "absent du bureau", "en vacaciones",
    "fuera de la oficina",
)


def _autoreply_subject(subject: str, bounce_subject: str) -> str:
    prefix = next((p for p in _OOF_PREFIXES if subject.startswith(p)), "")
    if prefix or bounce_subject:  # "Undeliverable: Out of Office: ..." is the bounce of an auto-reply
        return prefix
    return next((p for p in _OOF_PHRASES if p in subject), "")


def _autoreply_headers(msg: Message) -> str:
    for name in ("x-autoreply", "x-autorespond", "x-autoresponder", "x-autogenerated"):
        if msg.get(name) is not None:
            return f"auto-reply header {name}"
    precedence = (msg.get("precedence", "") or "").strip().lower()
    if precedence == "auto_reply":
        return "Precedence: auto_reply"
    auto_submitted = (msg.get("auto-submitted", "") or "").strip().lower()
    if auto_submitted.startswith("auto-replied"):  # RFC 3834: a response to a message, e.g. a vacation notice
        return "Auto-Submitted: auto-replied"
    return ""


def _autoreply_body(msg: Message, text: str) -> str:
    lowered = text[:4096].lower()
    hint = next((phrase for phrase in _VACATION_BODY if phrase in lowered), "")
    auto = (msg.get("auto-submitted", "") or "").strip().lower()
    if hint and (auto.startswith("auto-") or msg.get("x-auto-response-suppress") is not None or len(text) < 4096):
        return f"vacation text ({hint})"
    return ""


def _complaint_text(text: str) -> bool:
    """Feedback loops that forward the complaint without ARF fields ("This is an email abuse report")."""
    lowered = text[:8192].lower()
    return "email abuse report" in lowered or "spam complaint" in lowered


# ---------------------------------------------------------------------------------------------------- classify

PERMANENT, TRANSIENT, UNDETERMINED = "Permanent", "Transient", "Undetermined"


@dataclass(frozen=True)
class _Rule:
    bounce_type: str
    sub_type: str
    statuses: frozenset[str]  # enhanced status codes that decide on their own
    phrases: tuple[str, ...]  # diagnostic wording that decides ...
    classes: str  # ... when the status class is one of these, or when no status is known at all


# SES's table (ses-compat.md §2.4). Statuses are checked first (a code naming the cause beats wording), then
# phrases, both in this order. Suppressed/OnAccountSuppressionList are SES-internal and never come from a DSN.
_RULES = (
    # SES files a full mailbox as Transient (it may be emptied), whether the remote said 4.2.2 or 5.2.2.
    _Rule(TRANSIENT, "MailboxFull", frozenset({"4.2.2", "5.2.2"}),
          ("mailbox full", "mailbox is full", "over quota", "quota exceeded", "exceeded storage", "disk quota",
           "mailbox quota", "insufficient storage"), "45"),
    # Too large is Transient for SES: the same recipient takes a smaller message. 5.2.3 is "message length exceeds
    # administrative limit", 5.3.4 "message too big for system".
    _Rule(TRANSIENT, "MessageTooLarge", frozenset({"5.3.4", "5.2.3", "4.3.4", "4.2.3"}),
          ("too large", "too big", "size limit", "exceeds the maximum", "message size exceeds",
           "exceeds size"), "45"),
    # The address does not exist: 5.1.1 bad mailbox, 5.1.10 Office 365's RecipientNotFound, 5.1.6 moved away;
    # a bare 5.0.0/5.1.0 counts when the wording says so (Domino: "not listed in public Name & Address Book").
    _Rule(PERMANENT, "NoEmail", frozenset({"5.1.1", "5.1.10", "5.1.6"}),
          ("user unknown", "unknown user", "no such user", "nosuchuser", "does not exist", "doesn't exist",
           "mailbox unavailable", "recipient not found", "recipientnotfound", "user not found",
           "address not found", "unknown recipient", "no such recipient", "invalid recipient",
           "no mailbox", "mailbox not found", "unknown address", "not listed in"), "5"),
    # Rejected attachments: checked before content, the more specific refusal.
    _Rule(TRANSIENT, "AttachmentRejected", frozenset(),
          ("attachment", "file type", "blocked extension"), "45"),
    # 5.6.x is a media error (the content as sent is unacceptable to the receiver: SES's ContentRejected, which is
    # Transient because different content would pass). 5.7.1 alone is mostly an access refusal (relaying denied,
    # sender blocked: Permanent General); with spam/content/policy wording it is a content rejection.
    _Rule(TRANSIENT, "ContentRejected", frozenset({"5.6.0", "5.6.1", "5.6.2", "5.6.3", "5.6.5"}),
          ("spam", "content", "virus", "malware", "phish", "policy", "blocked for", "message rejected"), "5"),
)


def classify(status: str | None, diagnostic: str | None, action: str | None = None) -> tuple[str, str]:
    """(bounceType, bounceSubType) for a recipient, following SES's table."""
    if action in _SUCCESS_ACTIONS:
        return UNDETERMINED, UNDETERMINED
    text = (diagnostic or "").lower()
    code = _enhanced_status(status) or _status_in(text) or ""
    klass = code[:1]
    for rule in _RULES:
        if code in rule.statuses:
            return rule.bounce_type, rule.sub_type
    for rule in _RULES:
        if (klass in rule.classes or not klass) and any(phrase in text for phrase in rule.phrases):
            return rule.bounce_type, rule.sub_type
    if klass == "5":
        return PERMANENT, "General"
    if klass == "4":  # a 4.x.x failure: the remote kept deferring and the MTA gave up (SES: Transient General)
        return TRANSIENT, "General"
    return UNDETERMINED, UNDETERMINED
