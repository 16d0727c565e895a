"""The instrumentation rules (docs/tracking.md) and the applicable pitfalls of tracking-pitfalls.md, one test
(or a few) each."""

import base64
import email
import email.policy
import json
import re
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.core import instrument as core
from relay.core import tokens
from relay.core.settings import TrackingSettings
from relay.core.tokens import ClickClaims, Keyring, OpenClaims, SigningKey
from relay.instrument import Instrumenter

RING = Keyring((SigningKey("k1", b"s" * 32),))
MID = "0100018c1a2b3c4d-05e008de-024e-4226-841e-98f0e0d61bb1-000000"
HOSTS = frozenset({"t.example.com", "old-track.example.net"})
FULL = TrackingSettings(True, True, "t.example.com", tracking_hosts=HOSTS)
CLICK = TrackingSettings(False, True, "t.example.com", tracking_hosts=HOSTS)
OPEN = TrackingSettings(True, False, "t.example.com", tracking_hosts=HOSTS)
NONE = TrackingSettings(False, False, "t.example.com", tracking_hosts=HOSTS)
TRACK_URL = re.compile(rb"https?://t\.example\.com/[co]/[A-Za-z0-9_-]+")


def message(body: bytes, cte: str | None = None, charset: str = "utf-8", extra: bytes = b"") -> bytes:
    head = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: s\r\nMIME-Version: 1.0\r\n" + extra
    head += b"Content-Type: text/html; charset=" + charset.encode() + b"\r\n"
    if cte:
        head += b"Content-Transfer-Encoding: " + cte.encode() + b"\r\n"
    return head + b"\r\n" + body


def copy(raw: bytes, settings: TrackingSettings = FULL, recipient: str = "r@example.org", inst=None):
    return (inst or Instrumenter(RING)).copy(MID, raw, settings, recipient, 1700000000)


def html_of(data: bytes) -> bytes:
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    part = next(p for p in msg.walk() if p.get_content_type() == "text/html")
    return part.get_payload(decode=True)


def run(doc: bytes, settings: TrackingSettings = FULL, **kw):
    out = copy(message(doc, **kw), settings)
    return html_of(out.data), out


def links(out) -> list[dict]:
    return [link for part in out.report["parts"] for link in part.get("links", [])]


def skipped(out) -> list[str]:
    return [s["reason"] for part in out.report["parts"] for s in part.get("skipped", [])]


def claims(url: str):
    return tokens.verify(RING, url.rsplit("/", 1)[1])


def strip_tracking(doc: bytes, out) -> bytes:
    """Undo the instrumentation with the report: originals back, pixel out."""
    for link in links(out):
        doc = doc.replace(link["tracking"].encode(), b"\0" + str(link["index"]).encode() + b"\0", 1)
    for link in links(out):
        doc = doc.replace(b"\0" + str(link["index"]).encode() + b"\0", link["href"].encode(), 1)
    return re.sub(rb'<img src="http://t\.example\.com/o/[^"]+"[^>]*/>', b"", doc)


# --- which links -------------------------------------------------------------------------------------------

def test_wraps_a_and_area_keeping_each_links_scheme():
    doc = b'<a href="http://a.example/x">a</a><map><area href="https://b.example/y" shape=rect></map>'
    got, out = run(doc)
    urls = [link["tracking"] for link in links(out)]
    assert urls[0].startswith("http://t.example.com/c/") and urls[1].startswith("https://t.example.com/c/")
    assert [claims(u).url for u in urls] == ["http://a.example/x", "https://b.example/y"]
    assert got.count(b"t.example.com/c/") == 2


def test_https_policy_require_makes_every_url_https():
    s = TrackingSettings(True, True, "t.example.com", https_policy="REQUIRE", tracking_hosts=HOSTS)
    got, out = run(b'<a href="http://a.example/">a</a>', s)
    assert links(out)[0]["tracking"].startswith("https://") and b'src="https://t.example.com/o/' in got


def test_https_policy_require_open_only_keeps_link_schemes():
    s = TrackingSettings(True, True, "t.example.com", https_policy="REQUIRE_OPEN_ONLY", tracking_hosts=HOSTS)
    got, out = run(b'<a href="http://a.example/">a</a>', s)
    assert links(out)[0]["tracking"].startswith("http://t.example.com/c/")
    assert b'src="https://t.example.com/o/' in got


