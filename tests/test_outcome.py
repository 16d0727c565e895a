import pytest

from relay.core.outcome import (
    BOUNCED,
    CONNECT,
    DATA,
    DELIVERED,
    END_OF_DATA,
    MAIL,
    QUEUED,
    RCPT,
    RetryPolicy,
    decide,
    refusal_type,
)

POLICY = RetryPolicy(initial_s=60, max_s=3600, max_age_s=86400)
T0 = 1_700_000_000_000


def test_2xx_delivered():
    o = decide(250, "2.0.0 Ok: queued", False, 1, T0, T0 + 5, POLICY, step=END_OF_DATA)
    assert (o.state, o.status) == (DELIVERED, "2.0.0")


def test_an_address_refusal_is_a_permanent_bounce_with_subtype():
    o = decide(550, "5.1.1 User unknown", False, 1, T0, T0, POLICY, step=RCPT)
    assert (o.state, o.bounce_type, o.bounce_sub_type, o.status) == (BOUNCED, "Permanent", "NoEmail", "5.1.1")
    o = decide(550, "no enhanced code", False, 1, T0, T0, POLICY, step=RCPT)
    assert (o.bounce_type, o.bounce_sub_type, o.status) == ("Permanent", "General", "5.0.0")


def test_a_content_refusal_is_final_and_transient():
    o = decide(554, "5.7.1 Spam", False, 1, T0, T0, POLICY, step=END_OF_DATA)
    assert (o.state, o.bounce_type, o.bounce_sub_type, o.status) == (BOUNCED, "Transient", "ContentRejected", "5.7.1")
    assert o.next_attempt_ms is None


def test_4xx_retries_with_exponential_backoff():
    nexts = [decide(451, "4.3.0 later", False, n, T0, T0, POLICY, step=END_OF_DATA).next_attempt_ms - T0
             for n in (1, 2, 3, 8)]
    assert nexts == [60_000, 120_000, 240_000, 3_600_000]
    o = decide(452, "4.2.2 Mailbox full", False, 1, T0, T0, POLICY, step=RCPT)
    assert (o.state, o.delay_type, o.expires_ms) == (QUEUED, "MailboxFull", T0 + 86_400_000)


def test_connection_problems_are_temporary_even_with_a_5xx_code():
    o = decide(535, "5.7.8 bad upstream credentials", True, 1, T0, T0, POLICY, step=CONNECT)
    assert (o.state, o.delay_type) == (QUEUED, "TransientCommunicationFailure")
    late = T0 + 86_400_000 - 1000
    o = decide(535, "5.7.8 bad upstream credentials", True, 20, T0, late, POLICY, step=CONNECT)
    assert (o.state, o.bounce_type, o.bounce_sub_type) == (BOUNCED, "Transient", "General")


def test_past_max_age_bounces_transient():
    late = T0 + 86_400_000 - 1000
    o = decide(452, "4.2.2 Mailbox full", False, 20, T0, late, POLICY, step=RCPT)
    assert (o.state, o.bounce_type, o.bounce_sub_type) == (BOUNCED, "Transient", "MailboxFull")
    o = decide(421, "4.4.1 no route", True, 20, T0, late, POLICY, step=CONNECT)
    assert (o.bounce_type, o.bounce_sub_type) == ("Transient", "General")


def test_a_refusal_of_relay_itself_is_retried_then_bounces_transient_general():
    o = decide(554, "5.7.1 <r@example.org>: Relay access denied", False, 1, T0, T0, POLICY, step=RCPT)
    assert (o.state, o.delay_type, o.status) == (QUEUED, "SendingDeferral", "5.7.1")
    late = T0 + 86_400_000 - 1000
    o = decide(554, "5.7.1 <r@example.org>: Relay access denied", False, 20, T0, late, POLICY, step=RCPT)
    assert (o.state, o.bounce_type, o.bounce_sub_type, o.status) == (BOUNCED, "Transient", "General", "4.7.1")


