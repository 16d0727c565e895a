"""The shared backend: one PostgreSQL database, any number of relay nodes.

psycopg 3 does the talking: one connection for the writer thread (group commit, as on SQLite: one COMMIT
per batch, synchronous_commit on, so a 250 follows a commit that is on the server's disk), a connection pool
for reads (autocommit: each read sees what is committed), and one connection holding this node's advisory
locks (leadership of the jobs one node at a time runs). The store's SQL reaches psycopg through
`PgConnection`, which only rewrites the placeholders (relay.store.dialect.psycopg_sql) and loads numeric
results as Python numbers, as sqlite3 does.

When the database cannot be reached, every write fails (SMTP answers 451, nothing is lost) and every read
fails; the next write reconnects, so the node resumes without a restart once the server is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import zlib
from collections.abc import Iterable, Iterator

import psycopg
from psycopg.adapt import Loader
from psycopg_pool import ConnectionPool, PoolTimeout

from relay.core.events import iso_ms
from relay.store.base import Store
from relay.store.dialect import POSTGRES, psycopg_sql
from relay.store.schema import migrate

log = logging.getLogger("relay.store")
CONNECT_TIMEOUT_S = 5  # a dead server is reported within this, not after the kernel's TCP timeout
READ_TIMEOUT_S = 5.0  # the longest a read in a worker thread waits for a pooled connection
# A read on the event loop holds up every connection of the node while it waits: it waits this long at most,
# and while the database is known to be away (the last read or write could not reach it) it fails at once,
# but for one try a second that finds out whether the database is back.
LOOP_READ_TIMEOUT_S = 0.25
AWAY_RETRY_S = 1.0
_LOCK_CLASS = 0x52454C41  # "RELA": the first key of relay's advisory locks, apart from other applications'
_MIGRATION_LOCK = 1


class _NumberLoader(Loader):
    """numeric -> int or float, as SQLite gives them (SUM of bigints and ROUND are numeric in PostgreSQL)."""

    def load(self, data) -> int | float:
        text = bytes(data).decode()
        return float(text) if any(c in text for c in ".eE") or text == "NaN" else int(text)


def _configure(conn: psycopg.Connection) -> None:
    conn.adapters.register_loader("numeric", _NumberLoader)


class PgConnection:
    """A psycopg connection that takes the store's SQL; works and read helpers see only this."""

    dialect = POSTGRES

    def __init__(self, raw: psycopg.Connection):
        self.raw = raw

    def execute(self, sql: str, params: Iterable | dict = ()) -> psycopg.Cursor:
        return self.raw.execute(psycopg_sql(sql), params if isinstance(params, dict) else tuple(params))

    def close(self) -> None:
        self.raw.close()

    def executemany(self, sql: str, rows: Iterable) -> psycopg.Cursor:
        cur = self.raw.cursor()
        cur.executemany(psycopg_sql(sql), [r if isinstance(r, dict) else tuple(r) for r in rows])
        return cur


def connect(url: str, autocommit: bool = False) -> psycopg.Connection:
    conn = psycopg.connect(url, autocommit=autocommit, connect_timeout=CONNECT_TIMEOUT_S,
                           options="-c synchronous_commit=on")
    _configure(conn)
    return conn


def lock_key(job: str) -> int:
    """A stable 32-bit key for a job's advisory lock (the same on every node)."""
    return zlib.crc32(job.encode()) - 2**31


