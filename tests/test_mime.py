import binascii
import email
import email.policy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.core import mime

MULTI = (
    b"From: a@example.com\r\n"
    b"Content-Type: multipart/mixed; boundary=\"outer\"\r\n"
    b"\r\n"
    b"preamble\r\n"
    b"--outer\r\n"
    b"Content-Type: multipart/alternative; boundary=inner\r\n"
    b"\r\n"
    b"--inner\r\n"
    b"Content-Type: text/plain\r\n"
    b"\r\n"
    b"plain\r\n"
    b"--inner\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"\r\n"
    b"<a href=3D\"http://x.example/\">x</a>\r\n"
    b"--inner--\r\n"
    b"--outer\r\n"
    b"Content-Type: message/rfc822\r\n"
    b"\r\n"
    b"Content-Type: text/html\r\n\r\n<p>inner</p>\r\n"
    b"--outer\r\n"
    b"Content-Type: text/html\r\n"
    b"Content-Disposition: attachment; filename=a.html\r\n"
    b"\r\n"
    b"<p>att</p>\r\n"
    b"--outer--\r\n"
    b"epilogue\r\n"
)


def test_tree_paths_types_and_offsets():
    root = mime.parse(MULTI)
    got = [(p.path, p.content_type) for p in mime.leaves(root)]
    assert got == [("1.1.1", "text/plain"), ("1.1.2", "text/html"), ("1.2", "message/rfc822"), ("1.3", "text/html")]
    html = [p for p in mime.leaves(root)][1]
    assert MULTI[html.body_start:html.body_end] == b'<a href=3D"http://x.example/">x</a>'
    assert html.cte == "quoted-printable" and html.charset == "utf-8"


def test_protected_and_attachment_flags():
    leaves = list(mime.leaves(mime.parse(MULTI)))
    assert leaves[2].protected and not leaves[2].children  # never descended into
    assert leaves[3].is_attachment


def test_bodies_match_the_email_package():
    msg = email.message_from_bytes(MULTI, policy=email.policy.compat32)
    ours = [p for p in mime.leaves(mime.parse(MULTI)) if p.content_type == "text/html"]
    theirs = [p for p in msg.walk() if p.get_content_type() == "text/html"]
    assert mime.decode_body(MULTI[ours[0].body_start:ours[0].body_end], ours[0].cte) == \
        theirs[0].get_payload(decode=True)


def test_consecutive_boundaries_open_one_part():
    raw = (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nx\r\n"
           b"--b\r\n--b\r\nContent-Type: text/html\r\n\r\n<p>y</p>\r\n--b--\r\n")
    assert [p.content_type for p in mime.leaves(mime.parse(raw))] == ["text/plain", "text/html"]


def test_missing_close_boundary_runs_to_end_less_the_final_line_end():
    raw = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/html\r\n\r\n<p>y</p>\r\n\r\n"
    (leaf,) = mime.leaves(mime.parse(raw))
    assert raw[leaf.body_start:leaf.body_end] == b"<p>y</p>\r\n"


def test_no_boundary_found_is_a_leaf():
    raw = b"Content-Type: multipart/mixed; boundary=zz\r\n\r\nno parts here\r\n"
    root = mime.parse(raw)
    assert root.multipart and list(mime.leaves(root)) == [root]


def test_digest_children_default_to_message():
    raw = (b"Content-Type: multipart/digest; boundary=d\r\n\r\n--d\r\n\r\nSubject: x\r\n\r\nbody\r\n--d--\r\n")
    (leaf,) = mime.leaves(mime.parse(raw))
    assert leaf.content_type == "message/rfc822" and leaf.protected


def test_body_without_separator_starts_at_first_non_header_line():
    raw = b"Content-Type: text/html\r\n<p>no blank line</p>\r\n"
    root = mime.parse(raw)
    assert raw[root.body_start:] == b"<p>no blank line</p>\r\n"


