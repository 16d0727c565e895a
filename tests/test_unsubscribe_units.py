"""The pure one-click unsubscribe header function (relay.core.unsubscribe) and its use by the Instrumenter."""

from __future__ import annotations

import email
import email.policy

import pytest

from relay.core import tokens
from relay.core.headers import split_header_block
from relay.core.settings import TrackingSettings
from relay.core.unsubscribe import add_list_unsubscribe, unsubscribe_fields
from relay.instrument import Instrumenter

URL = "https://t.example.com/u/" + "A" * 70
MAILTO = "unsub+" + "b" * 55 + "@bounces.example.com"
MESSAGE = (b"Received: from app ([192.0.2.1])\r\n\tby relay.test; Mon, 23 Nov 2026 02:00:00 +0000\r\n"
           b"From: News <news@example.com>\r\nTo: ann@example.org\r\nSubject: Sale\r\n"
           b"  folded subject\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
           b"Hello  \r\n\r\nList-Unsubscribe: in the body is not a header\r\n")
KEYRING = tokens.Keyring((tokens.SigningKey("k1", b"s" * 32),))
MID = "0100018c1a2b3c4d-05e008de-024e-4226-841e-98f0e0d61bb1-000000"


def _added(out: bytes, original: bytes) -> bytes:
    """The bytes `out` has beyond `original`, checking that everything else is byte for byte the same."""
    head, _, _ = original.partition(b"\r\n\r\n")
    assert out.startswith(head + b"\r\n") and out.endswith(original[len(head) + 2:])
    return out[len(head) + 2:len(out) - len(original) + len(head) + 2]


def test_fields_are_appended_to_the_header_block_and_nothing_else_changes():
    out = add_list_unsubscribe(MESSAGE, URL, MAILTO)
    added = _added(out, MESSAGE)
    assert added == (f"List-Unsubscribe: <{URL}>,\r\n <mailto:{MAILTO}>\r\n"
                     "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n").encode()
    parsed = email.message_from_bytes(out, policy=email.policy.default)
    assert parsed["List-Unsubscribe"] == f"<{URL}>, <mailto:{MAILTO}>"
    assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert parsed.get_content().replace("\r\n", "\n") == "Hello  \n\nList-Unsubscribe: in the body is not a header\n"


def test_folding_at_the_comma_keeps_lines_to_78_and_urls_whole():
    short = add_list_unsubscribe(MESSAGE, "https://t.example/u/x", "unsub+y@b.example")
    assert b"List-Unsubscribe: <https://t.example/u/x>, <mailto:unsub+y@b.example>\r\n" in short
    # Relay's URIs are longer than 78 alone (the tokens): one per line, never broken inside
    field = unsubscribe_fields(URL, MAILTO)
    lines = field.split(b"\r\n")[:-1]
    assert lines == [f"List-Unsubscribe: <{URL}>,".encode(), f" <mailto:{MAILTO}>".encode(),
                     b"List-Unsubscribe-Post: List-Unsubscribe=One-Click"]
    mid = unsubscribe_fields("https://t.example/u/" + "x" * 30, "unsub+y@b.example").split(b"\r\n")
    assert len(mid[0]) <= 78 and len(mid[1]) <= 78 and mid[1].startswith(b" <mailto:")
    assert split_header_block(field + b"\r\n").fields[0].value == f"<{URL}>, <mailto:{MAILTO}>"


def test_no_mailto_without_a_bounce_domain():
    added = _added(add_list_unsubscribe(MESSAGE, URL, None), MESSAGE)
    assert added == f"List-Unsubscribe: <{URL}>\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n".encode()


def test_an_http_url_gets_no_post_field():
    # RFC 8058 3.1: one-click needs an HTTPS URI; over http the URL still serves RFC 2369 (the GET page)
    added = _added(add_list_unsubscribe(MESSAGE, "http://t.example/u/x", None), MESSAGE)
    assert added == b"List-Unsubscribe: <http://t.example/u/x>\r\n"


