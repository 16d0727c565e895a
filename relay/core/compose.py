"""A message built from the API's Simple content or a rendered template (pure): what a careful MTA would write.

The email package writes it (policy SMTP: CRLF, header lines folded at 78, RFC 2047 for non-ASCII header
text): text/plain, text/html, or multipart/alternative with both; multipart/mixed around them when there are
attachments (multipart/related for inline ones). A body goes out as 7bit when it is ASCII with short lines,
else quoted-printable (text the reader can still read) or base64, so no line is ever over 998 octets. Date
and Message-ID are left to acceptance (relay/core/intake.py), which adds them to every message that lacks
them, unless given (TestRenderTemplate's rendering is a whole message on its own).
"""

from __future__ import annotations

import email.policy
import email.utils
import mimetypes
from dataclasses import dataclass
from email.message import EmailMessage

POLICY = email.policy.SMTP.clone(linesep="\r\n", max_line_length=78)
DISPOSITIONS = ("ATTACHMENT", "INLINE")
TRANSFER_ENCODINGS = {"BASE64": "base64", "QUOTED_PRINTABLE": "quoted-printable", "SEVEN_BIT": "7bit"}


class AddressError(ValueError):
    """An address SES would refuse; the message is SES's wording."""


@dataclass(frozen=True)
class Attachment:
    content: bytes
    filename: str
    content_type: str = ""  # empty: from the file name (application/octet-stream if unknown)
    disposition: str = "ATTACHMENT"
    content_id: str | None = None
    description: str | None = None
    transfer_encoding: str | None = None  # BASE64, QUOTED_PRINTABLE or SEVEN_BIT; None: base64


@dataclass(frozen=True)
class Simple:
    from_address: str
    subject: str
    text: str | None = None
    html: str | None = None
    to: tuple[str, ...] = ()
    cc: tuple[str, ...] = ()
    reply_to: tuple[str, ...] = ()
    headers: tuple[tuple[str, str], ...] = ()  # more header fields, in order
    attachments: tuple[Attachment, ...] = ()
    subject_charset: str | None = None
    text_charset: str | None = None
    html_charset: str | None = None


def addr_spec(address: str) -> str:
    """The `local@domain` of an address as SES's API takes it (`Name <local@domain>` or bare); AddressError
    with SES's texts for one it would refuse."""
    if any(c in address for c in "\r\n\0"):
        raise AddressError("Illegal address")
    parsed = email.utils.getaddresses([address])
    if len(parsed) != 1 or not parsed[0][1]:
        raise AddressError("Illegal address")
    spec = parsed[0][1]
    local, at, domain = spec.rpartition("@")
    if not at:
        raise AddressError("Missing final '@domain'")
    if not local or not domain or any(c.isspace() for c in spec):
        raise AddressError("Illegal address")
    return spec


def one_line(value: str) -> str:
    """A header value on one line: a line break in it (CR, LF, and what else Python splits lines at) would start
    a header field of the client's making."""
    return " ".join(value.splitlines())


def _charset(name: str | None, text: str) -> str:
    """The charset a part is written in: the one the client named when it can write the text, else UTF-8."""
    if name:
        try:
            text.encode(name)
            return name.lower()
        except (LookupError, UnicodeEncodeError):
            pass
    return "utf-8"


def _kwargs(a: Attachment) -> dict:
    maintype, _, subtype = (a.content_type or _guess(a.filename)).partition("/")
    kwargs: dict = {"maintype": maintype or "application", "subtype": subtype or "octet-stream",
                    "filename": a.filename, "disposition": a.disposition.lower()}
    if a.content_id:
        kwargs["cid"] = a.content_id if a.content_id.startswith("<") else f"<{a.content_id}>"
    if a.transfer_encoding:
        kwargs["cte"] = TRANSFER_ENCODINGS[a.transfer_encoding]
    return kwargs


def _guess(filename: str) -> str:
    return mimetypes.guess_type(filename)[0] or "application/octet-stream"


def _add(message: EmailMessage, a: Attachment, inline: bool) -> None:
    kwargs = _kwargs(a)
    if kwargs.get("cte") in ("quoted-printable", "7bit") and kwargs["maintype"] != "text":
        kwargs.pop("cte")  # the email package writes binary content base64 only
    (message.add_related if inline else message.add_attachment)(a.content, **kwargs)
    if a.description:
        message.get_payload()[-1]["Content-Description"] = a.description


def _html_part(message: EmailMessage) -> EmailMessage:
    return message.get_payload()[-1] if message.is_multipart() else message


def build(content: Simple, message_id: str | None = None, date: str | None = None) -> bytes:
    """The message as bytes (CRLF). `message_id` (without <>) and `date` (RFC 5322) are added when given."""
    message = EmailMessage(policy=POLICY)
    if content.from_address:
        message["From"] = content.from_address
    if content.to:
        message["To"] = ", ".join(content.to)
    if content.cc:
        message["Cc"] = ", ".join(content.cc)
    if content.reply_to:
        message["Reply-To"] = ", ".join(content.reply_to)
    message["Subject"] = one_line(content.subject)
    if date:
        message["Date"] = date
    if message_id:
        message["Message-ID"] = f"<{message_id}>"
    for name, value in content.headers:
        message[name] = one_line(value)
    if content.text is not None:
        message.set_content(content.text, charset=_charset(content.text_charset, content.text))
        if content.html is not None:
            message.add_alternative(content.html, subtype="html",
                                    charset=_charset(content.html_charset, content.html))
    else:
        html = content.html or ""
        message.set_content(html, subtype="html", charset=_charset(content.html_charset, html))
    # Inline parts belong with the HTML that shows them (multipart/related around it); without HTML they are
    # attachments like the others.
    html_part = _html_part(message) if content.html is not None else None
    for a in content.attachments:
        if a.disposition == "INLINE" and html_part is not None:
            _add(html_part, a, inline=True)
    for a in content.attachments:
        if a.disposition != "INLINE" or html_part is None:
            _add(message, a, inline=False)
    return message.as_bytes(policy=POLICY)
