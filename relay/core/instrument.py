"""Open and click instrumentation, split in two so a message is analysed once and copied cheaply per recipient.

`analyse(raw, settings)` parses the MIME tree, decodes each HTML part, scans it and turns it into a template:
the decoded bytes with holes (slots) where tracking URLs and the pixel go, already re-encoded wherever no slot
sits. `render(plan, ...)` fills the slots with one recipient's signed URLs, encodes only what contains them
and splices the part bodies into the original message bytes. Both are pure.

Rules follow SES (ses-compat.md §3 in the shared reference): only http(s) links valid per RFC 3986 (IRIs
allowed) are wrapped, at most 250 per message; opt-out markers and `ses:tags` are always removed; the first
`{{ses:openTracker}}` is the pixel and the others are deleted, whether or not opens are tracked.
"""

from __future__ import annotations

import binascii
import codecs
import html as stdlib_html
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache, partial
from itertools import accumulate

from relay.core import html, mime, tokens
from relay.core.settings import TrackingSettings
from relay.core.tokens import Keyring

MAX_LINKS = 250  # SES tracks at most 250 links per message
CLIP_BYTES = 102 * 1024  # Gmail clips a message whose HTML exceeds about 102 KB ...
TOP_PIXEL_BYTES = 100 * 1024  # ... so `auto` moves the pixel to the top above this
CLIP_WARNING_BYTES = 90 * 1024
PIXEL = -1  # slot number of the open pixel; links use their message-wide index
# The pixel's markup around its URL slot (no display:none: some clients then never fetch it).
PIXEL_PRE = b'<img src="'
PIXEL_POST = b'" width="1" height="1" alt="" border="0" style="border:0;width:1px;height:1px" />'
_TAG_PART = re.compile(r"^[A-Za-z0-9_-]{1,256}$")
# RFC 3986 (with RFC 3987's non-ASCII letters, so IDNs and IRIs pass): the shape
# scheme://[userinfo@]host[:port][/path][?query][#fragment] (group 1: host, 2: port) in allowed characters only
# (an IP literal's brackets aside), at most one "#"; then well-formed %XX escapes are checked apart.
# Case-insensitive only for the scheme: re.I on big Unicode classes makes matching several times slower, and the
# ASCII-only variant (classes the engine tests with a bitmap) serves the usual ASCII URL. Possessive runs (*+, ++):
# what follows each run cannot begin with a character of its class, so giving characters back never finds a match.
_IP_LITERAL = r"\[[0-9A-Fa-f:.vV]+\]|"
_URL_SHAPE = (r"(?i:https?)://(?:[{c}:]*+@)?(" + _IP_LITERAL + r"[{c}]++)(:[0-9]*+)?"
              r"(?:[/?][{c}:@/?]*+)?(?:#[{c}:@/?]*+)?")
_URL_ASCII_CHAR = r"A-Za-z0-9\-._~!$&'()*+,;=%"  # less : @ / ? # (added per part)
_URL_ASCII = re.compile(_URL_SHAPE.format(c=_URL_ASCII_CHAR))
_URL = re.compile(_URL_SHAPE.format(c=_URL_ASCII_CHAR + "\u00a0-\ud7ff\ue000-\U0010ffff"))
# The plain link of the fast path, on the attribute's bytes once "&amp;" is decoded: _URL_ASCII without "%"
# (escapes, and the "%%" placeholder, take the full path) and without IP literals.
_PLAIN_URL = re.compile(_URL_SHAPE.replace(_IP_LITERAL, "").format(c=_URL_ASCII_CHAR.replace("%", "")).encode())
_INDEX_AND_LENGTH = struct.Struct(">HH").pack  # a click token's link index and URL length (tokens.click_suffix)
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_SCHEME = re.compile(r"([a-z][a-z0-9+.-]*):")
_PLACEHOLDERS = re.compile(r"\{\{|\}\}|\*\|.*\|\*|%%|\{%|\$\{")
_STATEFUL = ("utf_7", "hz", "iso2022")
_SAMPLE_RECIPIENT = "r" * 40  # for size estimates before the recipient is known


# --- plan --------------------------------------------------------------------------------------------------

@dataclass
class PartPlan:
    part: mime.Part
    report: dict
    cte: str  # encoding of the rendered body
    like: bytes  # the original encoded body (base64 keeps its final newline)
    codec: str | None  # None: bytes of an ASCII-compatible charset; else transcode utf-8 → codec per copy
    pieces: list[bytes | int]  # decoded template; int = slot (a URL: only characters QP leaves as they are)
    mode: str = "whole"  # "qp": `encoded` is the QP body with slots; "identity": pieces are the body; "whole"
    encoded: list[bytes | int] = field(default_factory=list)
    lines: list[tuple[int, list[int]]] = field(default_factory=list)  # identity: (static length, slots) per line
    slots: list[int] = field(default_factory=list)
    static_size: int = 0  # decoded bytes outside the slots


