"""What an event destination sends, as bytes (pure): the SES record, its SNS envelope, the HMAC header.

The record is sent exactly as stored in `events.record` (SES's JSON), so a webhook receiver sees the bytes
SQLite holds. With `sns_envelope` the record travels as the string `Message` of an SNS Notification, the way
SES publishes through SNS, so SES/SNS consumers work unchanged; relay cannot produce AWS's SNS signature, so
receivers authenticate with `X-Relay-Signature` instead.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid

SIGNATURE_HEADER = "X-Relay-Signature"
EVENT_ID_HEADER = "X-Relay-Event-Id"
SNS_SUBJECT = "Amazon SES Email Event Notification"
_NAMESPACE = uuid.UUID("7f5a3c1e-2b9d-4c8e-9a61-0d3f5b7e9c21")


def jsonl_line(record_json: str) -> bytes:
    """One JSON Lines line: the record as stored (compact, no newlines inside), then LF."""
    return record_json.encode("utf-8") + b"\n"


def topic_arn(region: str, account_id: str, set_name: str, destination: str, configured: str = "") -> str:
    return configured or f"arn:aws:sns:{region}:{account_id}:{set_name}-{destination}"


def sns_message_id(set_name: str, destination: str, event_id: int) -> str:
    """Stable per event and destination, so a retried notification carries the same MessageId (dedup key)."""
    return str(uuid.uuid5(_NAMESPACE, f"{set_name}/{destination}/{event_id}"))


def sns_envelope(record_json: str, message_id: str, arn: str, timestamp: str) -> bytes:
    envelope = {
        "Type": "Notification",
        "MessageId": message_id,
        "TopicArn": arn,
        "Subject": SNS_SUBJECT,
        "Message": record_json,
        "Timestamp": timestamp,
    }
    return json.dumps(envelope, separators=(",", ":")).encode("utf-8")


def signature(secret: str, body: bytes) -> str:
    """`sha256=<hex>`: HMAC-SHA256 of the exact body with the destination's secret."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, header: str) -> bool:
    return hmac.compare_digest(signature(secret, body), header or "")


def webhook_request(record_json: str, *, event_id: int, set_name: str, destination: str, secret: str,
                    sns: bool, arn: str, timestamp: str) -> tuple[bytes, dict[str, str]]:
    """Body and headers of one webhook POST."""
    if sns:
        mid = sns_message_id(set_name, destination, event_id)
        body = sns_envelope(record_json, mid, arn, timestamp)
        headers = {"Content-Type": "text/plain; charset=UTF-8", "x-amz-sns-message-type": "Notification",
                   "x-amz-sns-message-id": mid, "x-amz-sns-topic-arn": arn}
    else:
        body = record_json.encode("utf-8")
        headers = {"Content-Type": "application/json"}
    headers[EVENT_ID_HEADER] = str(event_id)
    if secret:
        headers[SIGNATURE_HEADER] = signature(secret, body)
    return body, headers


def classify(status: int) -> str:
    """`ok` (2xx), `retry` (408, 429, 5xx and anything odd) or `refused` (other 4xx: the receiver says this
    request is wrong; resending it forever would hold up every later event)."""
    if 200 <= status < 300:
        return "ok"
    if 400 <= status < 500 and status not in (408, 429):
        return "refused"
    return "retry"


def backoff(attempt: int, initial: float, maximum: float) -> float:
    """Delay before retry number `attempt` (1-based): initial, 2x, 4x, ... capped."""
    return min(maximum, initial * (2 ** max(0, attempt - 1)))