def test_every_html_part_gets_a_pixel_and_links_are_numbered_across_parts():
    raw = (b"From: a@example.com\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=m\r\n\r\n"
           b"--m\r\nContent-Type: text/html\r\n\r\n<body><a href='https://a.example/'>a</a></body>\r\n"
           b"--m\r\nContent-Type: text/html\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
           b"<body><a href=3D'https://b.example/'>b</a></body>\r\n--m--\r\n")
    out = copy(raw)
    assert [x["index"] for x in links(out)] == [0, 1]
    assert [claims(x["tracking"]).link_index for x in links(out)] == [0, 1]
    assert [p["pixel"]["placement"] for p in out.report["parts"]] == ["before </body>", "before </body>"]
    assert out.data.count(b"t.example.com/o/") == 2


@pytest.mark.parametrize("href, reason", [
    ("mailto:x@example.com", "mailto: link"), ("tel:+123", "tel: link"), ("sms:+123", "sms: link"),
    ("#top", "fragment link"), ("/relative/path", "relative URL"), ("javascript:alert(1)", "javascript: link"),
    ("data:text/html,x", "data: link"), ("ftp://x.example/", "ftp: link"),
    ("https://t.example.com/c/abc", "already a tracking link"),
    ("http://old-track.example.net/c/abc", "already a tracking link"),
    ("{{unsubscribe_url}}", "unresolved template placeholder"),
    ("https://x.example/?u={{ user.id }}", "unresolved template placeholder"),
    ("*|UNSUB|*", "unresolved template placeholder"), ("%%view_online%%", "unresolved template placeholder"),
    ("https://x.example/a b", "not a valid URL (RFC 3986); SES leaves these untracked"),
    ("https://x.example/%zz", "not a valid URL (RFC 3986); SES leaves these untracked"),
    ("https://x.example/a|b", "not a valid URL (RFC 3986); SES leaves these untracked"),
    ("https://x.example/\u00a0", "not a valid URL (RFC 3986); SES leaves these untracked"),
    ("https://x.example/&nbsp;", "not a valid URL (RFC 3986); SES leaves these untracked"),
])
def test_links_left_alone_with_their_reason(href, reason):
    doc = b'<a href="' + href.encode() + b'">x</a>'
    got, out = run(doc, CLICK)
    assert got == doc and links(out) == [] and skipped(out) == [reason]


def test_at_most_250_links_per_message():
    doc = b"".join(b'<a href="https://x.example/%d">x</a>\r\n' % i for i in range(260))
    got, out = run(doc, CLICK)
    assert len(links(out)) == 250 and skipped(out).count("beyond SES's limit of 250 links per message") == 10
    assert b'href="https://x.example/250"' in got and b'href="https://x.example/249"' not in got


def test_link_img_base_and_other_elements_are_not_wrapped():
    doc = (b'<link rel="stylesheet" href="https://fonts.example/css"><base href="https://base.example/">'
           b'<img src="https://img.example/a.png"><div href="https://div.example/">x</div>')
    got, out = run(doc, CLICK)
    assert got == doc and links(out) == []


# --- URL fidelity (pitfalls 1, 2, 3) -----------------------------------------------------------------------

@pytest.mark.parametrize("href, dest", [
    (b"https://x.example/reset?key=abc&amp;login=bob", "https://x.example/reset?key=abc&login=bob"),
    (b"https://x.example/?a=1&#038;b=2", "https://x.example/?a=1&b=2"),  # WordPress make_clickable
    (b"https://x.example/page#section-2", "https://x.example/page#section-2"),
    (b"https://x.example/it's-here", "https://x.example/it's-here"),
    (b"https://x.example/share?href=https://y.example/p%3Fq%3D1&amp;t=2",
     "https://x.example/share?href=https://y.example/p%3Fq%3D1&t=2"),
    ("https://bücher.example/straße".encode(), "https://bücher.example/straße"),
    (b"https://x.example/user@host/path/", "https://x.example/user@host/path/"),
])
def test_destination_is_decoded_exactly_once_and_kept_whole(href, dest):
    q = b"'" if b'"' in href else b'"'
    got, out = run(b"<a href=" + q + href + q + b">x</a>", CLICK)
    (link,) = links(out)
    assert link["original"] == dest and claims(link["tracking"]).url == dest


