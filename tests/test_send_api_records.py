"""Event records as SES writes them, found wrong by testing with real clients: relay as a subprocess, a real
upstream, SMTP and boto3 against it. One Send per message; commonHeaders.messageId and a Date added at acceptance;
feedbackId in SES's format; ses:caller-identity for a trusted client without AUTH; ses:outgoing-ip on Delivery;
v2's UnrecognizedClientException; a tracking-options PUT with only HttpsPolicy.
"""

from __future__ import annotations

import email
import email.policy
import email.utils
import json
import re
import smtplib

import pytest
from botocore.exceptions import ClientError

from .test_api import REGION, SECRET, Env, code_of
from .test_destinations import wait_until
from .test_send_api import send_env

SES_ID = re.compile(r"^[0-9a-f]{16}-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}-000000$")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with send_env(tmp_path_factory.mktemp("records")) as e:
        yield e


def smtp_send(env: Env, data: bytes, recipients: list[str]) -> str:
    with smtplib.SMTP("127.0.0.1", env.relay.smtp_port, timeout=30) as client:
        client.ehlo("client.test")
        client.mail("news@example.com")
        for r in recipients:
            client.rcpt(r)
        code, reply = client.data(data)
    assert code == 250, reply
    return re.match(rb"Ok (\S+)$", reply).group(1).decode()


def records(env: Env, event_type: str, message_id: str) -> list[tuple[str | None, dict]]:
    return [(row[2], json.loads(row[4])) for row in env.relay.events(event_type) if row[1] == message_id]


PLAIN = b"From: News <news@example.com>\r\nTo: a@example.org\r\nSubject: Hi\r\n\r\nHello\r\n"


def test_one_send_per_message_listing_every_recipient(env):
    rcpts = ["a@example.org", "b@example.org", "c@example.org"]
    seen = len(env.upstream.messages)
    message_id = smtp_send(env, PLAIN, rcpts)
    env.upstream.wait_for(seen + 3)
    sends = records(env, "Send", message_id)
    assert len(sends) == 1
    recipient, record = sends[0]
    assert recipient is None and record["mail"]["destination"] == rcpts and record["send"] == {}


def test_common_headers_message_id_and_a_date_added_at_acceptance(env):
    seen = len(env.upstream.messages)
    message_id = smtp_send(env, PLAIN, ["a@example.org"])
    delivered = email.message_from_bytes(env.upstream.wait_for(seen + 1)[-1].data, policy=email.policy.default)
    (_, send), = records(env, "Send", message_id)
    common = send["mail"]["commonHeaders"]
    assert common["messageId"] == message_id == send["mail"]["messageId"]  # SES's id, as SES writes it
    # The copy carries a Date the client did not write, the same one the event shows.
    assert delivered["Date"] is not None and common["date"] == str(delivered["Date"])
    assert abs(email.utils.parsedate_to_datetime(common["date"]).timestamp()
               - email.utils.parsedate_to_datetime(delivered["Date"]).timestamp()) < 1
    assert {"name": "Date", "value": common["date"]} in send["mail"]["headers"]
    assert not any(h["name"] == "Message-ID" for h in send["mail"]["headers"])  # relay's, not the client's
    # The client's own Date and Message-ID are kept as written.
    own = b"Date: Mon, 07 Dec 2026 10:00:00 +0000\r\nMessage-ID: <own-1@example.com>\r\n" + PLAIN
    message_id = smtp_send(env, own, ["a@example.org"])
    (_, send), = records(env, "Send", message_id)
    assert send["mail"]["commonHeaders"]["date"] == "Mon, 07 Dec 2026 10:00:00 +0000"
    assert send["mail"]["commonHeaders"]["messageId"] == "<own-1@example.com>"


def test_feedback_id_in_ses_format(env):
    env.upstream.handler.refuse.add("gone@example.org")
    message_id = smtp_send(env, PLAIN, ["gone@example.org"])
    wait_until(lambda: records(env, "Bounce", message_id), what="the Bounce")
    (_, bounce), = records(env, "Bounce", message_id)
    assert SES_ID.match(bounce["bounce"]["feedbackId"]), bounce["bounce"]["feedbackId"]


def test_caller_identity_of_a_trusted_client_without_auth_and_outgoing_ip(env):
    seen = len(env.upstream.messages)
    message_id = smtp_send(env, PLAIN, ["a@example.org"])
    env.upstream.wait_for(seen + 1)
    (_, send), = records(env, "Send", message_id)
    assert send["mail"]["tags"]["ses:caller-identity"] == ["127.0.0.1"]
    assert "ses:outgoing-ip" not in send["mail"]["tags"]
    wait_until(lambda: records(env, "Delivery", message_id), what="the Delivery")
    (_, delivery), = records(env, "Delivery", message_id)
    assert delivery["mail"]["tags"]["ses:outgoing-ip"] == ["127.0.0.1"]
    assert delivery["mail"]["tags"]["ses:caller-identity"] == ["127.0.0.1"]


def test_an_unknown_key_is_unrecognized_in_v2_and_invalid_in_v1(env):
    with pytest.raises(ClientError) as exc:
        env.client("sesv2", key="AKIDUNKNOWN").list_configuration_sets()
    assert code_of(exc) == "UnrecognizedClientException"
    assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    with pytest.raises(ClientError) as exc:
        env.client("ses", key="AKIDUNKNOWN").list_configuration_sets()
    assert code_of(exc) == "InvalidClientTokenId"
    assert env.client("sesv2", secret=SECRET, region=REGION).list_configuration_sets() is not None


def test_a_tracking_put_with_only_an_https_policy_invents_no_domain(env):
    v2 = env.client("sesv2")
    v2.create_configuration_set(ConfigurationSetName="policy-only")
    v2.put_configuration_set_tracking_options(ConfigurationSetName="policy-only", HttpsPolicy="OPTIONAL")
    assert v2.get_configuration_set(ConfigurationSetName="policy-only")["TrackingOptions"] == {
        "HttpsPolicy": "OPTIONAL"}
    v2.delete_configuration_set(ConfigurationSetName="policy-only")
