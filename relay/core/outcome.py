"""What an upstream reply means for one recipient's copy: delivered, bounced, or retried later (pure).

2xx → delivered. 4xx, timeouts and connection problems → a DeliveryDelay and a retry with exponential backoff,
until the copy is older than the maximum age; then a Transient bounce. A problem reaching or authenticating to
the upstream is always temporary, whatever its code: relay's own misconfiguration must never bounce mail.

A 5xx is read by the SMTP step it answered and its enhanced status code (RFC 3463), the way SES tells bounces
apart. Only a refusal of the recipient's *address* is Permanent, and only a Permanent bounce puts the address on
the suppression list. A refusal of the content, the size or the sender is final for this message (the same
message would be refused again) but Transient: the next message to the address is sent. A refusal of relay
itself by its upstream is retried like a 4xx.

    step          5xx reply                                           outcome
    MAIL FROM     5.3.4, 5.2.3; 552 without code (SIZE= too big)      Transient MessageTooLarge
    MAIL FROM     5.7.x (authentication required, client refused)     retried, as relay refused
    MAIL FROM     anything else (the sender refused)                  Transient General
    RCPT TO       5.1.x but 5.1.7, 5.1.8 (the sender's codes)         Permanent NoEmail (5.1.1, 5.1.10) or General
    RCPT TO       550, 551, 553 without code (RFC 5321's mailbox      Permanent General
                  replies), unless the text names the sender
    RCPT TO       5.2.2; 552 without code                             Transient MailboxFull
    RCPT TO       5.2.3, 5.3.4                                        Transient MessageTooLarge
    RCPT TO       5.7.x; "relay" in a text without code               retried, as relay refused
    RCPT TO       anything else (Exim's "Sender verify failed",       Transient General
                  5.1.7/5.1.8, 5.4.x routing, 5.5.x syntax, ...)
    DATA, end     5.1.x but 5.1.7, 5.1.8                              Permanent, as at RCPT TO
    DATA, end     5.2.2                                               Transient MailboxFull
    DATA, end     5.3.4, 5.2.3; 552 without code                      Transient MessageTooLarge
    DATA          anything else (nothing of the content was sent)     Transient General
    end of DATA   anything else (spam, virus, policy, a line too      Transient ContentRejected
                  long, DMARC: the content as sent)

"Relay refused": relay hands every copy to one upstream (a smarthost). Before any content is sent, a 5.7.x (or
Exim's "relay not permitted", which has no code) refuses relay's own standing there: authentication required,
relaying denied, relay's return path not allowed, relay's IP on a blocklist. That is the operator's to fix, not
the recipient's fault and not the message's: like a failed AUTH it is retried (DeliveryDelay SendingDeferral)
until delivery.max_age, then a Transient General bounce; never a suppression. A 5.7.x refusing one recipient
by policy costs the same retries and ends the same way, which is the safe side to err on.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.core.events import enhanced_status, smtp_status

DELIVERED, BOUNCED, QUEUED = "delivered", "bounced", "queued"
PERMANENT, TRANSIENT = "Permanent", "Transient"

# The step of an SMTP transaction a reply answered (Postfix logs the same: "in reply to RCPT TO command").
# CONNECT: reaching, greeting, securing or authenticating to the upstream, or losing the connection.
CONNECT, MAIL, RCPT, DATA, END_OF_DATA = "connect", "MAIL FROM", "RCPT TO", "DATA", "end of DATA"

SENDER_STATUSES = ("5.1.7", "5.1.8")  # RFC 3463: bad sender's mailbox address syntax, bad sender's system address


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
           policy: RetryPolicy, *, step: str) -> Outcome:
    """`attempts` counts this attempt (1 for the first); `step` is the one the reply answered (MAIL, RCPT...)."""
    status = smtp_status(code, message)
    diagnostic = f"smtp; {code} {message}".strip()
    if connection_failed:
        return _retry(status, diagnostic, "TransientCommunicationFailure", "General", attempts, received_ms, now_ms,
                      policy)
    if 200 <= code < 300:
        return Outcome(DELIVERED, status, diagnostic)
    if 500 <= code < 600:
        bounce = refusal_type(step, code, message)
        if bounce is not None:
            return Outcome(BOUNCED, status, diagnostic, *bounce)
        return _retry(status, diagnostic, "SendingDeferral", "General", attempts, received_ms, now_ms, policy)
    return _retry(status, diagnostic, delay_type_for(status), None, attempts, received_ms, now_ms, policy)


def refusal_type(step: str, code: int, message: str) -> tuple[str, str] | None:
    """(bounceType, bounceSubType) of a 5xx answering `step` (the table above); None when it refuses relay itself
    (to be retried)."""
    status = enhanced_status(message) or ""
    cause = "" if status[2:] in ("", "0.0") else status[2:]  # "1.1" of 5.1.1; X.0.0 says no more than the code
    text = message.lower()
    if cause.startswith("1.") and status not in SENDER_STATUSES and step != MAIL:
        return PERMANENT, permanent_sub_type(status)
    if cause in ("3.4", "2.3") or (not cause and code == 552 and step != RCPT):
        return TRANSIENT, "MessageTooLarge"
    if cause == "2.2" or (not cause and code == 552):
        return TRANSIENT, "MailboxFull"
    if step in (MAIL, RCPT) and (cause.startswith("7.") or (not cause and "relay" in text)):
        return None
    if step == RCPT and not cause and code in (550, 551, 553) and "sender" not in text:
        return PERMANENT, "General"
    return TRANSIENT, "ContentRejected" if step == END_OF_DATA else "General"


def _retry(status: str, diagnostic: str, delay_type: str, expired_sub_type: str | None, attempts: int,
           received_ms: int, now_ms: int, policy: RetryPolicy) -> Outcome:
    """Another attempt after the backoff; past the maximum age, a Transient bounce (`expired_sub_type`, or the
    one the status names)."""
    expires_ms = received_ms + int(policy.max_age_s * 1000)
    backoff = min(policy.max_s, policy.initial_s * 2 ** max(0, attempts - 1))
    next_ms = now_ms + int(backoff * 1000)
    if next_ms > expires_ms:
        if status.startswith("5"):
            status = "4" + status[1:]
        return Outcome(BOUNCED, status, diagnostic, TRANSIENT, expired_sub_type or transient_sub_type(status))
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
