"""A tag scanner for email HTML that finds what tracking may change, and nothing else.

It never builds a DOM: one compiled regex jumps between the few things that matter (comments, link elements,
`<body>`, `</body>`, script/style; the open-tracker placeholder is found by a plain search) and reports byte
spans, so the caller can edit exactly those bytes and pass every other byte through (doctype, entities,
quoting, VML, malformed markup).
Tag syntax is ASCII, so the scanner works on bytes of any ASCII-compatible charset.
"""

from __future__ import annotations

import bisect
import html.entities
import re
from dataclasses import dataclass, field

PLACEHOLDER = b"{{ses:openTracker}}"
# Per-link opt-out and tag attributes (SES, SendGrid, Postmark, SparkPost): always removed from links.
MARKERS = frozenset({b"ses:no-track", b"ses:tags", b"clicktracking", b"data-pm-no-track", b"data-msys-clicktrack"})

# Whitespace or "/", then ">" or an attribute: name, and a value double-, single- or unquoted.
_ATTR = re.compile(rb"""[\s/]*(?:(>)|([^\s/>][^\s/>=]*)(?:\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s>]+)))?)""")
# The rest of a start tag after its name, read exactly as parse_tag's loop of _ATTR reads it (atomic groups: no
# backtracking into an attribute), noting the first href and whether any attribute is a marker. An unquoted value
# opening with a quote makes the loop give up on the tag; here the match fails and parse_tag decides.
_VALUE = rb"""(?:\s*+=\s*+(?:"[^"]*+"|'[^']*+'|[^\s>"'][^\s>]*+)|(?!\s*=\s*["']))"""
_NAME = rb"[^\s/>][^\s/>=]*+"
_HREF_NAME = rb"(?i:href)(?![^\s/>=])"
# An empty group that takes part when the attribute about to be read is a marker (the match remembers it).
_MARKER_FLAG = (rb"(?:(?=(?i:ses:no-track|ses:tags|clicktracking|data-pm-no-track|data-msys-clicktrack)"
                rb"(?![^\s/>=]))()|)")
_TAG_REST = re.compile(
    rb"(?>[\s/]*+(?!" + _HREF_NAME + rb")" + _MARKER_FLAG + _NAME + _VALUE + rb")*+"  # group 1: a marker before href
    rb"(?>[\s/]*+(" + _HREF_NAME + rb")"  # 2: the first href; its value double- (3), single- (4) or unquoted (5)
    rb"""(?:\s*+=\s*+(?:"([^"]*+)"|'([^']*+)'|([^\s>"'][^\s>]*+))|(?!\s*=\s*["']))"""
    rb"(?>[\s/]*+" + _MARKER_FLAG + _NAME + _VALUE + rb")*+)?+"  # 6: a marker after href
    rb"[\s/]*+>"
)
_MARKER_BEFORE, _HREF, _MARKER_AFTER = 1, 2, 6
_HREF_VALUES = ((3, b'"'), (4, b"'"), (5, b""))
# The usual link read whole while scanning: an a or area start tag with no marker attribute and an href with a
# value, read exactly as _TAG_REST reads it. Any other a or area tag fails this branch and takes the general one.
_NO_MARKER = rb"(?!(?i:ses:no-track|ses:tags|clicktracking|data-pm-no-track|data-msys-clicktrack)(?![^\s/>=]))"
# The search tries this branch at every "<a", also inside an attribute value or a tag that never closes, where
# reading on to the end of the document each time would make the scan quadratic. So it reads at most 16
# attributes on either side of href, none of them named with a "<" (a sign that the "<a" is not a tag); any
# other tag takes the general branch, which is read only once the scan knows it is a tag.
_PLAIN_NAME = rb"[^\s/><][^\s/>=<]*+"
_PLAIN_LINK = (
    rb"(?i:(a|area))(?=[\s/>])"  # group 1: the name; then the href value double- (2), single- (3) or unquoted (4)
    rb"(?>[\s/]*+(?!" + _HREF_NAME + rb")" + _NO_MARKER + _PLAIN_NAME + _VALUE + rb"){0,16}+"
    rb"[\s/]*+" + _HREF_NAME + rb"""\s*+=\s*+(?:"([^"]*+)"|'([^']*+)'|([^\s>"'][^\s>]*+))"""
    rb"(?>[\s/]*+" + _NO_MARKER + _PLAIN_NAME + _VALUE + rb"){0,16}+"
    rb"[\s/]*+>"
)
_GENERAL = 5  # the group of any other start tag's name
# A literal "<" first lets the regex engine jump between "<"s; the lookahead rejects most tags at once.
_SCAN = re.compile(
    rb"<(?=[!aAvVbBsS]|/[bB])(?:"
    + _PLAIN_LINK +
    rb"|!--(?!\[if)(?>[^-]++|-(?!->))*+-->"  # a comment, read whole unless conditional or never closed
    rb"|!--"
    rb"|!\[CDATA\["
    rb"|(?i:(a|area|v:[a-z0-9_.-]+|body|script|style))(?=[\s/>])"
    rb"|/(?i:body)(?=[\s/>]))"
)
_TAG_OPEN = re.compile(rb"</?[A-Za-z]")
_END_SCRIPT = re.compile(rb"</script\s*>", re.I)
_END_STYLE = re.compile(rb"</style\s*>", re.I)


