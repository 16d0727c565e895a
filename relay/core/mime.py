"""MIME structure over raw message bytes, with byte offsets, so a part can be replaced without touching the rest.

The structure follows the stdlib feed parser's reading of a message (header/body split, boundary lines, the line
end before a boundary belonging to the boundary), because that is how receivers and our acceptance checks see
it; but nothing is ever regenerated: `splice` puts new part bodies into the original bytes.
Protected containers (signed, encrypted, attached messages) are never descended into.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import policy
from email.message import Message
from operator import itemgetter

PROTECTED = frozenset({
    "multipart/signed", "multipart/encrypted", "application/pkcs7-mime", "application/x-pkcs7-mime",
    "message/rfc822", "text/rfc822-headers", "message/global",
})
# Same test as the feed parser: a header line, a unix From line, or a continuation line.
_HEADER_LINE = re.compile(rb"From |[\041-\071\073-\176]*:|[\t ]")
EDIT_ORDER = itemgetter(0, 1)  # sort key of (start, end, ...) edits
UUENCODE = ("x-uuencode", "uuencode", "uue", "x-uue")


@dataclass
class Part:
    path: str  # "1" for the message itself, "1.2" for its second child, as IMAP and the reports number them
    start: int  # first byte of the part's header block
    header_end: int  # end of the last header field (where a new field would go)
    body_start: int
    body_end: int  # the line end before a following boundary is not part of the body
    content_type: str
    charset: str | None
    cte: str  # Content-Transfer-Encoding, lower-cased exactly as the email package compares it
    disposition: str
    protected: bool  # a protected container itself, or anything inside one
    fields: list[tuple[str, int, int]] = field(default_factory=list)  # (lower name, start, end) of header fields
    children: list[Part] = field(default_factory=list)
    multipart: bool = False

    @property
    def is_attachment(self) -> bool:
        return self.disposition == "attachment"

    def field_span(self, lname: str) -> tuple[int, int] | None:
        return next(((s, e) for n, s, e in self.fields if n == lname), None)


def parse(raw: bytes) -> Part:
    """The MIME tree of a CRLF message."""
    return _parse_part(raw, 0, len(raw), "1", "text/plain", False)


def walk(part: Part) -> Iterator[Part]:
    yield part
    for child in part.children:
        yield from walk(child)


def leaves(part: Part) -> Iterator[Part]:
    """Parts with a body of their own: non-multiparts, protected containers, multiparts without a boundary."""
    if part.children:
        for child in part.children:
            yield from leaves(child)
    else:
        yield part


def _split_headers(raw: bytes, start: int, end: int) -> tuple[list[tuple[str, int, int]], int, int]:
    """Header fields of the block at `start`, the end of the fields and where the body starts."""
    fields: list[tuple[str, int, int]] = []
    pos = start
    while pos < end:
        nl = raw.find(b"\n", pos, end)
        line_end = end if nl < 0 else nl + 1
        if raw[pos:pos + 1] in (b"\r", b"\n"):  # the blank separator line
            return fields, pos, line_end
        if not _HEADER_LINE.match(raw, pos, line_end):
            return fields, pos, pos  # a body without separator starts at the first non-header line
        if raw[pos:pos + 1] in (b" ", b"\t") and fields:
            name, s, _ = fields[-1]
            fields[-1] = (name, s, line_end)
        else:
            colon = raw.find(b":", pos, line_end)
            name = raw[pos:colon].decode("ascii", "replace").strip().lower() if colon >= 0 else ""
            fields.append((name, pos, line_end))
        pos = line_end
    return fields, end, end


_WANTED = frozenset({"content-type", "content-transfer-encoding", "content-disposition"})


def _header_message(raw: bytes, fields: list[tuple[str, int, int]], default_type: str) -> Message:
    """A Message holding the fields that matter, stored exactly as the feed parser stores them."""
    msg = Message(policy.compat32)
    for name, s, e in fields:
        if name in _WANTED:
            lines = raw[s:e].decode("ascii", "surrogateescape").splitlines(keepends=True)
            msg.set_raw(*policy.compat32.header_source_parse(lines))
    msg.set_default_type(default_type)
    return msg


def _parse_part(raw: bytes, start: int, end: int, path: str, default_type: str, inside_protected: bool) -> Part:
    fields, header_end, body_start = _split_headers(raw, start, end)
    msg = _header_message(raw, fields, default_type)
    ctype = msg.get_content_type()
    disposition = str(msg.get("content-disposition", "")).split(";")[0].strip().lower()
    part = Part(
        path=path, start=start, header_end=header_end, body_start=body_start, body_end=end, content_type=ctype,
        charset=_charset(msg), cte=str(msg.get("content-transfer-encoding", "")).lower(),
        disposition=disposition, protected=inside_protected or ctype in PROTECTED, fields=fields,
    )
    if part.protected or ctype.split("/")[0] != "multipart":  # get_content_maintype(), without parsing again
        return part
    boundary = msg.get_boundary()
    if not boundary or "\r" in boundary or "\n" in boundary:  # a line-based reader can never match these
        return part
    part.multipart = True
    child_default = "message/rfc822" if ctype == "multipart/digest" else "text/plain"
    for i, (cs, ce) in enumerate(_child_ranges(raw, body_start, end, boundary), 1):
        part.children.append(_parse_part(raw, cs, ce, f"{path}.{i}", child_default, False))
    return part


def _charset(msg: Message) -> str | None:
    try:
        return msg.get_content_charset()
    except (LookupError, ValueError, TypeError):  # RFC 2231 values in unknown charsets
        return None


def _child_ranges(raw: bytes, start: int, end: int, boundary: str) -> list[tuple[int, int]]:
    """Byte ranges of the parts between boundary lines (a boundary never found: no parts)."""
    marker = b"--" + boundary.encode("utf-8", "surrogateescape")
    ranges: list[tuple[int, int]] = []
    part_start: int | None = None
    pos = start
    while True:
        line_start, line_end, closing = _find_delimiter(raw, marker, pos, end)
        if line_start < 0:
            if part_start is not None:  # no close boundary: the last part runs to the end ...
                # ... less its final line end when that is the end of the message (as the feed parser reads it)
                ranges.append((part_start, _before_line_end(raw, part_start, end) if end == len(raw) else end))
            return ranges
        if part_start is not None:
            ranges.append((part_start, _before_line_end(raw, part_start, line_start)))
        if closing:
            return ranges
        part_start = line_end
        # Like the feed parser, a run of boundary lines (close ones included) opens a single part.
        while part_start < end:
            again, again_end, _ = _find_delimiter(raw, marker, part_start, end)
            if again != part_start:
                break
            part_start = again_end
        pos = part_start


_DELIM_TAIL = re.compile(rb"(--)?[ \t]*(?:\r\n|\n|\r|\Z)")


def _find_delimiter(raw: bytes, marker: bytes, pos: int, end: int) -> tuple[int, int, bool]:
    """(start, end after its line end, is close) of the next boundary line: `--b`, `--b--`, then blanks only."""
    while True:
        at = raw.find(marker, pos, end)
        if at < 0:
            return -1, -1, False
        if at == 0 or raw[at - 1:at] in (b"\n", b"\r"):
            tail = _DELIM_TAIL.match(raw, at + len(marker), end)
            if tail is not None:
                return at, tail.end(), bool(tail.group(1))
        pos = at + 1


def _after_line(raw: bytes, pos: int) -> int:
    return pos + 1 if raw[pos:pos + 1] == b"\n" else pos


def _before_line_end(raw: bytes, floor: int, pos: int) -> int:
    if pos - 2 >= floor and raw[pos - 2:pos] == b"\r\n":
        return pos - 2
    if pos - 1 >= floor and raw[pos - 1:pos] in (b"\n", b"\r"):
        return pos - 1
    return pos


# --- transfer encodings ------------------------------------------------------------------------------------

class EncodingError(ValueError):
    pass


def decode_body(body: bytes, cte: str) -> bytes:
    """The part's content, as the email package decodes it; refuses what it could not re-encode faithfully."""
    if cte == "quoted-printable":
        return binascii.a2b_qp(body)
    if cte == "base64":
        compact = b"".join(body.split())
        try:
            return base64.b64decode(compact, validate=True)
        except binascii.Error as exc:
            raise EncodingError(f"malformed base64 ({exc})") from exc
    if cte in UUENCODE:
        raise EncodingError(f"unsupported transfer encoding {cte}")
    return body


