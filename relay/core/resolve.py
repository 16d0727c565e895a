"""Configuration sets, tracking levels and event destinations as plain data, and the precedence between them.

Pure: the shell (relay/resolve.py) gathers the data from the TOML file and SQLite; everything here takes that
data in and gives `TrackingSettings` plus where each value came from (for `relay tracking show`).

The rules:
- Which set: the message's X-SES-CONFIGURATION-SET wins; else the default set of the sender identity, an
  address before its domain (SES); else none, and a message without a set is relayed and recorded but never
  instrumented (SES: "send without a configuration set" is how one turns tracking off).
- Each tracking value is taken from the first level that sets it: configuration set, then sending domain,
  then account (set with the CLI), then the `[tracking]` table of the configuration file, then built-in
  defaults. A domain without its own options therefore follows the account level, including domains that
  start sending after the account level was set (Tencent Cloud's account level).
- Open/click switches nobody set explicitly follow SES: open tracking is on when an enabled destination of
  the set matches OPEN, click tracking when one matches CLICK.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from relay.core.control import ENABLED, SendingState, SetOptions
from relay.core.headers import CONFIG_SET_RE, HeaderBlock, domain_of, from_address
from relay.core.identities import IdentityDef
from relay.core.settings import HTTPS_POLICIES, PIXEL_POSITIONS, SUPPRESSION_REASONS, TrackingSettings

MAX_DESTINATIONS = 10  # per configuration set (SES quota)
MAX_SETS = 10000  # per account (SES quota)
DESTINATION_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
DESTINATION_KINDS = ("webhook", "file")
# v2 MatchingEventTypes -> eventType in the record (SES's own mapping; note the space in Rendering Failure).
EVENT_TYPES = {
    "SEND": "Send", "REJECT": "Reject", "BOUNCE": "Bounce", "COMPLAINT": "Complaint", "DELIVERY": "Delivery",
    "OPEN": "Open", "CLICK": "Click", "RENDERING_FAILURE": "Rendering Failure", "DELIVERY_DELAY": "DeliveryDelay",
    "SUBSCRIPTION": "Subscription",
}
# v1 names (lower camel) are accepted too, as `aws ses` sends them.
_V1_NAMES = {"send": "SEND", "reject": "REJECT", "bounce": "BOUNCE", "complaint": "COMPLAINT", "delivery": "DELIVERY",
             "open": "OPEN", "click": "CLICK", "renderingfailure": "RENDERING_FAILURE",
             "deliverydelay": "DELIVERY_DELAY", "subscription": "SUBSCRIPTION"}
TRACKING_FIELDS = ("open_tracking", "click_tracking", "custom_redirect_domain", "https_policy", "pixel_position")

# Provenance labels of the levels (shown by `relay tracking show`).
DEFAULTS = "built-in default"
IMPLICIT = "implicit"


class ModelError(ValueError):
    """Bad input for the model; `field` names what is wrong."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass(frozen=True)
class TrackingOptions:
    """Tracking options of one level; None = not set here, inherit from the next level."""

    open_tracking: bool | None = None
    click_tracking: bool | None = None
    custom_redirect_domain: str | None = None
    https_policy: str | None = None
    pixel_position: str | None = None

    @property
    def empty(self) -> bool:
        return all(getattr(self, f) is None for f in TRACKING_FIELDS)

    def merged(self, update: TrackingOptions, cleared: frozenset[str] = frozenset()) -> TrackingOptions:
        """These options with every value `update` sets replaced and the `cleared` fields unset."""
        values = {f: getattr(update, f) if getattr(update, f) is not None else getattr(self, f)
                  for f in TRACKING_FIELDS}
        return TrackingOptions(**{f: None if f in cleared else v for f, v in values.items()})

    def to_json(self) -> dict:
        return {f: getattr(self, f) for f in TRACKING_FIELDS if getattr(self, f) is not None}


@dataclass(frozen=True)
class FeedbackOptions:
    """A set's bounce and feedback options; None = follow the account defaults ([bounces], [suppression])."""

    verp: bool | None = None
    list_unsubscribe: bool | None = None
    suppression_reasons: tuple[str, ...] | None = None  # SES SuppressionOptions.SuppressedReasons (+ UNSUBSCRIBE)


