"""The embedded backend: one SQLite file under data_dir.

WAL mode with synchronous=FULL: a transaction is on disk (fsync'd) when COMMIT returns. One writer thread
owns the write connection (SQLite has one writer at a time anyway); every other thread reads on a connection
of its own, beside the writer (WAL). Other processes on the same file (`relay track` workers, the CLI) take
their turn through SQLite's own locking, waiting up to busy_timeout.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from relay.core.events import iso_ms
from relay.store.base import Store
from relay.store.dialect import SQLITE
from relay.store.schema import migrate


class SqliteConnection(sqlite3.Connection):
    """sqlite3's connection, telling the store's SQL which dialect it speaks."""

    dialect = SQLITE


def connect(path: Path) -> SqliteConnection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30,
                           factory=SqliteConnection)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=OFF")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def _now() -> str:
    return iso_ms(int(time.time() * 1000))


class SqliteStore(Store):
    dialect = SQLITE

    def __init__(self, path: Path):
        self.path = Path(path)
        self.description = str(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        conn = connect(self.path)
        # one transaction: another process never sees a view missing or half a migration
        conn.execute("BEGIN IMMEDIATE")
        try:
            migrate(conn, _now())
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            conn.close()
            raise
        self._writer_conn = conn
        super().__init__()

    def unavailable(self, error: BaseException) -> bool:
        """Disk full, I/O error, a lock, a read-only or damaged file (sqlite3's plain DatabaseError)."""
        return isinstance(error, (sqlite3.OperationalError, OSError)) or type(error) is sqlite3.DatabaseError

    def _writer_connection(self) -> SqliteConnection:
        return self._writer_conn

    def _begin(self, conn: SqliteConnection) -> None:
        conn.execute("BEGIN IMMEDIATE")

    def _commit(self, conn: SqliteConnection) -> None:
        conn.execute("COMMIT")

    def _rollback(self, conn: SqliteConnection) -> None:
        if conn.in_transaction:  # some errors end the transaction themselves
            conn.execute("ROLLBACK")

    def _close_writer(self) -> None:
        self._writer_conn.close()

    @contextlib.contextmanager
    def _reading(self) -> Iterator[SqliteConnection]:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = connect(self.path)
        yield conn

    def _close_readers(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
