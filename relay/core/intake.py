"""What relay does to a message at acceptance, before it is queued: pure, shared by SMTP and `relay instrument`.

- line ends become CRLF (the SMTP wire form; nothing else in the bytes changes);
- every X-SES-* field is removed from the header block (SES does the same) but kept for events' mail.headers;
- X-SES-CONFIGURATION-SET and X-SES-MESSAGE-TAGS are read and validated (HeaderError on bad input);
- a Message-ID is added only when the client sent none (threading depends on the client's own), and not to a
  message that is itself a signed, encrypted or wrapped container (relay treats it as sealed); it is relay's,
  not the client's, so it stays out of the event's mail.headers (commonHeaders.messageId is then SES's id);
- a Date is added, on the same terms, when the client sent none: RFC 5322 requires one, and a submission
  agent adds it (RFC 6409 8.2); the events' mail.headers and commonHeaders show it;
- optionally a Received trace field is prepended, as every MTA does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import islice

from relay.core.events import MailFacts
from relay.core.headers import (
    HeaderBlock,
    HeaderField,
    SesControl,
    extract_ses_control,
    from_domain,
    split_header_block,
    to_crlf,
)
from relay.core.mime import PROTECTED

# A message within these is read and rendered on the event loop: about a millisecond of work or less, which the
# hop to a thread and back (about 0.1 ms) would not repay. Measured per unit: intake ~3 ns a byte and ~5 us a
# header field; a first instrumented copy ~30 us a KB of link-dense HTML and ~75 us a MIME part.
INLINE_BYTES = 64 * 1024  # the 60 KB newsletter of the benchmarks stays inline: ~0.3 ms intake, ~2 ms first copy
INLINE_HEADER_LINES = 200  # typical mail has 10-60 (a few DKIM and ARC sets included)
INLINE_PARTS = 20  # counted as lines starting with "--" (boundaries and the odd signature separator)
_BLANK_LINE = re.compile(rb"\n\r?\n")
_DASHED_LINE = re.compile(rb"\n--")


@dataclass
class Intake:
    raw: bytes  # the message as it will be queued and (before instrumentation) delivered
    control: SesControl
    original_headers: list[HeaderField]  # as received, X-SES-* included, for mail.headers
    block: HeaderBlock
    from_domain: str
    message_id_header: str | None
    subject: str | None


def intake(raw: bytes, mail_from: str, relay_message_id: str, hostname: str, received: str | None = None,
           date: str | None = None) -> Intake:
    """`date`: the Date value (RFC 5322 form) given to a message that has none; None adds no Date."""
    block = split_header_block(to_crlf(raw))
    if block.fields and not block.fields[-1].raw.endswith(b"\r\n"):
        last = block.fields[-1]  # a message that ends inside its header block
        block.fields[-1] = HeaderField(last.name, last.raw + b"\r\n")
    original = list(block.fields)
    control = extract_ses_control(block)
    mid = block.get("message-id")
    if date is not None and block.get("date") is None and not sealed(block):
        block.fields.append(HeaderField("Date", f"Date: {date}\r\n".encode("ascii")))
        original.append(block.fields[-1])
    if mid is None and not sealed(block):
        value = f"<{relay_message_id}@{hostname}>"
        block.fields.append(HeaderField("Message-ID", f"Message-ID: {value}\r\n".encode("ascii")))
    if received:
        block.fields.insert(0, HeaderField("Received", received.encode("utf-8") + b"\r\n"))
    if not block.separator and not block.body:
        block.separator = b"\r\n"  # a header-only message still ends its header block
    subject = block.get("subject")
    return Intake(
        raw=block.to_bytes(),
        control=control,
        original_headers=original,
        block=block,
        from_domain=from_domain(block, mail_from),
        message_id_header=mid.value if mid else None,
        subject=subject.value if subject else None,
    )


def heavy(raw: bytes) -> bool:
    """Whether reading `raw` (or rendering a copy once its analysis is done) is enough work to take off the
    event loop (relay.offload): a big message, or a small one with very many header fields. About 1 us."""
    if len(raw) > INLINE_BYTES:
        return True
    blank = _BLANK_LINE.search(raw)  # the header block's lines end with the "\n" that starts it
    return raw.count(b"\n", 0, blank.start() + 1 if blank else len(raw)) > INLINE_HEADER_LINES


def many_parts(raw: bytes) -> bool:
    """Whether analysing `raw` for instrumentation meets more MIME parts than the loop should parse (each costs
    tens of microseconds). About 25 us for a 60 KB message: asked once per message, not per copy."""
    return next(islice(_DASHED_LINE.finditer(raw), INLINE_PARTS, None), None) is not None


def sealed(block: HeaderBlock) -> bool:
    """A message that is itself a signed, encrypted or wrapped container: its header block stays as sent."""
    ctype = block.get("content-type")
    return ctype is not None and ctype.value.split(";")[0].strip().lower() in PROTECTED


def mail_facts(item: Intake, *, message_id: str, now_ms: int, mail_from: str, recipients: list[str],
               source_ip: str = "", caller_identity: str = "", account_id: str = "000000000000",
               region: str = "local", operation: str = "SendSmtpEmail") -> MailFacts:
    return MailFacts(
        message_id=message_id,
        timestamp_ms=now_ms,
        source=mail_from,
        destination=list(recipients),
        headers=item.original_headers,
        configuration_set=item.control.configuration_set,
        tags=item.control.tags,
        source_ip=source_ip,
        from_domain=item.from_domain,
        caller_identity=caller_identity,
        account_id=account_id,
        region=region,
        operation=operation,
    )
