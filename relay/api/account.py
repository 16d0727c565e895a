"""The account and sending switches over the API: SES's SendingEnabled (account and set), DeliveryOptions,
ReputationOptions, the send quota and the send statistics, in v2 (REST-JSON) and v1 (Query/XML).

Handlers are registered by relay/api/v1.py and relay/api/v2.py (V1_ACTIONS, V2_ROUTES, V2_HANDLERS); they call
relay/control.py. Reads return what is so, never invented defaults: a set's SendingEnabled is its real switch;
DeliveryOptions and ReputationMetricsEnabled appear once they were set.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from xml.sax.saxutils import escape

from relay import control
from relay.api.common import Context, invalid, query_bool, required, structure, v2_bool
from relay.core.control import TLS_POLICIES, SetOptions, guard_verdict
from relay.core.events import ms_from_iso
from relay.core.resolve import SetDef
from relay.sets import SesError

_SEG = r"([^/]+)"
# SES's documented range for DeliveryOptions.MaxDeliverySeconds: five minutes to fourteen hours.
MIN_DELIVERY_SECONDS, MAX_DELIVERY_SECONDS = 300, 50400
V1_TLS = {"Require": "REQUIRE", "Optional": "OPTIONAL"}
NO_POOLS = ("relay sends every message through its upstream and has no dedicated IP pools: leave SendingPoolName"
            " out.")


# --- shared -----------------------------------------------------------------------------------------------------

def caller(ctx: Context, operation: str) -> tuple[str, str]:
    """(who, why) recorded with a switch changed through the API."""
    return ctx.caller or "api", f"{operation} through the API"


def _epoch(iso: str) -> float:
    return ms_from_iso(iso) / 1000


def _set(ctx: Context, name: str) -> SetDef:
    return ctx.model_set(name)


def set_sending(ctx: Context, name: str, enabled: bool, operation: str) -> None:
    _set(ctx, name)
    who, why = caller(ctx, operation)
    control.set_sending(ctx.config, ctx.store, name, enabled, why, who)


def max_delivery(value: object, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(value, where, "Member must be an integer")
    if not MIN_DELIVERY_SECONDS <= value <= MAX_DELIVERY_SECONDS:
        raise invalid(value, where, f"Member must have value between {MIN_DELIVERY_SECONDS} and"
                      f" {MAX_DELIVERY_SECONDS}")
    return value


def delivery_values(body: dict, where: str) -> dict:
    """v2 DeliveryOptions -> the stored options (every field replaced: absent ones are cleared)."""
    if body.get("SendingPoolName"):
        raise SesError("BadRequestException", NO_POOLS)
    policy = body.get("TlsPolicy")
    if policy is not None and policy not in TLS_POLICIES:
        raise invalid(policy, f"{where}tlsPolicy", f"Member must satisfy enum value set: [{', '.join(TLS_POLICIES)}]")
    return {"tls_policy": policy, "max_delivery_seconds": max_delivery(body.get("MaxDeliverySeconds"),
                                                                         f"{where}maxDeliverySeconds")}


def options_v2(ctx: Context, s: SetDef) -> dict:
    """SendingOptions, DeliveryOptions and ReputationOptions of GetConfigurationSet, and relay's own Reputation
    member (the set's rates in its window, what the guard judges; SDKs leave members they do not know out)."""
    data: dict = {"SendingOptions": {"SendingEnabled": s.sending.enabled}}
    o = s.options
    delivery = {k: v for k, v in (("TlsPolicy", o.tls_policy), ("MaxDeliverySeconds", o.max_delivery_seconds))
                if v is not None}
    if delivery:
        data["DeliveryOptions"] = delivery
    reputation: dict = {}
    if o.reputation_metrics is not None:
        reputation["ReputationMetricsEnabled"] = o.reputation_metrics
    if s.sending.fresh_start:
        reputation["LastFreshStart"] = _epoch(s.sending.fresh_start)
    if reputation:
        data["ReputationOptions"] = reputation
    outcomes, thresholds = control.set_outcomes(ctx.config, ctx.store, s)
    data["Reputation"] = {"BounceRate": outcomes.bounce_rate, "ComplaintRate": outcomes.complaint_rate,
                          "Delivered": outcomes.delivered, "Bounced": outcomes.bounced,
                          "PermanentBounces": outcomes.permanent, "Complaints": outcomes.complaints,
                          "WindowSeconds": thresholds.window_s, "MinVolume": thresholds.min_volume,
                          "BounceRateThreshold": thresholds.bounce_rate,
                          "ComplaintRateThreshold": thresholds.complaint_rate}
    return data


def create_options(body: dict) -> tuple[bool | None, dict]:
    """CreateConfigurationSet's SendingOptions, DeliveryOptions and ReputationOptions: (SendingEnabled given,
    or None; the options to store)."""
    values: dict = {}
    delivery = body.get("DeliveryOptions")
    if delivery is not None:
        values.update(delivery_values(structure(delivery, "deliveryOptions"), "deliveryOptions."))
    reputation = body.get("ReputationOptions")
    if reputation is not None:
        given = structure(reputation, "reputationOptions").get("ReputationMetricsEnabled")
        values["reputation_metrics"] = int(v2_bool(given, "reputationOptions.reputationMetricsEnabled"))
    sending = body.get("SendingOptions")
    enabled = None
    if sending is not None:
        enabled = v2_bool(structure(sending, "sendingOptions").get("SendingEnabled"), "sendingOptions.sendingEnabled")
    return enabled, {k: v for k, v in values.items() if v is not None}


def created(ctx: Context, name: str, enabled: bool | None, options: dict):
    """What CreateConfigurationSet writes with the new set beside its name (relay/sets.py's `also`)."""
    who, why = caller(ctx, "CreateConfigurationSet")
    return control.with_new_set(name, enabled, options, who, why)


# --- v2 -----------------------------------------------------------------------------------------------------------

def put_sending_options(ctx: Context, call) -> dict:
    set_sending(ctx, call.params[0], v2_bool(call.body.get("SendingEnabled"), "sendingEnabled"),
                "PutConfigurationSetSendingOptions")
    return {}


def put_delivery_options(ctx: Context, call) -> dict:
    _set(ctx, call.params[0])
    control.put_set_options(ctx.config, ctx.store, call.params[0], delivery_values(call.body, ""))
    return {}


def put_reputation_options(ctx: Context, call) -> dict:
    _set(ctx, call.params[0])
    enabled = v2_bool(call.body.get("ReputationMetricsEnabled"), "reputationMetricsEnabled")
    control.put_set_options(ctx.config, ctx.store, call.params[0], {"reputation_metrics": int(enabled)})
    return {}


def quota(ctx: Context) -> dict:
    """SES's SendQuota; -1 stands for no limit, as SES documents for Max24HourSend."""
    limits = ctx.config.quotas.account
    return {"Max24HourSend": float(limits.max_24_hour_send or -1), "MaxSendRate": float(limits.max_send_rate or -1),
            "SentLast24Hours": float(control.sent_last_24_hours(ctx.config, ctx.store))}


def enforcement_status(ctx: Context) -> str:
    """PROBATION while the account's own rates are past the guard's default thresholds (SES's first review
    levels), else HEALTHY. relay never shuts an account down by itself."""
    outcomes, thresholds = control.account_outcomes(ctx.config, ctx.store)
    return "PROBATION" if guard_verdict(outcomes, thresholds) else "HEALTHY"


def get_account(ctx: Context, call) -> dict:
    state = control.account_state(ctx.config, ctx.store)
    return {"DedicatedIpAutoWarmupEnabled": False, "EnforcementStatus": enforcement_status(ctx),
            "ProductionAccessEnabled": True, "SendQuota": quota(ctx), "SendingEnabled": state.enabled,
            "SuppressionAttributes": {"SuppressedReasons": [r for r in ctx.config.feedback.suppression_reasons
                                                            if r in ("BOUNCE", "COMPLAINT")]}}


def put_account_sending(ctx: Context, call) -> dict:
    who, why = caller(ctx, "PutAccountSendingAttributes")
    control.set_account_sending(ctx.store, v2_bool(call.body.get("SendingEnabled"), "sendingEnabled"), why, who)
    return {}


V2_ROUTES = [
    ("PUT", re.compile(rf"^/v2/email/configuration-sets/{_SEG}/sending$"), "PutConfigurationSetSendingOptions"),
    ("PUT", re.compile(rf"^/v2/email/configuration-sets/{_SEG}/delivery-options$"),
     "PutConfigurationSetDeliveryOptions"),
    ("PUT", re.compile(rf"^/v2/email/configuration-sets/{_SEG}/reputation-options$"),
     "PutConfigurationSetReputationOptions"),
    ("GET", re.compile(r"^/v2/email/account$"), "GetAccount"),
    ("PUT", re.compile(r"^/v2/email/account/sending$"), "PutAccountSendingAttributes"),
]
V2_HANDLERS = {
    "PutConfigurationSetSendingOptions": put_sending_options,
    "PutConfigurationSetDeliveryOptions": put_delivery_options,
    "PutConfigurationSetReputationOptions": put_reputation_options, "GetAccount": get_account,
    "PutAccountSendingAttributes": put_account_sending,
}


# --- v1 -----------------------------------------------------------------------------------------------------------

def xml(name: str, value: object) -> str:
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return f"<{name}>{escape(text)}</{name}>"


def describe_v1(s: SetDef, attributes: list[str]) -> str:
    """DescribeConfigurationSet's DeliveryOptions and ReputationOptions blocks, when asked for."""
    parts = []
    o: SetOptions = s.options
    if "deliveryOptions" in attributes and o.tls_policy:
        parts.append(f"<DeliveryOptions>{xml('TlsPolicy', o.tls_policy.capitalize())}</DeliveryOptions>")
    if "reputationOptions" in attributes:
        inner = xml("SendingEnabled", s.sending.enabled)
        if o.reputation_metrics is not None:
            inner += xml("ReputationMetricsEnabled", o.reputation_metrics)
        if s.sending.fresh_start:
            inner += xml("LastFreshStart", s.sending.fresh_start)
        parts.append(f"<ReputationOptions>{inner}</ReputationOptions>")
    return "".join(parts)


def _name(p: dict) -> str:
    return str(required(p.get("ConfigurationSetName"), "configurationSetName"))


def v1_set_sending(ctx: Context, p: dict) -> str:
    set_sending(ctx, _name(p), query_bool(p.get("Enabled"), "enabled"), "UpdateConfigurationSetSendingEnabled")
    return ""


def v1_set_reputation(ctx: Context, p: dict) -> str:
    name = _name(p)
    _set(ctx, name)
    enabled = query_bool(p.get("Enabled"), "enabled")
    control.put_set_options(ctx.config, ctx.store, name, {"reputation_metrics": int(enabled)})
    return ""


def v1_delivery_options(ctx: Context, p: dict) -> str:
    name = _name(p)
    _set(ctx, name)
    options = p.get("DeliveryOptions")
    policy = options.get("TlsPolicy") if isinstance(options, dict) else None
    if policy is not None and policy not in V1_TLS:
        raise SesError("InvalidDeliveryOptions", f"TlsPolicy {policy!r} is not one of Require, Optional.")
    control.put_set_options(ctx.config, ctx.store, name, {"tls_policy": V1_TLS.get(policy or "")})
    return ""


def v1_account_enabled(ctx: Context, p: dict) -> str:
    return xml("Enabled", control.account_state(ctx.config, ctx.store).enabled)


def v1_update_account(ctx: Context, p: dict) -> str:
    who, why = caller(ctx, "UpdateAccountSendingEnabled")
    control.set_account_sending(ctx.store, query_bool(p.get("Enabled"), "enabled"), why, who)
    return ""


def v1_send_quota(ctx: Context, p: dict) -> str:
    q = quota(ctx)
    return "".join(xml(k, q[k]) for k in ("Max24HourSend", "MaxSendRate", "SentLast24Hours"))


def v1_send_statistics(ctx: Context, p: dict) -> str:
    points = control.send_statistics(ctx.store)
    items = "".join(
        "<member>" + xml("Bounces", d.bounces) + xml("Complaints", d.complaints)
        + xml("DeliveryAttempts", d.delivery_attempts) + xml("Rejects", d.rejects)
        + xml("Timestamp", datetime.fromtimestamp(d.minute * 60, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")) + "</member>"
        for d in points)
    return f"<SendDataPoints>{items}</SendDataPoints>" if items else "<SendDataPoints/>"


V1_ACTIONS = {
    "UpdateConfigurationSetSendingEnabled": v1_set_sending,
    "UpdateConfigurationSetReputationMetricsEnabled": v1_set_reputation,
    "PutConfigurationSetDeliveryOptions": v1_delivery_options,
    "GetAccountSendingEnabled": v1_account_enabled, "UpdateAccountSendingEnabled": v1_update_account,
    "GetSendQuota": v1_send_quota, "GetSendStatistics": v1_send_statistics,
}