@pytest.mark.parametrize("data", [
    b"", b"abc", b"a \r\nb\t\r\n", b"x" * 300, b"caf\xc3\xa9 =\r\n", b"bare\nlf\rcr\r\n", b"end with space ",
    b".\r\nFrom me\r\n", bytes(range(256)),
    b"x" * 73 + b"ab \r\n", b"x" * 74 + b" \r\n" + b"y" * 74 + b"\t",
    b"a\nb" + b"x=" * 60, b"<td>\n" + b"y" * 74 + b">\n<tr>" * 30,  # bare LF: encoded line by line
])
def test_qp_round_trips_and_keeps_lines_short(data):
    enc = mime.encode_qp(data)
    assert binascii.a2b_qp(enc) == data
    assert all(len(line) <= 76 for line in enc.split(b"\r\n"))
    assert b"\n" not in enc.replace(b"\r\n", b"")


def test_base64_lines_and_final_newline():
    enc = mime.encode_base64(b"x" * 200, True)
    assert enc.endswith(b"\r\n") and all(len(x) <= 76 for x in enc.split(b"\r\n"))
    assert binascii.a2b_base64(enc.replace(b"\r\n", b"")) == b"x" * 200


def test_malformed_base64_is_refused():
    with pytest.raises(mime.EncodingError):
        mime.decode_body(b"PGh0bWw+==garbage", "base64")


def test_long_identity_lines_switch_to_qp():
    body, cte = mime.encode_body(b"a" * 1200, "8bit", b"")
    assert cte == "quoted-printable" and binascii.a2b_qp(body) == b"a" * 1200
    assert mime.encode_body(b"short", "7bit", b"") == (b"short", None)


def test_set_cte_replaces_or_adds_the_field():
    raw = b"Content-Type: text/html\r\nContent-Transfer-Encoding: 8bit\r\n\r\nx"
    root = mime.parse(raw)
    s, e, new = mime.set_cte(raw, root, "quoted-printable")
    assert mime.splice(raw, [(s, e, new)]).startswith(
        b"Content-Type: text/html\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n")
    raw2 = b"Content-Type: text/html\r\n\r\nx"
    edit = mime.set_cte(raw2, mime.parse(raw2), "quoted-printable")
    assert mime.splice(raw2, [edit]) == \
        b"Content-Type: text/html\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nx"


def test_splice_keeps_everything_else():
    assert mime.splice(b"0123456789", [(6, 8, b"X"), (1, 2, b"")]) == b"02345X89"


@given(st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"a", b" "]), max_size=12).map(b"".join))
def test_crlf_only_means_every_line_break_is_crlf(data):
    assert mime.crlf_only(data) == (data.count(b"\r") == data.count(b"\n") == data.count(b"\r\n"))


QP_PIECES = st.sampled_from([b"\r\n", b" ", b"\t", b"=", b"x" * 70, b"abc", b"\xc3\xa9", b"\x00", b"\x7f", b"=3D",
                             b".", b"<a href=\"https://x.example/?a=1&amp;b=2\">", b"\xff" * 3, b" \r\n", b"\t\r\n"])


@settings(max_examples=500, deadline=None)
@given(st.lists(QP_PIECES, max_size=60).map(b"".join))
def test_qp_by_bytes_operations_round_trips_and_keeps_lines_short(data):
    """Mostly-ASCII CRLF text is escaped and wrapped by bytes operations rather than binascii's loop; either way the
    result decodes to the input, keeps every line within 76 characters and has no bare CR or LF."""
    enc = mime.encode_qp(data)
    assert binascii.a2b_qp(enc) == data
    assert all(len(line) <= 76 for line in enc.split(b"\r\n"))
    assert b"\n" not in enc.replace(b"\r\n", b"") and b"\r" not in enc.replace(b"\r\n", b"")
    assert not any(line.endswith((b" ", b"\t")) for line in enc.split(b"\r\n"))
