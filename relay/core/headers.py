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
_BARE_LINE_END = re.compile(rb"\r\n?|\n")  # as aiosmtplib's normalize_message_line_endings reads them
_FIELD_NAME = re.compile(rb"([!-9;-~]+)[ \t]*:")
_NEXT_UNFOLDED_LINE = re.compile(rb"\r\n(?![ \t])")  # the end of a line that the next one does not continue
_BLANKS = b" \t"
_FOLD = re.compile(r"\r?\n(?=[ \t])")
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
        return _unfold(value).strip()


def _unfold(value: str) -> str:
    """`value` without the line breaks of its folding (a line break before a space or tab)."""
    if value.count("\n") == value.count("\r\n"):  # CRLF only, as every field after intake
        # Two replaces: several times faster than the regex on a long folded value, and no single C call that
        # holds the GIL (and so the event loop) for hundreds of milliseconds over a 2 MB one.
        return value.replace("\r\n ", " ").replace("\r\n\t", "\t")
    return _FOLD.sub("", value)


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
    """SMTP's line ending everywhere: a bare LF or a bare CR becomes CRLF, nothing else changes.

    aiosmtplib does the same to every message it sends, and receivers read a bare CR as a line end: done once
    at intake, what relay reads, stores, signs and sends are the same bytes (a bare CR made signatures fail,
    and could hide a field inside another one).
    """
    # Counting is ~15x cheaper than the regex over a message that has no bare CR or LF, as nearly all have.
    crlf = _count(raw, b"\r\n")
    if _count(raw, b"\n") == crlf == _count(raw, b"\r"):
        return raw
    return b"".join([_BARE_LINE_END.sub(b"\r\n", raw[start:end]) for start, end in _slices(raw)])


# Big messages are read in a thread, but one C call over all of a 39 MB message (a count, a regex) holds the GIL,
# and so the event loop, for up to half a second: work on slices of this size, and the loop gets its turns.
_SLICE = 1 << 20


def _count(raw: bytes, sub: bytes) -> int:
    """raw.count(sub), slice by slice (a slice reaches into the next by len(sub) - 1 bytes, so an occurrence
    across the cut is counted once, in the slice where it starts)."""
    if len(raw) <= _SLICE:
        return raw.count(sub)
    reach = len(sub) - 1
    return sum([raw.count(sub, i, i + _SLICE + reach) for i in range(0, len(raw), _SLICE)])


def _slices(raw: bytes) -> list[tuple[int, int]]:
    """(start, end) of consecutive slices of about _SLICE bytes, never cutting between a CR and an LF."""
    cuts = [0]
    while cuts[-1] + _SLICE < len(raw):
        cut = cuts[-1] + _SLICE
        cuts.append(cut + 1 if raw[cut - 1:cut + 1] == b"\r\n" else cut)
    return list(zip(cuts, [*cuts[1:], len(raw)], strict=True))


def split_header_block(raw: bytes, *, email_package_end: bool = True) -> HeaderBlock:
    """Split CRLF message bytes into header fields and body, keeping every byte (`to_bytes()` gives them back).

    The header block ends at the first empty line or, as the email package (and relay's MIME reader) reads a
    message, at the first line that is neither a field nor a continuation: that line then starts the body, with
    no separator between. With `email_package_end=False` only the empty line ends it (RFC 5322, as DKIM
    verifiers read it) and such a line is kept with the field before it.
    """
    fields: list[HeaderField] = []
    pos, size = 0, len(raw)
    start = -1  # where the field being read starts (-1: none yet)
    next_line = _NEXT_UNFOLDED_LINE.search
    while pos < size:
        if raw.startswith(b"\r\n", pos):
            _add_field(fields, raw, start, pos)
            return HeaderBlock(fields, raw[pos + 2:], b"\r\n")
        continuation = raw[pos] in _BLANKS
        malformed = not continuation and not _HEADER_LINE.match(raw, pos)
        if malformed and email_package_end:
            _add_field(fields, raw, start, pos)
            return HeaderBlock(fields, raw[pos:], b"")
        if start < 0 or not (continuation or malformed):
            _add_field(fields, raw, start, pos)
            start = pos
        # Continuation lines are skipped in one search: one step per field, however often it is folded (a
        # step per line that copied the field so far made a header of 600,000 folded lines take minutes).
        m = next_line(raw, pos)
        pos = size if m is None else m.end()
    _add_field(fields, raw, start, size)
    return HeaderBlock(fields, b"", b"")  # a header-only message


