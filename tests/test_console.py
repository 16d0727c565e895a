"""The web console in a real browser: Debian's Chromium driven by Playwright (never `playwright install`), against
a relay subprocess whose events come from real mail, opens and clicks (tests/test_console_helpers.py).

An admin logs in, sees the charts drawn with the campaign's numbers, finds the message by its recipient, reads
each link's clicks on the message itself (the heatmap), and removes an address from the suppression list after
a confirmation; a viewer cannot; a cross-site form is refused; no page logs an error to the browser console.
Screenshots of every page are written to tests/artifacts/console/<backend>/ (printed; ignored by git).
"""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path

import pytest
from aiohttp import web

from .test_console_helpers import (
    ADMIN,
    ADMIN_PASSWORD,
    BLOG,
    GONE,
    SALE,
    VIEWER,
    VIEWER_PASSWORD,
    run_campaign,
    start_relay,
)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian: apt-get install chromium)")
# As on this machine's image: without the background-networking flags Chromium's own connections are refused.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-proxy-server",
         "--disable-extensions", "--mute-audio"]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts" / "console"


class Attacker:
    """Another site's page (127.0.0.1, another port: same site, another origin) whose form posts to the
    console's suppression list as soon as it loads, with the browser's cookies and without a CSRF token."""

    def __init__(self, target: str, address: str):
        self.target, self.address = target, address
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.runner = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    async def _start(self) -> web.AppRunner:
        async def page(request: web.Request) -> web.Response:
            return web.Response(content_type="text/html", text=(
                f'<!doctype html><form id="f" method="post" action="{self.target}/suppression/remove">'
                f'<input name="address" value="{self.address}"><input name="reason" value=""></form>'
                "<script>document.getElementById('f').submit()</script>"))

        app = web.Application()
        app.router.add_get("/", page)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/"
        return runner

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