@dataclass
class Plan:
    settings: TrackingSettings
    size: int  # length of the input, as a cheap guard for cache hits
    static_edits: list[tuple[int, int, bytes]] = field(default_factory=list)
    parts: list[PartPlan] = field(default_factory=list)
    # per link, by message-wide index (signed into the token): the tracking URL up to the token (its scheme
    # follows the link's and the HTTPS policy), the same as written into the attribute (tokens are base64url:
    # nothing to escape), and the per-link part of the token body
    links: list[tuple[str, bytes, bytes]] = field(default_factory=list)
    report_parts: list[dict] = field(default_factory=list)  # in MIME order; dynamic ones filled per copy
    warnings: list[str] = field(default_factory=list)
    open_slots: bool = False
    settings_json: dict = field(default_factory=dict)


class PartError(Exception):
    """This part cannot be instrumented safely; it goes out as it came (with the reason in the report)."""


def analyse(raw: bytes, settings: TrackingSettings) -> Plan:
    plan = Plan(settings=settings, size=len(raw), settings_json=settings.to_json())
    root = mime.parse(raw)
    for part in mime.leaves(root):
        report = {"path": part.path, "content_type": part.content_type, "charset": part.charset,
                  "transfer_encoding": part.cte or None}
        plan.report_parts.append(report)
        reason = _untouchable(part)
        if reason:
            report.update(action="untouched", reason=reason)
            continue
        _analyse_html(raw, part, settings, plan, report)
    return plan


def _untouchable(part: mime.Part) -> str | None:
    if part.protected:
        return "protected container (signed, encrypted or attached message)"
    if part.content_type != "text/html":
        return "not HTML"
    if part.is_attachment:
        return "attachment"
    return None


def _analyse_html(raw: bytes, part: mime.Part, settings: TrackingSettings, plan: Plan, report: dict) -> None:
    links_before, edits_before = len(plan.links), len(plan.static_edits)
    try:
        pp = _plan_part(raw, part, settings, plan, report)
        if pp is not None and not pp.slots:  # markers or placeholders removed only: the same for everyone
            _static_body(raw, part, pp, b"".join(pp.pieces), plan)  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001 - any failure leaves the part as it was
        del plan.links[links_before:]
        del plan.static_edits[edits_before:]
        reason = str(exc) if isinstance(exc, PartError | mime.EncodingError) else f"{type(exc).__name__}: {exc}"
        plan.warnings.append(f"part {part.path} left unmodified: {reason}")
        report.update(action="untouched", reason=reason, links=[], skipped=[], pixel=None)
        _strip_only(raw, part, plan, report)
        return
    if pp is not None and pp.slots:
        plan.parts.append(pp)
        plan.open_slots = plan.open_slots or PIXEL in pp.slots


def _strip_only(raw: bytes, part: mime.Part, plan: Plan, report: dict) -> None:
    """After a failure, still remove markers and placeholders if the part can be read at all."""
    try:
        pp = _plan_part(raw, part, TrackingSettings(), Plan(settings=TrackingSettings(), size=0), {})
        if pp is not None:
            _static_body(raw, part, pp, b"".join(pp.pieces), plan)
            report["reason"] += "; opt-out markers and placeholders removed"
    except Exception:  # noqa: BLE001, S110 - the unmodified part is the safe answer
        pass


def _static_body(raw: bytes, part: mime.Part, pp: PartPlan, decoded: bytes, plan: Plan) -> None:
    body, header = _encode(raw, part, pp, decoded)
    plan.static_edits.append((part.body_start, part.body_end, body))
    pp.report["html_size"] = len(decoded)
    if header:
        plan.static_edits.append(header)
        pp.report["output_transfer_encoding"] = header[2].split(b":", 1)[1].strip().decode()


def _codec(charset: str | None) -> str | None:
    """None when the part's bytes can be scanned as they are (ASCII-compatible, or unknown), else the codec."""
    if not charset:
        return None
    try:
        name = codecs.lookup(charset).name
    except LookupError:
        return None  # an unknown or lying charset: tag syntax is ASCII, undecodable bytes pass through
    return None if _ascii_compatible(name) else name


@lru_cache(maxsize=64)
def _ascii_compatible(name: str) -> bool:
    if name.startswith(_STATEFUL):
        return False
    try:
        return bytes(range(128)).decode(name) == "".join(map(chr, range(128)))
    except UnicodeDecodeError:
        return False


