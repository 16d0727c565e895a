"""Sending control's pure parts (relay/core/control.py): refusals, quota decisions, the guard's verdicts, the
per-minute counts summed from events and SES's 15-minute statistics."""

from __future__ import annotations

import pathlib

import pytest

from relay import config as config_module
from relay.core import control as core
from relay.core.control import Outcomes, QuotaLimits, Quotas, SendingState, Thresholds
from relay.core.settings import TrackingSettings
from relay.pipeline import Pipeline


def test_a_pause_names_its_scope_and_reason():
    paused = SendingState(False, "bounce rate 9 %", "reputation-guard", "2026-01-01T00:00:00.000Z")
    assert core.paused(core.ENABLED, "s", core.ENABLED) is None
    assert core.paused(core.ENABLED, None, paused) is None  # no set: only the account's switch applies
    refused = core.paused(core.ENABLED, "s", paused)
    assert refused.reply == ("554 Message rejected: Sending paused for this configuration set. Configuration set"
                             " <s>: bounce rate 9 %.")
    assert core.paused(core.ENABLED, "s", SendingState(False)).message == (
        "Sending paused for this configuration set. Configuration set <s> is paused.")
    assert refused.code == "ConfigurationSetSendingPaused"
    account = core.paused(SendingState(False), "s", paused)  # the account's pause comes first
    assert account.reply == "554 Message rejected: Sending paused for this account."
    assert account.code == "AccountSendingPaused"


def test_quota_scopes_and_decisions():
    quotas = Quotas(QuotaLimits(0, 100), {"m": QuotaLimits(5, 0)}, {"app": QuotaLimits(0, 1)})
    assert [s for s, _ in quotas.scopes("m", "app")] == ["account", "set:m", "user:app"]
    assert [s for s, _ in quotas.scopes("other", None)] == ["account"]
    assert Quotas().scopes("m", "app") == []  # nothing configured: nothing counted
    assert core.over_quota(QuotaLimits(5, 0), 5, 10_000) is None
    rate = core.over_quota(QuotaLimits(5, 0), 6, 6)
    assert rate.reply == "454 4.7.0 Throttling failure: Maximum sending rate exceeded."
    day = core.over_quota(QuotaLimits(5, 10), 6, 11)  # both over: the day is what the client must wait for
    assert (day.code, day.message) == ("Throttling", "Daily message quota exceeded.")


@pytest.mark.parametrize("outcomes, verdict", [
    (Outcomes(delivered=899, bounced=100, permanent=100), None),  # 999: under the minimum volume
    (Outcomes(delivered=950, bounced=50, permanent=49), None),  # 4.9 %
    (Outcomes(delivered=950, bounced=50, permanent=50), "bounce rate 5 % (50 permanent bounces of 1000 messages"
                                                        " in 1d) reached the threshold of 5 %"),
    (Outcomes(delivered=900, bounced=100, permanent=10), None),  # transient bounces are not the bounce rate
    (Outcomes(delivered=1000, complaints=1), "complaint rate 0.1 % (1 complaints of 1000 delivered in 1d) reached"
                                             " the threshold of 0.1 %"),
])
def test_the_guard_verdict_follows_ses_review_levels(outcomes, verdict):
    assert core.guard_verdict(outcomes, Thresholds()) == verdict


def test_minute_counts_leave_suppressed_bounces_out():
    minute = 29_000_000
    rows = [("s", "Send", minute * 60000, None, None, 3), ("s", "Delivery", minute * 60000 + 5, None, None, 1),
            ("s", "Bounce", minute * 60000 + 6, "Permanent", "General", 1),
            ("s", "Bounce", minute * 60000 + 7, "Permanent", "OnAccountSuppressionList", 1),
            ("s", "Bounce", (minute + 1) * 60000, "Transient", "General", 1),
            ("", "Complaint", minute * 60000, None, None, 1), ("", "Reject", minute * 60000, None, None, 1)]
    assert core.minute_counts(rows) == {("s", minute): (3, 1, 1, 1, 0, 0), ("s", minute + 1): (0, 0, 1, 0, 0, 0),
                                        ("", minute): (0, 0, 0, 0, 1, 1)}


def test_data_points_are_fifteen_minutes():
    points = core.data_points([(30, 1, 0, 0, 0), (44, 2, 1, 0, 0), (45, 0, 0, 0, 0), (46, 1, 0, 1, 1)])
    assert [(p.minute, p.delivery_attempts, p.bounces, p.complaints, p.rejects) for p in points] == [
        (30, 3, 1, 0, 0), (45, 1, 0, 1, 1)]


def test_percent_and_durations():
    assert (core.percent(0.05), core.percent(0.001), core.percent(1 / 3)) == ("5 %", "0.1 %", "33.33 %")
    assert [core.duration_text(s) for s in (86400, 3600, 90, 600)] == ["1d", "1h", "90s", "10m"]


def test_a_sets_max_delivery_seconds_replaces_max_age():
    cfg = config_module.parse({}, pathlib.Path("/tmp"))
    pipeline = Pipeline(cfg, None, None, None, None, None)
    assert pipeline.retry_policy(TrackingSettings()).max_age_s == cfg.delivery.max_age
    assert pipeline.retry_policy(TrackingSettings(max_delivery_seconds=600)).max_age_s == 600.0


def test_configuration_of_quotas_and_reputation():
    cfg = config_module.parse({"quotas": {"max_send_rate": 14, "users": {"app": {"max_24_hour_send": 50}}},
                               "reputation": {"window": "6h", "min_volume": 200,
                                              "sets": {"news": {"complaint_rate": 0.003}}}}, pathlib.Path("/tmp"))
    assert cfg.quotas.account == QuotaLimits(14, 0) and cfg.quotas.users["app"] == QuotaLimits(0, 50)
    assert cfg.reputation.thresholds("other") == Thresholds(21600.0, 200, 0.05, 0.001)
    assert cfg.reputation.thresholds("news") == Thresholds(21600.0, 200, 0.05, 0.003)
    with pytest.raises(config_module.ConfigError) as exc:
        config_module.parse({"quotas": {"max_send_rate": -1}, "reputation": {"bounce_rate": 5, "window": "10s"},
                             "configuration_sets": {"x": {"tls_policy": "MAYBE", "max_delivery_seconds": 10}}},
                            pathlib.Path("/tmp"))
    assert len(exc.value.problems) == 5, exc.value.problems