_LONE_CR = re.compile(rb"\r(?!\n)")
_ESCAPED_BLANK_AT_EOL = re.compile(rb"=(?:20|09)\r\n")


def crlf_only(data: bytes) -> bool:
    """Whether every line break is CRLF (no bare CR or LF). As fast as two single-byte counts: a two-byte
    count (b"\r\n") is several times slower."""
    return data.count(b"\r") == data.count(b"\n") and _LONE_CR.search(data) is None


def encode_qp(data: bytes) -> bytes:
    """Quoted-printable with CRLF line ends and lines of at most 76 characters; decodes back to `data` exactly."""
    if crlf_only(data):
        out = binascii.b2a_qp(data, istext=True)
        # Without a CRLF in the input, soft breaks come out as bare LF; the input has no bare LF to confuse.
        if b"\r\n" not in data:
            out = out.replace(b"\n", b"\r\n")
        # In text mode binascii only overruns 76 with an escaped space or tab ending a line: look only then.
        suspect = _ESCAPED_BLANK_AT_EOL.search(out) is not None or out.endswith((b"=20", b"=09"))
    else:  # bare CR or LF inside lines must be escaped, so encode line by line in binary mode
        out = b"\r\n".join(binascii.b2a_qp(line, istext=False).replace(b"\n", b"\r\n") for line in data.split(b"\r\n"))
        suspect = True  # binary mode writes lines of 77
    return _rewrap(out) if suspect and max(map(len, out.split(b"\r\n"))) > 76 else out


