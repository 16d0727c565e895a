"""SES v2 (REST-JSON): routes, request parsing and response shaping over relay/sets.py.

`dispatch` takes the decoded request and returns (status, JSON object); SesError carries failures, shaped by
the server into `x-amzn-ErrorType` + `{"message": ...}` with the v2 status (relay/api/errors.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import parse_qs, parse_qsl, unquote

from relay import sets, suppression, templates
from relay.api import account, identities, send
from relay.api.common import (
    FEATURE_STATUS,
    HTTPS_POLICIES,
    V2_EVENT_TYPES,
    Context,
    arn_of,
    choice,
    event_types,
    invalid,
    key_token,
    page,
    page_size,
    required,
    target_fields,
    token_key,
    undo_on_error,
)
from relay.api.common import structure as _obj
from relay.core.events import iso_ms, ms_from_iso
from relay.core.resolve import Destination, SetDef, TrackingOptions
from relay.core.settings import SUPPRESSION_REASONS
from relay.core.templates import Template
from relay.sets import SesError

_SEG = r"([^/]+)"


@dataclass(frozen=True)
class Call:
    params: tuple[str, ...]  # path parameters, decoded
    query: dict[str, str]
    body: dict
    raw_query: str = ""  # for parameters that repeat (ListSuppressedDestinations' Reason)


Handler = Callable[[Context, Call], dict]
ROUTES: list[tuple[str, re.Pattern, str]] = [
    ("POST", re.compile(r"^/v2/email/configuration-sets$"), "CreateConfigurationSet"),
    ("GET", re.compile(r"^/v2/email/configuration-sets$"), "ListConfigurationSets"),
    # botocore 1.44 moved the listing to a POST with its parameters in the body; both are in use.
    ("POST", re.compile(r"^/v2/email/list-configuration-sets$"), "ListConfigurationSets"),
    ("GET", re.compile(rf"^/v2/email/configuration-sets/{_SEG}$"), "GetConfigurationSet"),
    ("DELETE", re.compile(rf"^/v2/email/configuration-sets/{_SEG}$"), "DeleteConfigurationSet"),
    ("PUT", re.compile(rf"^/v2/email/configuration-sets/{_SEG}/tracking-options$"),
     "PutConfigurationSetTrackingOptions"),
    ("PUT", re.compile(rf"^/v2/email/configuration-sets/{_SEG}/vdm-options$"), "PutConfigurationSetVdmOptions"),
    ("POST", re.compile(rf"^/v2/email/configuration-sets/{_SEG}/event-destinations$"),
     "CreateConfigurationSetEventDestination"),
    ("GET", re.compile(rf"^/v2/email/configuration-sets/{_SEG}/event-destinations$"),
     "GetConfigurationSetEventDestinations"),
    ("PUT", re.compile(rf"^/v2/email/configuration-sets/{_SEG}/event-destinations/{_SEG}$"),
     "UpdateConfigurationSetEventDestination"),
    ("DELETE", re.compile(rf"^/v2/email/configuration-sets/{_SEG}/event-destinations/{_SEG}$"),
     "DeleteConfigurationSetEventDestination"),
    ("PUT", re.compile(rf"^/v2/email/identities/{_SEG}/configuration-set$"),
     "PutEmailIdentityConfigurationSetAttributes"),
    ("PUT", re.compile(r"^/v2/email/account/vdm$"), "PutAccountVdmAttributes"),
    ("PUT", re.compile(rf"^/v2/email/configuration-sets/{_SEG}/suppression-options$"),
     "PutConfigurationSetSuppressionOptions"),
    ("PUT", re.compile(r"^/v2/email/suppression/addresses$"), "PutSuppressedDestination"),
    ("GET", re.compile(r"^/v2/email/suppression/addresses$"), "ListSuppressedDestinations"),
    ("GET", re.compile(rf"^/v2/email/suppression/addresses/{_SEG}$"), "GetSuppressedDestination"),
    ("DELETE", re.compile(rf"^/v2/email/suppression/addresses/{_SEG}$"), "DeleteSuppressedDestination"),
    # sending and templates
    ("POST", re.compile(r"^/v2/email/outbound-emails$"), "SendEmail"),
    ("POST", re.compile(r"^/v2/email/outbound-bulk-emails$"), "SendBulkEmail"),
    ("POST", re.compile(r"^/v2/email/templates$"), "CreateEmailTemplate"),
    ("GET", re.compile(r"^/v2/email/templates$"), "ListEmailTemplates"),
    ("GET", re.compile(rf"^/v2/email/templates/{_SEG}$"), "GetEmailTemplate"),
    ("PUT", re.compile(rf"^/v2/email/templates/{_SEG}$"), "UpdateEmailTemplate"),
    ("DELETE", re.compile(rf"^/v2/email/templates/{_SEG}$"), "DeleteEmailTemplate"),
    ("POST", re.compile(rf"^/v2/email/templates/{_SEG}/render$"), "TestRenderEmailTemplate"),
]


def route(method: str, raw_path: str) -> tuple[str, tuple[str, ...]] | None:
    """(operation, decoded path parameters) or None."""
    for verb, pattern, op in ROUTES:
        m = pattern.match(raw_path)
        if m and verb == method.upper():
            return op, tuple(unquote(g) for g in m.groups())
    return None


def parse_body(body: bytes) -> dict:
    if not body.strip():
        return {}
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SesError("BadRequestException", "The request body is not valid JSON.") from exc
    if not isinstance(data, dict):
        raise SesError("BadRequestException", "The request body must be a JSON object.")
    return data


def dispatch(ctx: Context, op: str, params: tuple[str, ...], raw_query: str, body: bytes) -> dict:
    call = Call(params, dict(parse_qsl(raw_query, keep_blank_values=True)), parse_body(body), raw_query)
    return HANDLERS[op](ctx, call)


# --- shaping ------------------------------------------------------------------------------------------------

def destination_json(d: Destination) -> dict:
    data: dict = {"Name": d.name, "Enabled": d.enabled, "MatchingEventTypes": list(d.event_types)}
    target = arn_of(d)
    if target and target[0] == "sns":
        data["SnsDestination"] = {"TopicArn": target[1]}
    elif target:
        data["EventBridgeDestination"] = {"EventBusArn": target[1]}
    return data


def set_json(s: SetDef) -> dict:
    data: dict = {"ConfigurationSetName": s.name}
    t = s.tracking
    if t.custom_redirect_domain or t.https_policy:
        # What was put, and only that: a set given only an HttpsPolicy has no domain of its own (it uses relay's
        # default host), and showing that host as its CustomRedirectDomain would have a client write it back.
        data["TrackingOptions"] = {k: v for k, v in (("CustomRedirectDomain", t.custom_redirect_domain),
                                                     ("HttpsPolicy", t.https_policy)) if v}
    if t.open_tracking is not None and t.open_tracking == t.click_tracking:
        status = "ENABLED" if t.open_tracking else "DISABLED"
        data["VdmOptions"] = {"DashboardOptions": {"EngagementMetrics": status}}
    if s.feedback.suppression_reasons is not None:  # the set's own; absent: the account's [suppression]
        data["SuppressionOptions"] = {"SuppressedReasons": list(s.feedback.suppression_reasons)}
    return data


# --- input ----------------------------------------------------------------------------------------------------

def _tracking(body: dict, where: str) -> tuple[TrackingOptions, frozenset[str]]:
    """(options given, fields cleared): PutConfigurationSetTrackingOptions replaces the set's options."""
    domain = body.get("CustomRedirectDomain")
    if domain is not None and not isinstance(domain, str):
        raise invalid(domain, f"{where}customRedirectDomain", "Member must be a string")
    policy = choice(body.get("HttpsPolicy"), HTTPS_POLICIES, f"{where}httpsPolicy")
    cleared = frozenset(f for f, v in (("custom_redirect_domain", domain), ("https_policy", policy)) if not v)
    return TrackingOptions(custom_redirect_domain=domain or None, https_policy=policy), cleared


