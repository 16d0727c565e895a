"""Who may use the console: logins, sessions, CSRF tokens and where a request comes from.

- Logins are checked by SMTP AUTH's Authenticator (relay/smtp.py): the same scrypt check in a bounded pool
  of threads, as long for an unknown user name as for a wrong password, and the same failed-attempt limit
  per client address ([console] auth_fail_limit in auth_fail_window).
- A session is a random token in a cookie (HttpOnly, SameSite=Strict, Secure over HTTPS) naming an entry in
  this process's memory: it ends at logout, after `session_idle` without a request, `session_lifetime` after
  the login, or when relay restarts. The user's role is read from the configuration at every request, so a
  user removed or made a viewer (SIGHUP) loses the rights at once.
- Every form that changes something carries the session's CSRF token, and every POST must come from a page
  of the console itself (its Origin, or its Referer when a browser sends no Origin).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from aiohttp import web

from relay.config import ConsoleSettings, ConsoleUser
from relay.core.verdicts import NetworkSet
from relay.smtp import Authenticator, unmatchable_hash
from relay.tracking import _client_ip

log = logging.getLogger("relay.console")
SESSION_COOKIE = "relay_console"
LOGIN_COOKIE = "relay_console_login"  # the login form's CSRF token, before there is a session


@dataclass
class Session:
    username: str
    csrf: str
    created: float
    seen: float = field(default=0.0)


class Sessions:
    """The console's sessions, in memory, keyed by a digest of their token (the token itself is not kept)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._by_digest: dict[bytes, Session] = {}

    @staticmethod
    def _digest(token: str) -> bytes:
        return hashlib.sha256(token.encode("utf-8", "replace")).digest()

    def create(self, username: str) -> tuple[str, Session]:
        token, now = new_token(), self.clock()
        session = Session(username, new_token(), now, now)
        self._by_digest[self._digest(token)] = session
        return token, session

    def get(self, token: str | None, settings: ConsoleSettings) -> Session | None:
        """The live session of `token` (and it is seen now), or None; expired ones are forgotten."""
        if not token:
            return None
        now = self.clock()
        self._expire(now, settings)
        session = self._by_digest.get(self._digest(token))
        if session is not None:
            session.seen = now
        return session

    def drop(self, token: str | None) -> None:
        if token:
            self._by_digest.pop(self._digest(token), None)

    def _expire(self, now: float, settings: ConsoleSettings) -> None:
        for digest, s in list(self._by_digest.items()):
            if now - s.seen >= settings.session_idle or now - s.created >= settings.session_lifetime:
                del self._by_digest[digest]

    def __len__(self) -> int:
        return len(self._by_digest)


class Logins(Authenticator):
    """SMTP AUTH's checks and failure limit for the console's login form."""

    def __init__(self, settings: ConsoleSettings):
        super().__init__(settings)  # it reads users, auth_fail_limit, auth_fail_window and auth_concurrency

    def follow(self, settings: ConsoleSettings) -> None:
        """Check against a reloaded configuration's users from now on (failures counted so far still count)."""
        if settings is not self.settings:
            self.settings, self._unknown_user_hash = settings, unmatchable_hash(settings.users)

    async def login(self, ip: str, username: str, password: str) -> str:
        """"ok", "wrong" or "blocked" (too many failures from `ip` in the window): `authenticate`'s steps,
        with the console's own log lines."""
        if self.blocked(ip):
            log.warning("console login ip=%s refused: too many failures", ip)
            return "blocked"
        attempt = self.clock()
        self._failures[ip].append(attempt)  # counts while checked, so parallel attempts cannot outrun the limit
        if await self.check(username, password):
            self._forget(ip, attempt)
            log.info("console login ip=%s user=%s ok", ip, username)
            return "ok"
        log.warning("console login ip=%s user=%s failed", ip, username)
        return "wrong"


def new_token() -> str:
    return secrets.token_urlsafe(32)


def user_of(settings: ConsoleSettings, username: str) -> ConsoleUser | None:
    return next((u for u in settings.users if u.username == username), None)


# --- where a request comes from ------------------------------------------------------------------------------

def trusted(settings: ConsoleSettings) -> NetworkSet:
    return NetworkSet([(net, "proxy") for net in settings.trusted_proxies])


def client_ip(request: web.BaseRequest, proxies: NetworkSet) -> str:
    """The client's address: X-Forwarded-For is believed from trusted proxies only."""
    return _client_ip(request.remote or "", request.headers.get("X-Forwarded-For"), proxies)


def is_https(request: web.BaseRequest, settings: ConsoleSettings, proxies: NetworkSet) -> bool:
    """Whether the browser reached the console over HTTPS: the operator says so, or a trusted proxy does."""
    if settings.secure_cookies or request.secure:
        return True
    if proxies.lookup(request.remote or "") is None:
        return False
    return request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower() == "https"


def own_origin(request: web.BaseRequest, https: bool) -> str:
    return f"{'https' if https else 'http'}://{request.host}"


def same_origin(request: web.BaseRequest, https: bool) -> bool:
    """Whether a POST comes from a page of the console: its Origin header, else its Referer's origin."""
    expected = own_origin(request, https)
    origin = request.headers.get("Origin")
    if origin is not None:
        return origin == expected
    referer = urlsplit(request.headers.get("Referer", ""))
    return bool(referer.scheme) and f"{referer.scheme}://{referer.netloc}" == expected


def tokens_match(expected: str | None, given: str | None) -> bool:
    return bool(expected) and bool(given) and hmac.compare_digest(expected.encode(), given.encode())


def set_cookie(response: web.StreamResponse, name: str, value: str, https: bool) -> None:
    response.set_cookie(name, value, path="/", httponly=True, samesite="Strict", secure=https)


def clear_cookie(response: web.StreamResponse, name: str, https: bool) -> None:
    response.del_cookie(name, path="/", httponly=True, samesite="Strict", secure=https)
