"""Property tests: instrumentation only ever replaces link values and inserts one pixel."""

import email
import email.policy
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.core import mime
from relay.core.headers import to_crlf
from relay.core.settings import TrackingSettings
from relay.core.tokens import Keyring, SigningKey
from relay.instrument import Instrumenter

RING = Keyring((SigningKey("k1", b"p" * 32),))
MID = "0100018c1a2b3c4d-05e008de-024e-4226-841e-98f0e0d61bb1-000000"
HOST = "t.example.com"
FULL = TrackingSettings(True, True, HOST, tracking_hosts=frozenset({HOST}))
PIXEL = re.compile(rb'<img src="https?://t\.example\.com/o/[A-Za-z0-9_-]+" width="1" height="1" alt="" border="0" '
                   rb'style="border:0;width:1px;height:1px" />')

HREFS = ["https://x.example/", "http://x.example/a?b=1&amp;c=2", "https://x.example/p#frag", "mailto:a@b.c",
         "https://x.example/a b", "#top", "/rel", "https://x.example/?q=&#038;r", "{{url}}", "https://bü.example/",
         "HTTPS://X.EXAMPLE/UP", "https://t.example.com/c/already", "javascript:void(0)", "", "https://x.example/'q"]
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30).map(lambda t: t.encode("utf-8"))


@st.composite
def links(draw) -> bytes:
    href = draw(st.sampled_from(HREFS))
    quote = draw(st.sampled_from(['"', "'", ""])) if " " not in href and "'" not in href else '"'
    if quote == "'" and "'" in href:
        quote = '"'
    name = draw(st.sampled_from(["a", "A", "area", "v:roundrect"]))
    before = draw(st.sampled_from(["", ' class="c"', "\r\n  title='t>'", " data-x"]))
    sep = draw(st.sampled_from(["=", " = ", "=\r\n"]))
    return f"<{name}{before} href{sep}{quote}{href}{quote}>".encode() + draw(TEXT) + f"</{name} >".encode()


FRAGMENTS = st.one_of(
    TEXT, links(),
    st.sampled_from([b"<!DOCTYPE html>", b"<html>", b"<body>", b'<body class="x">', b"</body>", b"</html>",
                     b"<p>", b"</p>", b"<br/>", b"<!-- c -->", b"<!--[if mso]>", b"<![endif]-->", b"&amp;",
                     b"&nbsp;", b"<table><tr><td>", b"</td></tr></table>", b"\r\n", b"<script>var a='<a href=x>';"
                     b"</script>", b"<style>a{}</style>", b'<img src="https://i.example/x.png">', b"<", b">",
                     b'<link href="https://css.example/">', b"\xff\xfe", b" " * 80, b"x" * 200]),
)
HTML = st.lists(FRAGMENTS, max_size=25).map(b"".join)


def head(cte: str) -> bytes:
    return (b"From: a@example.com\r\nSubject: s\r\nMIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: " + cte.encode() + b"\r\n\r\n")


def encode(doc: bytes, cte: str) -> bytes:
    if cte == "8bit":
        return doc
    return mime.encode_qp(doc) if cte == "quoted-printable" else mime.encode_base64(doc, True)


def undo(doc: bytes, report: dict) -> bytes:
    """Original hrefs back in place of the tracking URLs, and the pixel removed."""
    for part in report["parts"]:
        for link in part.get("links", []):
            doc = doc.replace(link["tracking"].encode(), link["href"].encode(), 1)
    return PIXEL.sub(b"", doc, count=1)


def decoded_html(data: bytes) -> bytes:
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    return msg.get_payload(decode=True)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=HTML, cte=st.sampled_from(["8bit", "quoted-printable", "base64"]),
       recipient=st.sampled_from(["r@example.org", "ünï@example.org", "x" * 60 + "@example.org"]))
def test_undoing_the_tracking_gives_back_the_input(doc, cte, recipient):
    if cte == "8bit":
        doc = to_crlf(doc)  # as intake queues it
    raw = head(cte) + encode(doc, cte)
    out = Instrumenter(RING).copy(MID, raw, FULL, recipient, 1700000000)
    got = decoded_html(out.data)
    assert undo(got, out.report) == doc
    body = out.data.split(b"\r\n\r\n", 1)[1]
    for line in body.split(b"\r\n"):
        assert len(line) <= 76 if cte != "8bit" else len(line) <= 998 or line in raw


