"""The pure parts of event publishing: bodies, SNS envelope, signature, retry policy."""

from __future__ import annotations

import hashlib
import hmac
import json

from relay.core import publish

RECORD = '{"eventType":"Send","mail":{"messageId":"m1"},"send":{}}'


def test_plain_body_is_the_record_and_the_signature_is_hmac_sha256_of_it():
    body, headers = publish.webhook_request(RECORD, event_id=7, set_name="s", destination="d", secret="k",
                                            sns=False, arn="", timestamp="2026-01-01T00:00:00.000Z")
    assert body == RECORD.encode()
    assert headers["X-Relay-Signature"] == "sha256=" + hmac.new(b"k", body, hashlib.sha256).hexdigest()
    assert headers["X-Relay-Event-Id"] == "7" and headers["Content-Type"] == "application/json"
    assert publish.verify("k", body, headers["X-Relay-Signature"]) and not publish.verify("x", body, "sha256=0")
    unsigned = publish.webhook_request(RECORD, event_id=7, set_name="s", destination="d", secret="", sns=False,
                                       arn="", timestamp="t")[1]
    assert "X-Relay-Signature" not in unsigned


def test_sns_envelope_carries_the_record_as_a_string_with_a_stable_message_id():
    arn = publish.topic_arn("eu-west-1", "123456789012", "s", "d")
    assert arn == "arn:aws:sns:eu-west-1:123456789012:s-d"
    first, headers = publish.webhook_request(RECORD, event_id=9, set_name="s", destination="d", secret="k",
                                             sns=True, arn=arn, timestamp="2026-01-01T00:00:00.000Z")
    again, _ = publish.webhook_request(RECORD, event_id=9, set_name="s", destination="d", secret="k", sns=True,
                                       arn=arn, timestamp="2026-01-01T00:00:05.000Z")
    env = json.loads(first)
    assert env["Type"] == "Notification" and env["Subject"] == "Amazon SES Email Event Notification"
    assert env["Message"] == RECORD and env["TopicArn"] == arn
    assert env["MessageId"] == json.loads(again)["MessageId"] == headers["x-amz-sns-message-id"]
    assert headers["x-amz-sns-message-type"] == "Notification"


def test_jsonl_line_and_retry_policy():
    assert publish.jsonl_line(RECORD) == RECORD.encode() + b"\n"
    assert [publish.classify(s) for s in (200, 204, 400, 404, 408, 429, 500, 503, 302)] == [
        "ok", "ok", "refused", "refused", "retry", "retry", "retry", "retry", "retry"]
    assert [publish.backoff(n, 1.0, 5.0) for n in (1, 2, 3, 4, 5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
