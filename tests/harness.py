"""Real parts for end-to-end tests: relay as a subprocess, an aiosmtpd upstream, free ports on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from aiosmtpd.controller import Controller

from relay.store.postgres import PgConnection

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 15.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"port {port} not listening after {timeout}s")


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    mail_options: list[str]


class UpstreamHandler:
    """An upstream MTA: stores what it accepts; `reply` can make it refuse or defer."""

    def __init__(self):
        self.messages: list[Received] = []
        self.reply: str | None = None
        self.refuse: set[str] = set()  # addresses refused at RCPT as unknown (a permanent bounce)
        self.delay = 0.0
        self.lock = threading.Lock()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address in self.refuse:
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown in virtual mailbox table"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.reply:
            return self.reply
        with self.lock:
            self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                          envelope.original_content, list(envelope.mail_options)))
        return "250 2.0.0 Ok: queued as test"


class Upstream:
    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.handler = UpstreamHandler()
        self.controller: Controller | None = None

    def start(self) -> Upstream:
        self.controller = Controller(self.handler, hostname="127.0.0.1", port=self.port, enable_SMTPUTF8=True,
                                     data_size_limit=None)
        self.controller.start()
        return self

    def stop(self) -> None:
        if self.controller:
            self.controller.stop()
            self.controller = None

    @property
    def messages(self) -> list[Received]:
        return self.handler.messages

    def wait_for(self, count: int, timeout: float = 20.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.messages) >= count:
                return self.messages
            time.sleep(0.02)
        raise TimeoutError(f"upstream got {len(self.messages)} of {count} messages")


def toml_lines(settings: dict) -> str:
    return "\n".join(f"{k} = {json.dumps(v)}" for k, v in settings.items())


def config_text(data_dir: Path, smtp_port: int, tracking_port: int, upstream_port: int | None, extra: str = "",
                smtp_extra: str = "", delivery: dict | None = None, upstream_settings: dict | None = None,
                store: dict | None = None, tracking: dict | None = None) -> str:
    if upstream_port:
        defaults = {"type": "smtp", "host": "127.0.0.1", "port": upstream_port, "tls": "none", "timeout": "5s"}
    else:
        defaults = {"type": "capture", "capture_dir": f"{data_dir}/delivered"}
    upstream = toml_lines({**defaults, **(upstream_settings or {})})
    delivery_lines = toml_lines({"retry_initial": "0.3s", "retry_max": "1s", **(delivery or {})})
    return f"""
[relay]
data_dir = "{data_dir}"
hostname = "relay.test"

[smtp]
listen = "127.0.0.1:{smtp_port}"
{smtp_extra}

[upstream]
{upstream}

[delivery]
{delivery_lines}

[store]
{toml_lines(store or {})}

[tracking]
listen = "127.0.0.1:{tracking_port}"
default_host = "127.0.0.1:{tracking_port}"
{toml_lines(tracking or {})}

[configuration_sets.marketing]
open_tracking = true
click_tracking = true

