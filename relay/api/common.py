"""What v1 and v2 share: the context, input errors, event types, destinations from ARNs, pagination.

Handlers are plain synchronous functions over relay/sets.py (each operation one store transaction); the
server runs them off the event loop.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass

from relay.api.errors import enum_constraint, validation_message
from relay.config import ApiTarget, Config
from relay.core import resolve as core
from relay.core.resolve import Destination, SetDef
from relay.resolve import Resolver
from relay.sets import SesError
from relay.store import Store

V2_EVENT_TYPES = tuple(core.EVENT_TYPES)  # SEND ... SUBSCRIPTION
V2_TO_V1 = {"SEND": "send", "REJECT": "reject", "BOUNCE": "bounce", "COMPLAINT": "complaint",
            "DELIVERY": "delivery", "OPEN": "open", "CLICK": "click", "RENDERING_FAILURE": "renderingFailure",
            "DELIVERY_DELAY": "deliveryDelay", "SUBSCRIPTION": "subscription"}
V1_TO_V2 = {v: k for k, v in V2_TO_V1.items()}
# The v1 model's enum; deliveryDelay/subscription are accepted too, since v1 describes v2-made destinations so.
V1_EVENT_TYPES = ("send", "reject", "bounce", "complaint", "delivery", "open", "click", "renderingFailure")
HTTPS_POLICIES = ("REQUIRE", "REQUIRE_OPEN_ONLY", "OPTIONAL")
FEATURE_STATUS = ("ENABLED", "DISABLED")
MAX_PAGE = 1000
NOT_WEBHOOK = ("relay delivers events to webhooks only: use an SnsDestination (or EventBridgeDestination) whose ARN"
               " is mapped in [api.sns_topics] ([api.event_buses]) of relay's configuration")


@dataclass(frozen=True)
class Context:
    config: Config
    store: Store
    caller: str = ""  # who is asking, as recorded with what they change: "api:<access key id>"

    def model_set(self, name: str) -> SetDef:
        s = Resolver(self.config, self.store).model().sets.get(name)
        if s is None:
            raise SesError("ConfigurationSetDoesNotExist", f"Configuration set <{name}> does not exist.")
        return s


def invalid(value: object, where: str, constraint: str) -> SesError:
    return SesError("ValidationError", validation_message(value, where, constraint))


def structure(value: object, where: str) -> dict:
    """A structure member of a JSON request: absent is empty, anything but an object is refused."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid(value, where, "Member must be a structure")
    return value


def required(value: object, where: str) -> object:
    if value is None or value == "":
        raise SesError("ValidationError", f"1 validation error detected: Value null at '{where}' failed to satisfy"
                       " constraint: Member must not be null")
    return value


def v2_bool(value: object, where: str) -> bool:
    """A v2 (JSON) boolean member; absent is false, as SES's services read an absent boolean."""
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(value, where, "Member must be a boolean")
    return value


def query_bool(value: object, where: str) -> bool:
    """A v1 (Query) boolean parameter; absent is false, as SES v1 documents its Enabled members."""
    if value in (None, ""):
        return False
    if value not in ("true", "false"):
        raise invalid(value, where, "Member must be true or false")
    return value == "true"


def choice(value: object, allowed: tuple[str, ...], where: str) -> str | None:
    if value is None:
        return None
    if value not in allowed:
        raise invalid(value, where, enum_constraint(allowed))
    return str(value)


def event_types(values: object, allowed: tuple[str, ...], where: str) -> tuple[str, ...]:
    """MatchingEventTypes in one protocol's spelling, validated against its enum; returned as v2 names."""
    if not isinstance(values, list):
        raise invalid(values, where, "Member must be a list")
    out = []
    for i, v in enumerate(values, 1):
        choice(v, allowed, f"{where}.{i}.member")
        out.append(V1_TO_V2.get(v, v))
    return tuple(out)


