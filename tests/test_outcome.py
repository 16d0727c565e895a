from relay.core.outcome import BOUNCED, DELIVERED, QUEUED, RetryPolicy, decide

POLICY = RetryPolicy(initial_s=60, max_s=3600, max_age_s=86400)
T0 = 1_700_000_000_000


def test_2xx_delivered():
    o = decide(250, "2.0.0 Ok: queued", False, 1, T0, T0 + 5, POLICY)
    assert (o.state, o.status) == (DELIVERED, "2.0.0")


def test_5xx_is_a_permanent_bounce_with_subtype():
    o = decide(550, "5.1.1 User unknown", False, 1, T0, T0, POLICY)
    assert (o.state, o.bounce_type, o.bounce_sub_type, o.status) == (BOUNCED, "Permanent", "NoEmail", "5.1.1")
    assert decide(554, "5.7.1 Spam", False, 1, T0, T0, POLICY).bounce_sub_type == "General"
    assert decide(550, "no enhanced code", False, 1, T0, T0, POLICY).status == "5.0.0"


def test_4xx_retries_with_exponential_backoff():
    nexts = [decide(451, "4.3.0 later", False, n, T0, T0, POLICY).next_attempt_ms - T0 for n in (1, 2, 3, 8)]
    assert nexts == [60_000, 120_000, 240_000, 3_600_000]
    o = decide(452, "4.2.2 Mailbox full", False, 1, T0, T0, POLICY)
    assert (o.state, o.delay_type, o.expires_ms) == (QUEUED, "MailboxFull", T0 + 86_400_000)


def test_connection_problems_are_temporary_even_with_a_5xx_code():
    o = decide(535, "5.7.8 bad upstream credentials", True, 1, T0, T0, POLICY)
    assert (o.state, o.delay_type) == (QUEUED, "TransientCommunicationFailure")


def test_past_max_age_bounces_transient():
    late = T0 + 86_400_000 - 1000
    o = decide(452, "4.2.2 Mailbox full", False, 20, T0, late, POLICY)
    assert (o.state, o.bounce_type, o.bounce_sub_type) == (BOUNCED, "Transient", "MailboxFull")
    o = decide(421, "4.4.1 no route", True, 20, T0, late, POLICY)
    assert (o.bounce_type, o.bounce_sub_type) == ("Transient", "General")
