"""Our event records have SES's structure (../shared/reference/ses-events), field for field."""

import json
from pathlib import Path

import pytest

from relay.core import events as ev
from relay.core.headers import split_header_block

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "ses-events"
RAW = (b"X-SES-CONFIGURATION-SET: ConfigSet\r\nX-SES-MESSAGE-TAGS: a=b\r\nFrom: Sender <sender@example.com>\r\n"
       b"To: recipient@example.com, Other <o@example.com>\r\nSubject: =?utf-8?q?caf=C3=A9?=\r\n"
       b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <m@example.com>\r\n\r\nbody")


def mail() -> dict:
    facts = ev.MailFacts(message_id=ev.mint_message_id(1_700_000_000_123), timestamp_ms=1_700_000_000_123,
                         source="sender@example.com", destination=["recipient@example.com"],
                         headers=split_header_block(RAW).fields, configuration_set="ConfigSet", tags={"a": ["b"]},
                         source_ip="192.0.2.1", from_domain="example.com", caller_identity="app")
    return ev.mail_object(facts)


def reference(name: str) -> dict:
    path = REFERENCE / f"{name}.json"
    if not path.exists():
        pytest.skip(f"reference examples not found at {REFERENCE}")
    return json.loads(path.read_text())


def keys(obj, prefix=""):
    """Every key path of a JSON object (lists by their first element)."""
    out = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            if prefix.rstrip(".").endswith(("tags", "linkTags")):  # user-chosen names
                continue
            out.add(prefix + k)
            out |= keys(v, prefix + k + ".")
    elif isinstance(obj, list) and obj:
        out |= keys(obj[0], prefix)
    return out


def test_message_id_format_and_timestamp():
    mid = ev.mint_message_id(0x18C1A2B3C4D)
    assert mid.startswith("0100018c1a2b3c4d-") and mid.endswith("-000000") and len(mid) == 60
    assert ev.iso_ms(1_700_000_000_123) == "2023-11-14T22:13:20.123Z"
    assert ev.ms_from_iso(ev.iso_ms(1_700_000_000_123)) == 1_700_000_000_123


def test_mail_object_matches_reference_structure():
    m = mail()
    ref = reference("send")["mail"]
    assert keys(ref) <= keys(m)
    assert m["commonHeaders"]["to"] == ["recipient@example.com", "Other <o@example.com>"]
    assert m["commonHeaders"]["subject"] == "caf\u00e9"
    assert m["headers"][0] == {"name": "X-SES-CONFIGURATION-SET", "value": "ConfigSet"}
    assert m["tags"]["ses:configuration-set"] == ["ConfigSet"] and m["tags"]["a"] == ["b"]


@pytest.mark.parametrize("name,record", [
    ("send", lambda m: ev.send_record(m)),
    ("delivery", lambda m: ev.delivery_record(m, "recipient@example.com", 1_700_000_001_000, "250 ok", "relay.test")),
    ("bounce", lambda m: ev.bounce_record(m, "recipient@example.com", 1_700_000_001_000, "Permanent", "General",
                                          "smtp; 550 5.1.1 unknown", "5.1.1", "relay.test")),
    ("deliverydelay", lambda m: ev.delay_record(m, "recipient@example.com", 1_700_000_001_000,
                                                "MailboxFull", "4.2.2", "smtp; 452 4.2.2 full", 1_700_086_400_000)),
    ("reject", lambda m: ev.reject_record(m)),
    ("open", lambda m: ev.open_record(m, 1_700_000_001_000, "192.0.2.1", "Mozilla/5.0")),
    ("click", lambda m: ev.click_record(m, 1_700_000_001_000, "192.0.2.1", "UA", "https://x.example/", {"k": ["v"]})),
])
def test_records_have_every_field_of_the_reference(name, record):
    ref, ours = reference(name), record(mail())
    assert ours["eventType"] == ref["eventType"]
    detail = ev.DETAIL_KEY[ref["eventType"]]
    missing = keys(ref[detail], detail + ".") - keys(ours[detail], detail + ".")
    assert not missing
    json.dumps(ours)  # serialisable


def test_delivery_processing_time():
    m = mail()
    rec = ev.delivery_record(m, "r@x", 1_700_000_001_123, "250 ok", "relay.test", "127.0.0.1")
    assert rec["delivery"]["processingTimeMillis"] == 1000 and rec["delivery"]["remoteMtaIp"] == "127.0.0.1"
