"""SES event records (`../shared/reference/ses-events/*.json`) as plain data.

Every event of a message shares one `mail` object, built once at acceptance; each event type adds its own
object. Times are passed in (milliseconds since the epoch) so these functions stay pure.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

from relay.core.headers import HeaderField, common_headers

SES_ID_PREFIX = "0100"
# An SES message id (and feedbackId): 16 hex digits (a prefix and the time in ms), a UUID, -000000
SES_ID_FORMAT = re.compile(r"^[0-9a-f]{16}-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}-000000$")
HEADERS_LIMIT = 10 * 1024  # SES truncates mail.headers beyond 10 KB

SEND, REJECT, BOUNCE, COMPLAINT, DELIVERY = "Send", "Reject", "Bounce", "Complaint", "Delivery"
OPEN, CLICK, RENDERING_FAILURE, DELIVERY_DELAY, SUBSCRIPTION = (
    "Open", "Click", "Rendering Failure", "DeliveryDelay", "Subscription",
)
# eventType -> the key of its own object in the record
DETAIL_KEY = {
    SEND: "send", REJECT: "reject", BOUNCE: "bounce", COMPLAINT: "complaint", DELIVERY: "delivery",
    OPEN: "open", CLICK: "click", RENDERING_FAILURE: "failure", DELIVERY_DELAY: "deliveryDelay",
    SUBSCRIPTION: "subscription",
}


# Message ids must be unique, not secret (tokens are signed): a PRNG seeded once from the OS avoids a
# getrandom() system call per message.
_ids = random.Random(int.from_bytes(os.urandom(16), "big"))


def mint_message_id(now_ms: int, random_uuid: uuid.UUID | None = None) -> str:
    """A message id in SES's format: 4-hex prefix, 12-hex Unix milliseconds, a UUID, `-000000`."""
    u = random_uuid or uuid.UUID(int=_ids.getrandbits(128), version=4)
    return f"{SES_ID_PREFIX}{now_ms & 0xFFFFFFFFFFFF:012x}-{u}-000000"


_last_second: tuple[int, str] = (-1, "")  # the latest second formatted (events come in runs within a second)


def iso_ms(ms: int) -> str:
    """`2016-10-19T23:20:52.240Z`: SES's timestamp format (on every event, so without datetime objects)."""
    global _last_second
    seconds, milli = divmod(ms, 1000)
    last = _last_second  # one read: other threads may replace it meanwhile, never change it
    if last[0] != seconds:
        t = time.gmtime(seconds)
        last = _last_second = (seconds, f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T{t.tm_hour:02d}"
                                        f":{t.tm_min:02d}:{t.tm_sec:02d}.")
    return f"{last[1]}{milli:03d}Z"


@dataclass
class MailFacts:
    """What relay knows of a message at acceptance; turned into SES's `mail` object."""

    message_id: str
    timestamp_ms: int
    source: str
    destination: list[str]
    headers: list[HeaderField]  # original order, X-SES-* included
    configuration_set: str | None = None
    tags: dict[str, list[str]] = field(default_factory=dict)
    source_ip: str = ""
    from_domain: str = ""
    caller_identity: str = ""
    account_id: str = "000000000000"
    region: str = "local"
    operation: str = "SendSmtpEmail"  # ses:operation: SMTP, or the API operation (SendEmail, SendRawEmail, ...)


def mail_object(facts: MailFacts) -> dict:
    headers, size, truncated = [], 0, False
    for f in facts.headers:
        value = f.value
        size += len(f.name) + len(value)
        if size > HEADERS_LIMIT:
            truncated = True
            break
        headers.append({"name": f.name, "value": value})
    tags: dict[str, list[str]] = {}
    if facts.configuration_set:
        tags["ses:configuration-set"] = [facts.configuration_set]
    if facts.source_ip:
        tags["ses:source-ip"] = [facts.source_ip]
    if facts.from_domain:
        tags["ses:from-domain"] = [facts.from_domain]
    if facts.caller_identity:
        tags["ses:caller-identity"] = [facts.caller_identity]
    tags["ses:operation"] = [facts.operation]
    for name, values in facts.tags.items():
        tags[name] = list(values)
    identity = facts.from_domain or facts.source.rpartition("@")[2]
    return {
        "timestamp": iso_ms(facts.timestamp_ms),
        "source": facts.source,
        "sourceArn": f"arn:aws:ses:{facts.region}:{facts.account_id}:identity/{identity}",
        "sendingAccountId": facts.account_id,
        "messageId": facts.message_id,
        "destination": list(facts.destination),
        "headersTruncated": truncated,
        "headers": headers,
        "commonHeaders": common_headers(facts.headers, facts.message_id),
        "tags": tags,
    }


