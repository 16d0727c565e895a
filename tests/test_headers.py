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
