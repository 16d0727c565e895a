"""SES v1 (Query/XML): form parameters in, XML out, over relay/sets.py.

`dispatch(ctx, params)` returns the inner XML of `<ActionResult>`; `response_xml`/`error_xml` build the
envelopes botocore's QueryParser reads. Failures are SesError with relay/sets.py's codes (the two
`...Exception` codes are applied by relay/api/errors.py).
"""

from __future__ import annotations

from collections.abc import Callable
from xml.sax.saxutils import escape

from relay import sets, templates
from relay.api import account, identities, send
from relay.api.common import (
    V1_EVENT_TYPES,
    V2_TO_V1,
    Context,
    arn_of,
    choice,
    event_types,
    has_tracking_options,
    invalid,
    key_token,
    page,
    page_size,
    required,
    token_key,
)
from relay.api.common import target_fields as _target_fields
from relay.api.errors import WireError
from relay.core.resolve import Destination, SetDef, TrackingOptions
from relay.core.templates import Template
from relay.sets import SesError

NAMESPACE = "http://ses.amazonaws.com/doc/2010-12-01/"
VERSION = "2010-12-01"
ATTRIBUTES = ("eventDestinations", "trackingOptions", "deliveryOptions", "reputationOptions")
# Accepted as well as the model's enum: v1 describes v2-made destinations with them.
_EVENT_TYPES_IN = V1_EVENT_TYPES + ("deliveryDelay", "subscription")
_TRACKING_FIELDS = frozenset({"custom_redirect_domain", "https_policy"})


# --- envelopes ----------------------------------------------------------------------------------------------------

def response_xml(action: str, inner: str, request_id: str) -> str:
    result = f"<{action}Result>{inner}</{action}Result>" if inner else f"<{action}Result/>"
    return (f'<{action}Response xmlns="{NAMESPACE}">{result}'
            f"<ResponseMetadata><RequestId>{request_id}</RequestId></ResponseMetadata></{action}Response>")


def error_xml(err: WireError, request_id: str) -> str:
    kind = "Sender" if err.sender else "Receiver"
    return (f'<ErrorResponse xmlns="{NAMESPACE}"><Error><Type>{kind}</Type><Code>{escape(err.code)}</Code>'
            f"<Message>{escape(err.message)}</Message></Error><RequestId>{request_id}</RequestId></ErrorResponse>")


def _el(name: str, value: object) -> str:
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return f"<{name}>{escape(text)}</{name}>"


def _members(name: str, items: list[str]) -> str:
    return f"<{name}>{''.join(f'<member>{i}</member>' for i in items)}</{name}>" if items else f"<{name}/>"


# --- parameters ---------------------------------------------------------------------------------------------------

def unflatten(params: list[tuple[str, str]]) -> dict:
    """`A.B.member.2.C=v` -> {"A": {"B": [.., {"C": "v"}]}} (lists are `member.N`, 1-based)."""
    root: dict = {}
    for key, value in params:
        node = root
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SesError("ValidationError", f"Parameter {key} conflicts with another parameter.")
        node[parts[-1]] = value
    return _lists(root)


def _lists(node: object) -> object:
    if not isinstance(node, dict):
        return node
    if set(node) == {"member"} and isinstance(node["member"], dict):
        items = node["member"]
        try:
            order = sorted(items, key=int)
        except ValueError as exc:
            raise SesError("ValidationError", "List members are numbered member.1, member.2, ...") from exc
        return [_lists(items[i]) for i in order]
    return {k: _lists(v) for k, v in node.items()}


def _bool(value: object, where: str) -> bool:
    if value in (None, ""):
        return False  # v1 documents Enabled as false when absent
    if value not in ("true", "false"):
        raise invalid(value, where, "Member must be true or false")
    return value == "true"


def _list(value: object) -> list:
    return value if isinstance(value, list) else [] if value in (None, "") else [value]


# --- shaping ------------------------------------------------------------------------------------------------------

def destination_xml(d: Destination) -> str:
    parts = [_el("Name", d.name), _el("Enabled", d.enabled),
             _members("MatchingEventTypes", [V2_TO_V1[t] for t in d.event_types])]
    target = arn_of(d)
    if target and target[0] == "sns":  # v1 has no EventBridge destinations
        parts.append(f"<SNSDestination>{_el('TopicARN', target[1])}</SNSDestination>")
    return f"<member>{''.join(parts)}</member>"


def describe_xml(s: SetDef, attributes: list[str]) -> str:
    parts = [f"<ConfigurationSet>{_el('Name', s.name)}</ConfigurationSet>"]
    if "eventDestinations" in attributes:
        inner = "".join(destination_xml(d) for d in s.destinations)
        parts.append(f"<EventDestinations>{inner}</EventDestinations>" if inner else "<EventDestinations/>")
    if "trackingOptions" in attributes and s.tracking.custom_redirect_domain:
        parts.append(f"<TrackingOptions>{_el('CustomRedirectDomain', s.tracking.custom_redirect_domain)}"
                     "</TrackingOptions>")
    parts.append(account.describe_v1(s, attributes))  # DeliveryOptions, ReputationOptions: as they are
    return "".join(parts)


