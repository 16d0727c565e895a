"""The engine over every message and template of the shared corpus (skipped when the corpus is absent)."""

from __future__ import annotations

import email
import email.policy
import re
from pathlib import Path

import pytest

from relay.core import html, mime, tokens
from relay.core.headers import to_crlf
from relay.core.intake import intake
from relay.core.settings import TrackingSettings
from relay.core.tokens import Keyring, SigningKey
from relay.instrument import Instrumenter

RING = Keyring((SigningKey("kc", b"c" * 32),))
MID = "0100018c1a2b3c4d-05e008de-024e-4226-841e-98f0e0d61bb1-000000"
SETTINGS = TrackingSettings(True, True, "track.example.com", pixel_position="auto",
                            tracking_hosts=frozenset({"track.example.com"}))


def corpus_messages(corpus: Path) -> list[tuple[str, bytes]]:
    out = []
    for path in sorted((corpus / "eml").rglob("*.eml")):
        out.append((str(path.relative_to(corpus)), path.read_bytes()))
    for path in sorted((corpus / "html").rglob("*.html")):
        out.append((str(path.relative_to(corpus)), as_message(path)))
    return out


def as_message(path: Path) -> bytes:
    """A template as an application would send it: one quoted-printable HTML part in its own charset."""
    m = re.search(r"\.([A-Za-z0-9_]+-[A-Za-z0-9_-]+)\.html$", path.name)
    charset = m.group(1) if m else "utf-8"
    head = (f"From: news@example.com\r\nTo: reader@example.org\r\nSubject: template\r\nMIME-Version: 1.0\r\n"
            f"Content-Type: text/html; charset={charset}\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n")
    return head.encode() + mime.encode_qp(to_crlf(path.read_bytes()))


def leaf_bytes(data: bytes) -> list[tuple[str, str, bytes]]:
    return [(p.path, p.content_type, data[p.start:p.body_end]) for p in mime.leaves(mime.parse(data))]


def tree(data: bytes) -> list[str]:
    return [p.get_content_type() for p in email.message_from_bytes(data, policy=email.policy.compat32).walk()]


def check(name: str, raw: bytes) -> list[str]:
    queued = intake(raw, "", MID, "relay.test").raw
    out = Instrumenter(RING).copy(MID, queued, SETTINGS, "rcpt@example.org", 1700000000)
    problems = []
    if tree(out.data) != tree(queued):
        problems.append("MIME tree changed")
    parts = {p["path"]: p for p in out.report["parts"]}
    before, after = leaf_bytes(queued), leaf_bytes(out.data)
    if [(p, t) for p, t, _ in before] != [(p, t) for p, t, _ in after]:
        return problems + ["leaves changed"]
    html_parts = []
    for (path, ctype, a), (_, _, b) in zip(before, after, strict=True):
        rewritten = parts.get(path, {}).get("action") == "instrumented" or parts.get(path, {}).get("html_size")
        if not rewritten and a != b:
            problems.append(f"untouched part {path} ({ctype}) changed")
        if rewritten:
            html_parts.append(path)
    for leaf in mime.leaves(mime.parse(out.data)):
        if leaf.path not in html_parts:
            continue
        doc = mime.decode_body(out.data[leaf.body_start:leaf.body_end], leaf.cte)
        if html.PLACEHOLDER in doc:
            problems.append(f"placeholder left in {leaf.path}")
        for tag in html.scan(doc).links:
            if any(a.name in html.MARKERS for a in tag.attrs):
                problems.append(f"marker left in {leaf.path}: {doc[tag.start:tag.end][:80]!r}")
        for link in parts[leaf.path]["links"]:
            claims = tokens.verify(RING, link["tracking"].rsplit("/", 1)[1])
            if claims is None or claims.url != link["original"] or claims.recipient != "rcpt@example.org":
                problems.append(f"link {link['index']} does not verify to {link['original']!r}")
            if link["tracking"].encode() not in doc:
                problems.append(f"link {link['index']} not in the HTML")
    return problems


def test_whole_corpus(corpus):
    failures = {}
    messages = corpus_messages(corpus)
    assert len(messages) > 300
    for name, raw in messages:
        try:
            problems = check(name, raw)
        except Exception as exc:  # noqa: BLE001 - report every message, not only the first failure
            problems = [f"{type(exc).__name__}: {exc}"]
        if problems:
            failures[name] = problems[:3]
    assert failures == {}


def test_corpus_links_are_wrapped_somewhere(corpus):
    """A floor, so a regression that quietly stops wrapping shows (about 450 eligible links in the corpus)."""
    wrapped = 0
    for _, raw in corpus_messages(corpus):
        if b"text/html" not in raw:
            continue
        out = Instrumenter(RING).copy(MID, intake(raw, "", MID, "relay.test").raw, SETTINGS, "r@x.org", 1)
        wrapped += out.report.get("links_wrapped", 0)
    assert wrapped > 400


@pytest.mark.parametrize("policy", ["no tracking", "open only"])
def test_corpus_other_settings_never_break_mime(corpus, policy):
    s = TrackingSettings(False, False, "t.example.com") if policy == "no tracking" else \
        TrackingSettings(True, False, "t.example.com")
    for _, raw in corpus_messages(corpus)[::3]:
        queued = intake(raw, "", MID, "relay.test").raw
        out = Instrumenter(RING).copy(MID, queued, s, "r@x.org", 1)
        assert [p.path for p in mime.leaves(mime.parse(out.data))] == [p.path for p in mime.leaves(mime.parse(queued))]
