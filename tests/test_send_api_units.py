"""The sending API's pure parts: pipeline refusals as SES errors, bulk statuses per protocol, tags and headers
checked as SES's model constrains them, the body limit derived from the raw message limit."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from relay.api import send
from relay.api.errors import v1_error, v2_error
from relay.api.sending import refusal_error
from relay.config import ApiSettings
from relay.core import events as ev
from relay.sets import SesError


def test_pipeline_refusals_become_ses_errors():
    unknown = refusal_error("554 Configuration Set does not exist: Configuration set <x> does not exist.")
    assert (unknown.code, unknown.message) == ("ConfigurationSetDoesNotExist", "Configuration set <x> does not exist.")
    virus = refusal_error("554 5.7.1 Message rejected: Bad content: virus Eicar found")
    assert (virus.code, virus.message) == ("MessageRejected", "Bad content: virus Eicar found")
    later = refusal_error("451 4.7.1 Temporary failure: virus scan unavailable")
    assert later.code == "ServiceUnavailable"
    assert v1_error(later.code, later.message).status == 503 and v2_error(later.code, later.message).status == 503
    assert v2_error("MessageRejected", "m").code == "MessageRejected"  # v2 models it under its own name
    assert v2_error("ConfigurationSetDoesNotExist", "m").code == "NotFoundException"
    assert v2_error("TemplateDoesNotExist", "m").status == 404
    assert v2_error("InvalidParameterValue", "m").code == "BadRequestException"


def test_bulk_statuses_in_both_spellings():
    assert send.bulk_status(None) == "SUCCESS"
    for code, v2, v1 in (("MessageRejected", "MESSAGE_REJECTED", "MessageRejected"),
                         ("TemplateDoesNotExist", "TEMPLATE_NOT_FOUND", "TemplateDoesNotExist"),
                         ("InvalidParameterValue", "INVALID_PARAMETER", "InvalidParameterValue"),
                         ("ConfigurationSetDoesNotExist", "CONFIGURATION_SET_NOT_FOUND",
                          "ConfigurationSetDoesNotExist"),
                         ("Whatever", "FAILED", "Failed")):
        status = send.bulk_status(SesError(code, "m"))
        assert status == v2 and send.BULK_STATUS_V1[status] == v1


def test_tags_and_headers_as_the_model_constrains_them():
    assert send.tags([{"Name": "campaign", "Value": "spring"}, {"Name": "team", "Value": "ops"}], "t") == {
        "campaign": ["spring"], "team": ["ops"]}
    assert send.tags(None, "t") is None
    with pytest.raises(SesError) as exc:
        send.tags([{"Name": "a b", "Value": "x"}], "t")
    assert exc.value.code == "MessageRejected"
    with pytest.raises(SesError) as exc:
        send.tags([{"Name": "ok"}], "emailTags")
    assert exc.value.code == "ValidationError" and "'emailTags.1.member.value'" in exc.value.message
    assert send.header_list([{"Name": "X-A", "Value": "1"}], "h") == (("X-A", "1"),)
    for bad in ([{"Name": "X:A", "Value": "1"}], [{"Name": "X-A", "Value": "caf\u00e9"}],
                [{"Name": "Subject", "Value": "twice"}], [{"Name": f"X-{i}", "Value": "v"} for i in range(16)]):
        with pytest.raises(SesError):
            send.header_list(bad, "h")


def test_base64_and_addresses():
    assert send.base64_data("aGVsbG8=", "d") == b"hello"
    for bad in ("not base64!", "aGVsbG8"):
        with pytest.raises(SesError) as exc:
            send.base64_data(bad, "rawMessage.data")
        assert exc.value.code == "InvalidParameterValue" and "rawMessage.data" in exc.value.message
    with pytest.raises(SesError) as exc:
        send.address_list(["ok@example.org", "nodomain"], "destination.toAddresses")
    assert exc.value.message == "Missing final '@domain'"
    dest = send.Destination(["A <a@example.org>"], ["b@example.org"], ["a@example.org", "c@example.org"])
    assert dest.recipients() == ["a@example.org", "b@example.org", "c@example.org"]


def test_the_request_body_limit_follows_the_raw_message_limit():
    assert ApiSettings(max_raw_message_size=40 * 1024 * 1024).max_body == 61 * 1024 * 1024
    assert ApiSettings(max_raw_message_size=1000).max_body == 1500 + 1024 * 1024


def test_a_rendering_failure_has_ses_fields():
    reference = Path(os.environ.get("RELAY_REFERENCE", Path(__file__).resolve().parents[2] / "shared" / "reference"))
    path = reference / "ses-events" / "rendering-failure.json"
    if not path.is_file():
        pytest.skip(f"SES's example not found at {path} (set RELAY_REFERENCE)")
    example = json.loads(path.read_text())
    mail = ev.mail_object(ev.MailFacts("0100abc-000000", 1_516_646_586_197, "sender@example.com",
                                       ["recipient@example.com"], [], configuration_set="ConfigSet"))
    ours = ev.rendering_failure_record(mail, "MyTemplate",
                                       "Attribute 'attributeName' is not present in the rendering data.")
    assert set(ours) == set(example) and ours["failure"] == example["failure"]
    assert set(example["mail"]) <= set(ours["mail"]) and "headers" not in ours["mail"]
