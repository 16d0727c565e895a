"""The management API's pure parts: SigV4 verification (against the CLI's captured requests and botocore's
signer), v1 parameter un-flattening, pagination tokens, error codes per protocol, XML envelopes."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from unittest import mock
from xml.etree import ElementTree

import botocore.auth
import pytest
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from relay.api import common, errors, sigv4, v1, v2
from relay.sets import SesError

from .harness import ROOT

CAPTURES = ROOT.parent / "shared" / "reference" / "ses-wire-captures.txt"
CAPTURE_KEYS = {"AKIDEXAMPLE": "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"}
KEYS = {"AKIDTEST": "test-secret-0123456789"}
NOW = datetime(2026, 11, 22, 22, 30, 0, tzinfo=UTC)


def captured_requests(path: Path) -> list[tuple[str, sigv4.Request]]:
    """(command, request) for every request in the capture file."""
    out = []
    for section in path.read_text().split("\n===== ")[1:]:
        command, _, rest = section.partition("\n----- ")
        lines = rest.split("\n")
        method, target, _ = lines[0].split(" ")
        headers, i = [], 1
        while lines[i].strip():
            name, _, value = lines[i].partition(": ")
            headers.append((name, value))
            i += 1
        body = next((x for x in lines[i + 1:] if x.strip()), "").encode()
        path_, _, query = target.partition("?")
        out.append((command, sigv4.Request(method, path_, query, tuple(headers), body)))
    return out


def _when(request: sigv4.Request) -> datetime:
    return datetime.strptime(request.header("X-Amz-Date"), "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)


@pytest.mark.skipif(not CAPTURES.exists(), reason=f"{CAPTURES} is not present")
def test_every_captured_cli_request_verifies():
    captured = captured_requests(CAPTURES)
    assert len(captured) == 23
    for command, request in captured:
        assert len(request.body) == int(request.header("Content-Length") or 0), command
        if request.header("X-Amz-Security-Token"):
            with pytest.raises(sigv4.AuthError) as exc:
                sigv4.verify(request, CAPTURE_KEYS, _when(request))
            assert exc.value.code == "InvalidClientTokenId"
            continue
        assert sigv4.verify(request, CAPTURE_KEYS, _when(request), ["us-east-1"]) == "AKIDEXAMPLE", command
        # One byte more in the body, a wrong secret, the wrong region or a stale clock: refused.
        tampered = sigv4.Request(request.method, request.raw_path, request.raw_query, request.headers,
                                 request.body + b" ")
        for req, keys, now, regions, code in (
                (tampered, CAPTURE_KEYS, _when(request), (), "SignatureDoesNotMatch"),
                (request, {"AKIDEXAMPLE": "another"}, _when(request), (), "SignatureDoesNotMatch"),
                (request, {"AKIDOTHER": "x"}, _when(request), (), "InvalidClientTokenId"),
                (request, CAPTURE_KEYS, _when(request), ("eu-west-1",), "SignatureDoesNotMatch"),
                (request, CAPTURE_KEYS, _when(request) + timedelta(minutes=16), (), "SignatureDoesNotMatch")):
            with pytest.raises(sigv4.AuthError) as exc:
                sigv4.verify(req, keys, now, regions)
            assert exc.value.code == code, command


def botocore_signed(method: str, url: str, body: bytes = b"", headers: dict | None = None,
                    when: datetime = NOW) -> sigv4.Request:
    request = AWSRequest(method=method, url=url, data=body, headers=headers or {})
    with mock.patch("botocore.auth.get_current_datetime", return_value=when.replace(tzinfo=None)):
        botocore.auth.SigV4Auth(Credentials("AKIDTEST", KEYS["AKIDTEST"]), "ses", "us-east-1").add_auth(request)
    prepared = request.prepare()
    raw = prepared.url.split("://", 1)[1]
    host, _, target = raw.partition("/")
    path, _, query = ("/" + target).partition("?")
    hdrs = [("Host", host)] + [(k, v) for k, v in prepared.headers.items()]
    return sigv4.Request(method, path, query, tuple(hdrs), body)


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8081/v2/email/identities/a%2Bb%20c%40example.com/configuration-set",
    "http://127.0.0.1:8081/v2/email/configuration-sets?NextToken=a%20b%2Fc%2Bd%3D&PageSize=5",
    "http://127.0.0.1:8081/v2/email/configuration-sets?PageSize=5&NextToken=abc",
    "http://localhost/v2/email/configuration-sets/x/./event-destinations/../event-destinations",
    "http://localhost/v2/email/configuration-sets/%7Etilde",
])
def test_botocore_signed_requests_verify(url):
    request = botocore_signed("PUT", url, b'{"ConfigurationSetName": "x"}', {"Content-Type": "application/json"})
    assert sigv4.verify(request, KEYS, NOW) == "AKIDTEST"


def test_header_checks():
    good = botocore_signed("GET", "http://127.0.0.1:8081/v2/email/configuration-sets")

    def without(name: str) -> sigv4.Request:
        return sigv4.Request(good.method, good.raw_path, good.raw_query,
                             tuple(h for h in good.headers if h[0].lower() != name), good.body)

    def replaced(name: str, value: str) -> sigv4.Request:
        return sigv4.Request(good.method, good.raw_path, good.raw_query,
                             tuple((k, value if k.lower() == name else v) for k, v in good.headers), good.body)

    cases = [(without("authorization"), "MissingAuthenticationToken"),
             (without("x-amz-date"), "IncompleteSignature"),
             (without("host"), "SignatureDoesNotMatch"),
             (replaced("host", "127.0.0.1:9999"), "SignatureDoesNotMatch"),
             (replaced("authorization", "Basic dXNlcjpwYXNz"), "IncompleteSignature"),
             (replaced("authorization", good.header("authorization").replace("/ses/", "/sns/")),
              "SignatureDoesNotMatch"),
             (replaced("authorization", good.header("authorization").replace("SignedHeaders=host;", "SignedHeaders=")),
              "SignatureDoesNotMatch"),
             (replaced("x-amz-date", "20261121T223000Z"), "SignatureDoesNotMatch")]
    for request, code in cases:
        with pytest.raises(sigv4.AuthError) as exc:
            sigv4.verify(request, KEYS, NOW)
        assert exc.value.code == code, request.headers
    with pytest.raises(sigv4.AuthError) as exc:
        sigv4.verify(sigv4.Request("GET", "/", "X-Amz-Algorithm=AWS4-HMAC-SHA256", (), b""), KEYS, NOW)
    assert exc.value.code == "AccessDenied"


def test_declared_payload_hash():
    body = b"Action=ListConfigurationSets&Version=2010-12-01"
    signed = botocore_signed("POST", "http://h/", body, {"Content-Type": "application/x-www-form-urlencoded",
                                                          "X-Amz-Content-SHA256": hashlib.sha256(body).hexdigest()})
    assert sigv4.verify(signed, KEYS, NOW) == "AKIDTEST"
    lying = sigv4.Request(signed.method, signed.raw_path, signed.raw_query, signed.headers, body + b"&x=1")
    with pytest.raises(sigv4.AuthError) as exc:
        sigv4.verify(lying, KEYS, NOW)
    assert exc.value.code == "XAmzContentSHA256Mismatch"


def test_canonical_parts():
    assert sigv4.canonical_uri("/v2/email/identities/a%40b.com") == "/v2/email/identities/a%2540b.com"
    assert sigv4.remove_dot_segments("/a/./b/../c") == "/a/c"
    assert sigv4.remove_dot_segments("/") == "/"
    assert sigv4.canonical_query("b=2&a=x%20y&a=1") == "a=1&a=x%20y&b=2"
    assert sigv4.canonical_query("k=a+b") == "k=a%2Bb"  # '+' is not a space in SigV4


def test_unflatten():
    params = [("ConfigurationSetName", "s"), ("EventDestination.Name", "d"),
              ("EventDestination.MatchingEventTypes.member.2", "open"),
              ("EventDestination.MatchingEventTypes.member.1", "send"),
              ("EventDestination.MatchingEventTypes.member.10", "click"),
              ("EventDestination.CloudWatchDestination.DimensionConfigurations.member.1.DimensionName", "c")]
    assert v1.unflatten(params) == {
        "ConfigurationSetName": "s",
        "EventDestination": {"Name": "d", "MatchingEventTypes": ["send", "open", "click"],
                             "CloudWatchDestination": {"DimensionConfigurations": [{"DimensionName": "c"}]}}}
    with pytest.raises(SesError):
        v1.unflatten([("A", "x"), ("A.B", "y")])


def test_pages_and_tokens():
    names = [f"s{i}" for i in range(5)]
    first, token = common.page(names, None, 2)
    assert first == ["s0", "s1"] and token
    second, token = common.page(names, token, 2)
    third, last = common.page(names, token, 2)
    assert second == ["s2", "s3"] and third == ["s4"] and last is None
    # A set deleted between pages skips nothing.
    assert common.page(["s0", "s2", "s3"], common.page(names, None, 1)[1], 1)[0] == ["s2"]
    with pytest.raises(SesError) as exc:
        common.page(names, "***", 2)
    assert exc.value.code == "ValidationError"
    for bad in ("0", "1001", "x"):
        with pytest.raises(SesError):
            common.page_size(bad, "pageSize")


def test_error_codes_per_protocol():
    assert errors.v1_error("TrackingOptionsAlreadyExists", "m").code == "TrackingOptionsAlreadyExistsException"
    assert errors.v1_error("ConfigurationSetDoesNotExist", "m") == errors.WireError(400, "ConfigurationSetDoesNotExist",
                                                                                    "m")
    assert errors.v2_error("ConfigurationSetDoesNotExist", "m") == errors.WireError(404, "NotFoundException", "m")
    assert errors.v2_error("EventDestinationAlreadyExists", "m").code == "AlreadyExistsException"
    assert errors.v2_error("LimitExceeded", "m").code == "LimitExceededException"
    for code in ("InvalidTrackingOptions", "ValidationError", "InvalidSNSDestination", "InvalidConfigurationSet"):
        assert errors.v2_error(code, "m") == errors.WireError(400, "BadRequestException", "m")
    assert errors.v2_error("SignatureDoesNotMatch", "m", 403).status == 403


def test_v1_envelopes_escape_and_parse():
    err = errors.v1_error("ConfigurationSetDoesNotExist", "Configuration set <a&b> does not exist.")
    root = ElementTree.fromstring(v1.error_xml(err, "rid"))
    ns = {"s": v1.NAMESPACE}
    assert root.find("s:Error/s:Code", ns).text == "ConfigurationSetDoesNotExist"
    assert root.find("s:Error/s:Message", ns).text == "Configuration set <a&b> does not exist."
    assert root.find("s:Error/s:Type", ns).text == "Sender"
    ok = ElementTree.fromstring(v1.response_xml("DeleteConfigurationSet", "", "rid"))
    assert ok.find("s:DeleteConfigurationSetResult", ns) is not None


def test_v2_routes():
    assert v2.route("GET", "/v2/email/configuration-sets") == ("ListConfigurationSets", ())
    assert v2.route("PUT", "/v2/email/identities/a%2Bb%40example.com/configuration-set") == (
        "PutEmailIdentityConfigurationSetAttributes", ("a+b@example.com",))
    assert v2.route("DELETE", "/v2/email/configuration-sets/s/event-destinations/d") == (
        "DeleteConfigurationSetEventDestination", ("s", "d"))
    assert v2.route("PATCH", "/v2/email/configuration-sets") is None
    with pytest.raises(SesError):
        v2.parse_body(b"[1]")


def test_api_settings_parse_and_hide_secrets(tmp_path):
    from relay import config

    cfg = config.parse({"api": {
        "listen": "127.0.0.1:0", "regions": ["us-east-1"], "max_skew": "5m",
        "access_keys": [{"id": "AKIDONE", "secret": "s" * 20}],
        "sns_topics": {"arn:aws:sns:us-east-1:123456789012:t": {"url": "http://127.0.0.1:9/h", "secret": "hs"}},
        "event_buses": {"arn:aws:events:us-east-1:123456789012:event-bus/default": {"url": "https://h.example/b"}},
    }}, tmp_path)
    api = cfg.api
    assert api.enabled and api.listen_port == 0 and api.max_skew == 300.0 and api.regions == ("us-east-1",)
    assert api.sns_topics["arn:aws:sns:us-east-1:123456789012:t"].sns_envelope is True
    assert api.event_buses["arn:aws:events:us-east-1:123456789012:event-bus/default"].sns_envelope is False
    assert "s" * 20 not in repr(cfg) and "'hs'" not in repr(cfg)
    assert not config.parse({}, tmp_path).api.enabled
    with pytest.raises(config.ConfigError) as exc:
        config.parse({"api": {"access_keys": [{"id": "AK", "secret": "short"}, {"id": "AK", "secret": "x" * 16}],
                              "sns_topics": {"arn:aws:events:us-east-1:123456789012:x": {"url": "ftp://x"}},
                              "colour": "blue"}}, tmp_path)
    text = "\n".join(exc.value.problems)
    for expected in ("api.access_keys[0].id", "api.access_keys[0].secret", "an id is listed twice",
                     "not an sns ARN", "url: required", "api.colour: unknown key"):
        assert expected in text


def test_the_api_stays_off_without_keys(tmp_path, caplog):
    import asyncio
    import logging

    from relay import config
    from relay.api.server import ApiServer

    cfg = config.parse({"api": {"listen": "127.0.0.1:0"}}, tmp_path)
    server = ApiServer(lambda: cfg, store=None)
    with caplog.at_level(logging.INFO, logger="relay.api"):
        asyncio.run(server.start())
    assert server.port == 0 and "management API disabled" in caplog.text
    asyncio.run(server.stop())


def test_a_store_fault_is_an_internal_failure_in_each_protocol(tmp_path):
    """Anything but an SES error (a broken store here) answers 500 InternalFailure in the protocol's shape."""
    import asyncio

    import aiohttp

    from relay import config
    from relay.api.server import ApiServer

    cfg = config.parse({"api": {"listen": "127.0.0.1:0",
                                "access_keys": [{"id": "AKIDTEST", "secret": KEYS["AKIDTEST"]}]}}, tmp_path)

    async def run() -> list[tuple[int, str, str]]:
        server = ApiServer(lambda: cfg, store=None)
        await server.start()
        out = []
        try:
            base = f"http://127.0.0.1:{server.port}"
            form = b"Action=ListConfigurationSets&Version=2010-12-01"
            for method, path, body, headers in (
                    ("GET", "/v2/email/configuration-sets", b"", {}),
                    ("POST", "/", form, {"Content-Type": "application/x-www-form-urlencoded"})):
                signed = botocore_signed(method, base + path, body, headers, when=datetime.now(UTC))
                async with aiohttp.ClientSession() as http, http.request(
                        method, base + path, data=body,
                        headers={k: v for k, v in signed.headers if k.lower() != "host"}) as resp:
                    out.append((resp.status, resp.headers.get("x-amzn-ErrorType", ""), await resp.text()))
        finally:
            await server.stop()
        return out

    (s2, t2, _), (s1, _, body1) = asyncio.run(run())
    assert (s2, t2) == (500, "InternalFailure")
    assert s1 == 500 and "<Type>Receiver</Type><Code>InternalFailure</Code>" in body1


def test_every_v2_operation_is_routed_where_the_installed_botocore_sends_it():
    """AWS moves operations between releases (botocore 1.44 made ListEmailIdentities and ListConfigurationSets
    POSTs): whatever botocore the user has, each operation relay answers must be reachable at its route."""
    import re

    import botocore.session

    from relay.api import v2

    model = botocore.session.get_session().get_service_model("sesv2")
    unrouted = []
    for name in sorted({op for _verb, _pattern, op in v2.ROUTES}):
        http = model.operation_model(name).http
        path = re.sub(r"\{[^}]+\}", "x", http["requestUri"].split("?")[0])
        if not any(verb == http["method"] and pattern.match(path) for verb, pattern, op in v2.ROUTES if op == name):
            unrouted.append(f"{name}: {http['method']} {path}")
    assert not unrouted