@dataclass(frozen=True)
class FeedbackDefaults:
    """Account-level bounce and feedback settings: the configuration file's [bounces] and [suppression]."""

    bounce_domain: str = ""  # empty: no VERP, no inbound reports
    verp: bool = True
    list_unsubscribe: bool = False
    suppression_reasons: tuple[str, ...] = SUPPRESSION_REASONS


def check_suppression_reasons(reasons) -> tuple[str, ...]:
    out = tuple(dict.fromkeys(str(r).upper() for r in reasons))
    bad = [r for r in out if r not in SUPPRESSION_REASONS]
    if bad:
        raise ModelError("SuppressionOptions.SuppressedReasons",
                         f"{', '.join(bad)} not one of {', '.join(SUPPRESSION_REASONS)}")
    return out


@dataclass(frozen=True)
class Destination:
    """An event destination of a configuration set. `secret` signs webhook bodies (X-Relay-Signature)."""

    name: str
    event_types: tuple[str, ...]  # v2 names: SEND, OPEN, ...
    kind: str  # webhook | file
    enabled: bool = True
    url: str = ""  # webhook
    secret: str = ""  # webhook; empty: unsigned
    sns_envelope: bool = False  # webhook: wrap the record in an SNS Notification
    topic_arn: str = ""  # webhook with sns_envelope; empty: arn:aws:sns:<region>:<account>:<set>-<name>
    path: str = ""  # file
    timeout: float = 10.0  # seconds per webhook request
    retry_initial: float = 1.0  # seconds before the first retry; doubles ...
    retry_max: float = 300.0  # ... up to this
    max_refusals: int = 5  # 4xx answers (other than 408/429) before the event is set aside

    def matches(self, event_type: str) -> bool:
        """Whether this destination takes events whose record says `eventType: event_type`."""
        return self.enabled and any(EVENT_TYPES[t] == event_type for t in self.event_types)

    def public_json(self) -> dict:
        data = {"Name": self.name, "Enabled": self.enabled, "MatchingEventTypes": list(self.event_types),
                "Type": self.kind}
        if self.kind == "webhook":
            data.update(Url=self.url, Signed=bool(self.secret), SnsEnvelope=self.sns_envelope)
            if self.topic_arn:
                data["TopicArn"] = self.topic_arn
        else:
            data["Path"] = self.path
        return data


@dataclass(frozen=True)
class SetDef:
    name: str
    source: str  # "config" (TOML, read-only) or "database"
    tracking: TrackingOptions = field(default_factory=TrackingOptions)
    destinations: tuple[Destination, ...] = ()
    has_tracking: bool = False  # tracking options exist at this level (TrackingOptionsAlreadyExists)
    feedback: FeedbackOptions = field(default_factory=FeedbackOptions)
    sending: SendingState = ENABLED  # paused or not, by whom and why (relay/core/control.py)
    options: SetOptions = field(default_factory=SetOptions)  # SES's DeliveryOptions and ReputationOptions


@dataclass(frozen=True)
class Level:
    label: str  # e.g. "configuration set marketing (config file)"
    options: TrackingOptions


@dataclass(frozen=True)
class Model:
    """Everything that decides a message's set and tracking settings, from both sources, already merged."""

    sets: dict[str, SetDef]
    domains: dict[str, Level]  # sending domain (lower case) -> its level
    identities: dict[str, tuple[str, str]]  # address or domain (lower case) -> (set name, where it was set)
    account: Level | None  # account level options set with the CLI
    base: Level  # the [tracking] table (custom_redirect_domain = default_host)
    tracking_hosts: frozenset[str]
    feedback: FeedbackDefaults = field(default_factory=FeedbackDefaults)
    account_sending: SendingState = ENABLED  # the account's switch (SES's SendingEnabled)
    # Identities of the database (with their DKIM keys, sealed), and every identity that may send: those verified
    # there, and those of the file ([identities], [[dkim.keys]] domains), which the operator vouches for.
    sending_identities: dict[str, IdentityDef] = field(default_factory=dict)
    verified_identities: frozenset[str] = frozenset()


@dataclass(frozen=True)
class SetChoice:
    name: str | None
    reason: str  # "X-SES-CONFIGURATION-SET", "default of identity x", "none"