# --- actions ------------------------------------------------------------------------------------------------------

def _set_name(p: dict) -> str:
    return str(required(p.get("ConfigurationSetName"), "configurationSetName"))


def create_set(ctx: Context, p: dict) -> str:
    cs = p.get("ConfigurationSet")
    sets.create_set(ctx.config, ctx.store, str(required(cs.get("Name") if isinstance(cs, dict) else None,
                                                        "configurationSet.name")))
    return ""


def describe_set(ctx: Context, p: dict) -> str:
    attributes = _list(p.get("ConfigurationSetAttributeNames"))
    for i, a in enumerate(attributes, 1):
        choice(a, ATTRIBUTES, f"configurationSetAttributeNames.{i}.member")
    return describe_xml(ctx.model_set(_set_name(p)), attributes)


def list_sets(ctx: Context, p: dict) -> str:
    size = page_size(p.get("MaxItems"), "maxItems")
    names = [s["Name"] for s in sets.list_sets(ctx.config, ctx.store)]
    chunk, token = page(names, p.get("NextToken") or None, size)
    items = "".join(f"<member>{_el('Name', n)}</member>" for n in chunk)
    out = f"<ConfigurationSets>{items}</ConfigurationSets>" if items else "<ConfigurationSets/>"
    return out + (_el("NextToken", token) if token else "")


def delete_set(ctx: Context, p: dict) -> str:
    sets.delete_set(ctx.config, ctx.store, _set_name(p))
    return ""


def _tracking_state(ctx: Context, name: str) -> SetDef:
    return ctx.model_set(name)


def _domain(p: dict) -> TrackingOptions:
    t = p.get("TrackingOptions")
    domain = t.get("CustomRedirectDomain") if isinstance(t, dict) else None
    return TrackingOptions(custom_redirect_domain=domain or None)


def create_tracking(ctx: Context, p: dict) -> str:
    name = _set_name(p)
    s = _tracking_state(ctx, name)
    if s.source == "database" and has_tracking_options(s):
        raise SesError("TrackingOptionsAlreadyExists", f"Configuration set <{name}> already has tracking options.")
    sets.put_tracking(ctx.config, ctx.store, "set", name, _domain(p))
    return ""


def _existing_tracking(ctx: Context, name: str) -> None:
    """SES's error when a set of the database has no tracking options to update or delete."""
    s = _tracking_state(ctx, name)
    if s.source == "database" and not has_tracking_options(s):
        raise SesError("TrackingOptionsDoesNotExist", f"There are no tracking options for configuration set"
                       f" <{name}>.")


def update_tracking(ctx: Context, p: dict) -> str:
    name = _set_name(p)
    _existing_tracking(ctx, name)
    sets.put_tracking(ctx.config, ctx.store, "set", name, _domain(p))
    return ""


def delete_tracking(ctx: Context, p: dict) -> str:
    name = _set_name(p)
    _existing_tracking(ctx, name)
    # Only SES's tracking options go; open/click switches (VDM, CLI) stay.
    sets.put_tracking(ctx.config, ctx.store, "set", name, TrackingOptions(), _TRACKING_FIELDS)
    return ""


_TARGETS = (("SNSDestination", "TopicARN", "sns"), ("KinesisFirehoseDestination", None, "firehose"),
            ("CloudWatchDestination", None, "cloudwatch"))


def _destination(ctx: Context, p: dict) -> Destination:
    """v1 EventDestination: the whole definition (Create and Update both send every field)."""
    d = p.get("EventDestination")
    if not isinstance(d, dict):
        required(None, "eventDestination")
    assert isinstance(d, dict)
    name = str(required(d.get("Name"), "eventDestination.name"))
    types = event_types(_list(d.get("MatchingEventTypes")), _EVENT_TYPES_IN, "eventDestination.matchingEventTypes")
    given = [t for t in _TARGETS if d.get(t[0]) is not None]
    if len(given) != 1:
        code = "InvalidSNSDestination" if not given else "ValidationError"
        raise SesError(code, "An event destination needs exactly one of SNSDestination, KinesisFirehoseDestination,"
                       " CloudWatchDestination; relay accepts SNSDestination topics mapped in [api.sns_topics].")
    member, key, kind = given[0]
    arn = d[member].get(key) if key and isinstance(d[member], dict) else None
    return Destination(name=name, event_types=types, enabled=_bool(d.get("Enabled"), "eventDestination.enabled"),
                       **_target_fields(ctx.config, kind, arn))


def create_destination(ctx: Context, p: dict) -> str:
    name = _set_name(p)
    sets.add_destination(ctx.config, ctx.store, name, _destination(ctx, p))
    return ""


def update_destination(ctx: Context, p: dict) -> str:
    name = _set_name(p)
    d = _destination(ctx, p)
    changes = {f: getattr(d, f) for f in ("enabled", "event_types", "kind", "url", "secret", "sns_envelope",
                                          "topic_arn")}
    sets.update_destination(ctx.config, ctx.store, name, d.name, changes)
    return ""


