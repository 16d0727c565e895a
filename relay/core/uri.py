"""A link in the form an HTTP header can carry: an IRI (Unicode host, path, query) as its URI (RFC 3987 §3.1).

A Location header is bytes that clients read as ASCII or Latin-1, so `https://bücher.example/straße` sent as UTF-8
arrives as `https://bÃ¼cher.example/straÃ\x9fe`. Its URI form is what a browser computes from the link and
requests anyway: the host in IDNA (an A-label per non-ASCII label), every other non-ASCII character as its UTF-8
bytes in %XX escapes. Only non-ASCII characters change: an ASCII link, its %XX escapes, case and oddities
included, is returned as it is (links must never break).

IDNA: the `idna` package's UTS #46 mapping, non-transitional, as the WHATWG URL Standard (so every current
browser) computes a host: `faß.de` stays `xn--fa-hia.de`. Python's `encodings.idna` is IDNA 2003 and would send
that click to `fass.de`, another domain. A label IDNA refuses (an emoji, say, which browsers still accept) is
percent-encoded instead (RFC 3986 §3.2.2 allows it; a browser decodes it and applies its own IDNA).
"""

from __future__ import annotations

import re

import idna

_AUTHORITY = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*:)?(//[^/?#]*)?(.*)", re.DOTALL)
_NON_ASCII = re.compile(r"[^\x00-\x7f]+")


def to_uri(iri: str) -> str:
    """The URI form of a link; an ASCII link unchanged. Raises UnicodeEncodeError for a lone surrogate (no
    character, no bytes to send)."""
    if iri.isascii():
        return iri
    scheme, authority, rest = _AUTHORITY.fullmatch(iri).groups()
    return (scheme or "") + (_authority(authority) if authority else "") + _escape(rest)


def _authority(authority: str) -> str:
    """`//userinfo@host:port` with the host as IDNA and anything else non-ASCII escaped."""
    userinfo, at, hostport = authority[2:].rpartition("@")
    host, port = hostport, ""
    if not hostport.startswith("["):  # an IPv6 literal is ASCII, its colons are not a port
        before, colon, digits = hostport.rpartition(":")
        if colon and digits.isascii() and (digits.isdigit() or not digits):
            host, port = before, colon + digits
    return "//" + _escape(userinfo) + at + _host(host) + _escape(port)


def _host(host: str) -> str:
    if host.isascii():
        return host
    try:
        mapped = idna.uts46_remap(host, std3_rules=False, transitional=False)
        return ".".join(label if label.isascii() else idna.alabel(label).decode("ascii")
                        for label in mapped.split("."))
    except (idna.IDNAError, UnicodeError, ValueError):
        return _escape(host)


def _escape(text: str) -> str:
    """Each run of non-ASCII characters as %XX escapes of its UTF-8 bytes; ASCII (escapes included) untouched."""
    if text.isascii():
        return text
    return _NON_ASCII.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode("utf-8")), text)
