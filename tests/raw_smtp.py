"""An SMTP client that sends a message's bytes exactly as given (smtplib rewrites bare CR and LF), for tests and
benchmarks that must control what reaches relay and when."""

from __future__ import annotations

import socket
import time


def dot_stuffed(message: bytes) -> bytes:
    """A message as DATA carries it: leading dots doubled, ending with CRLF and the lone-dot line."""
    data = message.replace(b"\r\n.", b"\r\n..")
    data = b"." + data if data.startswith(b".") else data
    return data + (b".\r\n" if data.endswith(b"\r\n") else b"\r\n.\r\n")


def raw_transaction(port: int, payload: bytes, mail_from: str = "news@example.com",
                    rcpt: str = "rcpt@example.org") -> tuple[str, float, float]:
    """One SMTP transaction over a plain socket, `payload` being dot_stuffed() already (so the caller only moves
    bytes while relay reads them, and can send bare CRs, which smtplib would rewrite): the reply to the message,
    when its first byte went out and when the reply came (time.monotonic)."""
    with socket.create_connection(("127.0.0.1", port), timeout=600) as s, s.makefile("rb") as f:
        def reply() -> bytes:
            while (line := f.readline())[3:4] == b"-":
                pass
            return line

        reply()
        s.sendall(b"EHLO client.test\r\n")
        reply()
        s.sendall(f"MAIL FROM:<{mail_from}>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n".encode())
        replies = [reply() for _ in range(3)]
        if not replies[2].startswith(b"354"):
            raise RuntimeError(f"transaction refused: {replies}")
        start = time.monotonic()
        s.sendall(payload)
        answer = reply()
        end = time.monotonic()
        s.sendall(b"QUIT\r\n")
    return answer.decode(errors="replace").strip(), start, end