@dataclass(frozen=True)
class Resolution:
    set_name: str | None
    settings: TrackingSettings
    provenance: dict[str, str]  # field -> level label
    set_reason: str


class UnknownSet(LookupError):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


# --- input rules ---------------------------------------------------------------------------------------------

def check_set_name(name: str) -> str:
    if not CONFIG_SET_RE.match(name or ""):
        raise ModelError("ConfigurationSetName", f"{name!r} is not 1-64 characters from A-Z a-z 0-9 _ -")
    return name


def check_destination_name(name: str) -> str:
    if not DESTINATION_NAME_RE.match(name or ""):
        raise ModelError("EventDestination.Name", f"{name!r} is not 1-64 characters from A-Z a-z 0-9 _ -")
    return name


def event_types(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Normalise MatchingEventTypes (v2 SEND or v1 send) to v2 names, refusing unknown ones."""
    if not names:
        raise ModelError("EventDestination.MatchingEventTypes", "name at least one event type")
    out: list[str] = []
    for raw in names:
        name = str(raw).strip()
        v2 = name.upper() if name.upper() in EVENT_TYPES else _V1_NAMES.get(name.lower())
        if v2 is None:
            raise ModelError("EventDestination.MatchingEventTypes",
                             f"{name!r} is not one of {', '.join(EVENT_TYPES)}")
        if v2 not in out:
            out.append(v2)
    return tuple(out)


def check_destination(d: Destination) -> Destination:
    check_destination_name(d.name)
    event_types(d.event_types)
    if d.kind not in DESTINATION_KINDS:
        raise ModelError("EventDestination.Type", f"{d.kind!r} is not one of {', '.join(DESTINATION_KINDS)}")
    if d.kind == "webhook" and not re.match(r"^https?://[^/\s]+", d.url or ""):
        raise ModelError("EventDestination.Url", f"{d.url!r} is not an http:// or https:// URL")
    if d.kind == "file" and not d.path:
        raise ModelError("EventDestination.Path", "a file destination needs a path")
    if d.timeout <= 0 or d.retry_initial <= 0 or d.retry_max < d.retry_initial or d.max_refusals < 1:
        raise ModelError("EventDestination.Retry",
                         "timeout and retry_initial must be positive, retry_max >= retry_initial, max_refusals >= 1")
    return d


def check_options(o: TrackingOptions) -> TrackingOptions:
    """Enumerated values; the custom domain is checked by relay/core/domains.py in the shell."""
    if o.https_policy is not None and o.https_policy not in HTTPS_POLICIES:
        raise ModelError("TrackingOptions.HttpsPolicy", f"{o.https_policy!r} is not one of {', '.join(HTTPS_POLICIES)}")
    if o.pixel_position is not None and o.pixel_position not in PIXEL_POSITIONS:
        raise ModelError("TrackingOptions.PixelPosition",
                         f"{o.pixel_position!r} is not one of {', '.join(PIXEL_POSITIONS)}")
    return o


# --- which set -----------------------------------------------------------------------------------------------

def sender_identity(block: HeaderBlock, mail_from: str) -> str:
    """The sender identity: the first From header address, or MAIL FROM when there is none (lower case).

    SES applies an identity's default set by the identity the message is sent from, which is the From address
    (MAIL FROM may be a bounce address on another domain, such as a VERP return path).
    """
    address = from_address(block)
    return (address if address is not None else mail_from.strip().strip("<>")).lower()


def choose_set(model: Model, header_set: str | None, identity: str) -> SetChoice:
    """The message's configuration set; UnknownSet for a header or default naming a set that does not exist
    (SES refuses mail whose identity's default set was deleted)."""
    if header_set is not None:
        if header_set not in model.sets:
            raise UnknownSet(header_set)
        return SetChoice(header_set, "X-SES-CONFIGURATION-SET")
    for key in (identity, domain_of(identity)):
        if key and key in model.identities:
            name, where = model.identities[key]
            if name not in model.sets:
                raise UnknownSet(name)
            return SetChoice(name, f"default of identity {key} ({where})")
    return SetChoice(None, "none: relayed and recorded, not instrumented")


# --- tracking settings ---------------------------------------------------------------------------------------

def levels_for(model: Model, set_name: str | None, identity: str) -> list[Level]:
    """The levels a message's values come from, most specific first."""
    levels: list[Level] = []
    if set_name is not None:
        s = model.sets[set_name]
        levels.append(Level(f"configuration set {s.name} ({_source(s.source)})", s.tracking))
    domain = domain_of(identity)
    if domain in model.domains:
        levels.append(model.domains[domain])
    if model.account is not None:
        levels.append(model.account)
    levels.append(model.base)
    return levels


def _source(source: str) -> str:
    return "config file" if source == "config" else source


def implicit_switches(s: SetDef) -> dict[str, tuple[bool, str]]:
    """SES: open tracking iff an enabled destination matches OPEN, click iff one matches CLICK."""
    out = {}
    for field_name, event_type in (("open_tracking", "Open"), ("click_tracking", "Click")):
        names = [d.name for d in s.destinations if d.matches(event_type)]
        label = (f"{IMPLICIT}: enabled destination {', '.join(names)} of set {s.name} matches "
                 f"{event_type.upper()}" if names else
                 f"{IMPLICIT}: no enabled destination of set {s.name} matches {event_type.upper()}")
        out[field_name] = (bool(names), label)
    return out


def resolve(model: Model, set_name: str | None, identity: str, https_available: Callable[[str], bool],
            set_reason: str = "") -> Resolution:
    """Effective settings for a message sent by `identity` with set `set_name` (already chosen)."""
    if set_name is None:
        host = model.base.options.custom_redirect_domain or "localhost"
        settings = TrackingSettings(host=host, tracking_hosts=model.tracking_hosts,
                                    https_available=https_available(host), **feedback_settings(model, None))
        return Resolution(None, settings, {f: "no configuration set: not instrumented" for f in TRACKING_FIELDS},
                          set_reason)
    levels = levels_for(model, set_name, identity)
    values: dict[str, object] = {}
    provenance: dict[str, str] = {}
    for f in TRACKING_FIELDS:
        for level in levels:
            value = getattr(level.options, f)
            if value is not None:
                values[f], provenance[f] = value, level.label
                break
    for f, (value, label) in implicit_switches(model.sets[set_name]).items():
        if f not in values:
            values[f], provenance[f] = value, label
    for f, default in (("https_policy", "OPTIONAL"), ("pixel_position", "bottom"),
                       ("custom_redirect_domain", "localhost:8080")):
        if f not in values:
            values[f], provenance[f] = default, DEFAULTS
    host = str(values["custom_redirect_domain"])
    settings = TrackingSettings(
        open_tracking=bool(values["open_tracking"]), click_tracking=bool(values["click_tracking"]), host=host,
        https_policy=str(values["https_policy"]), pixel_position=str(values["pixel_position"]),
        tracking_hosts=model.tracking_hosts, https_available=https_available(host),
        **feedback_settings(model, model.sets[set_name]), **model.sets[set_name].options.delivery_settings(),
    )
    return Resolution(set_name, settings, provenance, set_reason)


def feedback_settings(model: Model, s: SetDef | None) -> dict:
    """The set's bounce, unsubscribe and suppression settings over the account defaults. A message without a
    set is not instrumented (no List-Unsubscribe) but its bounces are still tracked."""
    base, own = model.feedback, s.feedback if s is not None else FeedbackOptions()
    verp = base.verp if own.verp is None else own.verp
    unsubscribe = s is not None and (base.list_unsubscribe if own.list_unsubscribe is None else own.list_unsubscribe)
    reasons = base.suppression_reasons if own.suppression_reasons is None else own.suppression_reasons
    return {"return_path_domain": base.bounce_domain if verp else "", "list_unsubscribe": unsubscribe,
            "suppression_reasons": reasons}


def all_tracking_hosts(base_host: str, sets: dict[str, SetDef], domains: dict[str, Level],
                       account: Level | None) -> frozenset[str]:
    """Every host relay serves tracking on: links already pointing at one are never wrapped again."""
    options = [s.tracking for s in sets.values()] + [lv.options for lv in domains.values()]
    options += [account.options] if account else []
    return frozenset([base_host.lower()] + [o.custom_redirect_domain.lower() for o in options
                                            if o.custom_redirect_domain])


def with_destination(s: SetDef, d: Destination) -> SetDef:
    return replace(s, destinations=tuple(x for x in s.destinations if x.name != d.name) + (d,))