def delete_destination(ctx: Context, p: dict) -> str:
    sets.delete_destination(ctx.config, ctx.store, _set_name(p),
                            str(required(p.get("EventDestinationName"), "eventDestinationName")))
    return ""


# --- templates ----------------------------------------------------------------------------------------------------

def _template(p: dict) -> Template:
    t = p.get("Template") if isinstance(p.get("Template"), dict) else {}
    name = str(required(t.get("TemplateName"), "template.templateName"))
    return Template(name, t.get("SubjectPart") or None, t.get("TextPart") or None, t.get("HtmlPart") or None)


def create_template(ctx: Context, p: dict) -> str:
    templates.create(ctx.config, ctx.store, _template(p))
    return ""


def update_template(ctx: Context, p: dict) -> str:
    templates.update(ctx.config, ctx.store, _template(p))
    return ""


def get_template(ctx: Context, p: dict) -> str:
    t = templates.get(ctx.store, str(required(p.get("TemplateName"), "templateName")))
    parts = [_el("TemplateName", t.name)] + [_el(tag, v) for tag, v in (
        ("SubjectPart", t.subject), ("TextPart", t.text), ("HtmlPart", t.html)) if v is not None]
    return f"<Template>{''.join(parts)}</Template>"


def delete_template(ctx: Context, p: dict) -> str:
    try:  # v1 models no error for a template that is not there
        templates.delete(ctx.store, str(required(p.get("TemplateName"), "templateName")))
    except SesError as exc:
        if exc.code != "TemplateDoesNotExist":
            raise
    return ""


def list_templates(ctx: Context, p: dict) -> str:
    size = page_size(p.get("MaxItems"), "maxItems")
    token = p.get("NextToken") or None
    rows = templates.listing(ctx.store, token_key(token) if token else None, size + 1)
    items = "".join(f"<member>{_el('Name', n)}{_el('CreatedTimestamp', t)}</member>" for n, t in rows[:size])
    out = f"<TemplatesMetadata>{items}</TemplatesMetadata>" if items else "<TemplatesMetadata/>"
    return out + (_el("NextToken", key_token(rows[size - 1][0])) if len(rows) > size else "")


def test_render(ctx: Context, p: dict) -> str:
    template = templates.get(ctx.store, str(required(p.get("TemplateName"), "templateName")))
    rendered = templates.render(template, str(required(p.get("TemplateData"), "templateData")))
    return _el("RenderedTemplate", templates.rendered_message(ctx.config, rendered))


# --- sending: planned in a worker thread, sent by the server through the pipeline ------------------------------

SEND_PLANS: dict[str, Callable[[Context, dict], send.Plan]] = {
    "SendEmail": send.v1_send_email, "SendRawEmail": send.v1_send_raw,
    "SendTemplatedEmail": send.v1_send_templated, "SendBulkTemplatedEmail": send.v1_send_bulk_templated,
}


def send_plan(ctx: Context, action: str, params: list[tuple[str, str]]) -> send.Plan:
    return SEND_PLANS[action](ctx, unflatten([(k, v) for k, v in params if k not in ("Action", "Version")]))


def send_response(plan: send.Plan, results: list[send.Result]) -> str:
    """`<MessageId>` (or the error, raised); SendBulkTemplatedEmail's status per destination."""
    if not plan.bulk:
        if results[0].error is not None:
            raise results[0].error
        return _el("MessageId", results[0].message_id)
    members = []
    for r in results:
        parts = [_el("Status", send.BULK_STATUS_V1[send.bulk_status(r.error)])]
        if r.error is not None:
            parts.append(_el("Error", r.error.message))
        if r.message_id:
            parts.append(_el("MessageId", r.message_id))
        members.append(f"<member>{''.join(parts)}</member>")
    return f"<Status>{''.join(members)}</Status>"


ACTIONS: dict[str, Callable[[Context, dict], str]] = {
    "CreateConfigurationSet": create_set, "DescribeConfigurationSet": describe_set,
    "ListConfigurationSets": list_sets, "DeleteConfigurationSet": delete_set,
    "CreateConfigurationSetTrackingOptions": create_tracking,
    "UpdateConfigurationSetTrackingOptions": update_tracking,
    "DeleteConfigurationSetTrackingOptions": delete_tracking,
    "CreateConfigurationSetEventDestination": create_destination,
    "UpdateConfigurationSetEventDestination": update_destination,
    "DeleteConfigurationSetEventDestination": delete_destination,
    "CreateTemplate": create_template, "GetTemplate": get_template, "ListTemplates": list_templates,
    "UpdateTemplate": update_template, "DeleteTemplate": delete_template, "TestRenderTemplate": test_render,
}


ACTIONS.update(account.V1_ACTIONS | identities.V1_ACTIONS)  # sending control; identities and DKIM


def action_of(params: list[tuple[str, str]]) -> str | None:
    return next((v for k, v in params if k == "Action"), None)


def dispatch(ctx: Context, action: str, params: list[tuple[str, str]]) -> str:
    """The inner XML of `<{action}Result>`; the caller checked that `action` is in ACTIONS."""
    p = unflatten([(k, v) for k, v in params if k not in ("Action", "Version")])
    return ACTIONS[action](ctx, p)
