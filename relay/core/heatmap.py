"""A message's HTML as delivered, each tracked link marked with its clicks: the console's click heatmap (pure).

Which links were tracked, and with which tags, is the instrumenter's decision (opt-out markers, schemes,
SES's 250 links, the tracking host's own links), so the delivered HTML is rebuilt by running it on the
message as received (relay.core.instrument.rewrite_html, as `relay instrument` does) with the message's stored
settings. Its report names each wrapped link's destination and tags, which is what a Click event records:
the clicks of a link are matched to it by both. The same link with the same tags in two places gets the same
counts (a Click event does not say which of them was clicked).

The tracking URLs themselves are never shown: each is replaced by `#relay-link-N`, so the preview holds no
token (a throwaway key signs them), and a click in it records nothing. Open tracking is left out of the
rebuild: the pixel is 1x1 and invisible, and loading it would be an open.
"""

from __future__ import annotations

import codecs
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, replace

from relay.core import html, mime
from relay.core.instrument import rewrite_html
from relay.core.settings import TrackingSettings
from relay.core.tokens import Keyring, SigningKey

HEAT_STEPS = 5  # links are coloured in this many steps of their share of the message's most clicked link
# The marks' look inside the preview: an outline coloured by heat and a label after the link. Links do not
# navigate (the preview is a picture of the message, not a way into the sites it links to).
STYLE = """
<style>
a { pointer-events: none !important; cursor: default !important; }
a[data-relay-link] { outline: 3px solid #9ca3af !important; outline-offset: 2px !important; }
a[data-relay-link]::after { content: attr(data-relay-label); display: inline-block; margin-left: 4px;
  padding: 1px 5px; border-radius: 3px; background: #111827; color: #fff; font: bold 11px/1.4 sans-serif;
  text-decoration: none; vertical-align: super; white-space: nowrap; }
a[data-relay-heat="1"] { outline-color: #fde047 !important; }
a[data-relay-heat="2"] { outline-color: #facc15 !important; }
a[data-relay-heat="3"] { outline-color: #fb923c !important; }
a[data-relay-heat="4"] { outline-color: #f97316 !important; }
a[data-relay-heat="5"] { outline-color: #dc2626 !important; }
</style>
"""


@dataclass(frozen=True)
class TrackedLink:
    number: int  # 1-based, as the console's table of links numbers them
    link: str  # the destination, as a Click event's `link`
    tags: dict[str, list[str]]
    clicks: int = 0
    unique_clicks: int = 0
    human_clicks: int = 0


@dataclass(frozen=True)
class Heatmap:
    html: str  # the preview document
    links: list[TrackedLink]  # every tracked link in the order of the document


def tags_key(tags: Mapping | str | None) -> str:
    """Link tags as one comparable text (a Click event's linkTags come as JSON text or as a dict)."""
    if isinstance(tags, str):
        tags = json.loads(tags) if tags.strip() else {}
    return json.dumps(tags or {}, sort_keys=True, separators=(",", ":"))


def html_part(raw: bytes) -> tuple[bytes, str] | None:
    """The first HTML body of a message (not an attachment, not inside a signed or encrypted part), decoded,
    in an ASCII-compatible charset: (document, charset); None when it has none."""
    for part in mime.leaves(mime.parse(raw)):
        if part.content_type != "text/html" or part.is_attachment or part.protected:
            continue
        body = mime.decode_body(raw[part.body_start:part.body_end], part.cte)
        charset = part.charset or "utf-8"
        try:
            name = codecs.lookup(charset).name
        except LookupError:
            return body, "utf-8"
        if bytes(range(128)).decode(name, "replace") != "".join(map(chr, range(128))):
            return body.decode(name, "replace").encode("utf-8"), "utf-8"  # UTF-16 and such: seen as UTF-8
        return body, name
    return None


def heatmap(raw: bytes, settings_json: Mapping, message_id: str, recipient: str,
            clicks: list[Mapping]) -> Heatmap | None:
    """The preview of a message with its tracked links marked by `clicks` (rows with link, link_tags, clicks,
    unique_clicks, human_clicks: relay.store.console.message_links); None without an HTML body."""
    found = html_part(raw)
    if found is None:
        return None
    doc, charset = found
    settings = replace(TrackingSettings.from_json(dict(settings_json)), open_tracking=False)
    throwaway = Keyring((SigningKey("console", secrets.token_bytes(32)),))
    report: dict = {}
    delivered = rewrite_html(doc, settings, throwaway, message_id, recipient, 0, charset, report)
    counts = {(row["link"], tags_key(row["link_tags"])): row for row in clicks}
    most = max((row.get("clicks") or 0 for row in clicks), default=0)
    links = []
    for entry in sorted(report.get("links", []), key=lambda e: e["index"]):
        row = counts.get((entry["original"], tags_key(entry["tags"])), {})
        links.append(TrackedLink(entry["index"] + 1, entry["original"], entry["tags"], row.get("clicks") or 0,
                                 row.get("unique_clicks") or 0, row.get("human_clicks") or 0))
        delivered = _mark(delivered, html.escape_attribute(entry["tracking"]).encode("ascii"), links[-1], most)
    text = delivered.decode(charset, "replace")
    return Heatmap(text + STYLE, links)


def heat(clicks: int, most: int) -> int:
    """0 (no click) to HEAT_STEPS (the most clicked link of the message)."""
    if clicks <= 0 or most <= 0:
        return 0
    return max(1, round(HEAT_STEPS * clicks / most))


def label(link: TrackedLink) -> str:
    return f"#{link.number}: {link.clicks} clicks, {link.unique_clicks} unique, {link.human_clicks} human"


def _mark(doc: bytes, value: bytes, link: TrackedLink, most: int) -> bytes:
    """The attribute value `value` (a tracking URL) replaced by the link's anchor, its marks added after it."""
    at = doc.find(value)
    if at < 0:
        return doc
    end = at + len(value)
    quoted = doc[end:end + 1] in (b'"', b"'")
    marks = (f' data-relay-link="{link.number}" data-relay-clicks="{link.clicks}"'
             f' data-relay-heat="{heat(link.clicks, most)}"'
             f' data-relay-label="{html.escape_attribute(label(link))}"').encode("ascii")
    anchor = f"#relay-link-{link.number}".encode("ascii")
    if quoted:
        return doc[:at] + anchor + doc[end:end + 1] + marks + doc[end + 1:]
    return doc[:at] + anchor + marks + doc[end:]
