"""Tracking-domain rules (pure): host names, Tencent's prefix rule, SES's InvalidTrackingOptions."""

from __future__ import annotations

import pytest

from relay.core import domains
from relay.core.domains import InvalidTrackingOptions


@pytest.mark.parametrize("domain,expected", [
    ("track.example.com", "track.example.com"),
    ("Track.Example.COM.", "track.example.com"),
    ("t-1.links.example.co.uk", "t-1.links.example.co.uk"),
    ("track.example.com:8080", "track.example.com:8080"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
])
def test_valid_domains(domain, expected):
    assert domains.validate_tracking_domain(domain) == expected


@pytest.mark.parametrize("domain,rule", [
    ("", "empty"),
    ("example", "at least two labels"),
    ("-bad.example.com", "label '-bad'"),
    ("bad-.example.com", "label 'bad-'"),
    ("under_score.example.com", "label 'under_score'"),
    ("a..example.com", "label ''"),
    ("bücher.example", "xn-- (punycode)"),
    ("192.168.1.1", "IP address"),
    ("track.example.com:0", "out of range"),
    ("track.example.com:99999", "out of range"),
    ("a" * 64 + ".example.com", "1-63"),
    (("a" * 60 + ".") * 5 + "com", "253"),
])
def test_invalid_domains_name_the_rule(domain, rule):
    with pytest.raises(InvalidTrackingOptions) as err:
        domains.validate_tracking_domain(domain)
    assert err.value.code == "InvalidTrackingOptions"
    assert "not a valid domain or subdomain" in err.value.message
    assert rule in err.value.message


@pytest.mark.parametrize("prefix", ["abc", "track", "t-1", "1a2", "a" * 63, "A-b-C"])
def test_prefix_rule_accepts(prefix):
    assert domains.prefix_problem(prefix) is None
    assert domains.PREFIX_RE.match(prefix)
    assert domains.domain_from_prefix(prefix, "Example.com") == f"{prefix.lower()}.example.com"


@pytest.mark.parametrize("prefix,rule", [
    ("ab", "3-63"),
    ("a" * 64, "3-63"),
    ("-abc", "start or end with a hyphen"),
    ("abc-", "start or end with a hyphen"),
    ("12345", "all digits"),
    ("ab_c", "letters, digits and hyphens"),
    ("ab.c", "letters, digits and hyphens"),
    ("äbc", "letters, digits and hyphens"),
])
def test_prefix_rule_refuses(prefix, rule):
    assert rule in domains.prefix_problem(prefix)
    assert not domains.PREFIX_RE.match(prefix)
    with pytest.raises(InvalidTrackingOptions, match=rule):
        domains.domain_from_prefix(prefix, "example.com")


def test_unverified_domain_refused_unless_operator_allows():
    with pytest.raises(InvalidTrackingOptions, match="Domain track.example.com is not verified under this account"):
        domains.check_tracking_options("track.example.com", set())
    assert domains.check_tracking_options("Track.Example.com:8080", {"track.example.com"}) == "track.example.com:8080"
    assert domains.check_tracking_options("track.example.com", set(), require_verified=False) == "track.example.com"
    with pytest.raises(InvalidTrackingOptions, match="not a valid domain"):
        domains.check_tracking_options("bad_domain.example", {"bad_domain.example"}, require_verified=False)
