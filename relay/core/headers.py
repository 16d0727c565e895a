"""Header-block surgery on raw message bytes, and SES's control headers.

Relay never regenerates a message: the header block is split into fields as they appear on the wire (folded
continuation lines included) so fields can be removed or added without touching any other byte.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from email.header import decode_header, make_header
from email.utils import getaddresses

CONFIG_SET_HEADER = "x-ses-configuration-set"
TAGS_HEADER = "x-ses-message-tags"
CONFIG_SET_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
TAG_PART_RE = re.compile(r"^[A-Za-z0-9_-]{1,256}$")
RESERVED_TAG_NAMES = ("ses:feedback-id-a", "ses:feedback-id-b")
MAX_TAGS = 50  # SES documents no limit; ours, so a header cannot carry unbounded data into every event
_BARE_LF = re.compile(rb"(?<!\r)\n")
_FIELD_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:")
_HEADER_LINE = re.compile(rb"From |[!-9;-~]*:|[ \t]")  # what the email package takes for a header line


class HeaderError(ValueError):
    """A control header relay must refuse; the message is the SMTP reply text after the code."""

    configuration_set: str | None = None  # the message's (valid) set, when the refusal is about something else


@dataclass(frozen=True)
class HeaderField:
    name: str  # as written
    raw: bytes  # the whole field, continuation lines and final CRLF included

    @property
    def lname(self) -> str:
        return self.name.lower()

    @property
    def value(self) -> str:
        """Unfolded value text (undecoded encoded-words), as SES puts it in mail.headers."""
        text = self.raw.decode("utf-8", "replace")
        value = text.split(":", 1)[1] if ":" in text else ""
        return re.sub(r"\r?\n(?=[ \t])", "", value).strip()


@dataclass
class HeaderBlock:
    fields: list[HeaderField]
    body: bytes  # everything after the blank line (empty when the message has no body)
    separator: bytes = b"\r\n"  # the blank line, or b"" when the message had none

    def get(self, lname: str) -> HeaderField | None:
        return next((f for f in self.fields if f.lname == lname), None)

    def to_bytes(self) -> bytes:
        return b"".join(f.raw for f in self.fields) + self.separator + self.body


def to_crlf(raw: bytes) -> bytes:
    """SMTP's line ending everywhere: bare LF becomes CRLF, nothing else changes."""
    # Counting is ~15x cheaper than the regex over a message that has no bare LF, as nearly all have.
    return raw if raw.count(b"\n") == raw.count(b"\r\n") else _BARE_LF.sub(b"\r\n", raw)


def split_header_block(raw: bytes, *, email_package_end: bool = True) -> HeaderBlock:
    """Split CRLF message bytes into header fields and body, keeping every byte (`to_bytes()` gives them back).

    The header block ends at the first empty line or, as the email package (and relay's MIME reader) reads a
    message, at the first line that is neither a field nor a continuation: that line then starts the body, with
    no separator between. With `email_package_end=False` only the empty line ends it (RFC 5322, as DKIM
    verifiers read it) and such a line is kept with the field before it.
    """
    fields: list[HeaderField] = []
    pos, size = 0, len(raw)
    while pos < size:
        end = raw.find(b"\r\n", pos)
        stop = size if end < 0 else end + 2
        line = raw[pos:stop]
        if line == b"\r\n":
            return HeaderBlock(fields, raw[stop:], b"\r\n")
        malformed = not _HEADER_LINE.match(line)
        if malformed and email_package_end:
            return HeaderBlock(fields, raw[pos:], b"")
        if (malformed or line[:1] in (b" ", b"\t")) and fields:
            last = fields[-1]
            fields[-1] = HeaderField(last.name, last.raw + line)
        else:
            m = _FIELD_NAME.match(line)
            fields.append(HeaderField(m.group(1).decode("ascii") if m else "", line))
        pos = stop
    return HeaderBlock(fields, b"", b"")  # a header-only message


@dataclass
class SesControl:
    """What the application asked of SES through X-SES-* headers (first instance of each wins)."""

    configuration_set: str | None = None
    tags: dict[str, list[str]] = field(default_factory=dict)
    removed: list[HeaderField] = field(default_factory=list)


def parse_message_tags(value: str) -> dict[str, list[str]]:
    """`a=b, c=d` as SES reads X-SES-MESSAGE-TAGS; raises HeaderError naming the first bad tag."""
    tags: dict[str, list[str]] = {}
    items = [item.strip() for item in value.split(",")]
    for item in items:
        if not item:
            continue
        name, eq, tag_value = (part.strip() for part in item.partition("="))
        if not eq:
            raise HeaderError(f"Message rejected: Invalid message tag '{item}': expected name=value.")
        if not (TAG_PART_RE.match(name) or name in RESERVED_TAG_NAMES):
            raise HeaderError(
                f"Message rejected: Invalid message tag name '{name}': use 1-256 characters from A-Z a-z 0-9 _ -."
            )
        if not TAG_PART_RE.match(tag_value):
            raise HeaderError(
                f"Message rejected: Invalid value '{tag_value}' for message tag '{name}': "
                "use 1-256 characters from A-Z a-z 0-9 _ -."
            )
        tags.setdefault(name, []).append(tag_value)
    if len(tags) > MAX_TAGS:
        raise HeaderError(f"Message rejected: More than {MAX_TAGS} message tags.")
    return tags