@dataclass(slots=True)
class Attr:
    name: bytes  # lower-cased
    start: int  # first byte of the name
    end: int  # end of the value (or of the name when there is no value)
    value_start: int = -1  # span of the value without its quotes (-1: no value)
    value_end: int = -1
    quote: bytes = b""

    def value(self, doc: bytes) -> bytes | None:
        return None if self.value_start < 0 else doc[self.value_start:self.value_end]


@dataclass(slots=True)
class Tag:
    name: str  # lower-cased
    start: int
    end: int  # just after ">"
    href: Attr | None  # the first href attribute
    marked: bool  # it has marker attributes (MARKERS)
    doc: bytes = field(default=b"", repr=False)
    name_end: int = 0
    in_comment: bool = False
    _attrs: list[Attr] | None = field(default=None, repr=False)

    @property
    def attrs(self) -> list[Attr]:
        """Every attribute, read on first use (the scan itself only needs href)."""
        if self._attrs is None:
            full = parse_tag(self.doc, self.start, self.name_end, self.end)
            self._attrs = full.attrs if full is not None else []
        return self._attrs

    def attr(self, name: bytes) -> Attr | None:
        if name == b"href":
            return self.href
        return next((a for a in self.attrs if a.name == name), None)


# The usual link as `scan(doc, compact=True)` reports it: an a or area start tag whose first href has a value and
# that has no marker attribute (read by _PLAIN_LINK), as (value start, value end, element name, inside a
# conditional comment).
PlainLink = tuple[int, int, str, bool]


@dataclass
class Scan:
    links: list[Tag | PlainLink] = field(default_factory=list)  # a, area and v:* start tags, in document order
    placeholders: list[tuple[int, bool]] = field(default_factory=list)  # (offset, usable as pixel spot)
    body_open_end: int | None = None  # just after the first <body ...>
    body_close: int | None = None  # start of the last </body>
    open_end: bool = False  # the document ends inside a tag or comment: anything appended would be swallowed
    opaque: list[tuple[int, int]] = field(default_factory=list)  # comments, CDATA, script and style text
    swallowed_from: int | None = None  # start of a tag that never closes
    compact: bool = False  # plain links as PlainLink tuples (no objects for the usual link)


def parse_tag(doc: bytes, start: int, name_end: int, limit: int) -> Tag | None:
    """The start tag at `start` with its attributes, or None when it never closes (then it is text)."""
    attrs: list[Attr] = []
    pos = name_end
    match = _ATTR.match
    while pos < limit:
        m = match(doc, pos, limit)
        last = m.lastindex if m is not None else None
        if last is None:  # only whitespace or "/" left before the limit
            return None
        if last == 1:
            end = m.end()
            href = next((a for a in attrs if a.name == b"href"), None)
            marked = any(a.name in MARKERS for a in attrs)
            return Tag(_tag_name(doc, start, name_end), start, end, href, marked, doc, name_end, _attrs=attrs)
        pos = m.end()
        if last == 2:
            attrs.append(Attr(m.group(2).lower(), m.start(2), pos))
            continue
        vs, ve = m.span(last)
        if last == 5 and doc[vs] in b"\"'":  # an opening quote that never closes
            return None
        quote = b'"' if last == 3 else b"'" if last == 4 else b""
        attrs.append(Attr(m.group(2).lower(), m.start(2), pos, vs, ve, quote))
    return None


def _inside_tag(doc: bytes, pos: int, floor: int) -> bool:
    """Whether `pos` sits inside some other tag (e.g. an attribute value), judged by the nearest < and >."""
    if pos > floor and doc[pos - 1] == 62:  # right after a ">" (the usual case): not inside any tag
        return False
    lt = doc.rfind(b"<", floor, pos)
    return lt >= 0 and doc.rfind(b">", lt, pos) < 0 and _TAG_OPEN.match(doc, lt) is not None


