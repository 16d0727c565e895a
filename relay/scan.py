"""The virus scan of the accept stage: clamd's INSTREAM over its unix socket or TCP (protocol in core/clamd.py).

One connection per message (a local socket costs little; clamd's own threads bound the concurrency). Every
failure — no socket, refused, reset, slow, an ERROR answer — becomes a FAILED result, never an exception: the
pipeline decides from `scan.on_error` what a message does when it could not be scanned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from relay.config import ScanSettings
from relay.core.clamd import COMMAND, FAILED, TOO_BIG_HINT, TOO_LARGE, ScanResult, instream_frames, parse_reply

log = logging.getLogger("relay.scan")
MAX_REPLY = 64 * 1024


class ClamdScanner:
    def __init__(self, settings: ScanSettings):
        self.settings = settings

    def __repr__(self) -> str:
        return f"ClamdScanner({self.target})"

    @property
    def target(self) -> str:
        s = self.settings
        return str(s.clamd_socket) if s.clamd_socket is not None else f"{s.clamd_host}:{s.clamd_port}"

    async def scan(self, data: bytes) -> ScanResult:
        if len(data) > self.settings.max_scan_size:
            return ScanResult(TOO_LARGE, f"{len(data)} bytes, over scan.max_scan_size")
        try:
            async with asyncio.timeout(self.settings.timeout):
                return await self._instream(data)
        except TimeoutError:
            return ScanResult(FAILED, f"clamd at {self.target} did not answer within {self.settings.timeout:g}s")
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            return ScanResult(FAILED, f"clamd at {self.target}: {type(exc).__name__}: {exc}")

    async def _instream(self, data: bytes) -> ScanResult:
        s = self.settings
        if s.clamd_socket is not None:
            reader, writer = await asyncio.open_unix_connection(s.clamd_socket, limit=MAX_REPLY)
        else:
            reader, writer = await asyncio.open_connection(s.clamd_host, s.clamd_port, limit=MAX_REPLY)
        try:
            try:
                writer.write(COMMAND)
                for frame in instream_frames(data):
                    writer.write(frame)
                    await writer.drain()  # bounded buffering for large messages
            except ConnectionError as exc:  # clamd hangs up past its StreamMaxLength; its answer may be lost
                with contextlib.suppress(OSError):
                    return parse_reply(await _answer(reader))
                return ScanResult(FAILED, f"clamd at {self.target} closed the connection during the message"
                                          f" ({type(exc).__name__}): {TOO_BIG_HINT}")
            return parse_reply(await _answer(reader))
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def _answer(reader: asyncio.StreamReader) -> bytes:
    """clamd's NUL-terminated line, or what came before it closed the connection."""
    try:
        return await reader.readuntil(b"\0")
    except asyncio.IncompleteReadError as exc:
        return exc.partial


def make_scanner(settings: ScanSettings) -> ClamdScanner | None:
    """The scanner of `[scan]`; None when no clamd is configured (messages are not scanned)."""
    return ClamdScanner(settings) if settings.enabled else None
