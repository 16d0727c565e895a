"""The console's locks, over real sockets against a relay subprocess (no browser needed): no page or data
endpoint answers without a session, a POST from another origin or without the session's CSRF token is refused,
viewers read only, failed logins are limited as SMTP AUTH's are, cookies carry their flags, sessions end."""

from __future__ import annotations

import json
import re
import signal
import time

import pytest

from relay import config as config_module
from relay.console.server import ConsoleServer

from .test_console_helpers import (
    ADMIN,
    ADMIN_PASSWORD,
    GONE,
    VIEWER,
    VIEWER_PASSWORD,
    Campaign,
    Client,
    run_campaign,
    start_relay,
)


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    c = start_relay(tmp_path_factory.mktemp("console-security"))
    try:
        yield run_campaign(c)
    finally:
        c.stop()


@pytest.fixture(scope="module")
def proxied(tmp_path_factory):
    """A console behind a trusted proxy (loopback), with sessions of 1 s idle and 3 s in all."""
    c = start_relay(tmp_path_factory.mktemp("console-proxied"), extra_console=(
        'trusted_proxies = ["127.0.0.0/8"]\nsession_idle = "1s"\nsession_lifetime = "3s"'))
    try:
        yield c
    finally:
        c.stop()


def routes(c: Campaign) -> list[tuple[str, str]]:
    """Every route of the console (from its own router, so a route added later is checked too), with its path
    parameters filled in."""
    server = ConsoleServer(lambda: config_module.load(c.relay.config_path), store=None)
    out = []
    for route in server.app().router.routes():
        path = route.resource.canonical
        path = path.replace("{name}", "marketing").replace("{id}", c.message_id)
        if route.method in ("GET", "POST"):
            out.append((route.method, path))
    return out


def test_without_a_session_every_page_and_endpoint_answers_401_or_the_login(campaign):
    anonymous = Client(campaign.base)
    checked = 0
    for method, path in routes(campaign):
        if path == "/login" or path.startswith("/static/"):
            continue
        for cookie in (None, "forged-session-token"):
            if cookie:
                anonymous.opener.addheaders = [("Cookie", f"relay_console={cookie}")]
            if method == "GET":
                status, headers, body = anonymous.get(path)
            else:
                status, headers, body = anonymous.post(path, {"address": GONE, "csrf": "x"})
            assert status in (303, 401), (method, path, status)
            if status == 303:
                assert headers["Location"].startswith("/login?next="), (path, headers)
            assert campaign.message_id not in body and "example.org" not in body, (method, path)
            checked += 1
        anonymous.opener.addheaders = []
    assert checked >= 2 * 18  # the pages, their JSON, the preview and the forms
    status, _headers, body = anonymous.get("/data/overview")
    assert status == 401 and json.loads(body) == {"error": "log in first"}
    assert GONE in _suppression(campaign)  # nothing was removed on the way


def _suppression(c: Campaign) -> str:
    admin = Client(c.base)
    assert admin.login(ADMIN, ADMIN_PASSWORD) == 303
    return admin.get("/suppression")[2]


def test_a_cross_site_post_is_refused_and_a_post_needs_the_session_token(campaign):
    admin = Client(campaign.base)
    assert admin.login(ADMIN, ADMIN_PASSWORD) == 303
    token = admin.csrf()
    form = {"csrf": token, "address": GONE, "reason": ""}
    refused = [
        admin.post("/suppression/remove", form, origin="http://attacker.example"),
        admin.post("/suppression/remove", form, origin=None, headers={"Referer": "http://attacker.example/x"}),
        admin.post("/suppression/remove", form, origin=None),  # neither Origin nor Referer
        admin.post("/suppression/remove", {**form, "csrf": "not-the-token"}),
        admin.post("/suppression/remove", {"address": GONE}),
        admin.post("/suppression/add", {"csrf": "", "address": "new@example.org", "reason": "BOUNCE"}),
    ]
    assert [status for status, _h, _b in refused] == [403] * len(refused)
    page = admin.get("/suppression")[2]
    assert GONE in page and "new@example.org" not in page
    status, headers, _body = admin.post("/suppression/add", {"csrf": token, "address": "new@example.org",
                                                              "reason": "COMPLAINT"})
    assert status == 303 and "done=added" in headers["Location"]  # the same form from the console: accepted
    assert "new@example.org" in admin.get("/suppression?q=new%40")[2]


