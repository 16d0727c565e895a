"""Sending control as plain data: who may send now (pausing), how fast and how much (quotas), and what a set's
bounce and complaint rates say (the reputation guard). Pure: the shell (relay/control.py, relay/reputation.py)
reads the store and the clock and hands the numbers in.

SES's words are kept where a client may match on them: the SMTP replies below are SES's own, the API codes are
those its SDKs model (the v1 and v2 shapes are in relay/api/errors.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

ACCOUNT = ""  # the scope of the account's sending status (a set's scope is its name)
GUARD = "reputation-guard"  # who paused a set when the reputation guard did

# SES's SMTP replies: the throttling ones are in its troubleshooting guide, the account's pause is what clients
# quote from it; a set's pause is worded the same way. A pause names its reason after SES's sentence, so whoever
# reads a client's log learns why without looking elsewhere.
ACCOUNT_PAUSED = "Sending paused for this account."
SET_PAUSED = "Sending paused for this configuration set."
RATE_EXCEEDED = "Maximum sending rate exceeded."
DAILY_EXCEEDED = "Daily message quota exceeded."


@dataclass(frozen=True)
class SendingState:
    """Whether a scope (the account, a configuration set) may send, and the last change: who, why, when."""

    enabled: bool = True
    reason: str = ""
    changed_by: str = ""
    changed_at: str = ""
    fresh_start: str | None = None  # reputation counts from here on (SES's ReputationOptions.LastFreshStart)


ENABLED = SendingState()
TLS_POLICIES = ("REQUIRE", "OPTIONAL")  # SES v2's DeliveryOptions.TlsPolicy (v1 spells them Require, Optional)


@dataclass(frozen=True)
class SetOptions:
    """SES's DeliveryOptions and ReputationOptions of a set, as they were given; None = never set."""

    tls_policy: str | None = None  # REQUIRE: a copy goes out over TLS or not at all
    max_delivery_seconds: int | None = None  # how long a copy is retried (SES: 300 to 50400); None: delivery.max_age
    reputation_metrics: bool | None = None  # ReputationMetricsEnabled

    def delivery_settings(self) -> dict:
        """What a message of the set carries to delivery (relay.core.settings.TrackingSettings)."""
        return {"require_tls": self.tls_policy == "REQUIRE", "max_delivery_seconds": self.max_delivery_seconds}


@dataclass(frozen=True)
class Refused:
    """A message refused by sending control: its SMTP reply and the API's error code and message."""

    reply: str
    code: str  # relay/api/errors.py code: AccountSendingPaused, ConfigurationSetSendingPaused, Throttling
    message: str


def paused(account: SendingState, set_name: str | None, set_state: SendingState) -> Refused | None:
    """The refusal of a message while its account or its configuration set is paused; None when it may go."""
    if not account.enabled:
        text = ACCOUNT_PAUSED + (f" Reason: {account.reason.rstrip('.')}." if account.reason else "")
        return Refused(f"554 Message rejected: {text}", "AccountSendingPaused", text)
    if set_name is not None and not set_state.enabled:
        reason = f": {set_state.reason.rstrip('.')}" if set_state.reason else " is paused"
        text = f"{SET_PAUSED} Configuration set <{set_name}>{reason}."
        return Refused(f"554 Message rejected: {text}", "ConfigurationSetSendingPaused", text)
    return None


# --- quotas -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class QuotaLimits:
    """SES's two sending quotas; 0 = no limit. Counted in recipients, as SES counts them."""

    max_send_rate: int = 0  # recipients in any one second
    max_24_hour_send: int = 0  # recipients in the last 24 hours

    @property
    def limited(self) -> bool:
        return self.max_send_rate > 0 or self.max_24_hour_send > 0


@dataclass(frozen=True)
class Quotas:
    account: QuotaLimits = field(default_factory=QuotaLimits)
    sets: dict[str, QuotaLimits] = field(default_factory=dict)
    users: dict[str, QuotaLimits] = field(default_factory=dict)  # SMTP user names

    def scopes(self, set_name: str | None, user: str | None) -> list[tuple[str, QuotaLimits]]:
        """The counters a message is counted on and their limits: the account's, its set's, its SMTP user's."""
        out = [("account", self.account)] if self.account.limited else []
        if set_name is not None and set_name in self.sets:
            out.append((f"set:{set_name}", self.sets[set_name]))
        if user is not None and user in self.users:
            out.append((f"user:{user}", self.users[user]))
        return out


def over_quota(limits: QuotaLimits, this_second: int, last_24_hours: int) -> Refused | None:
    """The refusal when counts that include the message exceed a limit (SES's 454 replies)."""
    if limits.max_24_hour_send and last_24_hours > limits.max_24_hour_send:
        return Refused(f"454 4.7.0 Throttling failure: {DAILY_EXCEEDED}", "Throttling", DAILY_EXCEEDED)
    if limits.max_send_rate and this_second > limits.max_send_rate:
        return Refused(f"454 4.7.0 Throttling failure: {RATE_EXCEEDED}", "Throttling", RATE_EXCEEDED)
    return None