def record(event_type: str, mail: dict, detail: dict) -> dict:
    return {"eventType": event_type, "mail": mail, DETAIL_KEY[event_type]: detail}


def send_record(mail: dict) -> dict:
    return record(SEND, mail, {})


def reject_record(mail: dict, reason: str = "Bad content") -> dict:
    return record(REJECT, mail, {"reason": reason})


def delivery_record(
    mail: dict, recipient: str, now_ms: int, smtp_response: str, reporting_mta: str, remote_ip: str = ""
) -> dict:
    detail = {
        "timestamp": iso_ms(now_ms),
        "processingTimeMillis": max(0, now_ms - _mail_ms(mail)),
        "recipients": [recipient],
        "smtpResponse": smtp_response,
        "reportingMTA": reporting_mta,
    }
    if remote_ip:
        detail["remoteMtaIp"] = remote_ip
    return record(DELIVERY, mail, detail)


def bounce_record(
    mail: dict,
    recipient: str,
    now_ms: int,
    bounce_type: str,
    sub_type: str,
    diagnostic: str,
    status: str,
    reporting_mta: str,
    remote_ip: str = "",
) -> dict:
    """A Bounce relay observed itself (the upstream's reply, or the end of its retries)."""
    bounced = {"emailAddress": recipient, "action": "failed", "status": status, "diagnosticCode": diagnostic}
    # SES writes "dsn; host" (not RFC 3464's "dns; host"), in its examples and in real notifications.
    out = report_bounce_record(mail, [bounced], now_ms, bounce_type, sub_type, feedback_id(mail["messageId"], now_ms),
                               f"dsn; {reporting_mta}")
    if remote_ip:
        out[DETAIL_KEY[BOUNCE]]["remoteMtaIp"] = remote_ip
    return out


def feedback_id(message_id: str, now_ms: int) -> str:
    """A feedbackId in SES's format, the message id's (`0100` + 12-hex milliseconds, a UUID, `-000000`): unique per
    bounce or complaint report, and the same for the same message and moment (a retried write records one id)."""
    digest = hashlib.sha256(f"{message_id}|{now_ms}".encode()).digest()[:16]
    return mint_message_id(now_ms, uuid.UUID(bytes=digest, version=4))


def with_outgoing_ip(mail: dict, mail_text: str | None, ip: str) -> tuple[dict, str | None]:
    """The mail object of a Delivery, with SES's `ses:outgoing-ip` tag (the address relay delivered from), and its
    JSON: the message's stored JSON with the tag spliced in at the end of `tags` (mail_object writes tags last),
    rather than the whole object encoded again for every copy."""
    if not ip:
        return mail, mail_text
    tagged = {**mail, "tags": {**mail.get("tags", {}), "ses:outgoing-ip": [ip]}}
    if mail_text is None or not mail_text.endswith("]}}") or list(mail)[-1] != "tags":
        return tagged, None
    return tagged, f'{mail_text[:-2]},"ses:outgoing-ip":{json.dumps([ip])}}}}}'


SUPPRESSED_DIAGNOSTIC = ("Amazon SES did not send the message to this address because it is on the suppression list"
                         " for your account. For more information about removing addresses from the suppression"
                         " list, see the Amazon SES Developer Guide at"
                         " https://docs.aws.amazon.com/ses/latest/DeveloperGuide/sending-email-suppression-list.html")


def suppressed_record(mail: dict, recipient: str, now_ms: int, reporting_mta: str) -> dict:
    """SES's Bounce for a recipient on the account's suppression list (the message is not sent to it)."""
    return bounce_record(mail, recipient, now_ms, "Permanent", "OnAccountSuppressionList", SUPPRESSED_DIAGNOSTIC,
                         "5.1.1", reporting_mta)


def report_bounce_record(
    mail: dict,
    recipients: list[dict],
    timestamp_ms: int,
    bounce_type: str,
    sub_type: str,
    feedback: str,
    reporting_mta: str | None = None,
) -> dict:
    """A Bounce from a later bounce report (DSN): `recipients` are SES bouncedRecipients objects
    (`emailAddress`, and `action`, `status`, `diagnosticCode` when the report gave them); `reporting_mta` is
    the DSN's Reporting-MTA value as written there (e.g. `dns; mx.example.net`), absent without a DSN."""
    detail: dict = {
        "bounceType": bounce_type,
        "bounceSubType": sub_type,
        "bouncedRecipients": [dict(r) for r in recipients],
        "timestamp": iso_ms(timestamp_ms),
        "feedbackId": feedback,
    }
    if reporting_mta:
        detail["reportingMTA"] = reporting_mta
    return record(BOUNCE, mail, detail)