def test_a_viewer_reads_but_cannot_change_the_suppression_list(campaign):
    viewer = Client(campaign.base)
    assert viewer.login(VIEWER, VIEWER_PASSWORD) == 303
    status, _headers, page = viewer.get("/suppression")
    assert status == 200 and GONE in page and "/suppression/remove" not in page and "add-form" not in page
    token = viewer.csrf()
    assert viewer.get(f"/suppression/remove?address={GONE}")[0] == 403
    assert viewer.post("/suppression/remove", {"csrf": token, "address": GONE})[0] == 403
    assert viewer.post("/suppression/add", {"csrf": token, "address": "v@example.org", "reason": "BOUNCE"})[0] == 403
    assert GONE in viewer.get("/suppression")[2] and "v@example.org" not in viewer.get("/suppression?q=v%40")[2]
    for path in ("/", "/sets/marketing", f"/messages/{campaign.message_id}", "/queue", "/reputation"):
        assert viewer.get(path)[0] == 200, path


def test_pages_carry_a_content_security_policy_and_the_preview_a_stricter_one(campaign):
    admin = Client(campaign.base)
    admin.login(ADMIN, ADMIN_PASSWORD)
    status, headers, body = admin.get("/")
    csp = headers["Content-Security-Policy"]
    assert status == 200 and "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "frame-ancestors 'none'" in csp and headers["X-Frame-Options"] == "DENY"
    assert headers["Cache-Control"] == "no-store" and headers["X-Content-Type-Options"] == "nosniff"
    assert not re.search(r"<script(?![^>]*(src=|type=\"application/json\"))", body)  # no inline script at all
    assert not re.search(r"https?://(?!127\.0\.0\.1)[^\"' ]+\.(js|css|woff2?)", body)  # nothing from elsewhere
    status, headers, body = admin.get(f"/messages/{campaign.message_id}/preview")
    csp = headers["Content-Security-Policy"]
    assert status == 200 and "img-src data:" in csp and "sandbox" in csp and "script-src" not in csp
    assert "default-src 'none'" in csp and headers["X-Frame-Options"] == "SAMEORIGIN"
    assert "/c/" not in body and "/o/" not in body  # no tracking URL: a look at the preview records nothing
    status, headers, _body = admin.get("/static/chart.umd.min.js")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript")


def test_data_endpoints_give_the_pages_numbers_as_json(campaign):
    admin = Client(campaign.base)
    admin.login(ADMIN, ADMIN_PASSWORD)
    overview = json.loads(admin.get("/data/overview?range=24h")[2])
    assert sum(overview["chart"]["series"]["human_clicks"]) == 4 and overview["range"]["by"] == "hour"
    message = json.loads(admin.get(f"/data/messages/{campaign.message_id}")[2])
    assert [link["clicks"] for link in message["links"]] == [3, 0, 1] and message["preview"] is True
    assert admin.get("/data/messages/no-such-message")[0] == 404


def test_logout_ends_the_session_even_for_a_replayed_cookie(campaign):
    admin = Client(campaign.base)
    admin.login(ADMIN, ADMIN_PASSWORD)
    stolen = admin.cookie("relay_console")
    assert admin.post("/logout", {"csrf": admin.csrf()})[0] == 303
    replay = Client(campaign.base)
    replay.opener.addheaders = [("Cookie", f"relay_console={stolen}")]
    assert replay.get("/")[0] == 303 and replay.get("/data/queue")[0] == 401


def test_session_cookie_is_httponly_strict_and_secure_only_behind_https(campaign, proxied):
    for c, forwarded, secure in ((campaign, {}, False), (campaign, {"X-Forwarded-Proto": "https"}, False),
                                 (proxied, {}, False), (proxied, {"X-Forwarded-Proto": "https"}, True)):
        client = Client(c.base)
        client.get("/login")
        status, headers, _body = client.post("/login", {"username": ADMIN, "password": ADMIN_PASSWORD,
                                                        "csrf": client.cookie("relay_console_login")},
                                             origin=("https://" if secure else "http://") + c.base.split("//")[1],
                                             headers=forwarded)
        cookie = next(v for k, v in _set_cookies(headers) if v.startswith("relay_console="))
        assert status == 303 and "HttpOnly" in cookie and "SameSite=Strict" in cookie, cookie
        assert ("Secure" in cookie) is secure, (c.base, forwarded, cookie)


def _set_cookies(headers: dict) -> list[tuple[str, str]]:
    # urllib folds repeated headers into one, joined by ", "
    return [("Set-Cookie", part.strip()) for part in re.split(r", (?=relay_console)", headers.get("Set-Cookie", ""))]


