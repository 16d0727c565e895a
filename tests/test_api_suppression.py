"""The suppression list through SES v2's API with boto3 (`sesv2`) against relay as a subprocess, and a set's
SuppressionOptions deciding whether its mail reaches a listed address."""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta

import pytest

from . import test_api
from .test_suppression import cli, rows, send

env = test_api.env  # the relay with its API, as test_api.py runs it (its own instance for this module)

@pytest.fixture
def v2(env):
    client = env.client("sesv2")
    yield client
    for entry in client.list_suppressed_destinations()["SuppressedDestinationSummaries"]:  # each test starts empty
        with contextlib.suppress(client.exceptions.NotFoundException):
            client.delete_suppressed_destination(EmailAddress=entry["EmailAddress"])


def test_put_get_delete(env, v2):
    before = datetime.now(UTC) - timedelta(seconds=1)
    v2.put_suppressed_destination(EmailAddress="Person@Example.com", Reason="BOUNCE")
    got = v2.get_suppressed_destination(EmailAddress="person@example.com")["SuppressedDestination"]
    assert (got["EmailAddress"], got["Reason"]) == ("person@example.com", "BOUNCE")
    assert isinstance(got["LastUpdateTime"], datetime) and got["LastUpdateTime"] >= before
    assert got["Attributes"] == {}  # added by hand: no message
    v2.put_suppressed_destination(EmailAddress="person@example.com", Reason="COMPLAINT")
    assert v2.get_suppressed_destination(EmailAddress="PERSON@example.com")["SuppressedDestination"]["Reason"] in (
        "BOUNCE", "COMPLAINT")
    v2.delete_suppressed_destination(EmailAddress="person@example.com")  # every reason
    with pytest.raises(v2.exceptions.NotFoundException) as exc:
        v2.get_suppressed_destination(EmailAddress="person@example.com")
    assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    with pytest.raises(v2.exceptions.NotFoundException):
        v2.delete_suppressed_destination(EmailAddress="person@example.com")
    with pytest.raises(v2.exceptions.BadRequestException) as exc:
        v2.put_suppressed_destination(EmailAddress="person@example.com", Reason="SPAM")  # botocore sends it
    assert "BOUNCE" in exc.value.response["Error"]["Message"]
    with pytest.raises(v2.exceptions.BadRequestException):
        v2.put_suppressed_destination(EmailAddress="nobody", Reason="BOUNCE")


def test_a_bounce_recorded_by_relay_carries_its_message_and_feedback_ids(env, v2):
    env.upstream.handler.reply = "550 5.1.1 no such user"
    try:
        v2.create_configuration_set(ConfigurationSetName="lenient", SuppressionOptions={"SuppressedReasons": []})
        send(env.relay, ("bounced@example.org",), "lenient")  # no reasons: its bounces list no one ...
        env.relay.wait_events("Bounce", 1)
        assert not v2.list_suppressed_destinations()["SuppressedDestinationSummaries"]
        message_id = send(env.relay, ("bounced@example.org",))  # ... mail without a set: the account's reasons
        env.relay.wait_events("Bounce", 2)
    finally:
        env.upstream.handler.reply = None
    got = v2.get_suppressed_destination(EmailAddress="bounced@example.org")["SuppressedDestination"]
    feedback = json.loads(env.relay.events("Bounce")[1][4])["bounce"]["feedbackId"]
    assert got["Reason"] == "BOUNCE"
    assert got["Attributes"] == {"MessageId": message_id, "FeedbackId": feedback}


def test_list_filters_pages_and_relays_unsubscribe_reason(env, v2):
    for i in range(5):
        v2.put_suppressed_destination(EmailAddress=f"u{i}@example.net", Reason="BOUNCE" if i % 2 else "COMPLAINT")
    added = cli(env.relay.config_path, "add", "left@example.net", "--reason", "UNSUBSCRIBE")
    assert added.returncode == 0, added.stderr
    everything = v2.list_suppressed_destinations()["SuppressedDestinationSummaries"]
    assert [(e["EmailAddress"], e["Reason"]) for e in everything] == [
        ("left@example.net", "UNSUBSCRIBE"), ("u0@example.net", "COMPLAINT"), ("u1@example.net", "BOUNCE"),
        ("u2@example.net", "COMPLAINT"), ("u3@example.net", "BOUNCE"), ("u4@example.net", "COMPLAINT")]
    assert all(isinstance(e["LastUpdateTime"], datetime) for e in everything)
    bounces = v2.list_suppressed_destinations(Reasons=["BOUNCE"])["SuppressedDestinationSummaries"]
    assert [e["EmailAddress"] for e in bounces] == ["u1@example.net", "u3@example.net"]
    both = v2.list_suppressed_destinations(Reasons=["BOUNCE", "UNSUBSCRIBE"])["SuppressedDestinationSummaries"]
    assert len(both) == 3
    now = datetime.now(UTC)
    assert v2.list_suppressed_destinations(StartDate=now + timedelta(hours=1))["SuppressedDestinationSummaries"] \
        == []
    assert len(v2.list_suppressed_destinations(StartDate=now - timedelta(hours=1), EndDate=now + timedelta(hours=1))
               ["SuppressedDestinationSummaries"]) == 6
    assert v2.list_suppressed_destinations(EndDate=now - timedelta(hours=1))["SuppressedDestinationSummaries"] == []
    pages, token = [], None
    for _ in range(10):  # bounded: 6 entries, 4 a page
        kwargs = {"NextToken": token} if token else {}
        answer = v2.list_suppressed_destinations(PageSize=4, **kwargs)
        pages.append([e["EmailAddress"] for e in answer["SuppressedDestinationSummaries"]])
        token = answer.get("NextToken")
        if not token:
            break
    assert [len(p) for p in pages] == [4, 2]
    assert [a for p in pages for a in p] == [e["EmailAddress"] for e in everything]
    with pytest.raises(v2.exceptions.InvalidNextTokenException):
        v2.list_suppressed_destinations(NextToken="bm90LW91cnM")
    with pytest.raises(v2.exceptions.BadRequestException):
        v2.list_suppressed_destinations(Reasons=["SPAM"])
    with pytest.raises(v2.exceptions.BadRequestException):
        v2.list_suppressed_destinations(PageSize=0)


