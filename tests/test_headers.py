import pytest

from relay.core.headers import HeaderError, extract_ses_control, parse_message_tags, split_header_block
from relay.core.intake import intake


def test_split_keeps_every_byte_including_folding():
    raw = b"Subject: a\r\n long\r\nFrom: x@y\r\nbogus line\r\n\r\nbody\r\n"
    block = split_header_block(raw)
    assert block.to_bytes() == raw
    assert [f.name for f in block.fields] == ["Subject", "From"]
    assert block.fields[0].value == "a long"


def test_ses_headers_removed_first_instance_wins():
    raw = (b"X-SES-CONFIGURATION-SET: marketing\r\nFrom: a@b.c\r\nX-SES-CONFIGURATION-SET: other\r\n"
           b"X-SES-MESSAGE-TAGS: campaign=spring, team=ops\r\n\r\nhi\r\n")
    block = split_header_block(raw)
    control = extract_ses_control(block)
    assert control.configuration_set == "marketing"
    assert control.tags == {"campaign": ["spring"], "team": ["ops"]}
    assert block.to_bytes() == b"From: a@b.c\r\n\r\nhi\r\n"


@pytest.mark.parametrize("value", ["a=b c", "a", "=b", "a=", "a.b=c", "a=b, c=d!"])
def test_bad_tags_are_refused_with_their_name(value):
    with pytest.raises(HeaderError):
        parse_message_tags(value)


def test_bad_config_set_name_is_unknown_set():
    block = split_header_block(b"X-SES-CONFIGURATION-SET: no spaces\r\n\r\n")
    with pytest.raises(HeaderError, match="does not exist"):
        extract_ses_control(block)


def test_intake_crlf_and_message_id_added_only_when_missing():
    out = intake(b"From: a@b.c\nSubject: s\n\nline\n", "a@b.c", "ID", "relay.test")
    assert out.raw == b"From: a@b.c\r\nSubject: s\r\nMessage-ID: <ID@relay.test>\r\n\r\nline\r\n"
    kept = intake(b"Message-ID: <app@x>\r\n\r\nb", "a@b.c", "ID", "relay.test")
    assert kept.raw == b"Message-ID: <app@x>\r\n\r\nb"


def test_a_non_header_line_ends_the_header_block_as_the_email_package_reads_it():
    raw = b"Subject: a\r\nHello, no colon here\r\nFrom: x@y\r\n\r\nbody\r\n"
    block = split_header_block(raw)
    assert [f.name for f in block.fields] == ["Subject"] and block.separator == b""
    assert block.body == b"Hello, no colon here\r\nFrom: x@y\r\n\r\nbody\r\n" and block.to_bytes() == raw
    rfc = split_header_block(raw, email_package_end=False)  # as DKIM verifiers read it: up to the empty line
    assert [f.name for f in rfc.fields] == ["Subject", "From"] and rfc.body == b"body\r\n"
    assert rfc.to_bytes() == raw


def test_message_id_goes_into_the_header_block_not_the_body():
    out = intake(b"Hello, I am an attachment!\r\n", "a@b.c", "ID", "relay.test")
    assert out.raw == b"Message-ID: <ID@relay.test>\r\nHello, I am an attachment!\r\n"
    from email import message_from_bytes
    assert message_from_bytes(out.raw).get_payload() == "Hello, I am an attachment!\r\n"


def test_a_sealed_container_keeps_its_header_block():
    signed = (b'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; boundary="b"\r\n\r\n'
              b"--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n--b--\r\n")
    assert intake(signed, "a@b.c", "ID", "relay.test").raw == signed
    wrapped = b"Content-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\nx\r\n"
    assert intake(wrapped, "a@b.c", "ID", "relay.test").raw == wrapped


def test_from_address_fast_path_agrees_with_the_email_package():
    """`a@b` and `Name <a@b>` skip getaddresses; every form must give what getaddresses gives."""
    import random
    from email.utils import getaddresses

    from relay.core import headers

    rng = random.Random(7)
    pieces = ["a", "b.c", "x@y.example", "<", ">", " ", "\r\n\t", '"', ",", "(c)", "=?utf-8?q?Z=C3=BC?=", "J.",
              "@", "news+tag", "Ex-ample", ";", ":", "\\", "é"]
    for _ in range(20000):
        value = "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 8)))
        block = headers.split_header_block(f"From: {value}\r\n\r\n".encode("utf-8", "surrogateescape"))
        field = block.get("from")
        expected = next((a.strip() for _, a in getaddresses([field.value]) if "@" in a), None) if field else None
        assert headers.from_address(block) == expected, value


def test_plain_envelope_addresses_are_quoted_as_aiosmtplib_quotes_them():
    from aiosmtplib.email import quote_address

    from relay.deliver import _quoted

    for address in ("a@b.example", "first.last+tag@sub.example.org", "bounce+abc234@b.example", "", "<a@b.c>",
                    "Name <a@b.c>", '"quoted"@b.example', "a@[127.0.0.1]", "a.@b.c"):
        assert _quoted(address) == quote_address(address), address
