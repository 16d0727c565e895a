"""What an upstream reply means for one recipient's copy: delivered, bounced, or retried later (pure).

2xx → delivered. 5xx → permanent bounce, no retry. 4xx, timeouts and connection problems → a DeliveryDelay
and a retry with exponential backoff, until the copy is older than the maximum age; then a transient bounce.
A problem reaching or authenticating to the upstream is always temporary, whatever its code: relay's own
misconfiguration must never bounce mail.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.core.events import smtp_status

DELIVERED, BOUNCED, QUEUED = "delivered", "bounced", "queued"


@dataclass(frozen=True)
class RetryPolicy:
    initial_s: float = 60.0
    max_s: float = 3600.0
    max_age_s: float = 86400.0


@dataclass(frozen=True)
class Outcome:
    state: str  # DELIVERED | BOUNCED | QUEUED
    status: str  # enhanced status code, e.g. 5.1.1
    diagnostic: str  # "smtp; 550 5.1.1 no such user"
    bounce_type: str = ""
    bounce_sub_type: str = ""
    delay_type: str = ""
    next_attempt_ms: int | None = None
    expires_ms: int | None = None


def decide(code: int, message: str, connection_failed: bool, attempts: int, received_ms: int, now_ms: int,
           policy: RetryPolicy) -> Outcome:
    """`attempts` counts this attempt (1 for the first)."""
    status = smtp_status(code, message)
    diagnostic = f"smtp; {code} {message}".strip()
    if 200 <= code < 300 and not connection_failed:
        return Outcome(DELIVERED, status, diagnostic)
    if 500 <= code < 600 and not connection_failed:
        return Outcome(BOUNCED, status, diagnostic, "Permanent", permanent_sub_type(status))
    expires_ms = received_ms + int(policy.max_age_s * 1000)
    backoff = min(policy.max_s, policy.initial_s * 2 ** max(0, attempts - 1))
    next_ms = now_ms + int(backoff * 1000)
    if next_ms > expires_ms:
        if status.startswith("5"):
            status = "4" + status[1:]
        return Outcome(BOUNCED, status, diagnostic, "Transient", transient_sub_type(status))
    delay_type = "TransientCommunicationFailure" if connection_failed else delay_type_for(status)
    return Outcome(QUEUED, status, diagnostic, delay_type=delay_type, next_attempt_ms=next_ms, expires_ms=expires_ms)


def permanent_sub_type(status: str) -> str:
    return "NoEmail" if status[1:] in (".1.1", ".1.10") else "General"


def transient_sub_type(status: str) -> str:
    detail = status[1:]
    if detail == ".2.2":
        return "MailboxFull"
    if detail in (".2.3", ".3.4"):
        return "MessageTooLarge"
    if detail.startswith(".7."):
        return "ContentRejected"
    return "General"


def delay_type_for(status: str) -> str:
    detail = status[1:]
    if detail == ".2.2":
        return "MailboxFull"
    if detail.startswith(".7."):
        return "SendingDeferral"  # policy deferrals: greylisting, rate limits
    if detail.startswith(".4."):
        return "TransientCommunicationFailure"
    return "RecipientServerError"
