"""Effective tracking settings for one message, and the tracking URLs they produce.

`TrackingSettings` is what the instrumentation stage needs to know about a message's configuration set after
every level (account, sending domain, set) has been resolved. It is plain data so a queued message can carry
a snapshot of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

HTTPS_POLICIES = ("REQUIRE", "REQUIRE_OPEN_ONLY", "OPTIONAL")
PIXEL_POSITIONS = ("bottom", "top", "auto")
OPEN_PATH = "/o/"
CLICK_PATH = "/c/"
UNSUBSCRIBE_PATH = "/u/"
# Why an address is on the suppression list; SES knows the first two, relay adds its one-click unsubscribe.
SUPPRESSION_REASONS = ("BOUNCE", "COMPLAINT", "UNSUBSCRIBE")


@dataclass(frozen=True)
class TrackingSettings:
    open_tracking: bool = False
    click_tracking: bool = False
    # host[:port] that pixel and redirect URLs point at: the set's custom redirect domain or relay's default.
    host: str = "localhost:8080"
    # SES semantics: OPTIONAL keeps each link's own scheme and serves the pixel over http; REQUIRE makes both
    # https; REQUIRE_OPEN_ONLY makes the pixel https and keeps each link's scheme.
    https_policy: str = "OPTIONAL"
    pixel_position: str = "bottom"
    # Every host relay serves tracking on: links already pointing there are not wrapped a second time.
    tracking_hosts: frozenset[str] = field(default_factory=frozenset)
    # Whether https://host reaches the tracking listener. When it does not, every tracking URL is http: an
    # https link then goes through an http redirect (a downgrade `relay check` warns about) instead of
    # pointing at an https URL nobody answers, which would break the link.
    https_available: bool = True
    # Bounces and feedback. return_path_domain: when set, each copy's envelope sender is a signed
    # VERP address on this domain (bounce+TOKEN@domain), which relay's SMTP listener accepts reports for.
    return_path_domain: str = ""
    # Add List-Unsubscribe (https on `host`, plus mailto on return_path_domain) and List-Unsubscribe-Post.
    list_unsubscribe: bool = False
    # Which suppression-list reasons apply to this message: an address listed for one of them is not sent
    # to, and this message's permanent bounces, complaints and unsubscribes add its recipients for them.
    suppression_reasons: tuple[str, ...] = SUPPRESSION_REASONS
    # Delivery options of the set (SES's DeliveryOptions): a copy goes out over TLS or waits for it; a copy is
    # retried this long (None: delivery.max_age).
    require_tls: bool = False
    max_delivery_seconds: int | None = None

    @property
    def enabled(self) -> bool:
        return self.open_tracking or self.click_tracking

    def open_base(self) -> str:
        scheme = "https" if self.https_policy in ("REQUIRE", "REQUIRE_OPEN_ONLY") else "http"
        return f"{scheme}://{self.host}{OPEN_PATH}"

    def click_base(self, link_scheme: str) -> str:
        own = link_scheme.lower() if self.https_available else "http"
        scheme = "https" if self.https_policy == "REQUIRE" else own
        return f"{scheme}://{self.host}{CLICK_PATH}"

    def is_tracking_host(self, host: str) -> bool:
        host = host.lower()
        return host == self.host.lower() or host in self.tracking_hosts

    def to_json(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["tracking_hosts"] = sorted(self.tracking_hosts)
        data["suppression_reasons"] = list(self.suppression_reasons)
        return data

    @classmethod
    def from_json(cls, data: dict) -> TrackingSettings:
        data = dict(data)
        data["tracking_hosts"] = frozenset(data.get("tracking_hosts", ()))
        if "suppression_reasons" in data:  # messages queued by an older relay have none: the defaults apply
            data["suppression_reasons"] = tuple(data["suppression_reasons"])
        return cls(**data)

    def unsubscribe_url(self, token: str) -> str:
        """The one-click unsubscribe URL: https unless the tracking host has no HTTPS (RFC 8058 wants https)."""
        scheme = "https" if self.https_available else "http"
        return f"{scheme}://{self.host}{UNSUBSCRIBE_PATH}{token}"