def test_non_ascii_url_only_in_utf8_parts():
    doc = "<a href='https://x.example/caf\u00e9?q=\u00e9'>x</a><a href='https://x.example/&eacute;'>y</a>"
    _, out = run(doc.encode("cp1252"), CLICK, cte="8bit", charset="windows-1252")
    assert links(out) == [] and skipped(out) == ["non-ASCII URL in a windows-1252 part"] * 2
    _, out = run(doc.encode("ascii", "replace"), CLICK, cte="8bit", charset="x-unknown-charset")
    assert skipped(out)[-1] == "non-ASCII URL in a x-unknown-charset part"
    _, out = run(doc.encode("utf-8"), CLICK)
    assert [x["original"] for x in links(out)] == ["https://x.example/caf\u00e9?q=\u00e9", "https://x.example/\u00e9"]


def test_ambiguous_legacy_reference_is_left_alone():
    _, out = run(b'<a href="https://x.example/?a=1&region=eu">x</a>', CLICK)
    assert links(out) == [] and skipped(out) == ["ambiguous character reference in the URL"]


def test_quoting_style_is_kept():
    doc = b"<a href='https://x.example/1'>a</a><a href=https://x.example/2>b</a><a href=\"https://x.example/3\">c</a>"
    got, _ = run(doc, CLICK)
    assert re.fullmatch(rb"<a href='[^'\"]+'>a</a><a href=[^'\" >]+>b</a><a href=\"[^'\"]+\">c</a>", got)


def test_tags_spanning_lines_and_odd_end_tags():
    doc = b'<a\r\n   class="btn"\r\n   href = "https://x.example/"\r\n>go</a >\r\n<a href="https://y.example/">y</a\r\n>'
    got, out = run(doc, CLICK)
    assert len(links(out)) == 2
    assert got.startswith(b'<a\r\n   class="btn"\r\n   href = "https://t.example.com/c/')
    assert got.endswith(b'">y</a\r\n>')


def test_only_the_href_bytes_change():
    doc = (b'<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN">\r\n<html><body>'
           b'<p>caf&eacute; &nbsp; &#169;</p><A  Class=x HREF="https://x.example/?a=1&amp;b=2" target=_blank>x</A>'
           b'<p unclosed <b>bold</body></html>')
    got, out = run(doc, CLICK)
    (link,) = links(out)
    assert got == doc.replace(b"https://x.example/?a=1&amp;b=2", link["tracking"].encode())


def test_href_3d_in_quoted_printable():
    doc = b'<a href="https://x.example/a?b=1&amp;c=2">x</a> ' + b"z" * 200 + b"\r\n</body>"
    from relay.core.mime import encode_qp

    raw = message(encode_qp(doc), cte="quoted-printable")
    assert b"href=3D" in raw
    out = copy(raw, CLICK)
    (link,) = links(out)
    assert link["original"] == "https://x.example/a?b=1&c=2"
    assert html_of(out.data) == doc.replace(b"https://x.example/a?b=1&amp;c=2", link["tracking"].encode())
    body = out.data.split(b"\r\n\r\n", 1)[1]
    assert all(len(line) <= 76 for line in body.split(b"\r\n"))


def test_base64_html():
    doc = b'<html><body><a href="https://x.example/">x</a></body></html>\r\n'
    raw = message(base64.encodebytes(doc).replace(b"\n", b"\r\n"), cte="base64")
    out = copy(raw)
    got = html_of(out.data)
    assert b"t.example.com/c/" in got and b"t.example.com/o/" in got
    body = out.data.split(b"\r\n\r\n", 1)[1]
    assert all(len(line) <= 76 for line in body.split(b"\r\n"))


def test_minified_one_line_html_switches_7bit_to_qp_when_lines_grow_past_998():
    doc = b"<html><body>" + b"".join(b'<a href="https://x.example/%d">x</a>' % i for i in range(24)) + b"</body></html>"
    assert len(doc) < 998
    raw = message(doc, cte="7bit")
    out = copy(raw)
    assert b"Content-Transfer-Encoding: quoted-printable\r\n" in out.data
    assert b"Content-Transfer-Encoding: 7bit" not in out.data
    assert max(len(x) for x in out.data.split(b"\r\n")) <= 76
    assert strip_tracking(html_of(out.data), out) == doc
    assert out.report["parts"][0]["output_transfer_encoding"] == "quoted-printable"


