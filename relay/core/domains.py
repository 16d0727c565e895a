"""Tracking-domain rules: which names may carry the pixel and wrapped links (pure).

A custom tracking domain is either a full host name (SES: `TrackingOptions.CustomRedirectDomain`) or, in the
Tencent Cloud style, a prefix placed in front of a verified sender domain (`prefix.sender-domain`). Both are
checked here and refused with SES's `InvalidTrackingOptions` error and a message that names the broken rule.
Whether a domain has been proved to reach the listener (`relay tracking-domain verify`) is a fact from the
store; `check_tracking_options` only combines it with the rules.
"""

from __future__ import annotations

import re

ERROR_CODE = "InvalidTrackingOptions"
# RFC 1123 label: letters, digits, hyphens; 1-63 long; no hyphen at either end.
_LABEL_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
# Tencent Cloud's trace-domain prefix: 3-63 letters, digits, hyphens; no hyphen at an end; not all digits.
PREFIX_RE = re.compile(r"^(?!-)(?![0-9]+$)[A-Za-z0-9-]{3,63}(?<!-)$")


class InvalidTrackingOptions(ValueError):
    """SES's error for a tracking domain that is malformed or not verified."""

    code = ERROR_CODE

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def split_port(domain: str) -> tuple[str, int | None]:
    """`host[:port]` → (host, port); tracking hosts may name a port (tests, non-standard listeners)."""
    host, sep, port = domain.rpartition(":")
    if sep and port.isdigit() and host and "]" not in port:
        return host, int(port)
    return domain, None


def host_name_problem(domain: str) -> str | None:
    """Why `domain` (optionally `host:port`) is not a usable tracking host name, or None when it is."""
    host, port = split_port(domain.strip())
    if port is not None and not 1 <= port <= 65535:
        return f"port {port} is out of range"
    if not host:
        return "the domain is empty"
    if host.endswith("."):
        host = host[:-1]
    if len(host) > 253:
        return "a domain name is at most 253 characters"
    labels = host.split(".")
    if len(labels) < 2 and host.lower() != "localhost":
        return "a tracking domain needs at least two labels (a subdomain such as track.example.com)"
    for label in labels:
        if not label.isascii():
            return f"label {label!r} is not valid: write an internationalised name in its xn-- (punycode) form"
        if not _LABEL_RE.match(label):
            return (f"label {label!r} is not valid: 1-63 letters, digits or hyphens, not starting or ending "
                    "with a hyphen")
    if labels[-1].isdigit():
        return "the top-level label cannot be all digits (an IP address is not a tracking domain)"
    return None


def prefix_problem(prefix: str) -> str | None:
    """Why `prefix` breaks Tencent Cloud's trace-domain prefix rule, or None."""
    if not 3 <= len(prefix) <= 63:
        return "a tracking domain prefix is 3-63 characters long"
    if not re.fullmatch(r"[A-Za-z0-9-]+", prefix):
        return "a tracking domain prefix contains only letters, digits and hyphens"
    if prefix.startswith("-") or prefix.endswith("-"):
        return "a tracking domain prefix must not start or end with a hyphen"
    if prefix.isdigit():
        return "a tracking domain prefix must not be all digits"
    assert PREFIX_RE.match(prefix)
    return None


def _invalid(domain: str, rule: str) -> InvalidTrackingOptions:
    return InvalidTrackingOptions(
        f"Invalid tracking options: the tracking domain {domain!r} is not a valid domain or subdomain: {rule}."
    )


def validate_tracking_domain(domain: str) -> str:
    """The normalised (lower-case, no trailing dot) domain, or InvalidTrackingOptions naming the rule."""
    problem = host_name_problem(domain)
    if problem:
        raise _invalid(domain, problem)
    host, port = split_port(domain.strip())
    host = host.rstrip(".").lower()
    return f"{host}:{port}" if port is not None else host


def domain_from_prefix(prefix: str, sender_domain: str) -> str:
    """`prefix.sender_domain` after checking the prefix rule and the resulting host name."""
    problem = prefix_problem(prefix)
    if problem:
        raise _invalid(f"{prefix}.{sender_domain}", problem)
    return validate_tracking_domain(f"{prefix}.{sender_domain}")


def check_tracking_options(domain: str, verified: set[str] | frozenset[str], require_verified: bool = True) -> str:
    """Validate a custom redirect domain for a configuration set's tracking options.

    `verified` holds host names (lower-case, without port) proved by `relay tracking-domain verify`.
    Operators who route traffic themselves can set `require_verified` to False.
    """
    normalised = validate_tracking_domain(domain)
    host = split_port(normalised)[0]
    if require_verified and host not in verified:
        raise InvalidTrackingOptions(
            f"Invalid tracking options: Domain {host} is not verified under this account. "
            f"Run `relay tracking-domain verify {host}` once DNS points at the tracking listener."
        )
    return normalised