def _rewrap(encoded: bytes) -> bytes:
    """binascii can end a line with an escaped space one past 76 characters: add soft breaks where needed."""
    out = []
    for line in encoded.split(b"\r\n"):
        while len(line) > 76:
            cut = 75
            if line[cut - 1:cut] == b"=":  # never split an =XX escape
                cut -= 1
            elif line[cut - 2:cut - 1] == b"=":
                cut -= 2
            out.append(line[:cut] + b"=")
            line = line[cut:]
        out.append(line)
    return b"\r\n".join(out)


_SEPARATOR = b"\r\n\x00\r\n"  # a line of one NUL, which QP always writes as "=00"
_ENCODED_SEPARATOR = b"\r\n=00\r\n"


def encode_qp_many(chunks: list[bytes]) -> list[bytes]:
    """`[encode_qp(c) for c in chunks]` in one pass of the C encoder (QP is line-local, so chunks that are
    separated by a line of their own encode as they would alone)."""
    if len(chunks) > 1:
        out = encode_qp(_SEPARATOR.join(chunks)).split(_ENCODED_SEPARATOR)
        if len(out) == len(chunks):  # a chunk holding such a line itself would shift them: then one by one
            return out
    return [encode_qp(c) for c in chunks]


def encode_base64(data: bytes, final_newline: bool) -> bytes:
    flat = binascii.b2a_base64(data, newline=False)
    out = b"\r\n".join([flat[i:i + 76] for i in range(0, len(flat), 76)])
    return out + b"\r\n" if final_newline and out else out


def max_line_length(data: bytes) -> int:
    if len(data) <= 998:
        return len(data)
    return max(map(len, data.split(b"\n")))


def encode_body(data: bytes, cte: str, like: bytes) -> tuple[bytes, str | None]:
    """Encode `data` for a part whose original body was `like`; the new CTE when it must switch to QP."""
    if cte == "quoted-printable":
        return encode_qp(data), None
    if cte == "base64":
        return encode_base64(data, like.endswith(b"\n")), None
    if max_line_length(data) > 998:  # 7bit/8bit lines must stay within SMTP's limit
        return encode_qp(data), "quoted-printable"
    return data, None


def set_cte(raw: bytes, part: Part, cte: str) -> tuple[int, int, bytes] | None:
    """The edit that makes the part's Content-Transfer-Encoding `cte` (None: no header block to put it in)."""
    span = part.field_span("content-transfer-encoding")
    if span is not None:
        name_end = raw.index(b":", span[0], span[1])
        return span[0], span[1], raw[span[0]:name_end] + b": " + cte.encode("ascii") + b"\r\n"
    if part.header_end == part.body_start:  # no separator line: adding a field would need one
        return None
    return part.header_end, part.header_end, b"Content-Transfer-Encoding: " + cte.encode("ascii") + b"\r\n"


def splice(raw: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    """`raw` with each (start, end) range replaced; edits must not overlap."""
    out: list[bytes] = []
    pos = 0
    for start, end, data in sorted(edits, key=EDIT_ORDER):
        out.append(raw[pos:start])
        out.append(data)
        pos = end
    out.append(raw[pos:])
    return b"".join(out)