@pytest.mark.parametrize("own", [b"List-Unsubscribe: <mailto:leave@example.com>\r\n",
                                 b"list-unsubscribe:\r\n <https://app.example/u/1>\r\n",
                                 b"LIST-UNSUBSCRIBE-POST: List-Unsubscribe=One-Click\r\n"])
def test_the_applications_own_fields_are_kept_and_nothing_added(own):
    raw = MESSAGE.replace(b"MIME-Version", own + b"MIME-Version")
    assert add_list_unsubscribe(raw, URL, MAILTO) is None


def test_lf_only_input_gets_lf_fields_and_stays_byte_identical():
    lf = MESSAGE.replace(b"\r\n", b"\n")
    out = add_list_unsubscribe(lf, URL, MAILTO)
    assert b"\r" not in out
    assert out == add_list_unsubscribe(MESSAGE, URL, MAILTO).replace(b"\r\n", b"\n")
    assert add_list_unsubscribe(lf.replace(b"MIME", b"List-Unsubscribe: <x>\nMIME"), URL, None) is None


def test_header_only_message_and_missing_blank_line():
    header_only = b"From: a@example.com\r\nSubject: x\r\n\r\n"
    assert add_list_unsubscribe(header_only, URL, None) == header_only[:-2] + unsubscribe_fields(URL, None) + b"\r\n"
    # A line that is no field ends the block for the email package: ours go after the trace fields, so no
    # verifier reads that line as a continuation of them.
    malformed = b"Received: x\r\nFrom: a@example.com\r\nthis is the body\r\n"
    out = add_list_unsubscribe(malformed, URL, None)
    assert out == b"Received: x\r\n" + unsubscribe_fields(URL, None) + malformed[len(b"Received: x\r\n"):]
    with pytest.raises(ValueError):
        add_list_unsubscribe(b"Received: x", URL, None)  # no line break to add a field after


@pytest.mark.parametrize("url", ["https://t.example/u/a b", "https://t.example/u/>", "https://t.example/\r\nX: y",
                                 "https://t.éxample/u/x"])
def test_urls_that_cannot_be_a_header_value_are_refused(url):
    with pytest.raises(ValueError):
        add_list_unsubscribe(MESSAGE, url, None)


def _settings(**kw) -> TrackingSettings:
    return TrackingSettings(host="t.example.com", list_unsubscribe=True, **kw)


def test_instrumenter_adds_signed_url_and_mailto_even_without_tracking():
    keyring = KEYRING
    inst = Instrumenter(keyring)
    settings = _settings(return_path_domain="bounces.example.com")
    assert not settings.enabled  # no open or click tracking: the copy still gets the fields
    copy = inst.copy(MID, MESSAGE, settings, "ann@example.org", 1_700_000_000, position=0)
    assert copy.changed and copy.report["list_unsubscribe"] == "added" and not copy.warnings
    field = split_header_block(copy.data).get("list-unsubscribe").value
    url, mailto = (part.strip(" <>") for part in field.split(","))
    token = url.removeprefix("https://t.example.com/u/")
    assert tokens.verify(keyring, token) == tokens.UnsubscribeClaims(MID, "ann@example.org", 1_700_000_000)
    assert tokens.verify_address(keyring, mailto.removeprefix("mailto:")) == tokens.AddressClaims("unsub", MID, 0)
    off = inst.copy(MID, MESSAGE, TrackingSettings(host="t.example.com"), "ann@example.org", 1_700_000_000)
    assert off.data is MESSAGE and not off.changed


def test_instrumenter_keeps_the_applications_header_and_survives_failures():
    inst = Instrumenter(KEYRING)
    own = MESSAGE.replace(b"MIME-Version", b"List-Unsubscribe: <https://app.example/u>\r\nMIME-Version")
    kept = inst.copy(MID, own, _settings(), "ann@example.org", 1)
    assert kept.data == own and not kept.changed and kept.report["list_unsubscribe"] == "kept the message's own"
    # a message id the mailto token cannot carry: the copy goes out without the fields, with a warning
    failed = inst.copy("not-an-ses-id", MESSAGE, _settings(return_path_domain="b.example.com"), "ann@example.org", 1)
    assert failed.data == MESSAGE and failed.warnings and "List-Unsubscribe not added" in failed.warnings[0]
