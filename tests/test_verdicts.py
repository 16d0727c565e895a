"""Machine verdicts (pure): each rule, its reason, and that lists are data."""

from __future__ import annotations

import ipaddress

import pytest

from relay.core import verdicts
from relay.core.verdicts import CLICK, HUMAN, MACHINE, OPEN, PROXY, Context, Hit, Lists, Thresholds, classify

APPLE_CSV = "17.58.0.0/16,US,US-CA,Cupertino,\n# comment\n172.224.224.0/27,US,US-NY,New York,\n2a01:b740::/32,US,,,\n"
SCANNER_NETS = "40.92.0.0/15 microsoft-safe-links\n148.163.128.0/19 proofpoint\n"
CHROME = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36"
GMAIL = "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
YAHOO = "YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html"


@pytest.fixture(scope="module")
def lists() -> Lists:
    apple, problems = verdicts.parse_networks(APPLE_CSV, "apple")
    assert problems == []
    nets, _ = verdicts.parse_networks(SCANNER_NETS, "scanner")
    uas = verdicts.parse_user_agents("# c\nmimecast: Mimecast\nbarracuda: Barracuda\nproofpoint: proofpoint\n")
    return Lists(apple_egress=apple, scanner_user_agents=tuple(uas), scanner_networks=nets)


def codes(v) -> list[str]:
    return [r.code for r in v.reasons]


def test_ordinary_open_is_human(lists):
    v = classify(Hit(OPEN, "GET", "198.51.100.4", CHROME, 1000), Context(), lists)
    assert (v.verdict, v.reasons) == (HUMAN, ())


def test_apple_mpp_needs_bare_ua_and_apple_range(lists):
    v = classify(Hit(OPEN, "GET", "17.58.3.4", "Mozilla/5.0", 0), Context(), lists)
    assert v.verdict == MACHINE and codes(v) == ["apple-mpp"]
    assert "Mail Privacy Protection" in v.reasons[0].detail
    assert classify(Hit(OPEN, "GET", "2a01:b740::5", "Mozilla/5.0", 0), Context(), lists).verdict == MACHINE
    assert classify(Hit(OPEN, "GET", "198.51.100.1", "Mozilla/5.0", 0), Context(), lists).verdict == HUMAN
    assert classify(Hit(OPEN, "GET", "17.58.3.4", CHROME, 0), Context(), lists).verdict == HUMAN
    assert classify(Hit(OPEN, "GET", "17.58.3.4", "Mozilla/5.0 ", 0), Context(), lists).verdict == HUMAN


@pytest.mark.parametrize("ua,code", [(GMAIL, "google-image-proxy"), (YAHOO, "yahoo-image-proxy")])
def test_image_proxies_are_real_opens_labelled_proxy(lists, ua, code):
    v = classify(Hit(OPEN, "GET", "66.249.84.1", ua, 0), Context(), lists)
    assert v.verdict == PROXY and codes(v) == [code]
    assert not v.is_machine


@pytest.mark.parametrize("ip,ua,code", [
    ("40.93.1.1", CHROME, "scanner-network"),
    ("148.163.130.9", CHROME, "scanner-network"),
    ("198.51.100.1", "Mozilla/5.0 Mimecast-LinkScanner", "scanner-user-agent"),
    ("198.51.100.1", "barracuda sentinel", "scanner-user-agent"),
])
def test_scanners_by_network_and_user_agent(lists, ip, ua, code):
    v = classify(Hit(CLICK, "GET", ip, ua, 60_000, "https://a/"), Context(0), lists)
    assert v.verdict == MACHINE and codes(v) == [code]


def test_head_and_missing_user_agent(lists):
    assert codes(classify(Hit(OPEN, "HEAD", "198.51.100.1", CHROME, 0), Context(), lists)) == ["head-request"]
    assert codes(classify(Hit(OPEN, "GET", "198.51.100.1", "", 0), Context(), lists)) == ["no-user-agent"]


def test_click_soon_after_delivery(lists):
    early = classify(Hit(CLICK, "GET", "198.51.100.1", CHROME, 3_000, "u"), Context(1_000), lists)
    assert codes(early) == ["early-click"] and "2.0 s after delivery" in early.reasons[0].detail
    late = classify(Hit(CLICK, "GET", "198.51.100.1", CHROME, 60_000, "u"), Context(1_000), lists)
    assert late.verdict == HUMAN
    msg = classify(Hit(CLICK, "GET", "198.51.100.1", CHROME, 2_000, "u"), Context(1_000, "message"), lists)
    assert "accepted" in msg.reasons[0].detail
    assert classify(Hit(CLICK, "GET", "198.51.100.1", CHROME, 2_000, "u"), Context(None), lists).verdict == HUMAN