def test_short_8bit_part_stays_8bit():
    doc = "<p>Grüße</p><a href='https://x.example/'>x</a>".encode()
    out = copy(message(doc, cte="8bit"), CLICK)
    assert b"Content-Transfer-Encoding: 8bit\r\n" in out.data and "Grüße".encode() in out.data


# --- Outlook, image maps -----------------------------------------------------------------------------------

def test_vml_button_in_conditional_comment_is_wrapped_like_its_fallback():
    doc = (b'<!--[if mso]><v:roundrect xmlns:v="urn:schemas-microsoft-com:vml" href="https://x.example/buy" '
           b'style="height:40px" arcsize="10%" stroke="f" fillcolor="#d62828"><w:anchorlock/>'
           b'<center>Buy</center></v:roundrect><![endif]--><!--[if !mso]><!-- -->'
           b'<a href="https://x.example/buy" class="btn">Buy</a><!--<![endif]-->')
    got, out = run(doc, CLICK)
    found = links(out)
    assert [(x["element"], x["in_conditional_comment"], x["original"]) for x in found] == [
        ("v:roundrect", True, "https://x.example/buy"), ("a", False, "https://x.example/buy")]
    assert strip_tracking(got, out) == doc


def test_plain_comment_links_are_left_alone():
    doc = b'<!-- <a href="https://x.example/old">old</a> -->'
    got, out = run(doc, CLICK)
    assert got == doc


def test_image_map_areas():
    doc = b'<img usemap="#m"><map name="m"><area shape="rect" coords="0,0,1,1" href="https://x.example/a"></map>'
    _, out = run(doc, CLICK)
    assert [x["element"] for x in links(out)] == ["area"]


# --- opt-out markers and link tags (pitfall 12) ------------------------------------------------------------

@pytest.mark.parametrize("marker", [b"ses:no-track", b'ses:no-track=""', b'ses:no-track="true"',
                                    b"clicktracking=off", b'clicktracking="off"', b"data-pm-no-track",
                                    b'data-msys-clicktrack="0"'])
@pytest.mark.parametrize("settings", [FULL, OPEN, NONE])
def test_opt_out_markers_are_honoured_and_always_removed(marker, settings):
    doc = b"<body><a " + marker + b' href="https://x.example/">x</a></body>'
    got, out = run(doc, settings)
    assert links(out) == [] and b'<a href="https://x.example/">x</a>' in got and marker not in got


def test_ses_tags_become_link_tags_and_are_removed():
    doc = b'<a ses:tags="product:book;genre:fiction;bad tag:x;" href="https://x.example/">x</a>'
    got, out = run(doc, CLICK)
    (link,) = links(out)
    assert link["tags"] == {"product": ["book"], "genre": ["fiction"]} and link["tag_warnings"]
    assert claims(link["tracking"]).tags == {"product": ["book"], "genre": ["fiction"]}
    assert b"ses:tags" not in got and got.startswith(b'<a href="https://t.example.com/c/')


def test_markers_removed_when_nothing_is_tracked_means_changed_bytes():
    raw = message(b'<a ses:no-track href="https://x.example/">x</a>{{ses:openTracker}}')
    out = copy(raw, NONE)
    assert out.changed and html_of(out.data) == b'<a href="https://x.example/">x</a>'


def test_no_tracking_and_nothing_to_strip_leaves_bytes_identical():
    raw = message(b'<a href="https://x.example/">x</a>', cte="quoted-printable")
    out = copy(raw, NONE)
    assert out.data == raw and not out.changed


def test_markers_stripped_even_when_instrumenting_the_part_fails(monkeypatch):
    def boom(*args, **kw):
        if args[2].open_tracking:
            raise RuntimeError("boom")
        return None
    monkeypatch.setattr(core, "_pixel_edits", boom)
    out = copy(message(b'<a ses:no-track href="https://x.example/">x</a>'))
    assert html_of(out.data) == b'<a href="https://x.example/">x</a>'
    assert any("left unmodified: RuntimeError: boom" in w for w in out.warnings)


# --- the pixel (pitfalls 20, 21) ---------------------------------------------------------------------------

