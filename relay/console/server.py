"""The console's HTTP shell: one aiohttp listener serving server-rendered pages (Jinja2), their JSON under
/data/..., a sandboxed preview of a message, and its own static files (the charting library included: no
CDN, no remote font).

Every request but the login form and the static files needs a session: a page without one is redirected to
the login, anything else answers 401, never data. Every POST must come from the console's own pages (Origin)
and carry the session's CSRF token; changing the suppression list takes an admin. Responses carry a
Content-Security-Policy without inline script; the message preview has its own, stricter one (no script at
all, images from data: URLs only) and is shown in an iframe sandboxed without scripts.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from datetime import UTC, date, datetime
from importlib import resources
from urllib.parse import quote, urlencode

import jinja2
from aiohttp import web

from relay import suppression
from relay.config import Config
from relay.console import auth, pages
from relay.core import console as core
from relay.sets import SesError
from relay.store import Store

log = logging.getLogger("relay.console")
MAX_FORM = 64 * 1024  # the largest form is a login or an address: nginx's 1 MB default is far more than needed
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self';"
            " frame-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
# The message preview: its own styles (mail is styled inline) but no script, no remote image, no form.
PREVIEW_CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; font-src data:; form-action 'none';"
               " frame-ancestors 'self'; base-uri 'none'; sandbox")
ADMIN_ONLY = ("/suppression/add", "/suppression/remove")
TEMPLATES = {"overview": "overview.html", "set": "set.html", "messages": "messages.html", "message": "message.html",
             "queue": "queue.html", "destinations": "destinations.html", "suppression": "suppression.html",
             "reputation": "reputation.html"}


def _jsonable(value):
    if is_dataclass(value):
        return asdict(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


def see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("relay.console", "templates"), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["percent"] = core.percent
    env.filters["number"] = lambda n: "-" if n is None else f"{n:,}"
    env.filters["when"] = lambda t: (t or "")[:19].replace("T", " ")
    env.filters["setname"] = lambda name: "(no set)" if name is None else name
    env.filters["slug"] = pages.set_slug
    env.filters["urlpart"] = lambda text: quote(str(text), safe="")
    env.globals["query"] = lambda **params: urlencode({k: v for k, v in params.items() if v not in (None, "")})
    return env


class ConsoleServer:
    """Started by `Relay.start` when [console] has a listen address and users. `config` is a callable, so a
    reloaded configuration (SIGHUP: users, roles, sets) applies to the next request."""

    def __init__(self, config: Callable[[], Config], store: Store, clock: Callable[[], datetime] | None = None):
        self._config, self.store = config, store
        self.clock = clock or (lambda: datetime.now(UTC))
        self.sessions = auth.Sessions()
        self.logins = auth.Logins(config().console)
        self.templates = environment()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def settings(self):
        return self._config().console

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_FORM, middlewares=[self._headers, self._guard])
        r = app.router
        r.add_get("/login", self.login_form)
        r.add_post("/login", self.login)
        r.add_post("/logout", self.logout)
        r.add_get("/static/{name}", self.static)
        r.add_get("/", self.page("overview"))
        r.add_get("/sets/{name}", self.page("set"))
        r.add_get("/messages", self.page("messages"))
        r.add_get("/messages/{id}", self.page("message"))
        r.add_get("/messages/{id}/preview", self.preview)
        r.add_get("/queue", self.page("queue"))
        r.add_get("/destinations", self.page("destinations"))
        r.add_get("/suppression", self.page("suppression"))
        r.add_get("/suppression/remove", self.remove_form)
        r.add_post("/suppression/remove", self.remove)
        r.add_post("/suppression/add", self.add)
        r.add_get("/reputation", self.page("reputation"))
        for path, name in (("/data/overview", "overview"), ("/data/sets/{name}", "set"),
                           ("/data/messages", "messages"), ("/data/messages/{id}", "message"),
                           ("/data/queue", "queue"), ("/data/destinations", "destinations"),
                           ("/data/suppression", "suppression"), ("/data/reputation", "reputation")):
            r.add_get(path, self.data(name))
        return app

    async def start(self) -> None:
        s = self.settings
        if not s.enabled:
            if s.listen_host is not None:
                log.warning("console disabled: no [[console.users]] in the configuration")
            return
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, s.listen_host, s.listen_port, reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        log.info("console on http://%s:%d, %d user(s)", s.listen_host, self.port, len(s.users))

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- what every request goes through ------------------------------------------------------------------

    @web.middleware
    async def _headers(self, request: web.Request, handler) -> web.StreamResponse:
        response = await handler(request)
        response.headers.setdefault("Content-Security-Policy", PAGE_CSP)
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers["Cross-Origin-Opener-Policy"] = "same-origin"
        if not request.path.startswith("/static/"):
            response.headers["Cache-Control"] = "no-store"
        return response

    @web.middleware
    async def _guard(self, request: web.Request, handler) -> web.StreamResponse:
        """Session, role and CSRF checks before any handler runs."""
        proxies = auth.trusted(self.settings)
        https = auth.is_https(request, self.settings, proxies)
        request["https"], request["ip"] = https, auth.client_ip(request, proxies)
        if request.method == "POST" and not auth.same_origin(request, https):
            log.warning("console %s %s refused: cross-origin (%s)", request.method, request.path, request["ip"])
            return self.error(request, 403, "This form did not come from the console.")
        if request.path == "/login" or request.path.startswith("/static/"):  # all that answers without a session
            return await handler(request)
        token = request.cookies.get(auth.SESSION_COOKIE)
        session = self.sessions.get(token, self.settings)
        user = auth.user_of(self.settings, session.username) if session else None
        if session is None or user is None:
            if request.method == "GET" and not request.path.startswith("/data/"):
                return see_other(f"/login?{urlencode({'next': request.path_qs})}")
            return web.json_response({"error": "log in first"}, status=401)
        request["session"], request["user"] = session, user
        if request.method == "POST":
            form = await request.post()
            if not auth.tokens_match(session.csrf, form.get("csrf")):
                log.warning("console %s %s refused: CSRF token (%s)", request.method, request.path, request["ip"])
                return self.error(request, 403, "This form has expired: open the page again.")
            request["form"] = form
        if request.path in ADMIN_ONLY and user.role != "admin":
            return self.error(request, 403, "Only an admin may change the suppression list.")
        return await handler(request)

    def render(self, request: web.Request, template: str, status: int = 200, **context) -> web.Response:
        user = request.get("user")
        session = request.get("session")
        body = self.templates.get_template(template).render(
            user=user, csrf=session.csrf if session else "", path=request.path, **context)
        return web.Response(text=body, status=status, content_type="text/html")

    def error(self, request: web.Request, status: int, message: str) -> web.Response:
        if request.path.startswith("/data/"):
            return web.json_response({"error": message}, status=status)
        return self.render(request, "error.html", status=status, status_code=status, message=message)

    # --- login ---------------------------------------------------------------------------------------------

    async def login_form(self, request: web.Request, message: str = "", status: int = 200) -> web.Response:
        token = request.cookies.get(auth.LOGIN_COOKIE) or auth.new_token()
        response = self.render(request, "login.html", status=status, login_token=token, message=message,
                               next=request.query.get("next", ""))
        auth.set_cookie(response, auth.LOGIN_COOKIE, token, request["https"])
        return response

    async def login(self, request: web.Request) -> web.Response:
        form = await request.post()
        if not auth.tokens_match(request.cookies.get(auth.LOGIN_COOKIE), form.get("csrf")):
            return await self.login_form(request, "The login form expired: try again.", 403)
        username, password = str(form.get("username", "")), str(form.get("password", ""))
        self.logins.follow(self.settings)
        outcome = await self.logins.login(request["ip"], username, password)
        if outcome == "blocked":
            return await self.login_form(request, "Too many failed logins from your address: try again later.", 429)
        if outcome != "ok" or auth.user_of(self.settings, username) is None:
            return await self.login_form(request, "Wrong user name or password.", 401)
        token, _session = self.sessions.create(username)
        target = str(form.get("next", ""))
        local = target.startswith("/") and target[1:2] not in ("/", "\\")  # "//x" and "/\\x" lead elsewhere
        response = see_other(target if local else "/")
        auth.set_cookie(response, auth.SESSION_COOKIE, token, request["https"])
        auth.clear_cookie(response, auth.LOGIN_COOKIE, request["https"])
        return response

    async def logout(self, request: web.Request) -> web.Response:
        self.sessions.drop(request.cookies.get(auth.SESSION_COOKIE))
        response = see_other("/login")
        auth.clear_cookie(response, auth.SESSION_COOKIE, request["https"])
        return response

    # --- pages -------------------------------------------------------------------------------------------

    async def build(self, request: web.Request, name: str) -> dict:
        view = pages.View(self._config(), self.store, dict(request.query), dict(request.match_info), self.clock())
        return await asyncio.to_thread(pages.PAGES[name], view)

    def page(self, name: str):
        async def handler(request: web.Request) -> web.Response:
            try:
                context = await self.build(request, name)
            except pages.NotFound as exc:
                return self.error(request, 404, str(exc))
            data_url = "/data/overview" + request.path_qs[1:] if request.path == "/" else "/data" + request.path_qs
            return self.render(request, TEMPLATES[name], page=name, data=context, data_url=data_url)
        return handler

    def data(self, name: str):
        async def handler(request: web.Request) -> web.Response:
            try:
                context = await self.build(request, name)
            except pages.NotFound as exc:
                return web.json_response({"error": str(exc)}, status=404)
            return web.Response(text=json.dumps(context, default=_jsonable), content_type="application/json")
        return handler

    async def preview(self, request: web.Request) -> web.Response:
        """The message's HTML as delivered, links marked by their clicks, for the page's sandboxed iframe."""
        view = pages.View(self._config(), self.store, {}, dict(request.match_info), self.clock())
        marked = await asyncio.to_thread(pages.preview, view)
        if marked is None:
            return web.Response(status=404, text="The message's body is no longer kept.", content_type="text/plain",
                                headers={"Content-Security-Policy": PREVIEW_CSP})
        return web.Response(text=marked.html, content_type="text/html", charset="utf-8",
                            headers={"Content-Security-Policy": PREVIEW_CSP, "X-Frame-Options": "SAMEORIGIN"})

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC:
            return web.Response(status=404, text="not found")
        body, kind = STATIC[name]
        return web.Response(body=body, content_type=kind, headers={"Cache-Control": "public, max-age=86400"})

    # --- the suppression list (admins) -------------------------------------------------------------------

    async def remove_form(self, request: web.Request) -> web.Response:
        if request["user"].role != "admin":
            return self.error(request, 403, "Only an admin may change the suppression list.")
        address, reason = request.query.get("address", ""), request.query.get("reason", "")
        return self.render(request, "confirm_remove.html", address=address, reason=reason)

    async def remove(self, request: web.Request) -> web.Response:
        form = request["form"]
        address, reason = str(form.get("address", "")), str(form.get("reason", ""))
        try:
            removed = await asyncio.to_thread(suppression.remove, self.store, address, (reason,) if reason else ())
        except SesError as exc:
            return self.error(request, 400, exc.message)
        log.info("console user=%s removed %s (%s) from the suppression list: %d entries", request["user"].username,
                 address, reason or "every reason", removed)
        return see_other(f"/suppression?{urlencode({'q': address, 'done': f'removed {removed}'})}")

    async def add(self, request: web.Request) -> web.Response:
        form = request["form"]
        address, reason = str(form.get("address", "")), str(form.get("reason", ""))
        try:
            entry = await asyncio.to_thread(suppression.put, self.store, address, reason)
        except SesError as exc:
            return self.error(request, 400, exc.message)
        log.info("console user=%s added %s (%s) to the suppression list", request["user"].username,
                 entry.email_address, entry.reason)
        return see_other(f"/suppression?{urlencode({'q': entry.email_address, 'done': 'added'})}")


def _static_files() -> dict[str, tuple[bytes, str]]:
    kinds = {".js": "text/javascript", ".css": "text/css", ".md": "text/plain", ".txt": "text/plain"}
    folder = resources.files("relay.console") / "static"
    return {f.name: (f.read_bytes(), kinds.get(f.name[f.name.rfind("."):], "application/octet-stream"))
            for f in folder.iterdir() if f.is_file()}


STATIC = _static_files()