def _engagement(vdm: object) -> bool | None:
    vdm = _obj(vdm, "vdmOptions")
    choice(_obj(vdm.get("GuardianOptions"), "vdmOptions.guardianOptions").get("OptimizedSharedDelivery"),
           FEATURE_STATUS, "vdmOptions.guardianOptions.optimizedSharedDelivery")
    status = choice(_obj(vdm.get("DashboardOptions"), "vdmOptions.dashboardOptions").get("EngagementMetrics"),
                    FEATURE_STATUS, "vdmOptions.dashboardOptions.engagementMetrics")
    return None if status is None else status == "ENABLED"


def _put_switches(ctx: Context, level: str, scope: str, on: bool | None) -> None:
    """Engagement metrics = relay's open and click switches; None: inherit again."""
    if on is None:
        sets.put_tracking(ctx.config, ctx.store, level, scope, TrackingOptions(),
                          frozenset({"open_tracking", "click_tracking"}))
    else:
        sets.put_tracking(ctx.config, ctx.store, level, scope, TrackingOptions(open_tracking=on, click_tracking=on))


_TARGETS = (("SnsDestination", "TopicArn", "sns"), ("EventBridgeDestination", "EventBusArn", "events"),
            ("KinesisFirehoseDestination", None, "firehose"), ("CloudWatchDestination", None, "cloudwatch"),
            ("PinpointDestination", None, "pinpoint"))