def scan(doc: bytes, compact: bool = False) -> Scan:
    """Everything tracking may touch in `doc`; conditional comments are scanned for links too. With `compact`,
    the usual link is a PlainLink tuple instead of a Tag (the instrumentation engine's fast path)."""
    out = Scan(compact=compact)
    _scan_range(doc, 0, len(doc), False, out)
    limit = len(doc) if out.swallowed_from is None else out.swallowed_from
    at = doc.find(PLACEHOLDER)
    inside = _InsideTag(doc)
    while at >= 0:  # rare, so placed by a plain search and judged by the context found above
        usable = not inside(at) and at < limit and not _in_ranges(out.opaque, at)
        out.placeholders.append((at, usable))
        at = doc.find(PLACEHOLDER, at + len(PLACEHOLDER))
    return out


class _InsideTag:
    """`_inside_tag(doc, pos, 0)` for ascending positions, each byte looked at a bounded number of times: the nearest
    "<" before a position, and whether a ">" follows it, carry over from the previous position (asked afresh,
    thousands of placeholders after one far "<" made the scan quadratic)."""

    def __init__(self, doc: bytes):
        self.doc = doc
        self.searched = 0  # [0, searched) has been looked at
        self.lt = -1  # the last "<" in it
        self.closed = False  # a ">" follows that "<" in it

    def __call__(self, pos: int) -> bool:
        doc = self.doc
        lt = doc.rfind(b"<", self.searched, pos)
        if lt >= 0:
            self.lt, self.closed = lt, doc.find(b">", lt, pos) >= 0
        elif self.lt >= 0 and not self.closed:
            self.closed = doc.find(b">", self.searched, pos) >= 0
        self.searched = pos
        return self.lt >= 0 and not self.closed and _TAG_OPEN.match(doc, self.lt) is not None


def _in_ranges(ranges: list[tuple[int, int]], pos: int) -> bool:
    i = bisect.bisect_right(ranges, (pos, 1 << 62)) - 1
    return i >= 0 and ranges[i][0] <= pos < ranges[i][1]


def _scan_range(doc: bytes, start: int, end: int, in_comment: bool, out: Scan) -> None:
    # The usual link and a plain comment are read whole by the search regex. (Measured: one finditer between jumps
    # instead of a search per stop is faster on link-dense mail but slower on the corpus's templates.)
    pos = start
    search = _SCAN.search
    links = out.links
    compact = out.compact
    while True:
        m = search(doc, pos, end)
        if m is None:
            if not in_comment and _inside_tag(doc, end, max(start, pos - 1)):
                out.open_end = True
            return
        at = m.start()
        group = m.lastindex
        if group:  # a start tag, the usual match; usually right after another tag's ">"
            if doc[at - 1] != 62 and _inside_tag(doc, at, start):
                pos = at + 1
            elif group == _GENERAL:
                pos = _start_tag(doc, m, end, in_comment, out)
            else:  # the usual link, read whole
                pos = m.end()
                if compact:
                    vs, ve = m.span(group)
                    links.append((vs, ve, "a" if m.end(1) - at == 2 else "area", in_comment))
                else:
                    links.append(_read_tag(doc, at, m.end(1), end, in_comment))
            continue
        pos = m.end()
        if doc[pos - 3:pos] == b"-->":  # a comment read whole (not a conditional one)
            out.opaque.append((at, pos))
            continue
        head = doc[at + 1:at + 3]
        if head == b"!-":  # <!--
            close = doc.find(b"-->", at + 4, end)
            stop = end if close < 0 else close
            if doc.startswith(b"[if", at + 4) and not in_comment:  # Outlook conditional comment: VML buttons
                _scan_range(doc, at + 4, stop, True, out)
            if close < 0:
                out.open_end = True
            pos = end if close < 0 else close + 3
            out.opaque.append((at, pos))
        elif head == b"![":  # <![CDATA[
            close = doc.find(b"]]>", at, end)
            pos = end if close < 0 else close + 3
            if not in_comment:
                out.opaque.append((at, pos))
        elif _inside_tag(doc, at, start):
            pos = at + 1
        else:  # </body>
            if not in_comment:
                out.body_close = at
            continue


# Lower-cased names of the elements _SCAN stops at, as they are usually written.
_NAMES = {name.encode(): name.lower() for name in ("a", "A", "area", "AREA", "body", "BODY", "script", "style")}


def _tag_name(doc: bytes, start: int, name_end: int) -> str:
    name = doc[start + 1:name_end]
    return _NAMES.get(name) or name.decode("ascii", "replace").lower()