@settings(max_examples=60, deadline=None)
@given(doc=HTML, recipients=st.lists(st.sampled_from(["a@x.org", "b@y.org", "c@z.org"]), min_size=2, max_size=4))
def test_cached_plan_renders_like_a_fresh_one(doc, recipients):
    raw = head("quoted-printable") + encode(doc, "quoted-printable")
    shared = Instrumenter(RING)
    for rcpt in recipients:
        assert shared.copy(MID, raw, FULL, rcpt, 1).data == Instrumenter(RING).copy(MID, raw, FULL, rcpt, 1).data


@st.composite
def messages(draw, depth=0) -> bytes:
    if depth < 2 and draw(st.booleans()):
        boundary = f"b{depth}{draw(st.integers(0, 99))}"
        kind = draw(st.sampled_from(["mixed", "alternative", "related", "signed"]))
        parts = draw(st.lists(messages(depth + 1), min_size=1, max_size=3))
        body = b"".join(b"--" + boundary.encode() + b"\r\n" + p + b"\r\n" for p in parts)
        return (f'Content-Type: multipart/{kind}; boundary="{boundary}"\r\n\r\npreamble\r\n'.encode() + body
                + b"--" + boundary.encode() + b"--\r\nepilogue")
    ctype = draw(st.sampled_from(["text/html", "text/plain", "message/rfc822", "image/png"]))
    cte = draw(st.sampled_from(["8bit", "quoted-printable", "base64"]))
    disposition = draw(st.sampled_from([b"", b"Content-Disposition: attachment\r\n"]))
    return (f"Content-Type: {ctype}; charset=utf-8\r\nContent-Transfer-Encoding: {cte}\r\n".encode() + disposition
            + b"\r\n" + encode(to_crlf(draw(HTML)), cte))


def shape(data: bytes) -> list[str]:
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    return [p.get_content_type() for p in msg.walk()]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=messages())
def test_output_always_parses_with_the_same_tree_and_untouched_parts(body):
    raw = b"From: a@example.com\r\nMIME-Version: 1.0\r\n" + body
    out = Instrumenter(RING).copy(MID, raw, FULL, "r@example.org", 1)
    assert shape(out.data) == shape(raw)
    msg_in = email.message_from_bytes(raw, policy=email.policy.compat32)
    msg_out = email.message_from_bytes(out.data, policy=email.policy.compat32)
    for a, b in zip(msg_in.walk(), msg_out.walk(), strict=True):
        if a.get_content_type() != "text/html" and not a.is_multipart():
            assert a.get_payload() == b.get_payload()


HREF_TEXT = st.lists(st.sampled_from(list("aZ09:/?#@.&;%{}|=-_~!$'()*+, \t\r\n\u00e9")
                                     + ["&amp;", "&#038;", "&nbsp;", "%20", "%%", "{{", "[::1]"]),
                     max_size=12).map("".join)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["http://", "https://", "HTTP://", "", "mailto:", "https://t.example.com"]), HREF_TEXT,
       st.sampled_from(['"', "'"]), st.sampled_from(["a", "area"]))
def test_the_plain_link_fast_path_judges_as_the_full_path(scheme, rest, quote, element):
    """The usual link is judged in a fast path; a marker attribute sends the same href through the full path
    (ses:tags="" adds no tag), so both must wrap or skip it alike and decode the same destination."""
    from relay.core.instrument import rewrite_html

    href = (scheme + rest).replace(quote, "")
    plain = f"<{element} href={quote}{href}{quote}>x</{element}>".encode()
    marked = f'<{element} ses:tags="" href={quote}{href}{quote}>x</{element}>'.encode()
    reports: list[dict] = [{}, {}]
    for doc, report in zip((plain, marked), reports, strict=True):
        rewrite_html(doc, FULL, RING, MID, "r@example.org", 1, report=report)
    assert reports[0]["links"] == reports[1]["links"]
    assert reports[0]["skipped"] == reports[1]["skipped"]