def extract_ses_control(block: HeaderBlock) -> SesControl:
    """Remove every X-SES-* field from `block` (in place) and read the ones relay understands."""
    control = SesControl()
    kept: list[HeaderField] = []
    for f in block.fields:
        if f.lname.startswith("x-ses-"):
            control.removed.append(f)
        else:
            kept.append(f)
    block.fields = kept
    first: dict[str, HeaderField] = {}
    for f in control.removed:
        first.setdefault(f.lname, f)
    if CONFIG_SET_HEADER in first:
        name = first[CONFIG_SET_HEADER].value
        if not CONFIG_SET_RE.match(name):
            raise HeaderError(f"Configuration Set does not exist: Configuration set <{name}> does not exist.")
        control.configuration_set = name
    if TAGS_HEADER in first:
        try:
            control.tags = parse_message_tags(first[TAGS_HEADER].value)
        except HeaderError as exc:
            exc.configuration_set = control.configuration_set
            raise
    return control


def decoded(value: str) -> str:
    try:
        return str(make_header(decode_header(value)))
    except (ValueError, LookupError, UnicodeDecodeError):
        return value


_PLAIN_ADDRESS = re.compile(r"\s*(?:([^\"<>,;:()\\@=]*?)\s*<([^<>\s,;:()\"\\]+@[^<>\s,;:()\"\\]+)>"
                            r"|([^<>\s,;:()\"\\]+@[^<>\s,;:()\"\\]+))\s*")


def addresses(value: str) -> list[str]:
    """Address list as SES shows it in commonHeaders: `Name <a@b>` or `a@b`, encoded words decoded."""
    # Most headers are plain `a@b` or `Name <a@b>` lists; the stdlib parser costs ~40 us per address.
    matches = [_PLAIN_ADDRESS.fullmatch(item) for item in value.split(",")]
    if all(matches):
        return [f"{m[1]} <{m[2]}>" if m[1] else (m[2] or m[3]) for m in matches]
    out = []
    for name, addr in getaddresses([value]):
        if not addr:
            continue
        name = decoded(name)
        out.append(f'"{name}" <{addr}>' if name and any(c in name for c in ',;:"') else
                   f"{name} <{addr}>" if name else addr)
    return out


def common_headers(fields: list[HeaderField], message_id: str) -> dict:
    """SES's mail.commonHeaders from the original header fields."""
    first = {}
    for f in fields:
        first.setdefault(f.lname, f.value)
    common: dict = {}
    for key, lname in (("from", "from"), ("replyTo", "reply-to"), ("to", "to"), ("cc", "cc"), ("bcc", "bcc")):
        if lname in first:
            common[key] = addresses(first[lname])
    if "sender" in first:
        common["sender"] = first["sender"]
    if "return-path" in first:
        common["returnPath"] = first["return-path"]
    if "date" in first:
        common["date"] = first["date"]
    common["messageId"] = first.get("message-id", message_id)
    if "subject" in first:
        common["subject"] = decoded(first["subject"])
    return common


def domain_of(address: str) -> str:
    """The domain of an address, lower case, without a trailing root dot."""
    return address.rpartition("@")[2].strip().strip(">").rstrip(".").lower()


# `local@domain` in dot-atom form (no quoting, comments or routes): what nearly every address looks like. Such an
# address needs no full RFC 5322 parser (the email package's costs tens of microseconds per call).
ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
DOT_ATOM_ADDRESS = rf"{ATEXT}(?:\.{ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
_PLAIN_FROM = re.compile(rf"[ \t\r\n]*(?:{ATEXT}(?:[ \t\r\n]+{ATEXT})*[ \t\r\n]*<({DOT_ATOM_ADDRESS})>"
                         rf"|({DOT_ATOM_ADDRESS}))[ \t\r\n]*")


def from_address(block: HeaderBlock) -> str | None:
    """The first address of the From header that has a domain: the sender identity, and what DMARC aligns on.
    One rule for every stage (configuration set defaults, ses:from-domain, the DKIM signing domain)."""
    f = block.get("from")
    plain = _PLAIN_FROM.fullmatch(f.value) if f else None
    if plain:  # `a@b` or `Name <a@b>`: what getaddresses would find, without it
        return plain.group(1) or plain.group(2)
    for _, addr in getaddresses([f.value]) if f else []:
        if "@" in addr:
            return addr.strip()
    return None


def from_domain(block: HeaderBlock, fallback: str) -> str:
    address = from_address(block)
    return domain_of(address if address is not None else fallback)
