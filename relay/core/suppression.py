"""The account suppression list as plain data: which events put which recipients on it.

SES adds an address after a permanent bounce or a complaint; relay also after its one-click unsubscribe. The
reasons a message's configuration set applies (TrackingSettings.suppression_reasons, SES's SuppressionOptions)
decide both whether its events add entries and whether existing entries stop a send.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.core import events as ev


@dataclass(frozen=True)
class Suppression:
    email_address: str  # lower case
    reason: str  # BOUNCE | COMPLAINT | UNSUBSCRIBE
    last_update_time: str  # SES timestamp format
    message_id: str | None = None
    feedback_id: str | None = None


def entries_for(record: dict, recipient: str | None, reasons: tuple[str, ...], when: str) -> list[Suppression]:
    """The entries an event record adds: its permanent bounce, complaint or unsubscribe, if the message's
    set applies that reason. `recipient` is the event's recipient column (used by Subscription records)."""
    kind = record.get("eventType")
    message_id = record.get("mail", {}).get("messageId")
    detail = record.get(ev.DETAIL_KEY.get(kind, ""), {})
    if kind == ev.BOUNCE and detail.get("bounceType") == "Permanent" \
            and detail.get("bounceSubType") != "OnAccountSuppressionList":
        reason, addresses = "BOUNCE", [r.get("emailAddress", "") for r in detail.get("bouncedRecipients", [])]
    elif kind == ev.COMPLAINT and detail.get("complaintSubType") != "OnAccountSuppressionList":
        reason, addresses = "COMPLAINT", [r.get("emailAddress", "") for r in detail.get("complainedRecipients", [])]
    elif kind == ev.SUBSCRIPTION and detail.get("newTopicPreferences", {}).get("unsubscribeAll"):
        reason, addresses = "UNSUBSCRIBE", [recipient or ""]
    else:
        return []
    if reason not in reasons:
        return []
    feedback = detail.get("feedbackId")
    return [Suppression(a.strip().lower(), reason, when, message_id, feedback) for a in addresses if "@" in a]