# Reply lines as Postfix and Exim send them (aiosmtplib and relay's reader join a multi-line reply's texts
# with "\n"), at the step each MTA sends them.
POSTFIX_AND_EXIM = [
    # Postfix
    (RCPT, 550, "5.1.1 <x@example.org>: Recipient address rejected: User unknown in virtual mailbox table",
     ("Permanent", "NoEmail")),
    (RCPT, 550, "5.1.1 <x@example.org>: Recipient address rejected: User unknown in local recipient table",
     ("Permanent", "NoEmail")),
    (RCPT, 554, "5.7.1 <x@example.org>: Relay access denied", None),
    (RCPT, 554, "5.7.1 Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org", None),
    (RCPT, 550, "5.1.8 <app@nowhere.invalid>: Sender address rejected: Domain not found", ("Transient", "General")),
    (MAIL, 552, "5.3.4 Message size exceeds fixed limit", ("Transient", "MessageTooLarge")),
    (MAIL, 553, "5.7.1 <app@example.com>: Sender address rejected: not owned by user app", None),
    (MAIL, 530, "5.7.0 Must issue a STARTTLS command first", None),
    (END_OF_DATA, 552, "5.3.4 Message size exceeds fixed limit", ("Transient", "MessageTooLarge")),
    (END_OF_DATA, 554, "5.7.1 spam content", ("Transient", "ContentRejected")),
    (END_OF_DATA, 550, "5.7.1 Message content rejected", ("Transient", "ContentRejected")),
    (DATA, 554, "5.5.1 Error: no valid recipients", ("Transient", "General")),
    # Exim (no enhanced status codes unless configured)
    (RCPT, 550, "Unrouteable address", ("Permanent", "General")),
    (RCPT, 550, "relay not permitted", None),
    (RCPT, 550, "Verification failed for <app@nowhere.invalid>\nUnrouteable address\nSender verify failed",
     ("Transient", "General")),
    (MAIL, 552, "Message size exceeds maximum permitted", ("Transient", "MessageTooLarge")),
    (END_OF_DATA, 552, "Message size exceeds maximum permitted", ("Transient", "MessageTooLarge")),
    (END_OF_DATA, 552, "Message size limit exceeded", ("Transient", "MessageTooLarge")),
    (END_OF_DATA, 550, "spam content", ("Transient", "ContentRejected")),  # an ACL's deny message
    (END_OF_DATA, 550, "Administrative prohibition", ("Transient", "ContentRejected")),
    # others
    (END_OF_DATA, 500, "Line too long", ("Transient", "ContentRejected")),
    (RCPT, 552, "5.2.2 Mailbox full", ("Transient", "MailboxFull")),
    (END_OF_DATA, 550, "5.1.1 user unknown", ("Permanent", "NoEmail")),
    (MAIL, 550, "5.1.0 Sender rejected", ("Transient", "General")),
    (END_OF_DATA, 550, "5.7.26 Unauthenticated email is not accepted due to the sender's DMARC policy",
     ("Transient", "ContentRejected")),
]


@pytest.mark.parametrize(("step", "code", "text", "expected"), POSTFIX_AND_EXIM,
                         ids=[f"{s} {c} {t[:40]}" for s, c, t, _ in POSTFIX_AND_EXIM])
def test_refusals_of_real_mtas_by_step(step, code, text, expected):
    assert refusal_type(step, code, text) == expected


def test_only_permanent_refusals_suppress():
    """The suppression list takes Permanent bounces only (relay.core.suppression): a content refusal never."""
    from relay.core import events as ev
    from relay.core.suppression import entries_for

    mail = {"messageId": "m1", "destination": ["x@example.org"]}
    for step, code, text, expected in POSTFIX_AND_EXIM:
        if expected is None:
            continue
        o = decide(code, text, False, 1, T0, T0, POLICY, step=step)
        record = ev.bounce_record(mail, "x@example.org", T0, o.bounce_type, o.bounce_sub_type, o.diagnostic,
                                  o.status, "relay.test")
        listed = entries_for(record, "x@example.org", ("BOUNCE",), "2023-11-14T22:13:20.000Z")
        assert bool(listed) == (expected[0] == "Permanent"), (step, text)
