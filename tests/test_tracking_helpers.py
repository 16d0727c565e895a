"""Shared parts of the tracking-listener tests: a config on disk, the listener running in a thread against a
real Store (SQLite, or PostgreSQL with `store_url`), raw HTTP requests over 127.0.0.1, and stored messages
to attribute events to. No tests here."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import socket
import threading
import time
from pathlib import Path

from relay import config as config_module
from relay.core import events, tokens
from relay.core.headers import split_header_block
from relay.store import MessageRow, Store, open_store
from relay.tracking import TrackingServer

from .conftest import store_toml

MID = "0100018c1a2b3c4d-05e008de-024e-4226-841e-98f0e0d61bb1-000000"
RCPT = "reader@example.org"
CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/120.0.0.0 Safari/537.36")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(tmp: Path, tracking: str = "", sets: str = "", listen: str = "127.0.0.1:0",
                 store_url: str | None = None) -> Path:
    path = tmp / "relay.toml"
    path.write_text(
        f'[relay]\ndata_dir = "data"\n\n[tracking]\nlisten = "{listen}"\ndefault_host = "localhost"\n'
        f"{tracking}\n{sets}\n{store_toml(store_url)}",
        encoding="utf-8",
    )
    return path


def load(tmp: Path, tracking: str = "", sets: str = "", store_url: str | None = None) -> config_module.Config:
    return config_module.load(write_config(tmp, tracking, sets, store_url=store_url))


class Listener:
    """TrackingServer on its own event loop thread, as `relay serve` would run it."""

    def __init__(self, cfg: config_module.Config, store: Store | None = None):
        self.cfg = cfg
        self.store = store or open_store(cfg.store_target)
        self.keyring = cfg.keyring()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = TrackingServer(cfg, self.store, self.keyring)
        self.call(self.server.start())

    def call(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def port(self) -> int:
        return self.server.port

    def flush(self) -> None:
        """Wait until every hit answered so far is committed."""
        self.call(self.server.recorder.drain())

    def stop(self) -> None:
        self.call(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.store.close()

    def open_token(self, message_id: str = MID, recipient: str = RCPT, issued: int | None = None) -> str:
        return tokens.sign_open(self.keyring, message_id, recipient, int(time.time()) if issued is None else issued)

    def click_token(self, url: str, index: int = 0, tags: dict | None = None, message_id: str = MID,
                    recipient: str = RCPT, issued: int | None = None) -> str:
        issued = int(time.time()) if issued is None else issued
        return tokens.sign_click(self.keyring, message_id, recipient, issued, index, url, tags or {})


def request(port: int, method: str, path: str, headers: dict | None = None, source: str = "127.0.0.1"):
    """(status, headers as a list of (name, value), body) of one request on a fresh connection from `source`."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    try:
        headers = headers or {"User-Agent": CHROME}
        conn.putrequest(method, path, skip_host="Host" in headers, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.getheaders(), resp.read()
    finally:
        conn.close()


def raw_request(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send bytes as they are and read the whole answer (the server closes: `Connection: close`)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        with contextlib.suppress(TimeoutError):
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)


def header(headers: list[tuple[str, str]], name: str) -> str | None:
    return next((v for k, v in headers if k.lower() == name.lower()), None)


def store_message(store: Store, message_id: str = MID, recipients: tuple[str, ...] = (RCPT,),
                  configuration_set: str | None = "marketing", timestamp_ms: int | None = None) -> dict:
    """Store an accepted message as the SMTP side would; its SES mail object."""
    raw = (f"From: Shop <news@shop.example>\r\nTo: {recipients[0]}\r\nSubject: Autumn sale\r\n"
           f"X-SES-CONFIGURATION-SET: {configuration_set or ''}\r\n\r\nhello\r\n").encode()
    block = split_header_block(raw)
    ms = int(time.time() * 1000) - 3_600_000 if timestamp_ms is None else timestamp_ms
    facts = events.MailFacts(message_id, ms, "news@shop.example", list(recipients), block.fields,
                             configuration_set=configuration_set, from_domain="shop.example")
    mail = events.mail_object(facts)
    row = MessageRow(message_id, events.iso_ms(ms), "news@shop.example", configuration_set, "Autumn sale", None,
                     len(raw), "127.0.0.1", None, mail, {})
    sends = [Store_event(events.SEND, ms, message_id, r, configuration_set, events.send_record(mail))
             for r in recipients]
    store.submit(Store.accept_work(row, list(recipients), raw, sends)).result()
    return mail


def store_delivery(store: Store, mail: dict, recipient: str, delivered_ms: int) -> None:
    rec = events.delivery_record(mail, recipient, delivered_ms, "250 ok", "relay.test")
    store.submit(Store.events_work([Store_event(events.DELIVERY, delivered_ms, mail["messageId"], recipient,
                                                mail["tags"].get("ses:configuration-set", [None])[0], rec)])).result()


def Store_event(type_: str, ms: int, message_id: str, recipient: str, cset: str | None, record: dict):  # noqa: N802
    from relay.store import EventRow

    return EventRow(type_, events.iso_ms(ms), message_id, recipient, cset, record)


def stored(store: Store, event_type: str, message_id: str = MID) -> list[dict]:
    return store.events(message_id, event_type)


def verdict_of(store: Store, message_id: str = MID) -> list[dict]:
    return store.tracking_verdicts(message_id)


def dumps(obj) -> str:
    return json.dumps(obj, sort_keys=True)