def complaint_record(
    mail: dict,
    recipients: list[str],
    timestamp_ms: int,
    feedback: str,
    feedback_type: str | None = None,
    user_agent: str | None = None,
    arrival_ms: int | None = None,
    sub_type: str | None = None,
) -> dict:
    """A Complaint; `feedback_type`, `user_agent` and `arrival_ms` come from an ARF report when there is one."""
    detail: dict = {
        "complainedRecipients": [{"emailAddress": r} for r in recipients],
        "timestamp": iso_ms(timestamp_ms),
        "feedbackId": feedback,
        "complaintSubType": sub_type,
    }
    if user_agent is not None:
        detail["userAgent"] = user_agent
    if feedback_type is not None:
        detail["complaintFeedbackType"] = feedback_type
    if arrival_ms is not None:
        detail["arrivalDate"] = iso_ms(arrival_ms)
    return record(COMPLAINT, mail, detail)


def subscription_record(mail: dict, timestamp_ms: int, contact_list: str, source: str = "UnsubscribeHeader") -> dict:
    """A Subscription: the recipient unsubscribed from everything (relay has no topics)."""
    detail = {
        "contactList": contact_list,
        "timestamp": iso_ms(timestamp_ms),
        "source": source,
        "newTopicPreferences": {"unsubscribeAll": True, "topicSubscriptionStatus": []},
        "oldTopicPreferences": {"unsubscribeAll": False, "topicSubscriptionStatus": []},
    }
    return record(SUBSCRIPTION, mail, detail)


def delay_record(
    mail: dict,
    recipient: str,
    now_ms: int,
    delay_type: str,
    status: str,
    diagnostic: str,
    expiration_ms: int,
    reporting_mta: str = "",
) -> dict:
    detail = {
        "timestamp": iso_ms(now_ms),
        "delayType": delay_type,
        "expirationTime": iso_ms(expiration_ms),
        "delayedRecipients": [{"emailAddress": recipient, "status": status, "diagnosticCode": diagnostic}],
    }
    if reporting_mta:
        detail["reportingMTA"] = reporting_mta
    return record(DELIVERY_DELAY, mail, detail)


def open_record(mail: dict, now_ms: int, ip: str, user_agent: str) -> dict:
    return record(OPEN, mail, {"ipAddress": ip, "timestamp": iso_ms(now_ms), "userAgent": user_agent})


def click_record(
    mail: dict, now_ms: int, ip: str, user_agent: str, link: str, link_tags: dict[str, list[str]]
) -> dict:
    detail = {
        "ipAddress": ip,
        "timestamp": iso_ms(now_ms),
        "userAgent": user_agent,
        "link": link,
        "linkTags": {k: list(v) for k, v in link_tags.items()},
    }
    return record(CLICK, mail, detail)


def rendering_failure_record(mail: dict, template: str, error_message: str) -> dict:
    """A Rendering Failure: the message was not sent. SES's record has no headers or commonHeaders (none were
    written)."""
    bare = {k: v for k, v in mail.items() if k not in ("headers", "commonHeaders")}
    return record(RENDERING_FAILURE, bare, {"errorMessage": error_message, "templateName": template})


def ms_from_iso(text: str) -> int:
    """Inverse of `iso_ms`."""
    digits = text[:4] + text[5:7] + text[8:10] + text[11:13] + text[14:16] + text[17:19] + text[20:23]
    marks = text[4] + text[7] + text[10] + text[13] + text[16] + text[19] + text[23] if len(text) == 24 else ""
    if marks == "--T::.Z" and digits.isascii() and digits.isdigit():
        # iso_ms's own form (every delivery reads one) without strptime; datetime() still checks the ranges
        with contextlib.suppress(ValueError):
            ts = datetime(int(text[:4]), int(text[5:7]), int(text[8:10]), int(text[11:13]), int(text[14:16]),
                          int(text[17:19]), tzinfo=UTC)
            return int(ts.timestamp()) * 1000 + int(text[20:23])
    ts = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    return round(ts.timestamp() * 1000)


def _mail_ms(mail: dict) -> int:
    return ms_from_iso(mail["timestamp"])


def smtp_status(code: int, message: str) -> str:
    """Enhanced status code from an SMTP reply (`5.1.1` from `550 5.1.1 ...`), else derived from the code."""
    return enhanced_status(message) or f"{code // 100}.0.0"


def enhanced_status(message: str) -> str | None:
    """The enhanced status code (RFC 3463) a reply's text starts with, e.g. `5.1.1`; None when it has none."""
    first = message.split(None, 1)[0] if message else ""
    parts = first.split(".")
    if len(parts) == 3 and all(p.isdigit() for p in parts):
        return first
    return None
