"""The store's interface: group-committed writes and reads, whichever database is behind it.

A write is a *work*: a function of a connection, run by the store's writer thread inside a transaction. The
writer commits whatever works have queued up since its last commit in one transaction (group commit), so
durability costs one commit (one fsync) per batch, not one per message, and a work's caller learns its result
only once that commit is durable. One failing work fails only its own caller: when a work raises, the batch
is rolled back and run again with each other work in its own SAVEPOINT (savepoints for every work cost a
tenth of the writer's time, and works rarely fail). So a work may run twice: its effects outside the
connection must bear repeating (results kept in local variables).

Reads run a helper on a connection of the calling thread's own (`read`), beside the writer. Works and read
helpers receive a connection with `execute`/`executemany` taking the store's SQL (`?` and `:name`
parameters) and a `dialect` (relay.store.dialect) for the few things the two engines spell differently. The
backends (relay.store.sqlite, relay.store.postgres) supply connections, transactions and leader locks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from relay.store import messages, tracking
from relay.store.dialect import Dialect
from relay.store.messages import MessageRow, PendingCopy

log = logging.getLogger("relay.store")
T = TypeVar("T")
MAX_BATCH = 512


class StoreClosed(RuntimeError):
    pass


class _LoopResult:
    """The writer's handle on a `write()` awaited on an event loop: the outcome goes straight to that loop's
    future (a concurrent.futures.Future, its condition variable and the chaining of wrap_future cost more than
    the rest of a small write). Quacks like the part of concurrent.futures.Future the writer uses."""

    __slots__ = ("loop", "future")

    def __init__(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future):
        self.loop, self.future = loop, future

    def set_running_or_notify_cancel(self) -> bool:
        return not self.future.cancelled()

    def done(self) -> bool:
        return self.future.done()

    def set_result(self, value: Any) -> None:
        self._settle(True, value)

    def set_exception(self, exc: BaseException) -> None:
        self._settle(False, exc)

    def _settle(self, ok: bool, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(_settle, self.future, ok, value)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


def _settle(future: asyncio.Future, ok: bool, value: Any) -> None:
    if future.done():  # cancelled meanwhile, or already settled
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


class Store:
    """What relay asks of its database. Backends implement the hooks at the end of the class."""

    dialect: Dialect
    description: str  # where the data lives, for messages to the operator (never a password)

    def __init__(self) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(target=self._writer, name="relay-store-writer", daemon=True)
        self._thread.start()

    # --- the group-commit writer -------------------------------------------------------------------------

    def submit(self, work: Callable[[Any], T]) -> concurrent.futures.Future[T]:
        """Run `work(conn)` in the next batch; the future resolves after the batch's COMMIT is durable."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if self._closed:
            future.set_exception(StoreClosed("store is closed"))
            return future
        self._queue.put((work, future))
        return future

    async def write(self, work: Callable[[Any], T]) -> T:
        """As `submit`, awaited on the running loop. A caller cancelled meanwhile gets no result; its work is
        done all the same (a delivery outcome is still worth recording)."""
        if self._closed:
            raise StoreClosed("store is closed")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((work, _LoopResult(loop, future)))
        return await future

    def _writer(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                break
            batch = [item]
            while len(batch) < MAX_BATCH:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                batch.append(nxt)
            # From here a caller can no longer cancel; one that already gave up still gets its work done (a
            # delivery outcome is still worth recording) but no result.
            live = {id(f) for _, f in batch if f.set_running_or_notify_cancel()}
            try:
                self._run_batch(batch, live)
            except Exception as exc:  # never let the writer thread die: every later write would hang
                log.exception("store writer: unexpected error")
                for _, future in batch:
                    if id(future) in live and not future.done():
                        future.set_exception(exc)
        self._close_writer()

    def _run_batch(self, batch: list, live: set[int]) -> None:
        conn = None
        try:
            conn = self._writer_connection()
            self._begin(conn)
            results, failed = self._run_works(conn, batch)
            if failed is not None:  # its statements are mixed with the others': again, each work on its own
                self._rollback(conn)
                self._begin(conn)
                results, _ = self._run_works(conn, batch, failed)
            self._commit(conn)
        except Exception as exc:  # disk full, I/O error, database unreachable: nothing in the batch is durable
            log.error("store commit failed: %s", exc)
            if conn is not None:
                with contextlib.suppress(Exception):
                    self._rollback(conn)
            for _, future in batch:
                if id(future) in live:
                    future.set_exception(exc)
            return
        for future, ok, value in results:
            if id(future) not in live:
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    @staticmethod
    def _run_works(conn, batch: list, failed: tuple[int, Exception] | None = None
                   ) -> tuple[list[tuple[concurrent.futures.Future, bool, Any]], tuple[int, Exception] | None]:
        """Run the batch's works. Without `failed`: plainly, stopping at the first work that raises, returned
        as (its index, its error). With it: each work in a SAVEPOINT; the one that failed is not run again."""
        results: list[tuple[concurrent.futures.Future, bool, Any]] = []
        for i, (work, future) in enumerate(batch):
            if failed is None:
                try:
                    results.append((future, True, work(conn)))
                except Exception as exc:
                    return results, (i, exc)
                continue
            if i == failed[0]:
                results.append((future, False, failed[1]))
                continue
            conn.execute("SAVEPOINT work")
            try:
                value = work(conn)
                conn.execute("RELEASE work")
                results.append((future, True, value))
            except Exception as exc:  # the caller gets its own error; the batch goes on
                conn.execute("ROLLBACK TO work")
                conn.execute("RELEASE work")
                results.append((future, False, exc))
        return results, None

    def close(self) -> None:
        """Finish queued writes, then stop the writer."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join()
        self._close_readers()

    # --- reads ---------------------------------------------------------------------------------------------

    def read(self, helper: Callable[..., T], *args) -> T:
        """Run a read helper (a function of a connection, then `args`) on committed data."""
        with self._reading() as conn:
            return helper(conn, *args)

    def query(self, sql: str, params: Iterable = ()) -> list[tuple]:
        with self._reading() as conn:
            return conn.execute(sql, tuple(params)).fetchall()

    tracking_read = read  # the name the tracking listener's helpers have always used

    # --- messages, events and tracking domains, as the rest of relay reads them ---------------------------

    accept_work = staticmethod(messages.accept_work)
    events_work = staticmethod(messages.events_work)
    recipient_work = staticmethod(messages.recipient_work)
    verified_domain_work = staticmethod(tracking.verified_domain_work)

    def pending_copies(self) -> list[PendingCopy]:
        rows = self.query(
            "SELECT message_id, recipient, attempts, next_attempt_at FROM recipients WHERE state = 'queued'"
            " ORDER BY next_attempt_at, message_id, position"
        )
        return [PendingCopy(*row) for row in rows]

    def load_message(self, message_id: str) -> tuple[MessageRow, bytes] | None:
        rows = self.query(
            "SELECT m.id, m.received_at, m.mail_from, m.configuration_set, m.subject, m.message_id_header,"
            " m.size, m.client_ip, m.auth_user, m.mail_json, m.settings_json, s.raw"
            " FROM messages m JOIN spool s ON s.message_id = m.id WHERE m.id = ?",
            (message_id,),
        )
        if not rows:
            return None
        r = rows[0]
        msg = MessageRow(*r[:9], mail=json.loads(r[9]), settings=json.loads(r[10]), mail_json=r[9])
        return msg, bytes(r[11])

    def mail_object(self, message_id: str) -> tuple[dict, str | None] | None:
        """SES's `mail` object and configuration set of a message, for events recorded later."""
        rows = self.query("SELECT mail_json, configuration_set FROM messages WHERE id = ?", (message_id,))
        return (json.loads(rows[0][0]), rows[0][1]) if rows else None

    def events(self, message_id: str | None = None, event_type: str | None = None) -> list[dict]:
        sql, params = "SELECT record FROM events WHERE 1=1", []
        if message_id:
            sql += " AND message_id = ?"
            params.append(message_id)
        if event_type:
            sql += " AND type = ?"
            params.append(event_type)
        return [json.loads(r[0]) for r in self.query(sql + " ORDER BY id", params)]

    # --- the tracking listener's ---------------------------------------------------------------------------------

    def tracking_verdicts(self, message_id: str) -> list[dict]:
        """Open/Click events of a message with their verdicts: {id, type, recipient, method, verdict, reasons,
        device}, oldest first."""
        rows = self.query(
            "SELECT e.id, e.type, e.recipient, v.method, v.verdict, v.reasons, v.client, v.os, v.device"
            " FROM events e LEFT JOIN tracking_verdicts v ON v.event_id = e.id"
            " WHERE e.message_id = ? AND e.type IN ('Open', 'Click') ORDER BY e.id",
            (message_id,),
        )
        return [
            {"id": r[0], "type": r[1], "recipient": r[2], "method": r[3], "verdict": r[4],
             "reasons": json.loads(r[5]) if r[5] else [], "device": {"client": r[6], "os": r[7], "kind": r[8]}}
            for r in rows
        ]

    def verified_tracking_domains(self) -> set[str]:
        """Host names proved by `relay tracking-domain verify` (lower-case, without port)."""
        return {r[0] for r in self.query("SELECT domain FROM tracking_domains")}

    def is_tracking_domain_verified(self, domain: str) -> bool:
        host = domain.lower().rstrip(".")
        return bool(self.query("SELECT 1 FROM tracking_domains WHERE domain = ?", (host,)))

    def unavailable(self, error: BaseException) -> bool:
        """Whether a failed write is the database's (disk full, I/O error, locked, unreachable) and may pass
        later, rather than a fault in what was written."""
        return isinstance(error, OSError)

    # --- leadership: the jobs one node at a time runs (destinations, rollups, retention) -----------------

    def try_lead(self, job: str) -> bool:
        """Whether this process runs `job` now; once True, it stays so until `resign` or the process ends.
        A single-node store always leads."""
        return True

    def resign(self, job: str) -> None:
        """Give `job` up (its task stopped)."""

    # --- what a backend supplies ----------------------------------------------------------------------------

    def _writer_connection(self):
        """The writer thread's connection (reconnected by the backend after the database was lost)."""
        raise NotImplementedError

    def _begin(self, conn) -> None:
        raise NotImplementedError

    def _commit(self, conn) -> None:
        raise NotImplementedError

    def _rollback(self, conn) -> None:
        raise NotImplementedError

    def _close_writer(self) -> None:
        raise NotImplementedError

    @contextlib.contextmanager
    def _reading(self) -> Iterator[Any]:
        raise NotImplementedError
        yield

    def _close_readers(self) -> None:
        """Close what `_reading` opened (only connections of the calling thread can be closed on SQLite)."""