[configuration_sets.plain]
open_tracking = false
click_tracking = false
{extra}
"""


@dataclass
class RelayProcess:
    workdir: Path
    upstream_port: int | None = None
    extra: str = ""
    smtp_extra: str = ""
    delivery: dict = field(default_factory=dict)
    upstream: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)
    smtp_port: int = field(default_factory=free_port)
    tracking_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    preexec: object = None  # e.g. set a resource limit in the child
    store_url: str | None = None  # PostgreSQL (tests.conftest.store_target); None: SQLite under data
    node_id: str | None = None
    tracking: dict = field(default_factory=dict)  # more [tracking] settings
    store: dict = field(default_factory=dict)  # more [store] settings

    @property
    def config_path(self) -> Path:
        return self.workdir / "relay.toml"

    @property
    def db_path(self) -> Path:
        return self.workdir / "data" / "relay.sqlite3"

    def write_config(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(config_text(self.workdir / "data", self.smtp_port, self.tracking_port,
                                                self.upstream_port, self.extra, self.smtp_extra, self.delivery,
                                                self.upstream, self.store_settings(), self.tracking))

    def store_settings(self) -> dict:
        settings = {**self.store, **({"url": self.store_url} if self.store_url else {})}
        return {**settings, "node_id": self.node_id} if self.node_id else settings

    def start(self) -> RelayProcess:
        self.write_config()
        cmd = [sys.executable, "-m", "relay.cli", "serve", "--config", str(self.config_path)]
        with open(self.workdir / "relay.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, cwd=self.workdir, preexec_fn=self.preexec,
                                         env={**os.environ, "PYTHONPATH": str(ROOT), **self.env})
        wait_port(self.smtp_port, proc=self.proc)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=timeout)
        self.proc = None
        return code

    def log(self) -> str:
        return (self.workdir / "relay.log").read_text(errors="replace")

    def db(self):
        """A connection to relay's database taking the store's SQL (`?` parameters), SQLite or PostgreSQL."""
        return db_connection(self.store_url or self.db_path)

    def events(self, event_type: str | None = None) -> list[tuple]:
        with contextlib.closing(self.db()) as conn:
            sql = "SELECT type, message_id, recipient, configuration_set, record FROM events"
            if event_type:
                return conn.execute(sql + " WHERE type = ? ORDER BY id", (event_type,)).fetchall()
            return conn.execute(sql + " ORDER BY id").fetchall()

    def wait_events(self, event_type: str, count: int, timeout: float = 20.0) -> list[tuple]:
        deadline = time.monotonic() + timeout
        rows: list[tuple] = []
        while time.monotonic() < deadline:
            with contextlib.suppress(sqlite3.OperationalError, psycopg.OperationalError):
                rows = self.events(event_type)
                if len(rows) >= count:
                    return rows
            time.sleep(0.05)
        raise TimeoutError(f"{len(rows)} of {count} {event_type} events\n{self.log()[-3000:]}")


class HarnessPgConnection(PgConnection):
    """PgConnection used as tests use sqlite3's: `with conn:` ends a transaction (here every statement is its
    own: autocommit)."""

    def __enter__(self) -> HarnessPgConnection:
        return self

    def __exit__(self, *exc) -> None:
        return None


def db_connection(target: str | Path):
    """A connection to the database at `target` (a SQLite file, or a PostgreSQL URL) taking the store's SQL."""
    if isinstance(target, str):
        return HarnessPgConnection(psycopg.connect(target, autocommit=True))
    return sqlite3.connect(target, timeout=30)


def dict_rows(cursor) -> list[dict]:
    """A cursor's rows as {column: value}, on either backend (sqlite3.Row has no PostgreSQL twin)."""
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def database_text(conn) -> str:
    """Every row of every table as text (binary columns as hex, as sqlite3's iterdump writes them): to check
    that something is nowhere in the database."""
    if isinstance(conn, PgConnection):
        tables = [r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
                                             " ORDER BY 1").fetchall()]
    else:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY 1")]
    lines = []
    for table in tables:
        for row in conn.execute(f"SELECT * FROM {table}").fetchall():
            values = [bytes(v).hex() if isinstance(v, bytes | memoryview) else v for v in row]
            lines.append(f"{table}: {values!r}")
    return "\n".join(lines)


class TcpProxy:
    """A TCP relay from a local port to `target` that a test can cut: `cut()` closes every connection and
    refuses new ones (the server behind looks gone, as when PostgreSQL stops), `restore()` lets them in."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.port = free_port()
        self._open = threading.Event()
        self._open.set()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def start(self) -> TcpProxy:
        self._bind()
        self._thread.start()
        return self

    def _bind(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(128)
        s.settimeout(0.2)
        self._listener = s

    def _serve(self) -> None:
        while not self._stop:
            if not self._open.is_set():
                time.sleep(0.05)
                continue
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            with self._lock:
                self._conns -= {a, b}

    def cut(self) -> None:
        self._open.clear()
        self._listener.close()  # new connections are refused
        with self._lock:
            conns = list(self._conns)
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def restore(self) -> None:
        self._bind()
        self._open.set()

    def stop(self) -> None:
        self._stop = True
        self.cut()