def _definition(ctx: Context, raw: object) -> dict:
    """EventDestinationDefinition -> the Destination fields it gives (absent members are left out)."""
    d = _obj(raw, "eventDestination")
    fields: dict = {}
    if d.get("Enabled") is not None:
        if not isinstance(d["Enabled"], bool):
            raise invalid(d["Enabled"], "eventDestination.enabled", "Member must be a boolean")
        fields["enabled"] = d["Enabled"]
    if d.get("MatchingEventTypes") is not None:
        fields["event_types"] = event_types(d["MatchingEventTypes"], V2_EVENT_TYPES,
                                            "eventDestination.matchingEventTypes")
    given = [(member, key, kind) for member, key, kind in _TARGETS if d.get(member) is not None]
    if len(given) > 1:
        raise SesError("BadRequestException", "An event destination has exactly one destination;"
                       f" got {', '.join(g[0] for g in given)}.")
    for member, key, kind in given:
        arn = _obj(d[member], f"eventDestination.{member}").get(key) if key else None
        fields.update(target_fields(ctx.config, kind, arn))
    return fields


# --- operations -------------------------------------------------------------------------------------------------

def create_set(ctx: Context, call: Call) -> dict:
    name = str(required(call.body.get("ConfigurationSetName"), "configurationSetName"))
    tracking = call.body.get("TrackingOptions")
    options = cleared = None
    if tracking is not None:
        required(_obj(tracking, "trackingOptions").get("CustomRedirectDomain"), "trackingOptions.customRedirectDomain")
        options, cleared = _tracking(tracking, "trackingOptions.")
    engagement = _engagement(call.body.get("VdmOptions"))
    reasons = _suppressed_reasons(_obj(call.body.get("SuppressionOptions"), "suppressionOptions"),
                                  "suppressionOptions.")
    enabled, sending_options = account.create_options(call.body)
    sets.create_set(ctx.config, ctx.store, name, account.created(ctx, name, enabled, sending_options))

    def configure() -> None:
        if options is not None:
            sets.put_tracking(ctx.config, ctx.store, "set", name, options, cleared)
        if engagement is not None:
            _put_switches(ctx, "set", name, engagement)
        if reasons is not None:
            suppression.put_set_reasons(ctx.config, ctx.store, name, reasons)

    # SES creates the set whole or not at all: a refused tracking domain takes the new set away again.
    undo_on_error(configure, lambda: sets.delete_set(ctx.config, ctx.store, name))
    return {}


def get_set(ctx: Context, call: Call) -> dict:
    s = ctx.model_set(call.params[0])
    return {**set_json(s), **account.options_v2(ctx, s)}