# Destination kinds relay serves through a webhook: (config table, SES error code, what the ARN names).
_MAPPED_KINDS = {
    "sns": ("sns_topics", "InvalidSNSDestination", "SNS topic"),
    "events": ("event_buses", "InvalidEventBridgeDestination", "Event bus"),
}


def target_fields(config: Config, kind: str, arn: str | None) -> dict:
    """Destination fields for an SES destination: SNS topics and EventBridge buses mapped to webhooks in
    [api.sns_topics] / [api.event_buses]; every other kind is refused with SES's code for it."""
    if kind in _MAPPED_KINDS:
        table, code, noun = _MAPPED_KINDS[kind]
        target = getattr(config.api, table).get(arn or "")
        if target is None:
            raise SesError(code, f"{noun} <{arn}> is not mapped to a webhook: add it to [api.{table}] in relay's"
                           " configuration.")
        return _webhook(target, arn or "")
    code = {"firehose": "InvalidFirehoseDestination", "cloudwatch": "InvalidCloudWatchDestination"}.get(
        kind, "InvalidPinpointDestination")
    raise SesError(code, NOT_WEBHOOK)


def _webhook(target: ApiTarget, arn: str) -> dict:
    # The ARN is kept as the destination's topic_arn: reads give it back, SNS envelopes carry it.
    return {"kind": "webhook", "url": target.url, "secret": target.secret, "sns_envelope": target.sns_envelope,
            "topic_arn": arn}


def arn_of(d: Destination) -> tuple[str, str] | None:
    """("sns" | "events", ARN) of a destination made from an ARN (or given a topic ARN by the CLI)."""
    if d.kind != "webhook" or not d.topic_arn:
        return None
    service = d.topic_arn.split(":")[2] if d.topic_arn.count(":") >= 5 else "sns"
    return ("events" if service == "events" else "sns"), d.topic_arn


def has_tracking_options(s: SetDef) -> bool:
    """SES's TrackingOptions are the custom redirect domain and https policy (open/click switches are VDM's)."""
    return s.tracking.custom_redirect_domain is not None or s.tracking.https_policy is not None


# --- pagination: the token is the last name of the page, so deletions between pages skip nothing ----------

def page(names: list[str], token: str | None, size: int) -> tuple[list[str], str | None]:
    after = _decode_token(token) if token else None
    rest = [n for n in names if after is None or n > after]
    chunk = rest[:size]
    return chunk, (_encode_token(chunk[-1]) if len(rest) > size else None)


def key_token(key: str) -> str:
    """A NextToken naming the last key of a page (keyset pagination of a listing)."""
    return _encode_token(key)


def token_key(token: str, code: str = "ValidationError") -> str:
    """The key a NextToken of this server names; SesError `code` for any other token."""
    try:
        return _decode_token(token)
    except SesError as exc:
        raise SesError(code, exc.message) from exc


def _encode_token(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode("utf-8")).decode("ascii")


def _decode_token(token: str) -> str:
    try:
        name = base64.b64decode(token.encode("ascii"), altchars=b"-_", validate=True).decode("utf-8")
    except (binascii.Error, UnicodeError, ValueError) as exc:
        raise SesError("ValidationError", "Invalid NextToken.") from exc
    if not name or _encode_token(name) != token:  # only tokens this server issued
        raise SesError("ValidationError", "Invalid NextToken.")
    return name


def page_size(raw: object, where: str) -> int:
    if raw is None or raw == "":
        return MAX_PAGE
    try:
        size = int(str(raw))
    except ValueError as exc:
        raise invalid(raw, where, "Member must be an integer") from exc
    if not 1 <= size <= MAX_PAGE:
        raise invalid(raw, where, f"Member must have value between 1 and {MAX_PAGE}")
    return size


def undo_on_error(action: Callable[[], None], undo: Callable[[], None]) -> None:
    """Run `action`; when it raises, run `undo` (best effort) and re-raise."""
    try:
        action()
    except Exception:
        try:
            undo()
        except SesError:
            pass
        raise