def _plan_part(raw: bytes, part: mime.Part, settings: TrackingSettings, plan: Plan, report: dict) -> PartPlan | None:
    like = raw[part.body_start:part.body_end]
    decoded = mime.decode_body(like, part.cte)
    codec = _codec(part.charset)
    if codec is None:
        doc = decoded
    else:
        text = decoded.decode(codec, "surrogateescape")
        if text.encode(codec, "surrogateescape") != decoded:
            raise PartError(f"charset {part.charset} does not round-trip")
        doc = text.encode("utf-8", "surrogateescape")
    if not like and part.body_start == part.header_end:  # inserting anything would extend the header block
        report.update(action="untouched", reason="no body and no blank line after the headers", links=[],
                      skipped=[], pixel=None)
        return None
    edits = _edits(doc, "utf-8" if codec else (part.charset or "ascii"), settings, plan, report)
    if not edits:
        report["reason"] = "nothing to change"
        return None
    pieces = _pieces(doc, edits)
    cte = part.cte
    pp = PartPlan(part, report, cte, like, codec, pieces, slots=[p for p in pieces if isinstance(p, int)],
                  static_size=sum(len(p) for p in pieces if isinstance(p, bytes)))
    if codec is None and cte == "quoted-printable":
        pp.mode, pp.encoded = "qp", _qp_reusing(like, doc, edits) or _qp_template(pieces)
    elif codec is None and cte != "base64" and mime.max_line_length(doc) <= 998:
        pp.mode, pp.lines = "identity", _slot_lines(pieces)
    return pp


def _edits(doc: bytes, charset: str, settings: TrackingSettings, plan: Plan,
           report: dict) -> list[tuple[int, int, bytes | int]]:
    """What changes in one decoded HTML document: (start, end, new bytes or slot number)."""
    scanned = html.scan(doc, compact=True)
    edits: list[tuple[int, int, bytes | int]] = []
    links: list[LinkFound] = []
    skipped: list[dict] = []
    context = _link_context(settings, charset)
    plain = _PLAIN_URL.fullmatch if context.click_tracking else None
    hosts = context.tracking_hosts_ascii
    wrapped = plan.links
    for link in scanned.links:
        if type(link) is not tuple:
            _link_edits(doc, link, context, plan, edits, links, skipped)
            continue
        # The usual link: wrapped at once when its URL is plain and not ours (no objects), else judged in full
        vs, ve, name, in_comment = link
        value = url = doc[vs:ve]
        if b"&" in value:  # only as "&amp;" here (anything else takes the full path)
            url = value.replace(b"&amp;", b"&") if value.count(b"&") == value.count(b"&amp;") else b""
        m = plain(url) if plain is not None else None
        if m is not None and len(wrapped) < MAX_LINKS and len(url) <= 0xFFFF:
            host, port = m.groups()
            host = host.lower()
            if host not in hosts and not (port and host + port in hosts):
                index = len(wrapped)
                base, base_attr = context.https_base if url[4] == 115 or url[4] == 83 else context.http_base  # "s"
                wrapped.append((base, base_attr, _INDEX_AND_LENGTH(index, len(url)) + url + b"\0\0"))
                links.append((index, value, url, None, name, in_comment, None))  # ASCII: decoded for a report
                edits.append((vs, ve, index))
                continue
        _judge_href(doc, vs, ve, name, in_comment, context, plan, edits, links, skipped)
    pixel = _pixel_edits(doc, scanned, settings, edits, plan, len(doc))
    report.update(action="instrumented" if edits else "untouched", links=links, skipped=skipped, pixel=pixel,
                  original_html_size=len(doc))
    return edits


def rewrite_html(doc: bytes, settings: TrackingSettings, keyring: Keyring, message_id: str, recipient: str,
                 issued: int, charset: str = "utf-8", report: dict | None = None) -> bytes:
    """One decoded HTML document (ASCII-compatible charset) instrumented for one recipient, without MIME; the
    dry run's report of the document goes into `report` when one is given."""
    plan = Plan(settings=settings, size=len(doc))
    found: dict = {}
    pieces = _pieces(doc, _edits(doc, charset, settings, plan, found))
    plan.open_slots = PIXEL in pieces
    values, sealed, _ = _values(plan, keyring, message_id, recipient, issued)
    if report is not None:
        report.update(found, links=[_link_entry(link, plan, sealed) for link in found["links"]])
    return _fill(pieces, values)


# A wrapped link as analysis records it; the report's dictionary is made only when a report is asked for.
# (index, href, destination, tags, element, in a conditional comment, tag warnings); href and destination are
# ASCII bytes for a link of the fast path, and its tags None.
LinkFound = tuple[int, str | bytes, str | bytes, dict | None, str, bool, list | None]


def _link_entry(link: LinkFound, plan: Plan, sealed: list[bytes]) -> dict:
    index, href, original, tags, element, in_comment, tag_warnings = link
    if type(href) is bytes:
        href, original = href.decode("ascii"), original.decode("ascii")  # type: ignore[union-attr]
    entry = {"index": index, "href": href, "original": original, "tags": tags or {}, "element": element,
             "in_conditional_comment": in_comment}
    if tag_warnings:
        entry["tag_warnings"] = tag_warnings
    entry["tracking"] = plan.links[index][0] + sealed[index].decode("ascii")
    return entry