def test_all_links_clicked_within_seconds(lists):
    hit = Hit(CLICK, "GET", "198.51.100.1", CHROME, 100_000, "c")
    assert codes(classify(hit, Context(0, burst_links=3), lists)) == ["link-burst"]
    assert "3 different links" in classify(hit, Context(0, burst_links=3), lists).reasons[0].detail
    assert classify(hit, Context(0, burst_links=2), lists).verdict == HUMAN
    # a two-link message whose both links go at once
    assert codes(classify(hit, Context(0, burst_links=2, link_count=2), lists)) == ["link-burst"]
    assert classify(hit, Context(0, burst_links=3), lists, Thresholds(burst_min_links=4)).verdict == HUMAN


def test_burst_sizes():
    w = 5000
    assert verdicts.burst_sizes([], w) == []
    assert verdicts.burst_sizes([(0, "a")], w) == [1]
    # three links within 2 s, given out of order
    assert verdicts.burst_sizes([(101_000, "b"), (99_000, "a"), (100_000, "c")], w) == [3, 3, 3]
    # the same link again and again is one link (a person double-clicking)
    assert verdicts.burst_sizes([(0, "a"), (100, "a"), (200, "a")], w) == [1, 1, 1]
    # spread over more than the window: no window holds all three; the middle one shares one with each side
    assert verdicts.burst_sizes([(0, "a"), (4000, "b"), (8000, "c")], w) == [2, 2, 2]
    # a late click does not join an earlier burst
    assert verdicts.burst_sizes([(0, "a"), (1000, "b"), (2000, "c"), (60_000, "d")], w) == [3, 3, 3, 1]


def test_burst_sizes_is_fast_on_a_flood():
    import time

    clicks = [(i, f"l{i % 7}") for i in range(50_000)]
    start = time.monotonic()
    sizes = verdicts.burst_sizes(clicks, 5000)
    assert time.monotonic() - start < 2
    assert set(sizes) == {7}


def test_machine_wins_over_proxy_and_reasons_accumulate(lists):
    v = classify(Hit(OPEN, "HEAD", "40.92.0.1", GMAIL, 0), Context(), lists)
    assert v.verdict == MACHINE
    assert codes(v) == ["head-request", "google-image-proxy", "scanner-network"]
    assert v.reasons_json()[0] == {"code": "head-request", "detail": v.reasons[0].detail, "verdict": MACHINE}


def test_network_set_nested_and_overlapping_ranges():
    nets = verdicts.NetworkSet([
        (ipaddress.ip_network("10.0.0.0/8"), "big"),
        (ipaddress.ip_network("10.1.0.0/16"), "small"),
        (ipaddress.ip_network("10.3.0.0/16"), "other"),
    ])
    assert nets.lookup("10.1.2.3") == "small"
    assert nets.lookup("10.2.0.1") == "big"
    assert nets.lookup("10.200.0.1") == "big"
    assert nets.lookup("11.0.0.0") is None
    assert nets.lookup("::ffff:10.3.0.1") == "other"
    assert nets.lookup("not-an-ip") is None
    assert len(nets) == 3


def test_list_parsers_report_bad_lines():
    nets, problems = verdicts.parse_networks("10.0.0.0/8 corp\nbogus\n\n192.0.2.0/24\n", "x")
    assert problems == ["line 2: 'bogus' is not a network"]
    assert nets.lookup("10.9.9.9") == "corp" and nets.lookup("192.0.2.9") == "x"
    assert verdicts.parse_user_agents("a: b\nnot a rule\nc:\n") == [("a", "b")]


def test_scanner_agent_answers_stay_per_list_when_remembered(lists):
    ua = "Mozilla/5.0 Mimecast-LinkScanner"
    assert [lists.scanner_agent(ua) for _ in range(3)] == [("mimecast", "mimecast")] * 3
    assert [lists.scanner_agent(CHROME) for _ in range(3)] == [None] * 3
    # a reload builds new lists: what the old ones remembered does not carry over
    reloaded = Lists(scanner_user_agents=(("chrome-scanner", "Chrome/120"),))
    assert reloaded.scanner_agent(ua) is None
    assert reloaded.scanner_agent(CHROME) == ("chrome-scanner", "chrome/120")
