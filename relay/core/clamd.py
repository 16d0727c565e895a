"""clamd's INSTREAM protocol and what a scan result means for a message (pure: bytes in, decisions out).

INSTREAM (clamd(8)): the client sends `zINSTREAM\\0`, then the data in chunks, each preceded by its length as a
4-byte big-endian integer, then a zero-length chunk. clamd answers one NUL-terminated line: `stream: OK`,
`stream: <signature> FOUND`, `INSTREAM size limit exceeded. ERROR` (more than its StreamMaxLength; it closes
the connection) or `<reason> ERROR`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

COMMAND = b"zINSTREAM\0"
END = struct.pack("!I", 0)
CHUNK = 64 * 1024  # well under any StreamMaxLength; one write per chunk

CLEAN, INFECTED, TOO_LARGE, FAILED = "clean", "infected", "too large", "failed"
# A message over clamd's StreamMaxLength cannot be scanned: a misconfiguration, treated as clamd failing (so
# scan.on_error decides) rather than as relay's own, deliberate size limit.
TOO_BIG_HINT = "is the message over clamd's StreamMaxLength? keep scan.max_scan_size at or below it"

REJECT_REASON = "Bad content"  # SES's only Reject reason (a virus)
TEMPFAIL = "451 4.7.0 Temporary failure: virus scan unavailable"


@dataclass(frozen=True)
class ScanResult:
    status: str  # CLEAN, INFECTED, FAILED, or TOO_LARGE (over scan.max_scan_size: not sent to clamd)
    detail: str = ""  # the signature's name when INFECTED, else what went wrong (for the log)


def instream_frames(data: bytes, chunk: int = CHUNK) -> Iterator[bytes | memoryview]:
    """Everything the client sends after COMMAND: length-prefixed chunks, then the zero-length end."""
    view = memoryview(data)
    for start in range(0, len(view), chunk):
        part = view[start:start + chunk]
        yield struct.pack("!I", len(part))
        yield part
    yield END


def parse_reply(reply: bytes) -> ScanResult:
    """clamd's answer to INSTREAM (with or without the trailing NUL, with or without an IDSESSION `N: `)."""
    text = reply.split(b"\0", 1)[0].decode("utf-8", "replace").strip()
    if not text:
        return ScanResult(FAILED, "clamd closed the connection without an answer")
    if text.endswith(" ERROR"):
        reason = text[: -len(" ERROR")].strip()
        if reason.startswith("INSTREAM size limit exceeded"):
            reason += f" ({TOO_BIG_HINT})"
        return ScanResult(FAILED, reason)
    _, sep, verdict = text.partition("stream: ")
    if sep and verdict == "OK":
        return ScanResult(CLEAN)
    if sep and verdict.endswith(" FOUND") and verdict[: -len(" FOUND")].strip():
        return ScanResult(INFECTED, verdict[: -len(" FOUND")].strip())
    return ScanResult(FAILED, f"unexpected answer from clamd: {text[:200]!r}")


def refusal(result: ScanResult, on_error: str) -> str | None:
    """The SMTP reply refusing a message for its scan result; None accepts it.

    A virus is refused for good (554). clamd unreachable, slow or failing answers 451 with on_error =
    "tempfail", so the client keeps the message and retries: mail is never lost and never passes unscanned.
    A message over the scan limit is accepted unscanned, as clamav-milter and rspamd do: refusing it for
    good would bounce legitimate large mail, and a 451 would only delay the same bounce by days.
    """
    if result.status == INFECTED:
        return f"554 5.7.1 Message rejected: {REJECT_REASON}: virus {printable(result.detail)} found"
    if result.status == FAILED and on_error == "tempfail":
        return TEMPFAIL
    return None


def printable(name: str, limit: int = 200) -> str:
    """A signature name fit for an SMTP reply line (clamd's names are ASCII; a broken one must not be)."""
    return "".join(c if " " < c < "\x7f" else "?" for c in name)[:limit]