def describe(url: str) -> str:
    """The URL without its password, for messages to the operator."""
    info = psycopg.conninfo.conninfo_to_dict(url)
    host, port = info.get("host", ""), info.get("port", 5432)
    return f"postgresql://{info.get('user', '')}@{host}:{port}/{info.get('dbname', '')}"


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class PostgresStore(Store):
    dialect = POSTGRES

    def __init__(self, url: str, pool_size: int = 8):
        self.url = url
        self.description = describe(url)
        self._writer_raw: psycopg.Connection | None = connect(url)
        with self._writer_raw.transaction():
            conn = PgConnection(self._writer_raw)
            applied = migrate(conn, iso_ms(int(time.time() * 1000)), lambda: conn.execute(
                "SELECT pg_advisory_xact_lock(?, ?)", (_LOCK_CLASS, _MIGRATION_LOCK)))
        if applied:
            log.info("store %s: schema migrations %s applied", self.description, applied)
        self._pool_size = pool_size
        self._pool = self._new_pool()
        self._away_since: float | None = None  # monotonic time the database was found unreachable
        self._next_try = 0.0
        self._leader: psycopg.Connection | None = None
        self._led: set[str] = set()
        self._leader_lock = threading.Lock()
        super().__init__()

    def unavailable(self, error: BaseException) -> bool:
        """The server gone or refusing for now (connection, disk, resources, shutdown, a pool timeout)."""
        return isinstance(error, (psycopg.OperationalError, psycopg.errors.InsufficientResources, PoolTimeout,
                                  OSError))

    # --- writer ---------------------------------------------------------------------------------------------

    def _writer_connection(self) -> PgConnection:
        raw = self._writer_raw
        if raw is None or raw.closed or raw.broken:
            if raw is not None:
                with contextlib.suppress(Exception):
                    raw.close()
            self._writer_raw = None
            raw = self._writer_raw = connect(self.url)  # raises while the server is away: the batch fails
            log.info("store %s: writer connected", self.description)
            self._away_since = None
        return PgConnection(raw)

    def _begin(self, conn: PgConnection) -> None:
        """psycopg opens the transaction with the first statement."""

    def _commit(self, conn: PgConnection) -> None:
        conn.raw.commit()

    def _rollback(self, conn: PgConnection) -> None:
        if not conn.raw.closed:
            conn.raw.rollback()

    def _close_writer(self) -> None:
        if self._writer_raw is not None:
            self._writer_raw.close()

    # --- readers --------------------------------------------------------------------------------------------

    def _new_pool(self) -> ConnectionPool:
        return ConnectionPool(self.url, min_size=1, max_size=self._pool_size, open=True, configure=_configure,
                              kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT_S},
                              name="relay-readers")

    @contextlib.contextmanager
    def _reading(self) -> Iterator[PgConnection]:
        if self._away_since is not None:
            with self._probe() as conn:
                yield conn
            return
        try:
            connection = self._pool.connection(timeout=LOOP_READ_TIMEOUT_S if _on_event_loop() else READ_TIMEOUT_S)
            raw = connection.__enter__()
        except (PoolTimeout, psycopg.OperationalError):
            self._went_away()
            raise
        try:
            yield PgConnection(raw)
        except BaseException as exc:
            if not connection.__exit__(type(exc), exc, exc.__traceback__):
                raise
        else:
            connection.__exit__(None, None, None)

    @contextlib.contextmanager
    def _probe(self) -> Iterator[PgConnection]:
        """A read while the database is away: fails at once on the event loop but for one try a second; a try
        is a connection of its own (the pool would come back only after its own growing back-off: up to twice
        the outage). When one connects, the database is back: a fresh pool serves the reads from now on."""
        if _on_event_loop() and time.monotonic() < self._next_try:
            raise psycopg.OperationalError(f"{self.description} is unreachable (tried again every {AWAY_RETRY_S:g}s)")
        self._next_try = time.monotonic() + AWAY_RETRY_S
        raw = connect(self.url, autocommit=True)  # raises while it is still away
        log.info("store %s: reachable again after %.0fs", self.description, time.monotonic() - self._away_since)
        old, self._pool, self._away_since = self._pool, self._new_pool(), None
        threading.Thread(target=old.close, name="relay-old-pool", daemon=True).start()
        try:
            yield PgConnection(raw)
        finally:
            raw.close()

    def _went_away(self) -> None:
        now = time.monotonic()
        if self._away_since is None:
            self._away_since = now
            log.error("store %s: unreachable; reads on the event loop fail at once while it is away",
                      self.description)
        self._next_try = now + AWAY_RETRY_S

    def _close_readers(self) -> None:
        self._pool.close()
        with self._leader_lock:
            if self._leader is not None:
                self._leader.close()

    # --- leadership -----------------------------------------------------------------------------------------

    def try_lead(self, job: str) -> bool:
        """Session advisory locks on a connection of their own: held while this process lives and reaches the
        server; a node that dies or loses the server loses them, and another node's next try takes over."""
        with self._leader_lock:
            try:
                if self._leader is None or self._leader.closed or self._leader.broken:
                    self._led.clear()
                    self._leader = connect(self.url, autocommit=True)
                if job in self._led:
                    self._leader.execute("SELECT 1")  # still connected, so still holding it
                    return True
                got = self._leader.execute("SELECT pg_try_advisory_lock(%s, %s)",
                                           (_LOCK_CLASS, lock_key(job))).fetchone()[0]
            except psycopg.Error as exc:
                log.warning("store %s: leadership of %s unknown: %s", self.description, job, exc)
                self._led.clear()
                return False
            if got:
                self._led.add(job)
                log.info("store %s: this node now runs %s", self.description, job)
            return bool(got)

    def resign(self, job: str) -> None:
        with self._leader_lock:
            if job not in self._led:
                return
            self._led.discard(job)
            with contextlib.suppress(psycopg.Error):
                self._leader.execute("SELECT pg_advisory_unlock(%s, %s)", (_LOCK_CLASS, lock_key(job)))