# --- the reputation guard --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Thresholds:
    """When the guard pauses a set. The rates default to SES's first review levels (its account is "under
    review" at a 5 % bounce rate or a 0.1 % complaint rate, and may be paused at 10 % and 0.5 %), so relay acts
    before SES or a mailbox provider would."""

    window_s: float = 86400.0  # rolling window; a day, as Gmail's Postmaster Tools count spam rates
    min_volume: int = 1000  # delivered + bounced in the window before any rate counts: 1 complaint in 1,000 is 0.1 %
    bounce_rate: float = 0.05
    complaint_rate: float = 0.001


@dataclass(frozen=True)
class Outcomes:
    """A set's outcomes in the window, counted from its events."""

    delivered: int = 0
    bounced: int = 0  # every Bounce but those SES leaves out (suppression-list bounces: never sent)
    permanent: int = 0  # of them, Permanent
    complaints: int = 0

    @property
    def volume(self) -> int:
        return self.delivered + self.bounced

    @property
    def bounce_rate(self) -> float:
        """Permanent bounces over delivered + bounced (SES's bounce rate counts hard bounces)."""
        return self.permanent / self.volume if self.volume else 0.0

    @property
    def complaint_rate(self) -> float:
        """Complaints over delivered: a complaint can only follow a delivery."""
        return self.complaints / self.delivered if self.delivered else 0.0


def guard_verdict(o: Outcomes, t: Thresholds) -> str | None:
    """Why the set must be paused, naming the rate; None while it stays under its thresholds or has not sent
    `min_volume` messages in the window yet."""
    if o.volume < t.min_volume:
        return None
    window = duration_text(t.window_s)
    if o.bounce_rate >= t.bounce_rate:
        return (f"bounce rate {percent(o.bounce_rate)} ({o.permanent} permanent bounces of {o.volume} messages in"
                f" {window}) reached the threshold of {percent(t.bounce_rate)}")
    if o.complaint_rate >= t.complaint_rate:
        return (f"complaint rate {percent(o.complaint_rate)} ({o.complaints} complaints of {o.delivered} delivered"
                f" in {window}) reached the threshold of {percent(t.complaint_rate)}")
    return None


def percent(rate: float) -> str:
    return f"{rate * 100:.2f}".rstrip("0").rstrip(".") + " %"


def duration_text(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


# --- outcomes per set and minute, from the events ------------------------------------------------------------

SUPPRESSION_SUBTYPES = ("OnAccountSuppressionList", "OnSuppressionList")  # never sent: not in the bounce rate


def minute_counts(events: list[tuple[str, str, int, str | None, str | None, int]]
                  ) -> dict[tuple[str, int], tuple[int, ...]]:
    """(set, eventType, time in ms, bounceType, bounceSubType, recipients of a Send) rows summed per (set, epoch
    minute) into (attempts, delivered, bounced, permanent, complaints, rejects), the columns of send_statistics."""
    out: dict[tuple[str, int], list[int]] = {}
    for set_name, kind, time_ms, bounce_type, sub_type, recipients in events:
        counts = out.setdefault((set_name, time_ms // 60000), [0] * 6)
        if kind == "Send":
            counts[0] += recipients or 0
        elif kind == "Delivery":
            counts[1] += 1
        elif kind == "Bounce" and sub_type not in SUPPRESSION_SUBTYPES:
            counts[2] += 1
            counts[3] += bounce_type == "Permanent"
        elif kind == "Complaint":
            counts[4] += 1
        elif kind == "Reject":
            counts[5] += 1
    return {key: tuple(c) for key, c in out.items()}


# --- SES's GetSendStatistics -----------------------------------------------------------------------------------

STATISTICS_MINUTES = 15  # SES's data points are 15-minute intervals ...
STATISTICS_DAYS = 14  # ... over the last two weeks


@dataclass(frozen=True)
class DataPoint:
    """One of SES's SendDataPoints: the interval's start (epoch minute) and its counts."""

    minute: int
    delivery_attempts: int
    bounces: int
    complaints: int
    rejects: int


def data_points(rows: list[tuple[int, int, int, int, int]]) -> list[DataPoint]:
    """(epoch minute, attempts, bounces, complaints, rejects) rows summed into 15-minute points, oldest first;
    intervals with nothing in them are left out, as SES leaves them out."""
    points: dict[int, list[int]] = {}
    for minute, *counts in rows:
        start = minute - minute % STATISTICS_MINUTES
        totals = points.setdefault(start, [0, 0, 0, 0])
        for i, n in enumerate(counts):
            totals[i] += n or 0
    return [DataPoint(m, *c) for m, c in sorted(points.items()) if any(c)]
