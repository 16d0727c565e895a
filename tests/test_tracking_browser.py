"""A real browser: headless Chromium (Debian's `chromium`) opens an instrumented HTML page from a local file,
loads the pixel, follows a wrapped link through the listener and lands on a local destination page."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from aiohttp import web

from relay.core import tokens
from relay.core.settings import TrackingSettings

from .test_tracking_helpers import MID, RCPT, Listener, load, store_message, stored, verdict_of

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian: apt-get install chromium)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-proxy-server",
         "--disable-extensions", "--mute-audio"]


class Destination:
    """The link's target: a tiny aiohttp app on 127.0.0.1 that remembers what it was asked."""

    def __init__(self):
        self.seen: list[str] = []
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.runner = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    async def _start(self) -> web.AppRunner:
        async def landing(request: web.Request) -> web.Response:
            self.seen.append(str(request.rel_url))
            # the script writes the fragment the browser arrived with into the DOM (servers never see it)
            return web.Response(text="<!doctype html><title>Sale</title><h1 id=dest>Destination reached</h1>"
                                     "<script>document.getElementById('dest').title = location.hash</script>",
                                content_type="text/html")

        app = web.Application()
        app.router.add_get("/{tail:.*}", landing)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return runner

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


def _chromium(target: str, profile: Path) -> str:
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", target]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_chromium_loads_pixel_and_follows_wrapped_link(tmp_path):
    server = Listener(load(tmp_path))
    dest = Destination()
    try:
        store_message(server.store)
        # the URLs as the instrumentation engine writes them: settings' bases + signed tokens
        settings = TrackingSettings(open_tracking=True, click_tracking=True, host=f"127.0.0.1:{server.port}")
        issued = int(time.time())
        destination = f"http://127.0.0.1:{dest.port}/sale?item=42&ref=mail#details"
        pixel = settings.open_base() + tokens.sign_open(server.keyring, MID, RCPT, issued)
        link = settings.click_base("http") + tokens.sign_click(server.keyring, MID, RCPT, issued, 0, destination,
                                                               {"campaign": ["autumn"]})
        page = tmp_path / "message.html"
        page.write_text(f'<!doctype html><html><body><p>Autumn sale</p><a href="{link}">See the sale</a>'
                        f'<img src="{pixel}" width="1" height="1" alt=""></body></html>', encoding="utf-8")

        dom = _chromium(page.as_uri(), tmp_path / "profile1")
        assert "Autumn sale" in dom
        server.flush()
        [opened] = stored(server.store, "Open")
        assert "Chrome" in opened["open"]["userAgent"]

        dom = _chromium(link, tmp_path / "profile2")
        assert "Destination reached" in dom
        assert 'title="#details"' in dom  # the fragment survived the redirect
        assert dest.seen[0] == "/sale?item=42&ref=mail"
        server.flush()
        [clicked] = stored(server.store, "Click")
        assert clicked["click"]["link"] == destination
        assert clicked["click"]["linkTags"] == {"campaign": ["autumn"]}
        assert [v["type"] for v in verdict_of(server.store)] == ["Open", "Click"]
    finally:
        dest.stop()
        server.stop()
