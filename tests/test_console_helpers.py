"""Real parts for the console's tests: a relay subprocess with [console] and two users (an admin, a viewer), an
upstream that delivers, defers one address and refuses another, and the mail, opens and clicks of one
campaign, made through relay's own SMTP and tracking listeners."""

from __future__ import annotations

import contextlib
import http.cookiejar
import re
import smtplib
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from pathlib import Path

from relay.config import hash_password

from .harness import RelayProcess, Upstream, UpstreamHandler, free_port, wait_port

ADMIN, ADMIN_PASSWORD = "admin", "console-admin-pw-8d2f"
VIEWER, VIEWER_PASSWORD = "viewer", "console-viewer-pw-41c7"
BROWSER = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36"
SCANNER = "Mozilla/5.0 (compatible; Barracuda Sentinel)"  # a machine by relay/data/scanner-user-agents.txt
SALE, BLOG = "https://shop.example.com/sale", "https://blog.example.com/post"
DELIVERED, LATER, GONE = ("ann@example.org", "bob@example.net"), "later@example.com", "gone@example.org"
SUBJECT = "Autumn sale"
# Three links: the sale with tags, the same URL without (another link for SES: its own counts), and the blog.
MESSAGE = (
    f"From: News <news@example.com>\r\nTo: list@example.org\r\nSubject: {SUBJECT}\r\n"
    "X-SES-CONFIGURATION-SET: marketing\r\nMIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
    f'<html><body><h1>Autumn sale</h1><p><a href="{SALE}" ses:tags="slot:hero;">See the sale</a></p>\r\n'
    f'<p><a href="{SALE}">Shop now</a> or read <a href="{BLOG}">the blog</a>.</p>\r\n</body></html>\r\n'
).encode()


class CampaignUpstream(UpstreamHandler):
    """Delivers, except LATER (deferred: its copy stays queued, so relay keeps the message's body) and GONE
    (refused: a permanent bounce, and an entry on the suppression list)."""

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address == LATER:
            return "450 4.2.1 Mailbox busy, try again later"
        if address == GONE:
            return "550 5.1.1 <gone@example.org>: Recipient address rejected: User unknown"
        return await super().handle_RCPT(server, session, envelope, address, rcpt_options)


@dataclass
class Campaign:
    relay: RelayProcess
    upstream: Upstream
    console_port: int
    message_id: str = ""
    clicks: dict[str, list[str]] = field(default_factory=dict)  # recipient -> tracked URLs in document order

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.console_port}"

    def stop(self) -> None:
        self.relay.stop()
        self.upstream.stop()


def console_config(port: int, extra_console: str = "") -> str:
    return f"""
[[configuration_sets.marketing.destinations]]
name = "crm"
url = "http://127.0.0.1:{free_port()}/events"
event_types = ["DELIVERY", "OPEN", "CLICK"]
retry_initial = "30s"

[console]
listen = "127.0.0.1:{port}"
{extra_console}

[[console.users]]
username = "{ADMIN}"
password_hash = "{hash_password(ADMIN_PASSWORD)}"
role = "admin"

[[console.users]]
username = "{VIEWER}"
password_hash = "{hash_password(VIEWER_PASSWORD)}"
role = "viewer"
"""


def start_relay(workdir: Path, store_target=None, extra_console: str = "") -> Campaign:
    upstream = Upstream()
    upstream.handler = CampaignUpstream()
    upstream.start()
    port = free_port()
    relay = RelayProcess(workdir, upstream.port, extra=console_config(port, extra_console),
                         tracking={"early_click_seconds": 0},  # clicks right after delivery count as human here
                         store_url=store_target if isinstance(store_target, str) else None)
    relay.start()
    wait_port(port, proc=relay.proc)
    return Campaign(relay, upstream, port)


def tracked_urls(data: bytes) -> tuple[list[str], str]:
    html = message_from_bytes(data, policy=policy.default).get_content()
    clicks = re.findall(r'href="(http://127\.0\.0\.1:\d+/c/[^"]+)"', html)
    pixel = re.findall(r'src="(http://127\.0\.0\.1:\d+/o/[^"]+)"', html)
    assert len(clicks) == 3 and len(pixel) == 1, html
    return clicks, pixel[0]


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def hit(url: str, agent: str = BROWSER) -> int:
    request = urllib.request.Request(url, headers={"User-Agent": agent})
    try:
        with urllib.request.build_opener(_NoRedirect).open(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as answer:
        return answer.code


def run_campaign(c: Campaign) -> Campaign:
    """Send the message to ann, bob, later and gone; ann opens it and clicks the tagged sale link twice and the
    blog once; bob clicks the tagged sale link once; a scanner fetches ann's pixel (a machine open)."""
    with smtplib.SMTP("127.0.0.1", c.relay.smtp_port) as client:
        client.sendmail("news@example.com", [*DELIVERED, LATER, GONE], MESSAGE)
    copies = {m.rcpt_tos[0]: tracked_urls(m.data) for m in c.upstream.wait_for(2)}
    c.relay.wait_events("Bounce", 1)
    (ann_links, ann_pixel), (bob_links, _bob_pixel) = copies["ann@example.org"], copies["bob@example.net"]
    assert hit(ann_pixel) == 200 and hit(ann_pixel, SCANNER) == 200
    for url in (ann_links[0], ann_links[0], ann_links[2], bob_links[0]):
        assert hit(url) in (302, 303)
    c.relay.wait_events("Click", 4)
    c.relay.wait_events("Open", 2)
    c.message_id = c.relay.events("Send")[0][1]
    c.clicks = {"ann@example.org": ann_links, "bob@example.net": bob_links}
    return c


# --- a plain HTTP client with a cookie jar (no browser) ---------------------------------------------------------

class Client:
    """urllib with cookies and without following redirects: what the console answers, as it answers it."""

    def __init__(self, base: str):
        self.base = base
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar), _NoRedirect)

    def request(self, method: str, path: str, form: dict | None = None,
                headers: dict | None = None) -> tuple[int, dict, str]:
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=headers or {})
        try:
            with self.opener.open(request, timeout=20) as response:
                return response.status, dict(response.headers), response.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as answer:
            with contextlib.closing(answer):
                return answer.code, dict(answer.headers), answer.read().decode("utf-8", "replace")

    def get(self, path: str, **kw) -> tuple[int, dict, str]:
        return self.request("GET", path, **kw)

    def post(self, path: str, form: dict, origin: str | None = "", **kw) -> tuple[int, dict, str]:
        """A POST from the console's own page (Origin: the console) unless `origin` says otherwise (None: no
        Origin header at all)."""
        headers = dict(kw.pop("headers", {}))
        if origin is not None:
            headers["Origin"] = origin or self.base
        return self.request("POST", path, form, headers=headers, **kw)

    def login(self, username: str, password: str) -> int:
        self.get("/login")
        status, _headers, _body = self.post("/login", {"username": username, "password": password,
                                                        "csrf": self.cookie("relay_console_login")})
        return status

    def cookie(self, name: str) -> str | None:
        return next((c.value for c in self.jar if c.name == name), None)

    def csrf(self) -> str:
        """The session's CSRF token, as every page's forms carry it."""
        _status, _headers, body = self.get("/suppression")
        return re.search(r'name="csrf" value="([^"]+)"', body).group(1)
