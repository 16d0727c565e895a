"""Device summary of a User-Agent (client, OS, mobile/desktop/tablet, proxy, bot) via the `ua-parser` package.

The parser's regexes are maintained upstream (uap-core); we only fold its answer into four coarse fields.
Parsing one new string costs about a millisecond, and a mailing's hits repeat a few thousand strings, so the
summary is cached.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import ua_parser

MOBILE, DESKTOP, TABLET, PROXY, BOT, UNKNOWN = "mobile", "desktop", "tablet", "proxy", "bot", "unknown"
_MOBILE_OS = {"iOS", "Android", "Windows Phone", "BlackBerry OS", "KaiOS", "HarmonyOS"}
_DESKTOP_OS = {"Windows", "Mac OS X", "Linux", "Ubuntu", "Chrome OS", "Fedora", "FreeBSD", "Debian"}
_TABLET_HINTS = ("iPad", "Tablet", "Kindle", "Silk", "SM-T", "Nexus 7", "Nexus 9")


@dataclass(frozen=True)
class Device:
    client: str  # "Chrome 120", "Apple Mail", "GmailImageProxy", "" when unknown
    os: str  # "iOS 17.1", "Windows 10", ""
    kind: str  # mobile | desktop | tablet | proxy | bot | unknown

    def to_json(self) -> dict:
        return asdict(self)


def _version(family: str, major: str | None, minor: str | None) -> str:
    if not major:
        return family
    return f"{family} {major}.{minor}" if minor else f"{family} {major}"


def _kind(ua: str, client: str, os_family: str, device_family: str) -> str:
    if "Proxy" in client or "ImageProxy" in ua or "YahooMailProxy" in ua:
        return PROXY
    if device_family == "Spider" or "bot" in client.lower():
        return BOT
    android_tablet = os_family == "Android" and "Mobile" not in ua  # Android phones say "Mobile", tablets do not
    if device_family == "iPad" or android_tablet or any(h in ua for h in _TABLET_HINTS):
        return TABLET
    if os_family in _MOBILE_OS or "Mobi" in ua:
        return MOBILE
    if os_family in _DESKTOP_OS:
        return DESKTOP
    return UNKNOWN


@lru_cache(maxsize=8192)
def summarize(user_agent: str) -> Device:
    if not user_agent:
        return Device("", "", UNKNOWN)
    r = ua_parser.parse(user_agent)
    client = _version(r.user_agent.family, r.user_agent.major, r.user_agent.minor) if r.user_agent else ""
    if client == "Other":
        client = ""
    os_family = r.os.family if r.os else ""
    os_name = _version(os_family, r.os.major, r.os.minor) if r.os and os_family != "Other" else ""
    device_family = r.device.family if r.device else ""
    # Apple Mail on macOS/iOS sends a bare WebKit UA; ua-parser names it by the engine. Say what it is.
    if not client and "AppleWebKit" in user_agent and os_family in ("Mac OS X", "iOS"):
        client = "Apple Mail"
    return Device(client, os_name, _kind(user_agent, client, os_family, device_family))