# --- links -------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _LinkContext:
    """What every link of a part is judged and wrapped with, worked out once per part."""

    click_tracking: bool
    charset: str
    utf8: bool
    tracking_hosts: frozenset[str]  # host[:port] values, lower-cased as links' hosts are
    tracking_hosts_ascii: frozenset[bytes]  # the same as bytes, for the plain-link fast path
    http_base: tuple[str, bytes]  # (tracking URL up to the token, the same escaped for an attribute)
    https_base: tuple[str, bytes]


@lru_cache(maxsize=64)
def _link_context(settings: TrackingSettings, charset: str) -> _LinkContext:
    http, https = (settings.click_base(scheme) for scheme in ("http", "https"))
    hosts = frozenset({settings.host.lower()}) | settings.tracking_hosts
    return _LinkContext(settings.click_tracking, charset, _is_utf8(charset), hosts,
                        frozenset(h.encode("ascii") for h in hosts if h.isascii()),
                        (http, html.escape_attribute(http).encode("ascii")),
                        (https, html.escape_attribute(https).encode("ascii")))


def _link_edits(doc: bytes, tag: html.Tag, context: _LinkContext, plan: Plan, edits: list, links: list,
                skipped: list) -> None:
    no_track, tags, tag_problems = _markers(doc, tag, edits) if tag.marked else (False, {}, None)
    href = tag.href
    if href is None or href.value_start < 0:
        return
    _judge_href(doc, href.value_start, href.value_end, tag.name, tag.in_comment, context, plan, edits, links,
                skipped, no_track, tags, tag_problems)


def _judge_href(doc: bytes, value_start: int, value_end: int, element: str, in_comment: bool, context: _LinkContext,
                plan: Plan, edits: list, links: list, skipped: list, no_track: bool = False,
                tags: dict | None = None, tag_problems: list[str] | None = None) -> None:
    """Wrap the link whose href value is doc[value_start:value_end], or say in `skipped` why not."""
    tags = tags or {}
    raw_value = doc[value_start:value_end]
    text = _attribute_text(raw_value, context.charset)
    url, ambiguous = _destination(text) if text is not None else (None, False)
    index = len(plan.links)
    if no_track or ambiguous or url is None or index >= MAX_LINKS or not _plainly_eligible(url, context):
        reason = _reason(url, ambiguous, no_track, context, index)
        if reason is not None:
            if context.click_tracking:
                shown = url if url is not None else raw_value.decode("ascii", "replace")
                skipped.append({"href": shown, "element": element, "reason": reason})
            return
        assert url is not None
    base, base_attr = context.https_base if url[4] in "sS" else context.http_base
    plan.links.append((base, base_attr, tokens.click_suffix(index, url, tags)))
    links.append((index, text, url, tags, element, in_comment, tag_problems or None))
    edits.append((value_start, value_end, index))


def _plainly_eligible(url: str, context: _LinkContext) -> bool:
    """The usual link in one check: a valid ASCII http(s) URL, nothing that could be a placeholder, not ours.
    False sends the link through `_reason`, which judges every case (this one included)."""
    if not context.click_tracking or "%" in url or "{" in url or "|" in url or not url.isascii():
        return False
    m = _URL_ASCII.fullmatch(url)
    if m is None:
        return False
    host, port = m.groups()
    host = host.lower()
    return host not in context.tracking_hosts and not (port and host + port in context.tracking_hosts)


def _reason(url: str | None, ambiguous: bool, no_track: bool, context: _LinkContext, wrapped: int) -> str | None:
    """Why a link is not wrapped, or None."""
    if no_track:
        return "opt-out marker"
    if not context.click_tracking:
        return "click tracking off"
    if url is None:
        return "undecodable bytes in the URL"
    reason = _skip_reason(url, ambiguous, context)
    if reason is None and not context.utf8 and not url.isascii():
        # a browser would percent-encode the query in the page's own charset: which URL is meant is unclear
        reason = f"non-ASCII URL in a {context.charset} part"
    if reason is None and wrapped >= MAX_LINKS:
        reason = f"beyond SES's limit of {MAX_LINKS} links per message"
    return reason