def _reasons(v2, name: str) -> list[str] | None:
    return v2.get_configuration_set(ConfigurationSetName=name).get("SuppressionOptions", {}).get("SuppressedReasons")


def test_set_suppression_options_decide_who_is_sent_to(env, v2):
    v2.create_configuration_set(ConfigurationSetName="opts", SuppressionOptions={"SuppressedReasons": ["COMPLAINT"]})
    assert _reasons(v2, "opts") == ["COMPLAINT"]
    assert _reasons(v2, "marketing") is None  # a file's set without suppression_reasons: the account's
    v2.put_suppressed_destination(EmailAddress="listed@example.org", Reason="BOUNCE")
    sent = len(env.upstream.messages)
    send(env.relay, ("listed@example.org",), "opts")  # BOUNCE does not stop this set's mail
    env.upstream.wait_for(sent + 1)
    v2.put_configuration_set_suppression_options(ConfigurationSetName="opts", SuppressedReasons=["BOUNCE"])
    assert _reasons(v2, "opts") == ["BOUNCE"]
    blocked = send(env.relay, ("listed@example.org",), "opts")  # the running relay follows at once
    assert rows(env.relay, "SELECT state FROM recipients WHERE message_id = ?", blocked) == [("bounced",)]
    v2.put_configuration_set_suppression_options(ConfigurationSetName="opts", SuppressedReasons=[])
    assert _reasons(v2, "opts") == []
    v2.put_configuration_set_suppression_options(ConfigurationSetName="opts")  # no reasons: the account's again
    assert _reasons(v2, "opts") is None
    with pytest.raises(v2.exceptions.NotFoundException):
        v2.put_configuration_set_suppression_options(ConfigurationSetName="nope", SuppressedReasons=["BOUNCE"])
    with pytest.raises(v2.exceptions.BadRequestException) as exc:
        v2.put_configuration_set_suppression_options(ConfigurationSetName="marketing", SuppressedReasons=["BOUNCE"])
    assert "read-only" in exc.value.response["Error"]["Message"]
    with pytest.raises(v2.exceptions.BadRequestException):
        v2.put_configuration_set_suppression_options(ConfigurationSetName="opts", SuppressedReasons=["SPAM"])
    # a deleted set takes its options with it
    v2.put_configuration_set_suppression_options(ConfigurationSetName="opts", SuppressedReasons=["COMPLAINT"])
    v2.delete_configuration_set(ConfigurationSetName="opts")
    v2.create_configuration_set(ConfigurationSetName="opts")
    assert _reasons(v2, "opts") is None
    v2.delete_configuration_set(ConfigurationSetName="opts")


def test_the_wire_format(env, v2):
    """What botocore parses leniently, checked on the wire: epoch seconds, SES's member names."""
    v2.put_suppressed_destination(EmailAddress="wire@example.org", Reason="COMPLAINT")
    request = urllib.request.Request(f"{env.endpoint}/v2/email/suppression/addresses/wire%40example.org")
    with pytest.raises(urllib.error.HTTPError) as exc:  # unsigned: refused before anything is read
        urllib.request.urlopen(request, timeout=10)
    assert exc.value.code in (400, 403)
    captured: list[dict] = []
    v2.meta.events.register("after-call.sesv2.GetSuppressedDestination",
                            lambda http_response, **_: captured.append(json.loads(http_response.content)))
    v2.get_suppressed_destination(EmailAddress="wire@example.org")
    got = captured[0]["SuppressedDestination"]
    assert set(got) == {"EmailAddress", "Reason", "LastUpdateTime", "Attributes"}
    assert isinstance(got["LastUpdateTime"], float)
    assert abs(got["LastUpdateTime"] - datetime.now(UTC).timestamp()) < 120