def list_sets(ctx: Context, call: Call) -> dict:
    params = {**call.body, **call.query}
    size = page_size(params.get("PageSize"), "pageSize")
    names = [s["Name"] for s in sets.list_sets(ctx.config, ctx.store)]
    contains = name_filter(params.get("Filter"))
    names = [n for n in names if contains in n]
    chunk, token = page(names, params.get("NextToken"), size)
    return {"ConfigurationSets": chunk, **({"NextToken": token} if token else {})}


def name_filter(raw: object) -> str:
    """The newer API's `Filter: {"CONFIGURATION_SET_NAME_CONTAINS": "..."}` (empty: every set)."""
    if raw is None:
        return ""
    if not isinstance(raw, dict) or set(raw) - {"CONFIGURATION_SET_NAME_CONTAINS"}:
        raise invalid(raw, "filter", "Member must be a map with the key CONFIGURATION_SET_NAME_CONTAINS")
    return str(raw.get("CONFIGURATION_SET_NAME_CONTAINS", ""))


def delete_set(ctx: Context, call: Call) -> dict:
    sets.delete_set(ctx.config, ctx.store, call.params[0])
    return {}


def put_tracking(ctx: Context, call: Call) -> dict:
    options, cleared = _tracking(call.body, "")
    sets.put_tracking(ctx.config, ctx.store, "set", call.params[0], options, cleared)
    return {}


def put_set_vdm(ctx: Context, call: Call) -> dict:
    _put_switches(ctx, "set", call.params[0], _engagement(call.body.get("VdmOptions")))
    return {}


def put_account_vdm(ctx: Context, call: Call) -> dict:
    attrs = _obj(required(call.body.get("VdmAttributes"), "vdmAttributes"), "vdmAttributes")
    enabled = choice(required(attrs.get("VdmEnabled"), "vdmAttributes.vdmEnabled"), FEATURE_STATUS,
                     "vdmAttributes.vdmEnabled")
    choice(_obj(attrs.get("GuardianAttributes"), "vdmAttributes.guardianAttributes").get("OptimizedSharedDelivery"),
           FEATURE_STATUS, "vdmAttributes.guardianAttributes.optimizedSharedDelivery")
    dashboard = _obj(attrs.get("DashboardAttributes"), "vdmAttributes.dashboardAttributes")
    engagement = choice(dashboard.get("EngagementMetrics"), FEATURE_STATUS,
                        "vdmAttributes.dashboardAttributes.engagementMetrics")
    # VDM off turns engagement tracking off; on, the dashboard switch decides (absent: on).
    _put_switches(ctx, "account", "", enabled == "ENABLED" and (engagement or "ENABLED") == "ENABLED")
    return {}


def create_destination(ctx: Context, call: Call) -> dict:
    name = str(required(call.body.get("EventDestinationName"), "eventDestinationName"))
    fields = _definition(ctx, required(call.body.get("EventDestination"), "eventDestination"))
    if "kind" not in fields:
        raise SesError("BadRequestException", f"An event destination needs a destination: {_ONE_OF}.")
    fields.setdefault("enabled", False)  # as SES v1 documents
    fields.setdefault("event_types", ())
    sets.add_destination(ctx.config, ctx.store, call.params[0], Destination(name=name, **fields))
    return {}


_ONE_OF = "SnsDestination or EventBridgeDestination (mapped to a webhook in relay's configuration)"


def get_destinations(ctx: Context, call: Call) -> dict:
    return {"EventDestinations": [destination_json(d) for d in ctx.model_set(call.params[0]).destinations]}


def update_destination(ctx: Context, call: Call) -> dict:
    # Members left out keep their value (the CLI sends only what was given).
    changes = _definition(ctx, required(call.body.get("EventDestination"), "eventDestination"))
    sets.update_destination(ctx.config, ctx.store, call.params[0], call.params[1], changes)
    return {}


def delete_destination(ctx: Context, call: Call) -> dict:
    sets.delete_destination(ctx.config, ctx.store, call.params[0], call.params[1])
    return {}


