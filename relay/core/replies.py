"""SMTP reply lines fit to send, whatever client input they echo (an address, a header value, a command).

RFC 5321 4.5.3.1.5 limits a reply line to 512 octets with its CRLF; a CR or LF inside one would end it early
and make the rest look like the next reply, and other control characters have no business on a terminal
reading a log or a transcript. Control characters become "?" (as Postfix prints them), and a line too long
keeps its start (the code and what went wrong) and its end (usually the explanation), with "..." between.
"""

from __future__ import annotations

import re

REPLY_LINE_OCTETS = 512 - 2  # RFC 5321 4.5.3.1.5, without the CRLF
ELLIPSIS = "..."
# C0, DEL and C1 controls, and lone surrogates (undecodable client bytes kept by surrogateescape)
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_SHORT_ENOUGH = REPLY_LINE_OCTETS // 4  # characters that fit whatever they are (UTF-8: at most 4 octets each)


def reply_line(text: str) -> str:
    """`text` as one reply line: no control characters, at most REPLY_LINE_OCTETS octets in UTF-8."""
    text = _UNPRINTABLE.sub("?", text)
    if len(text) <= _SHORT_ENOUGH:
        return text
    raw = text.encode("utf-8")
    if len(raw) <= REPLY_LINE_OCTETS:
        return text
    room = REPLY_LINE_OCTETS - len(ELLIPSIS)
    head, tail = raw[:room * 2 // 3], raw[len(raw) - (room - room * 2 // 3):]
    # cut inside a character: drop its pieces rather than send broken UTF-8
    return head.decode("utf-8", "ignore") + ELLIPSIS + tail.decode("utf-8", "ignore")


def echo(value: str, limit: int = 256) -> str:
    """A client's value to quote in a reply: printable, and at most `limit` characters (RFC 5321 4.5.3.1.3
    allows a path of 256 octets; anything longer is not worth repeating whole)."""
    value = _UNPRINTABLE.sub("?", value)
    return value if len(value) <= limit else value[:limit - len(ELLIPSIS)] + ELLIPSIS