def _read_tag(doc: bytes, start: int, name_end: int, limit: int, in_comment: bool = False) -> Tag | None:
    """parse_tag's answer, from one regex match in the usual case (attributes other than href are read later,
    if ever)."""
    m = _TAG_REST.match(doc, name_end, limit)
    if m is None:  # _TAG_REST cannot read it: the attribute loop decides (usually: never closed)
        tag = parse_tag(doc, start, name_end, limit)
        if tag is not None:
            tag.in_comment = in_comment
        return tag
    regs = m.regs
    href = None
    name_start, name_stop = regs[_HREF]
    if name_start >= 0:
        for group, quote in _HREF_VALUES:
            vs, ve = regs[group]
            if vs >= 0:
                href = Attr(b"href", name_start, ve + len(quote), vs, ve, quote)
                break
        else:
            href = Attr(b"href", name_start, name_stop)
    marked = regs[_MARKER_BEFORE][0] >= 0 or regs[_MARKER_AFTER][0] >= 0
    return Tag(_tag_name(doc, start, name_end), start, regs[0][1], href, marked, doc, name_end, in_comment)


def _start_tag(doc: bytes, m: re.Match, end: int, in_comment: bool, out: Scan) -> int:
    at, name_end = m.span(_GENERAL)
    at -= 1
    tag = _read_tag(doc, at, name_end, end, in_comment)
    if tag is None:  # never closed: a browser reads the rest of the document as part of this tag
        if not in_comment:
            out.open_end = True
            out.swallowed_from = m.start()
            return end
        return m.start() + 1
    name = tag.name
    if name == "a" or name not in ("body", "script", "style"):  # a, area, v:*
        out.links.append(tag)
    elif name == "body":
        if out.body_open_end is None and not in_comment:
            out.body_open_end = tag.end
    else:
        close = (_END_SCRIPT if name == "script" else _END_STYLE).search(doc, tag.end, end)
        stop = end if close is None else close.start()
        if not in_comment:  # opaque ranges do not nest: those in comments are covered by the comment's
            out.opaque.append((tag.end, stop))
        return stop
    return tag.end


# --- attribute values ---------------------------------------------------------------------------------------

_CHARREF = re.compile(r"&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[A-Za-z][A-Za-z0-9]*;?)")
_NUMERIC_FIXES = {0x80: "\u20ac", 0x82: "\u201a", 0x83: "\u0192", 0x84: "\u201e", 0x85: "\u2026", 0x86: "\u2020",
                  0x87: "\u2021", 0x88: "\u02c6", 0x89: "\u2030", 0x8A: "\u0160", 0x8B: "\u2039", 0x8C: "\u0152",
                  0x8E: "\u017d", 0x91: "\u2018", 0x92: "\u2019", 0x93: "\u201c", 0x94: "\u201d", 0x95: "\u2022",
                  0x96: "\u2013", 0x97: "\u2014", 0x98: "\u02dc", 0x99: "\u2122", 0x9A: "\u0161", 0x9B: "\u203a",
                  0x9C: "\u0153", 0x9E: "\u017e", 0x9F: "\u0178"}
_HTML5 = html.entities.html5


def _numeric(ref: str) -> str:
    digits = ref[1:].rstrip(";")
    code = int(digits[1:], 16) if digits[:1] in ("x", "X") else int(digits)
    if code in _NUMERIC_FIXES:
        return _NUMERIC_FIXES[code]
    if code == 0 or code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
        return "\ufffd"
    return chr(code)


def unescape_attribute(value: str) -> str:
    """Character references decoded once, as a browser does in an attribute value.

    Unlike `html.unescape`, a named reference without ";" followed by a letter, digit or "=" is left as it is
    (so `?a=1&region=eu` keeps `&region`), which is what makes the redirect land where the link pointed.
    """
    if "&" not in value:
        return value

    def repl(m: re.Match) -> str:
        ref = m.group(1)
        if ref[0] == "#":
            return _numeric(ref)
        if ref.endswith(";") and ref in _HTML5:
            return _HTML5[ref]
        for n in range(len(ref.rstrip(";")), 1, -1):  # longest legacy name without ";"
            name = ref[:n]
            if name in _HTML5 and not name.endswith(";"):
                after = value[m.start(1) + n:m.start(1) + n + 1]
                if after and (after.isalnum() or after == "="):
                    return m.group(0)
                return _HTML5[name] + ref[n:]
        return m.group(0)

    return _CHARREF.sub(repl, value)


def escape_attribute(value: str) -> str:
    """A URL made safe for any attribute quoting: & as &amp;, quotes and whitespace as references."""
    return (value.replace("&", "&amp;").replace('"', "&quot;").replace("'", "&#39;").replace(">", "&gt;")
            .replace(" ", "&#32;"))