def test_pixel_before_last_body_end_with_plain_markup():
    doc = b"<html><body><p>x</p><!-- </body> --></body></html>"
    got, out = run(doc, OPEN)
    pixel = re.search(rb"<img [^>]*>", got).group(0)
    assert got.index(pixel) == doc.index(b"</body></html>")
    assert b'width="1"' in pixel and b'height="1"' in pixel and b'alt=""' in pixel and b'border="0"' in pixel
    assert b"display:none" not in pixel.replace(b" ", b"")
    (part,) = out.report["parts"]
    assert part["pixel"]["placement"] == "before </body>"
    assert claims(part["pixel"]["url"]) == OpenClaims(MID, "r@example.org", 1700000000)


def test_pixel_at_end_without_body():
    got, _ = run(b"<p>fragment</p>", OPEN)
    assert got.startswith(b"<p>fragment</p><img ")


def test_first_placeholder_is_the_pixel_and_the_rest_are_removed():
    doc = b"<body><p>{{ses:openTracker}}</p><p>{{ses:openTracker}}</p></body>"
    got, out = run(doc, OPEN)
    assert got.startswith(b"<body><p><img ") and got.endswith(b"</p><p></p></body>")
    assert out.report["parts"][0]["pixel"]["placement"] == "placeholder"


def test_placeholders_removed_when_open_tracking_is_off():
    got, _ = run(b"<body>{{ses:openTracker}}<p>x</p>{{ses:openTracker}}</body>", CLICK)
    assert got == b"<body><p>x</p></body>"


def test_pixel_top_and_auto():
    top = TrackingSettings(True, False, "t.example.com", pixel_position="top", tracking_hosts=HOSTS)
    got, _ = run(b'<html><body class="b"><p>x</p></body></html>', top)
    assert got.startswith(b'<html><body class="b"><img ')
    auto = TrackingSettings(True, False, "t.example.com", pixel_position="auto", tracking_hosts=HOSTS)
    small, _ = run(b"<html><body><p>x</p></body></html>", auto)
    assert small.endswith(b" /></body></html>")
    big, out = run(b"<html><body>" + b"<p>lorem ipsum</p>\r\n" * 6000 + b"</body></html>", auto)
    assert big.startswith(b"<html><body><img ")
    assert any("Gmail's 102 KB clip" in w for w in out.warnings)


def test_no_pixel_without_open_tracking():
    got, out = run(b"<body><p>x</p></body>", CLICK)
    assert b"<img" not in got and out.report["parts"][0]["pixel"] is None


# --- MIME fidelity -----------------------------------------------------------------------------------------

SIGNED = (
    b"From: a@example.com\r\nSubject: a very long subject that an email generator would fold somewhere around "
    b"here, breaking signatures\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"m\"\r\n\r\n"
    b"--m\r\nContent-Type: multipart/signed; protocol=\"application/pkcs7-signature\"; boundary=s\r\n\r\n"
    b"--s\r\nContent-Type: text/html\r\n\r\n<a href=\"https://signed.example/\">s</a>\r\n"
    b"--s\r\nContent-Type: application/pkcs7-signature\r\n\r\nAAAA\r\n--s--\r\n"
    b"--m\r\nContent-Type: message/rfc822\r\n\r\nContent-Type: text/html\r\n\r\n"
    b"<a href=\"https://attached.example/\">a</a>\r\n"
    b"--m\r\nContent-Type: text/html; name=a.html\r\nContent-Disposition: attachment\r\n\r\n"
    b"<a href=\"https://attachment.example/\" ses:no-track>a</a>\r\n"
    b"--m\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<body><a href=\"https://x.example/\">x</a></body>\r\n"
    b"--m--\r\nepilogue\r\n"
)


def test_protected_parts_attachments_headers_and_epilogue_stay_byte_identical():
    out = copy(SIGNED)
    head, _, tail = SIGNED.rpartition(b"<body>")
    assert out.data.startswith(head + b"<body>") and out.data.endswith(b"</body>\r\n--m--\r\nepilogue\r\n")
    reasons = {p["path"]: p.get("reason") for p in out.report["parts"]}
    assert reasons["1.1"].startswith("protected") and reasons["1.2"].startswith("protected")
    assert reasons["1.3"] == "attachment"
    assert [x["original"] for x in links(out)] == ["https://x.example/"]