def _markers(doc: bytes, tag: html.Tag, edits: list) -> tuple[bool, dict[str, list[str]], list[str]]:
    """Remove every opt-out/tag marker of a link; whether it opts out, its SES link tags and tag problems."""
    no_track, tags, problems = False, {}, []
    for attr in tag.attrs:
        if attr.name not in html.MARKERS:
            continue
        value = (attr.value(doc) or b"").decode("utf-8", "replace").strip().lower()
        if attr.name == b"ses:tags":
            tags, problems = parse_link_tags((attr.value(doc) or b"").decode("utf-8", "replace"))
        elif attr.name in (b"ses:no-track", b"data-pm-no-track"):
            no_track = True
        elif attr.name == b"clicktracking":
            no_track = no_track or value == "off"
        elif attr.name == b"data-msys-clicktrack":
            no_track = no_track or value in ("0", "false")
        start = attr.start
        while start > tag.start and doc[start - 1:start] in (b" ", b"\t", b"\r", b"\n", b"\f"):
            start -= 1  # take the separating whitespace along
        edits.append((start, attr.end, b""))
    return no_track, tags, problems


def parse_link_tags(text: str) -> tuple[dict[str, list[str]], list[str]]:
    """`ses:tags="k:v;k2:v2;"` → {"k": ["v"], ...}; names and values as SES allows them (others dropped)."""
    tags: dict[str, list[str]] = {}
    problems = []
    for item in text.split(";"):
        item = item.strip()
        if not item:
            continue
        key, sep, value = (s.strip() for s in item.partition(":"))
        if not sep or not _TAG_PART.match(key) or not _TAG_PART.match(value):
            problems.append(f"invalid link tag {item!r} ignored")
            continue
        tags.setdefault(key, []).append(value)
    return tags, problems


@lru_cache(maxsize=64)
def _is_utf8(charset: str) -> bool:
    try:
        return codecs.lookup(charset).name == "utf-8"
    except LookupError:
        return False


def _attribute_text(value: bytes, charset: str) -> str | None:
    """An attribute value as text; ASCII whatever the charset claims when Python does not know it."""
    try:
        return value.decode(charset)
    except LookupError:
        return value.decode("ascii", "strict") if value.isascii() else None
    except UnicodeDecodeError:
        return None


def _destination(text: str) -> tuple[str, bool]:
    """The URL an attribute value points at (references decoded once, as a browser does), and whether a
    naive decoder (html.unescape) would read it differently."""
    ws = " \t\n\f\r"
    if "&" not in text:
        return text.strip(ws), False
    if text.count("&") == text.count("&amp;"):  # the usual case, cheaply
        return text.replace("&amp;", "&").strip(ws), False
    url = html.unescape_attribute(text).strip(ws)
    return url, stdlib_html.unescape(text).strip(ws) != url


def _valid_url(url: str) -> re.Match | None:
    """The shape match of a valid http(s) URL (group 1: host), or None."""
    ascii_only = url.isascii()
    m = (_URL_ASCII if ascii_only else _URL).fullmatch(url)
    if m is None or ("%" in url and _BAD_ESCAPE.search(url)):
        return None
    if not ascii_only and any(c.isspace() or c in "\u200b\ufeff" for c in url):  # e.g. a pasted no-break space
        return None
    return m


def _skip_reason(url: str, ambiguous: bool, context: _LinkContext) -> str | None:
    if ("{" in url or "|" in url or "%" in url) and _PLACEHOLDERS.search(url):
        return "unresolved template placeholder"
    m = _valid_url(url)
    if m is None:
        lower = url.lower()
        if lower.startswith(("http://", "https://")):
            return "not a valid URL (RFC 3986); SES leaves these untracked"
        scheme = _SCHEME.match(lower)
        if not url:
            return "empty href"
        if url.startswith("#"):
            return "fragment link"
        return f"{scheme.group(1)}: link" if scheme else "relative URL"
    if ambiguous:
        return "ambiguous character reference in the URL"
    host = m.group(1).lower()
    if host in context.tracking_hosts or (m.group(2) and host + m.group(2) in context.tracking_hosts):
        return "already a tracking link"
    return None


# --- pixel and placeholders --------------------------------------------------------------------------------

def _pixel_edits(doc: bytes, scanned: html.Scan, settings: TrackingSettings, edits: list, plan: Plan,
                 size: int) -> dict | None:
    spot = None
    for at, usable in scanned.placeholders:
        first = spot is None and usable
        edits.append((at, at + len(html.PLACEHOLDER), PIXEL if first and settings.open_tracking else b""))
        if first:
            spot = at
    if not settings.open_tracking:
        return None
    if spot is not None:
        return {"placement": "placeholder", "offset": spot}
    top = settings.pixel_position == "top" or (
        settings.pixel_position == "auto" and _estimate(size, edits, plan, settings) > TOP_PIXEL_BYTES)
    if top and scanned.body_open_end is not None:
        edits.append((scanned.body_open_end, scanned.body_open_end, PIXEL))
        return {"placement": "top", "offset": scanned.body_open_end}
    if scanned.body_close is not None:
        edits.append((scanned.body_close, scanned.body_close, PIXEL))
        return {"placement": "before </body>", "offset": scanned.body_close}
    if not scanned.open_end:
        end = _before_final_line_break(doc, size)
        edits.append((end, end, PIXEL))
        return {"placement": "end", "offset": end}
    if scanned.body_open_end is not None:  # the end sits inside a broken tag: the top is the only safe spot
        edits.append((scanned.body_open_end, scanned.body_open_end, PIXEL))
        return {"placement": "top", "offset": scanned.body_open_end}
    return {"placement": "none", "reason": "the HTML ends inside an unterminated tag or comment", "url": None}