def _add_field(fields: list[HeaderField], raw: bytes, start: int, end: int) -> None:
    """The field raw[start:end] (none when start < 0), named by its first line."""
    if start >= 0:
        m = _FIELD_NAME.match(raw, start, end)
        fields.append(HeaderField(m.group(1).decode("ascii") if m else "", raw[start:end]))


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
    """Encoded words decoded; the value as written when they cannot be (a broken word, an unknown charset)."""
    try:
        return str(make_header(decode_header(value)))
    except Exception:  # noqa: BLE001 - HeaderParseError, CharsetError, ...: the email package raises many kinds
        return value


def _parsed_addresses(value: str) -> list[tuple[str, str]] | None:
    """getaddresses' (name, address) pairs; None when it cannot read the value: it recurses once per nested
    group, so `a:a:a:...` exhausts the stack."""
    try:
        return getaddresses([value])
    except Exception:  # noqa: BLE001 - RecursionError, or anything else the parser meets in hostile text
        return None


_PLAIN_ADDRESS = re.compile(r"\s*(?:([^\"<>,;:()\\@=]*?)\s*<([^<>\s,;:()\"\\]+@[^<>\s,;:()\"\\]+)>"
                            r"|([^<>\s,;:()\"\\]+@[^<>\s,;:()\"\\]+))\s*")


def addresses(value: str) -> list[str]:
    """Address list as SES shows it in commonHeaders: `Name <a@b>` or `a@b`, encoded words decoded."""
    # Most headers are plain `a@b` or `Name <a@b>` lists; the stdlib parser costs ~40 us per address.
    matches = [_PLAIN_ADDRESS.fullmatch(item) for item in value.split(",")]
    if all(matches):
        return [f"{m[1]} <{m[2]}>" if m[1] else (m[2] or m[3]) for m in matches]
    pairs = _parsed_addresses(value)
    if pairs is None:
        return [value]  # recorded as written
    out = []
    for name, addr in pairs:
        if not addr:
            continue
        name = decoded(name)
        out.append(f'"{name}" <{addr}>' if name and any(c in name for c in ',;:"') else
                   f"{name} <{addr}>" if name else addr)
    return out


_COMMON = frozenset({"from", "reply-to", "to", "cc", "bcc", "sender", "return-path", "date", "message-id", "subject"})


def common_headers(fields: list[HeaderField], message_id: str) -> dict:
    """SES's mail.commonHeaders from the original header fields."""
    first: dict[str, str] = {}
    for f in fields:  # only the first of each wanted field is read (a message may have many thousand fields)
        if f.lname in _COMMON and f.lname not in first:
            first[f.lname] = f.value
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
    for _, addr in (_parsed_addresses(f.value) or []) if f else []:
        if "@" in addr:
            return addr.strip()
    return None


def first_recipient(block: HeaderBlock) -> str | None:
    """The first address of To, else of Cc, else of Bcc: whom the message is addressed to first."""
    for name in ("to", "cc", "bcc"):
        f = block.get(name)
        for _, addr in (_parsed_addresses(f.value) or []) if f else []:
            if "@" in addr:
                return addr.strip()
    return None


def from_domain(block: HeaderBlock, fallback: str) -> str:
    address = from_address(block)
    return domain_of(address if address is not None else fallback)