def test_failed_logins_are_limited_per_client_as_smtp_auth(proxied):
    """smtp.auth_fail_limit's default: 5 failures in 5 minutes; then even the right password is refused for that
    address (X-Forwarded-For from the trusted proxy), while another address logs in."""
    attacker = {"X-Forwarded-For": "192.0.2.7"}
    client = Client(proxied.base)
    client.get("/login")
    statuses = [client.post("/login", {"username": ADMIN, "password": f"guess-{i}",
                                       "csrf": client.cookie("relay_console_login")}, headers=attacker)[0]
                for i in range(5)]
    assert statuses == [401] * 5
    status, _headers, body = client.post("/login", {"username": ADMIN, "password": ADMIN_PASSWORD,
                                                    "csrf": client.cookie("relay_console_login")}, headers=attacker)
    assert status == 429 and "Too many failed logins" in body
    other = Client(proxied.base)
    other.get("/login")
    assert other.post("/login", {"username": ADMIN, "password": ADMIN_PASSWORD,
                                 "csrf": other.cookie("relay_console_login")},
                      headers={"X-Forwarded-For": "192.0.2.8"})[0] == 303
    assert "console login ip=192.0.2.7 refused: too many failures" in proxied.relay.log()


def test_a_session_ends_after_its_idle_time_and_its_lifetime(proxied):
    client = Client(proxied.base)
    client.get("/login")
    client.post("/login", {"username": VIEWER, "password": VIEWER_PASSWORD,
                           "csrf": client.cookie("relay_console_login")}, headers={"X-Forwarded-For": "192.0.2.9"})
    assert client.get("/queue")[0] == 200
    time.sleep(2.0)  # session_idle = 1s
    assert client.get("/queue")[0] == 303
    client.get("/login")
    client.post("/login", {"username": VIEWER, "password": VIEWER_PASSWORD,
                           "csrf": client.cookie("relay_console_login")}, headers={"X-Forwarded-For": "192.0.2.9"})
    started, answers = time.monotonic(), []
    while time.monotonic() - started < 5.0:  # a request every 0.4 s: never idle, but session_lifetime = 3s
        answers.append((time.monotonic() - started, client.get("/queue")[0]))
        time.sleep(0.4)
    assert all(status == 200 for at, status in answers if at < 2.0), answers
    assert all(status == 303 for at, status in answers if at > 4.0), answers


def test_a_user_removed_on_reload_loses_the_session_at_once(tmp_path):
    c = start_relay(tmp_path / "reload")
    try:
        viewer = Client(c.base)
        assert viewer.login(VIEWER, VIEWER_PASSWORD) == 303 and viewer.get("/queue")[0] == 200
        text = c.relay.config_path.read_text()
        without = re.sub(r'\[\[console\.users\]\]\nusername = "viewer"\n[^\[]*', "", text)
        assert without != text
        c.relay.config_path.write_text(without)
        c.relay.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "configuration reloaded" not in c.relay.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert viewer.get("/queue")[0] == 303 and viewer.get("/data/queue")[0] == 401
        assert viewer.login(VIEWER, VIEWER_PASSWORD) == 401
    finally:
        c.stop()


def test_after_login_only_a_page_of_the_console_is_next(campaign):
    for wanted, location in (("/queue?x=1", "/queue?x=1"), ("//attacker.example/", "/"),
                             ("/\\attacker.example/", "/"), ("https://attacker.example/", "/")):
        client = Client(campaign.base)
        client.get("/login")
        status, headers, _body = client.post("/login", {"username": VIEWER, "password": VIEWER_PASSWORD,
                                                        "csrf": client.cookie("relay_console_login"),
                                                        "next": wanted})
        assert (status, headers["Location"]) == (303, location), wanted


def test_a_form_larger_than_the_console_takes_is_refused(campaign):
    """MAX_FORM: 64 KiB holds any of the console's forms; a larger body is refused before it is read whole."""
    admin = Client(campaign.base)
    admin.login(ADMIN, ADMIN_PASSWORD)
    status, _headers, _body = admin.post("/suppression/add", {"csrf": admin.csrf(), "address": "x" * 70_000,
                                                              "reason": "BOUNCE"})
    assert status == 413
    assert admin.post("/suppression/add", {"csrf": admin.csrf(), "address": "big@example.org",
                                           "reason": "BOUNCE"})[0] == 303