def _before_final_line_break(doc: bytes, size: int) -> int:
    """Where a pixel goes at the end of a document: before its final line break, so the part (and, for a
    single part, the message) still ends with one."""
    if doc.endswith(b"\r\n"):
        return size - 2
    return size - 1 if doc.endswith(b"\n") else size


def _estimate(size: int, edits: list, plan: Plan, settings: TrackingSettings) -> int:
    """The instrumented part's size for a typical recipient (tokens vary only with the address length)."""
    click = _sample_token_length()
    total = size + len(PIXEL_PRE + PIXEL_POST) + len(settings.open_base()) + click
    total -= sum([end - start for start, end, _ in edits])
    links = [plan.links[rep] for _, _, rep in edits if type(rep) is int and rep >= 0]
    return total + sum([len(base) + click + len(suffix) * 4 // 3 for base, _, suffix in links])


_SAMPLE_KEYRING = Keyring((tokens.SigningKey("k00000", b"0" * 32),))


@lru_cache(maxsize=1)
def _sample_token_length() -> int:
    prefix = tokens.token_prefix(_SAMPLE_KEYRING, tokens.KIND_CLICK, "m" * 60, _SAMPLE_RECIPIENT, 0)
    return len(tokens.seal(_SAMPLE_KEYRING, prefix))


def _pieces(doc: bytes, edits: list[tuple[int, int, bytes | int]]) -> list[bytes | int]:
    out: list[bytes | int] = []
    _add_pieces(doc, sorted(edits, key=mime.EDIT_ORDER), 0, len(doc), out)
    return out


def _add_pieces(doc: bytes, edits: list[tuple[int, int, bytes | int]], start: int, stop: int, out: list) -> None:
    """doc[start:stop] with `edits` (sorted, inside the range) applied, as template pieces added to `out`."""
    pos = start
    for edit_start, edit_end, rep in edits:
        if edit_start < pos:
            raise PartError("overlapping edits")
        if edit_start > pos:
            out.append(doc[pos:edit_start])
        if rep == PIXEL:
            out.extend((PIXEL_PRE, PIXEL, PIXEL_POST))
        elif rep != b"":
            out.append(rep)
        pos = edit_end
    if stop > pos:
        out.append(doc[pos:stop])


@dataclass(slots=True)
class _Encoded:
    """A piece of the template that is already quoted-printable: whole original lines, kept as they were."""

    data: bytes


def _qp_template(pieces: list) -> list[bytes | int]:
    """The quoted-printable body with slots: static text encoded once, soft line breaks around each slot.

    A slot holds a URL, whose characters QP leaves as they are, so a copy only cuts it into lines of 75.
    Pieces of type _Encoded are whole encoded lines and pass through.
    """
    joined = _join_adjacent(pieces)  # adjacent plain pieces encode as one: their lines run on
    encoded = iter(mime.encode_qp_many([p for p in joined if type(p) is bytes]))
    out: list[bytes | int] = []
    run: list[bytes] = []  # encoded text since the last slot, joined into one item when the next slot comes
    mid_line = False  # whether the previous piece ended inside a line
    for p in joined:
        if type(p) is int:
            if mid_line:  # a soft break after the text before (or after the previous slot, at most 75 long)
                run.extend(_with_soft_break(run.pop()) if run else (b"=\r\n",))
            if run:
                out.append(b"".join(run))
                run = []
            out.append(p)
            mid_line = True
        elif type(p) is bytes:
            if out and not run and not p.startswith(b"\r\n"):  # right after a slot
                run.append(b"=\r\n")
            run.append(next(encoded))
            mid_line = not p.endswith(b"\r\n")
        else:  # _Encoded: whole lines, ending in a line break
            run.append(p.data)
            mid_line = False
    if run:
        out.append(b"".join(run))
    return out


def _join_adjacent(pieces: list) -> list:
    """`pieces` with each run of adjacent bytes joined into one (joined at the end of the run: adding each
    piece to the one before copied it again, quadratic in a run of thousands of removed markers)."""
    out: list = []
    run: list[bytes] = []
    for p in pieces:
        if type(p) is bytes:
            run.append(p)
            continue
        if run:
            out.append(b"".join(run))
            run = []
        out.append(p)
    if run:
        out.append(b"".join(run))
    return out


def _with_soft_break(encoded: bytes) -> tuple[bytes, ...]:
    """`encoded` and a soft line break, its last line shortened if the "=" would make it 77 long."""
    last = encoded.rfind(b"\n") + 1
    if len(encoded) - last <= 75:
        return encoded, b"=\r\n"
    cut = len(encoded) - 1
    if encoded[cut - 1:cut] == b"=":  # never split an =XX escape
        cut -= 1
    elif encoded[cut - 2:cut - 1] == b"=":
        cut -= 2
    return encoded[:cut], b"=\r\n", encoded[cut:], b"=\r\n"


_ENCODED_LINE_END = re.compile(rb"=0[DdAa]")


def _qp_reusing(like: bytes, doc: bytes, edits: list[tuple[int, int, bytes | int]]) -> list[bytes | int] | None:
    """The QP template re-encoding only the lines that change; every other line goes out exactly as the sender
    encoded it (faithful, and cheaper: the C encoder is the slowest step of a first copy).

    None when the encoded lines do not map one to one onto decoded lines (encoded line ends, odd soft breaks).
    """
    if b"\x00" in like or _ENCODED_LINE_END.search(like):
        return None
    # One item per hard line; soft breaks masked with a marker of the same length so offsets stay true. With
    # no encoded line ends, decoded line k is encoded line k, and every LF of either ends a CRLF.
    lines = like.replace(b"=\r\n", b"=\x00\x00").split(b"\n")
    if len(lines) != doc.count(b"\n") + 1:
        return None
    offsets = [0, *accumulate(map(len, lines))]  # line k starts at offsets[k] + k in `like`
    pieces: list = []
    done = 0  # encoded bytes [0, done) are in `pieces`
    old, new = [], []  # the changed lines as encoded and as decoded, checked against each other at the end
    for first, last, group in _line_groups(doc, sorted(edits, key=mime.EDIT_ORDER)):
        start = doc.rfind(b"\n", 0, group[0][0]) + 1
        stop = doc.find(b"\n", group[-1][1])
        enc_start = offsets[first] + first
        if stop < 0:  # the last line
            stop, enc_stop = len(doc), len(like)
        else:  # just before the line's CR
            stop, enc_stop = stop - 1, offsets[last + 1] + last - 1
        if enc_start > done:
            pieces.append(_Encoded(like[done:enc_start]))
        old.append(like[enc_start:enc_stop])
        new.append(doc[start:stop])
        _add_pieces(doc, group, start, stop, pieces)
        done = enc_stop
    if binascii.a2b_qp(b"\r\n".join(old)) != b"\r\n".join(new):
        return None
    if done < len(like):
        pieces.append(_Encoded(like[done:]))
    return _qp_template(pieces)


def _line_groups(doc: bytes, edits: list) -> list[tuple[int, int, list]]:
    """Sorted edits grouped by the decoded lines they touch: (first line, last line, edits). Lines are counted
    by LF (a one-byte count is several times faster than counting CRLF; the caller made sure they agree)."""
    groups: list[tuple[int, int, list]] = []
    pos = line = 0
    for edit in edits:
        line += doc.count(b"\n", pos, edit[0])
        pos = edit[0]
        last = line + doc.count(b"\n", edit[0], edit[1]) if edit[1] > edit[0] else line
        if groups and groups[-1][1] >= line:
            first, prev_last, group = groups[-1]
            group.append(edit)
            groups[-1] = (first, max(prev_last, last), group)
        else:
            groups.append((line, last, [edit]))
    return groups


def _slot_lines(pieces: list[bytes | int]) -> list[tuple[int, list[int]]]:
    """For each line holding slots, its length outside them and its slots (to check SMTP's 998 limit)."""
    lines: list[tuple[int, list[int]]] = []
    static, slots = 0, []
    for p in pieces:
        if isinstance(p, int):
            slots.append(p)
            continue
        first = p.find(b"\r\n")
        if first < 0:
            static += len(p)
            continue
        if slots:
            lines.append((static + first, slots))
        static, slots = len(p) - p.rfind(b"\r\n") - 2, []
    if slots:
        lines.append((static, slots))
    return lines


# --- rendering ---------------------------------------------------------------------------------------------

@dataclass
class Copy:
    data: bytes
    warnings: list[str]
    make_report: Callable[[], dict] = dict  # the report is built on first use: delivery never reads it
    extra: dict = field(default_factory=dict)  # keys the caller adds to the report
    _report: dict | None = field(default=None, init=False, repr=False)

    @property
    def report(self) -> dict:
        """The dry run's report for this copy (`relay instrument --report-json`)."""
        if self._report is None:
            self._report = self.make_report()
        self._report.update(self.extra)
        return self._report


def _values(plan: Plan, keyring: Keyring, message_id: str, recipient: str,
            issued: int) -> tuple[list[bytes], list[bytes], str | None]:
    """One recipient's slot values (link URLs by index, then the pixel URL as slot -1), link tokens, pixel URL."""
    values: list[bytes] = []
    sealed: list[bytes] = []
    if plan.links:
        prefix = tokens.token_prefix(keyring, tokens.KIND_CLICK, message_id, recipient, issued)
        sealed = tokens.seal_all(keyring, prefix, [suffix for _, _, suffix in plan.links])
        values = [base_attr + token for (_, base_attr, _), token in zip(plan.links, sealed, strict=True)]
    pixel_url = None
    if plan.open_slots:
        pixel_url = plan.settings.open_base() + tokens.sign_open(keyring, message_id, recipient, issued)
        values.append(pixel_url.encode("ascii"))
    return values, sealed, pixel_url


def render(raw: bytes, plan: Plan, keyring: Keyring, message_id: str, recipient: str, issued: int) -> Copy:
    values, sealed, pixel_url = _values(plan, keyring, message_id, recipient, issued)
    edits = list(plan.static_edits)
    warnings = list(plan.warnings)
    sizes: dict[str, tuple[int, str | None]] = {}
    wrapped: list[bytes] = []
    for pp in plan.parts:
        try:
            if pp.mode == "qp" and not wrapped:
                wrapped = [b"=\r\n".join([v[i:i + 75] for i in range(0, len(v), 75)]) for v in values]
            body, header, size = _render_part(raw, pp, values, wrapped)
        except Exception as exc:  # noqa: BLE001 - never lose the mail over one part
            warnings.append(f"part {pp.part.path} left unmodified: {type(exc).__name__}: {exc}")
            sizes[pp.part.path] = (-1, None)
            continue
        edits.append((pp.part.body_start, pp.part.body_end, body))
        if header:
            edits.append(header)
        sizes[pp.part.path] = (size, header[2].split(b":", 1)[1].strip().decode() if header else None)
    data = mime.splice(raw, edits) if edits else raw
    for path, (size, _) in sizes.items():
        if size > CLIP_WARNING_BYTES:
            warnings.append(f"HTML part {path} is {size / 1024:.1f} KB, "
                            f"{'over' if size > CLIP_BYTES else 'close to'} Gmail's 102 KB clip")
    return Copy(data, warnings, partial(_report, plan, sealed, pixel_url, sizes, warnings, message_id, recipient))


def _fill(pieces: list[bytes | int], values: list[bytes]) -> bytes:
    return b"".join([p if isinstance(p, bytes) else values[p] for p in pieces])


def _render_part(raw: bytes, pp: PartPlan, values: list[bytes],
                 wrapped: list[bytes]) -> tuple[bytes, tuple | None, int]:
    size = pp.static_size + sum([len(values[s]) for s in pp.slots])
    if pp.mode == "qp":
        return _fill(pp.encoded, wrapped), None, size
    if pp.mode == "identity" and all(n + sum([len(values[s]) for s in slots]) <= 998 for n, slots in pp.lines):
        return _fill(pp.pieces, values), None, size
    decoded = _fill(pp.pieces, values)  # base64, a transcoded charset, or 7bit lines grown past 998 octets
    if pp.codec:
        decoded = decoded.decode("utf-8", "surrogateescape").encode(pp.codec, "surrogateescape")
    body, header = _encode(raw, pp.part, pp, decoded)
    return body, header, size


def _encode(raw: bytes, part: mime.Part, pp: PartPlan, decoded: bytes) -> tuple[bytes, tuple | None]:
    body, new_cte = mime.encode_body(decoded, pp.cte, pp.like)
    if new_cte is None:
        return body, None
    header = mime.set_cte(raw, part, new_cte)
    if header is None:
        raise PartError("lines over 998 octets and no header block to declare quoted-printable in")
    return body, header


def _report(plan: Plan, sealed: list[bytes], pixel_url: str | None, sizes: dict, warnings: list[str],
            message_id: str, recipient: str) -> dict:
    parts = []
    wrapped = skipped = 0
    for rp in plan.report_parts:
        entry = dict(rp)
        if "links" in rp:
            entry["links"] = [_link_entry(link, plan, sealed) for link in rp["links"]]
            wrapped += len(entry["links"])
            skipped += len(rp["skipped"])
            if rp.get("pixel") and rp["pixel"]["placement"] != "none":
                entry["pixel"] = dict(rp["pixel"], url=pixel_url)
        size, new_cte = sizes.get(rp["path"], (None, None))
        if size == -1:
            entry.update(action="untouched", reason="rendering failed", links=[], pixel=None)
        elif size is not None:
            entry["html_size"] = size
            if new_cte:
                entry["output_transfer_encoding"] = new_cte
        parts.append(entry)
    return {"message_id": message_id, "recipient": recipient, "settings": plan.settings_json,
            "links_wrapped": wrapped, "links_skipped": skipped, "parts": parts, "warnings": warnings}