def put_identity_set(ctx: Context, call: Call) -> dict:
    name = call.body.get("ConfigurationSetName") or None
    sets.set_identity_default(ctx.config, ctx.store, call.params[0], name)
    return {}


# --- suppression list ---------------------------------------------------------------------------------
# SES's API knows the reasons BOUNCE and COMPLAINT; relay's UNSUBSCRIBE is accepted and listed too (botocore
# checks neither enum: it sends and parses any string).

def _suppressed_reasons(body: dict, where: str) -> list[str] | None:
    raw = body.get("SuppressedReasons")
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise invalid(raw, f"{where}suppressedReasons", "Member must be a list")
    return [str(choice(r, SUPPRESSION_REASONS, f"{where}suppressedReasons.{i}.member")) for i, r in enumerate(raw, 1)]


def put_set_suppression(ctx: Context, call: Call) -> dict:
    """Without SuppressedReasons the set follows the account's reasons again; [] suppresses nothing."""
    ctx.model_set(call.params[0])  # NotFoundException before anything else
    suppression.put_set_reasons(ctx.config, ctx.store, call.params[0], _suppressed_reasons(call.body, ""))
    return {}


def _epoch(time_text: str) -> float:
    return ms_from_iso(time_text) / 1000


def _date(raw: str | None, where: str) -> str | None:
    """A query-string timestamp (ISO 8601 as botocore sends it, or epoch seconds) -> the list's time format."""
    if not raw:
        return None
    try:
        dt = datetime.fromtimestamp(float(raw), UTC) if re.fullmatch(r"\d+(\.\d+)?", raw) \
            else datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except (ValueError, OverflowError) as exc:
        raise invalid(raw, where, "Member must be a timestamp") from exc
    return iso_ms(int((dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp() * 1000))


def put_suppressed(ctx: Context, call: Call) -> dict:
    address = str(required(call.body.get("EmailAddress"), "emailAddress"))
    reason = choice(required(call.body.get("Reason"), "reason"), SUPPRESSION_REASONS, "reason")
    suppression.put(ctx.store, address, str(reason))
    return {}


def get_suppressed(ctx: Context, call: Call) -> dict:
    e = suppression.get(ctx.store, call.params[0])[0]  # the newest of its reasons
    attributes = {k: v for k, v in (("MessageId", e.message_id), ("FeedbackId", e.feedback_id)) if v}
    return {"SuppressedDestination": {"EmailAddress": e.email_address, "Reason": e.reason,
                                      "LastUpdateTime": _epoch(e.last_update_time), "Attributes": attributes}}


def delete_suppressed(ctx: Context, call: Call) -> dict:
    suppression.remove(ctx.store, call.params[0])
    return {}


def list_suppressed(ctx: Context, call: Call) -> dict:
    size = page_size(call.query.get("PageSize"), "pageSize")
    reasons = [choice(r, SUPPRESSION_REASONS, f"reasons.{i}.member")
               for i, r in enumerate(parse_qs(call.raw_query).get("Reason", []), 1)]
    token = call.query.get("NextToken")
    after = tuple(token_key(token, "InvalidNextTokenException").split("\n", 1)) if token else None
    if after is not None and len(after) != 2:
        raise SesError("InvalidNextTokenException", "Invalid NextToken.")
    entries = suppression.listing(ctx.store, reasons, _date(call.query.get("StartDate"), "startDate"),
                                  _date(call.query.get("EndDate"), "endDate"), after, size + 1)
    out: dict = {"SuppressedDestinationSummaries": [
        {"EmailAddress": e.email_address, "Reason": e.reason, "LastUpdateTime": _epoch(e.last_update_time)}
        for e in entries[:size]]}
    if len(entries) > size:
        last = entries[size - 1]
        out["NextToken"] = key_token(f"{last.email_address}\n{last.reason}")
    return out


# --- templates ----------------------------------------------------------------------------------------------------

def _template(name: str, body: dict) -> Template:
    content = _obj(required(body.get("TemplateContent"), "templateContent"), "templateContent")
    return Template(name, content.get("Subject"), content.get("Text"), content.get("Html"))


def create_template(ctx: Context, call: Call) -> dict:
    name = str(required(call.body.get("TemplateName"), "templateName"))
    templates.create(ctx.config, ctx.store, _template(name, call.body))
    return {}


def get_template(ctx: Context, call: Call) -> dict:
    t = templates.get(ctx.store, call.params[0])
    content = {k: v for k, v in (("Subject", t.subject), ("Text", t.text), ("Html", t.html)) if v is not None}
    return {"TemplateName": t.name, "TemplateContent": content, "Tags": []}


def list_templates(ctx: Context, call: Call) -> dict:
    size = page_size(call.query.get("PageSize"), "pageSize")
    token = call.query.get("NextToken")
    rows = templates.listing(ctx.store, token_key(token, "BadRequestException") if token else None, size + 1)
    out: dict = {"TemplatesMetadata": [{"TemplateName": n, "CreatedTimestamp": _epoch(t)} for n, t in rows[:size]]}
    if len(rows) > size:
        out["NextToken"] = key_token(rows[size - 1][0])
    return out


def update_template(ctx: Context, call: Call) -> dict:
    templates.update(ctx.config, ctx.store, _template(call.params[0], call.body))
    return {}


def delete_template(ctx: Context, call: Call) -> dict:
    templates.delete(ctx.store, call.params[0])
    return {}


def test_render(ctx: Context, call: Call) -> dict:
    data = required(call.body.get("TemplateData"), "templateData")
    rendered = templates.render(templates.get(ctx.store, call.params[0]), str(data))
    return {"RenderedTemplate": templates.rendered_message(ctx.config, rendered)}


# --- sending: planned in a worker thread, sent by the server through the pipeline ------------------------------

SEND_PLANS: dict[str, Callable[[Context, dict], send.Plan]] = {
    "SendEmail": send.v2_send_email, "SendBulkEmail": send.v2_send_bulk,
}


def send_response(plan: send.Plan, results: list[send.Result]) -> dict:
    """SendEmail's MessageId (or its error, raised), SendBulkEmail's result per entry."""
    if not plan.bulk:
        result = results[0]
        if result.error is not None:
            raise result.error
        return {"MessageId": result.message_id}
    entries = []
    for r in results:
        entry: dict = {"Status": send.bulk_status(r.error)}
        if r.error is not None:
            entry["Error"] = r.error.message
        if r.message_id:
            entry["MessageId"] = r.message_id
        entries.append(entry)
    return {"BulkEmailEntryResults": entries}


HANDLERS: dict[str, Handler] = {
    "CreateConfigurationSet": create_set, "GetConfigurationSet": get_set, "ListConfigurationSets": list_sets,
    "DeleteConfigurationSet": delete_set, "PutConfigurationSetTrackingOptions": put_tracking,
    "PutConfigurationSetVdmOptions": put_set_vdm, "PutAccountVdmAttributes": put_account_vdm,
    "CreateConfigurationSetEventDestination": create_destination,
    "GetConfigurationSetEventDestinations": get_destinations,
    "UpdateConfigurationSetEventDestination": update_destination,
    "DeleteConfigurationSetEventDestination": delete_destination,
    "PutEmailIdentityConfigurationSetAttributes": put_identity_set,
    "PutConfigurationSetSuppressionOptions": put_set_suppression, "PutSuppressedDestination": put_suppressed,
    "GetSuppressedDestination": get_suppressed, "DeleteSuppressedDestination": delete_suppressed,
    "ListSuppressedDestinations": list_suppressed,
    "CreateEmailTemplate": create_template, "GetEmailTemplate": get_template, "ListEmailTemplates": list_templates,
    "UpdateEmailTemplate": update_template, "DeleteEmailTemplate": delete_template,
    "TestRenderEmailTemplate": test_render,
}


# Sending control: the account and sets' sending switches, delivery and reputation options (relay/api/account.py),
# email identities and their DKIM keys (relay/api/identities.py).
ROUTES += account.V2_ROUTES + identities.V2_ROUTES
HANDLERS.update(account.V2_HANDLERS | identities.V2_HANDLERS)