class Browser:
    """One Chromium; pages that record every console error and uncaught exception."""

    def __init__(self, shots: Path):
        self.shots = shots
        self._pw = playwright.sync_playwright().start()
        self.chromium = self._pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        self.errors: list[str] = []

    def page(self):
        context = self.chromium.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.on("console", lambda m: self.errors.append(f"{page.url}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"{page.url}: {e}"))
        return page

    def shot(self, page, name: str) -> None:
        page.screenshot(path=str(self.shots / f"{name}.png"), full_page=True)

    def close(self) -> None:
        self.chromium.close()
        self._pw.stop()


def log_in(page, base: str, username: str, password: str, shot=None) -> None:
    page.goto(base + "/")
    assert "/login" in page.url  # no session: the login form
    if shot is not None:
        shot(page, "00-login")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_url(base + "/")


@pytest.fixture
def campaign(tmp_path, store_target):
    c = start_relay(tmp_path / "relay", store_target)
    try:
        yield run_campaign(c)
    finally:
        c.stop()


@pytest.fixture
def browser(store_target):
    shots = ARTIFACTS / ("postgresql" if isinstance(store_target, str) else "sqlite")
    shutil.rmtree(shots, ignore_errors=True)
    shots.mkdir(parents=True)
    print(f"\nconsole screenshots: {shots}")
    b = Browser(shots)
    try:
        yield b
    finally:
        b.close()


def test_console_in_chromium(campaign, browser):
    base = campaign.base
    page = browser.page()
    log_in(page, base, ADMIN, ADMIN_PASSWORD, browser.shot)

    # Overview: the charts are drawn with the campaign's numbers (sent 4, 2 delivered, opens and clicks)
    page.goto(base + "/")
    browser.shot(page, "01-overview")
    # one Send (a message: SES's one event for all its recipients), two deliveries, a bounce
    assert int(page.get_attribute("#chart-volume", "data-total")) >= 1 + 2 + 1
    assert int(page.get_attribute("#chart-opens", "data-total")) == 2  # one human, one machine
    assert int(page.get_attribute("#chart-clicks", "data-total")) == 4
    assert page.inner_text("#sets").count("marketing") == 1
    page.goto(base + "/?range=24h")  # by hour
    browser.shot(page, "02-overview-by-hour")
    assert int(page.get_attribute("#chart-clicks", "data-points")) == 24 * 3
    assert int(page.get_attribute("#chart-clicks", "data-total")) == 4

    # The set: its funnel, links, domains, settings and destinations
    page.click("a:text('marketing')")
    page.wait_for_url(f"{base}/sets/marketing**")
    browser.shot(page, "03-set")
    assert int(page.get_attribute("#chart-funnel", "data-total")) > 0
    assert SALE in page.inner_text("#links") and "example.net" in page.inner_text("#domains")
    assert "crm" in page.inner_text("#set-destinations")

    # A message, found by its recipient: its timeline and the clicks on each link of the message itself
    page.goto(base + "/messages")
    page.select_option("select[name=by]", "recipient")
    page.fill("input[name=q]", "ann@example.org")
    page.click("form.inline button[type=submit]")
    browser.shot(page, "04-messages")
    page.click(f"a:text('{campaign.message_id}')")
    page.wait_for_url(f"{base}/messages/{campaign.message_id}")
    frame = page.frame_locator("#preview")
    marks = {n: frame.locator(f'a[data-relay-link="{n}"]') for n in (1, 2, 3)}
    assert marks[1].inner_text() == "See the sale"
    assert [marks[n].get_attribute("data-relay-clicks") for n in (1, 2, 3)] == ["3", "0", "1"]
    assert marks[1].get_attribute("data-relay-label") == "#1: 3 clicks, 2 unique, 3 human"
    assert marks[3].get_attribute("data-relay-label") == "#3: 1 clicks, 1 unique, 1 human"
    assert [page.inner_text(f"#links tr[data-link='{n}'] td:nth-child(4)") for n in (1, 2, 3)] == ["3", "0", "1"]
    assert BLOG in page.inner_text("#links")
    timeline = page.inner_text("#timeline")
    assert "Bounce" in timeline and "human" in timeline and "machine" in timeline
    browser.shot(page, "05-message-heatmap")

    for path, name in (("/queue", "06-queue"), ("/destinations", "07-destinations"),
                       ("/reputation", "08-reputation")):
        page.goto(base + path)
        browser.shot(page, name)
        assert page.locator("main table").count() > 0
    page.goto(base + "/queue")
    assert "later@example.com" in page.inner_text("#queue-copies")
    page.goto(base + "/destinations")
    assert "crm" in page.inner_text("#destinations")
    page.goto(base + "/reputation")
    assert "marketing" in page.inner_text("#reputation")

    # A viewer sees the suppression list but cannot change it
    viewer = browser.page()
    log_in(viewer, base, VIEWER, VIEWER_PASSWORD)
    viewer.goto(base + "/suppression")
    browser.shot(viewer, "09-suppression-viewer")
    assert GONE in viewer.inner_text("#entries") and viewer.locator("a.remove").count() == 0
    assert browser.errors == []
    assert viewer.goto(base + f"/suppression/remove?address={GONE}").status == 403
    token = viewer.get_attribute("header form input[name=csrf]", "value")
    refused = viewer.request.post(base + "/suppression/remove", form={"csrf": token, "address": GONE},
                                  headers={"Origin": base})
    assert refused.status == 403
    browser.errors.clear()  # the refusals above are logged by the browser as failed loads: expected

    # Another site's form, posted with the admin's cookies: refused, the entry stays
    attacker = Attacker(base, GONE)
    try:
        response = page.goto(attacker.url)
        page.wait_for_load_state()
        assert page.url.startswith(base) and "did not come from the console" in page.content()
        assert response is not None
    finally:
        attacker.stop()
    browser.errors.clear()
    page.goto(base + "/suppression")
    assert GONE in page.inner_text("#entries")

    # The admin removes it, after a confirmation
    browser.shot(page, "10-suppression-admin")
    page.click(f"tr:has-text('{GONE}') a.remove")
    page.wait_for_url(f"{base}/suppression/remove**")
    browser.shot(page, "11-confirm-removal")
    assert GONE in page.inner_text("main")
    page.click("#confirm-form button")
    page.wait_for_url(f"{base}/suppression?**")
    assert "removed 1" in page.inner_text("#done") and GONE not in page.inner_text("#entries")
    assert not campaign.relay.db().execute("SELECT 1 FROM suppressed_destinations WHERE email_address = ?",
                                           (GONE,)).fetchall()
    assert browser.errors == []