def test_output_mime_tree_matches():
    out = copy(SIGNED)
    a = email.message_from_bytes(SIGNED, policy=email.policy.compat32)
    b = email.message_from_bytes(out.data, policy=email.policy.compat32)
    assert [p.get_content_type() for p in a.walk()] == [p.get_content_type() for p in b.walk()]


@pytest.mark.parametrize("charset, text", [("iso-8859-1", "Grüße"), ("koi8-r", "Привет"), ("big5", "中文"),
                                           ("shift_jis", "ソ表"), ("iso-2022-jp", "日本語"), ("utf-16", "Grüße"),
                                           ("utf-7", "Grüße")])
def test_charsets_are_kept(charset, text):
    doc = f'<html><body><p>{text}</p><a href="https://x.example/?q=1&amp;r=2">{text}</a></body></html>'
    raw = message(doc.encode(charset), cte="base64" if charset == "utf-16" else "8bit", charset=charset)
    if charset == "utf-16":
        raw = message(base64.encodebytes(doc.encode(charset)).replace(b"\n", b"\r\n"), cte="base64",
                      charset=charset)
    out = copy(raw)
    got = html_of(out.data).decode(charset)
    (link,) = links(out)
    assert link["original"] == "https://x.example/?q=1&r=2"
    assert got.replace(link["tracking"], "https://x.example/?q=1&amp;r=2") == doc.replace(
        "</body>", re.search(r"<img [^>]*>", got).group(0) + "</body>")


def test_bytes_that_do_not_decode_survive():
    doc = b'<p>\xff\xfe bad utf-8 \xc3</p><a href="https://x.example/">x</a>'
    got, out = run(doc, CLICK)
    assert got == doc.replace(b"https://x.example/", links(out)[0]["tracking"].encode())


def test_malformed_base64_part_goes_out_unmodified_with_a_warning():
    raw = message(b"PGEgaHJlZj0iaHR0cHM6Ly94LyI+eDwvYT4=garbage!!", cte="base64")
    out = copy(raw)
    assert out.data == raw and any("left unmodified: malformed base64" in w for w in out.warnings)


@pytest.mark.parametrize("raw", [b"", b"\r\n", b"garbage", b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x",
                                 b"Content-Type: text/html; charset=\"\r\n\r\n<a href=x>",
                                 b"Content-Type: text/html; charset=utf-16\r\n\r\n\xff<a href='http://x/'>"])
def test_copy_never_raises(raw):
    out = copy(raw)
    assert isinstance(out.data, bytes)


# --- per recipient -----------------------------------------------------------------------------------------

def test_each_recipient_gets_own_signed_urls_from_one_analysis(monkeypatch):
    calls = []
    real = core.analyse
    monkeypatch.setattr(core, "analyse", lambda *a: calls.append(1) or real(*a))
    inst = Instrumenter(RING)
    raw = message(b'<body><a href="https://x.example/">x</a></body>', cte="quoted-printable")
    one, two = copy(raw, recipient="one@example.org", inst=inst), copy(raw, recipient="two@example.org", inst=inst)
    assert len(calls) == 1 and one.data != two.data
    c1, c2 = claims(links(one)[0]["tracking"]), claims(links(two)[0]["tracking"])
    assert isinstance(c1, ClickClaims) and (c1.recipient, c2.recipient) == ("one@example.org", "two@example.org")
    assert c1.message_id == MID and c1.url == c2.url == "https://x.example/"


def test_cache_is_bounded():
    inst = Instrumenter(RING, cache_size=2)
    for i in range(5):
        inst.copy(f"m{i}", message(b"<p>x</p>"), FULL, "r@x", 1)
    assert len(inst._plans) == 2


def test_report_shape():
    out = copy(SIGNED)
    part = out.report["parts"][-1]
    assert {"path", "content_type", "charset", "transfer_encoding", "links", "skipped", "pixel", "html_size"} <= \
        set(part)
    assert part["pixel"]["url"].startswith("http://t.example.com/o/")
    json.dumps(out.report)


# --- dry run -----------------------------------------------------------------------------------------------

@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "relay.toml"
    path.write_text(
        '[relay]\ndata_dir = "data"\n[tracking]\ndefault_host = "t.example.com"\nkeys_file = "data/keys"\n'
        "[configuration_sets.marketing]\nopen_tracking = true\nclick_tracking = true\n")
    return path


