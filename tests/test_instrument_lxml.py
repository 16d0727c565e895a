"""An independent HTML parser's view of instrumentation: lxml (libxml2) reads the corpus templates before and
after, and must see the same elements, attributes and text, except wrapped hrefs (which verify back to the
original destination), removed opt-out markers and the one added pixel."""

from __future__ import annotations

import re
from email import message_from_bytes, policy
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from relay.core import tokens
from relay.core.settings import TrackingSettings
from relay.core.tokens import Keyring, SigningKey
from relay.instrument import Instrumenter

lxml_html = pytest.importorskip("lxml.html")

KEYRING = Keyring((SigningKey("t1", b"k" * 32),))
SETTINGS = TrackingSettings(True, True, "t.example.com", tracking_hosts=frozenset({"t.example.com"}))
MARKERS = {"ses:no-track", "ses:tags", "clicktracking", "data-pm-no-track", "data-msys-clicktrack"}
MID = "0100018c1a2b3c4d-05e008de-024e-4226-841e-98f0e0d61bb1-000000"


def html_files(corpus: Path) -> list[Path]:
    return sorted((corpus / "html").rglob("*.html"))


def as_message(html: bytes) -> bytes:
    return (b"From: a@example.com\r\nTo: b@example.org\r\nSubject: t\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
            + re.sub(rb"\r?\n", b"\r\n", html))


def elements(doc: bytes):
    try:
        root = lxml_html.document_fromstring(doc)
    except Exception:  # lxml refuses some inputs (e.g. empty documents): nothing to compare
        return None
    for pixel in [el for el in root.iter() if isinstance(el.tag, str) and is_pixel(el)]:
        pixel.drop_tree()  # the text after it (a final line break) joins the element before, where it was
    return [el for el in root.iter() if isinstance(el.tag, str)]


def is_pixel(el) -> bool:
    return el.tag == "img" and urlsplit(el.get("src", "")).netloc == "t.example.com"


def test_lxml_sees_the_same_document(corpus):
    files = [f for f in html_files(corpus) if f.stat().st_size < 400_000]
    if not files:
        pytest.skip("no HTML templates in the corpus")
    instrumenter = Instrumenter(KEYRING)
    compared = wrapped = 0
    for path in files:
        source = path.read_bytes()
        if not source.strip():
            continue
        out = instrumenter.copy(MID, as_message(source), SETTINGS, "rcpt@example.org", 1).data
        part = message_from_bytes(out, policy=policy.default)
        after_html = part.get_payload(decode=True)
        before, after = elements(re.sub(rb"\r?\n", b"\r\n", source)), elements(after_html)
        if before is None:
            continue
        assert [el.tag for el in before] == [el.tag for el in after], path.name
        for a, b in zip(before, after, strict=True):
            attrs_a = {k: v for k, v in a.attrib.items() if k not in MARKERS}
            attrs_b = dict(b.attrib)
            href_a, href_b = attrs_a.pop("href", None), attrs_b.pop("href", None)
            assert attrs_a == attrs_b, (path.name, a.tag)
            assert (a.text or "") == (b.text or "") and (a.tail or "") == (b.tail or ""), (path.name, a.tag)
            if href_a != href_b:
                assert href_b.startswith(("http://t.example.com/c/", "https://t.example.com/c/")), (path.name, href_b)
                claims = tokens.verify(KEYRING, href_b.rsplit("/", 1)[1])
                assert claims is not None and claims.url == href_a.strip(), (path.name, href_a)
                wrapped += 1
        compared += 1
    assert compared >= 50 and wrapped >= 100, (compared, wrapped)