def relay(config_file, *args, stdin=b""):
    cmd = [sys.executable, "-m", "relay.cli", "instrument", "--config", str(config_file), "--recipient", "r@x.org",
           *args]
    return subprocess.run(cmd, input=stdin, capture_output=True, timeout=60)


def test_dry_run_writes_message_and_report(config_file, tmp_path):
    report = tmp_path / "report.json"
    raw = message(b'<body><a href="https://x.example/">x</a></body>').replace(b"\r\n", b"\n")
    r = relay(config_file, "--config-set", "marketing", "--report-json", str(report), "--message-id", MID, stdin=raw)
    assert r.returncode == 0, r.stderr
    assert b"\r\nMessage-ID: <" + MID.encode() + b"@" in r.stdout
    data = json.loads(report.read_text())
    (link,) = data["parts"][0]["links"]
    assert link["original"] == "https://x.example/" and link["tracking"].encode() in r.stdout
    assert data["parts"][0]["pixel"]["url"].encode() in r.stdout


def test_dry_run_unknown_set(config_file):
    r = relay(config_file, "--config-set", "nope", stdin=b"Subject: x\r\n\r\nx")
    assert r.returncode != 0
    assert b"Configuration Set does not exist: Configuration set <nope> does not exist." in r.stderr


def test_qp_lines_without_changes_keep_their_original_encoding():
    from relay.core.mime import encode_qp

    lines = [b"<p>line %d caf\xc3\xa9 " % i + b"x" * (i % 90) + b"</p>" for i in range(200)]
    lines[120] = b'<p><a href="https://x.example/?a=1&amp;b=2">link</a> ' + b"y" * 100 + b"</p>"
    doc = b"\r\n".join(lines) + b"\r\n"
    encoded = encode_qp(doc).replace(b"=C3=A9", b"=c3=a9")  # an encoder's own spelling, to be kept
    raw = message(encoded, cte="quoted-printable")
    out = copy(raw, CLICK)
    (link,) = links(out)
    got = out.data.split(b"\r\n\r\n", 1)[1]
    assert got.startswith(encoded[:encoded.index(b"<p><a href")])
    assert got.endswith(encoded[encoded.index(b"<p>line 121"):])
    assert html_of(out.data) == doc.replace(b"https://x.example/?a=1&amp;b=2", link["tracking"].encode())
    assert all(len(x) <= 76 for x in got.split(b"\r\n"))


# RFC 3986 validity spelled out in two steps (the shape, then the allowed characters outside an IP literal): the
# reference the engine's single regex must agree with.
URL_CHARS = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/?#%\u00a0-\ud7ff\ue000-\U0010ffff]*")
URL_SHAPE = re.compile(r"https?://(?:[^/?#@]*@)?(\[[0-9A-Fa-f:.vV]+\]|[^/?#:@\[\]]+)(:[0-9]*)?(?:[/?#].*)?",
                       re.I | re.S)


def reference_valid_url(url: str) -> tuple | None:
    m = URL_SHAPE.fullmatch(url)
    if m is None or url.count("#") > 1 or re.search(r"%(?![0-9A-Fa-f]{2})", url):
        return None
    if not url.isascii() and any(c.isspace() or c in "\u200b\ufeff" for c in url):
        return None
    rest = url[:m.start(1)] + url[m.end(1):] if m.group(1).startswith("[") else url
    return (m.group(1), m.group(2)) if URL_CHARS.fullmatch(rest) else None


URL_PIECES = ["x.example", "a", "/", "?", "#", ":", ":80", "@", "u:p@", "%2F", "&", "-", "'", "\u00e9", "\u212a",
              "\u017f", "K"] * 3 + ["[::1]", "[v1.x]", "[", "]", "%", "%zz", "\u00a0", " ", "\u200b", "\n", "<", "{",
                                   "|", "\U0001F600", "^", "\\", "http://", "HTTPS://"]


@settings(max_examples=1500)
@given(st.sampled_from(["http://", "https://", "HTTP://", ""]), st.lists(st.sampled_from(URL_PIECES), max_size=10))
def test_url_validity_matches_rfc_3986_spelled_out(scheme, pieces):
    url = scheme + "".join(pieces)
    m = core._valid_url(url)
    assert (None if m is None else (m.group(1), m.group(2))) == reference_valid_url(url)
