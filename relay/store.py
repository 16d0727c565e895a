"""The store: schema, group-committed writes and reads. The only module that speaks SQL.

SQLite in WAL mode with synchronous=FULL: a transaction is on disk (fsync'd) when COMMIT returns. One writer
thread owns the write connection and commits whatever work has queued up since its last commit in a single
transaction (group commit), so durability costs one fsync per batch, not one per message. One failing work
fails only its own caller: when a work raises, the batch is rolled back and run again with each other work in
its own SAVEPOINT (savepoints for every work cost a tenth of the writer's time, and works rarely fail). So a
work may run twice: its effects outside the connection must bear repeating (results kept in local variables).

The SQL is kept portable (no SQLite-only syntax beyond the PRAGMAs) so a PostgreSQL store can follow the
same interface when several relay nodes share one database.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import queue
import re
import sqlite3
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any, TypeVar

from relay.core import events as ev
from relay.core.settings import TrackingSettings
from relay.core.suppression import Suppression, entries_for

log = logging.getLogger("relay.store")
T = TypeVar("T")
MAX_BATCH = 512

SCHEMA = [
    # One row per accepted message. mail_json is SES's `mail` object shared by all its events.
    """CREATE TABLE IF NOT EXISTS messages (
        id TEXT PRIMARY KEY,
        received_at TEXT NOT NULL,
        mail_from TEXT NOT NULL,
        configuration_set TEXT,
        subject TEXT,
        message_id_header TEXT,
        size INTEGER NOT NULL,
        client_ip TEXT,
        auth_user TEXT,
        mail_json TEXT NOT NULL,
        settings_json TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS messages_received ON messages (received_at)",
    # The message as received (CRLF, X-SES-* removed), kept until every recipient is final.
    """CREATE TABLE IF NOT EXISTS spool (
        message_id TEXT PRIMARY KEY REFERENCES messages (id),
        raw BLOB NOT NULL
    )""",
    # Delivery state per recipient copy: queued -> delivered | bounced.
    """CREATE TABLE IF NOT EXISTS recipients (
        message_id TEXT NOT NULL REFERENCES messages (id),
        recipient TEXT NOT NULL,
        position INTEGER NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at TEXT,
        last_response TEXT,
        updated_at TEXT NOT NULL,
        PRIMARY KEY (message_id, recipient)
    )""",
    "CREATE INDEX IF NOT EXISTS recipients_state ON recipients (state, next_attempt_at)",
    "CREATE INDEX IF NOT EXISTS recipients_address ON recipients (recipient)",
    # Every event as SES publishes it: the record column is the event JSON, the other columns index it.
    """CREATE TABLE IF NOT EXISTS events (
        id INTEGER PRIMARY KEY,
        type TEXT NOT NULL,
        time TEXT NOT NULL,
        message_id TEXT NOT NULL,
        recipient TEXT,
        configuration_set TEXT,
        record TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS events_message ON events (message_id, id)",
    "CREATE INDEX IF NOT EXISTS events_type_time ON events (type, time)",
    "DROP INDEX IF EXISTS events_recipient",  # superseded by events_recipient_time (recipient, type, time)
    # Warnings recorded against a message (instrumentation left a part unmodified, no DKIM key, ...).
    """CREATE TABLE IF NOT EXISTS message_warnings (
        message_id TEXT NOT NULL,
        recipient TEXT,
        time TEXT NOT NULL,
        stage TEXT NOT NULL,
        warning TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS message_warnings_message ON message_warnings (message_id)",
]


@dataclass(frozen=True)
class EventRow:
    type: str
    time: str
    message_id: str
    recipient: str | None
    configuration_set: str | None
    record: dict
    mail_json: str | None = None  # record["mail"] already serialised (`mail_json`): spliced in, not re-encoded


@dataclass(frozen=True)
class MessageRow:
    id: str
    received_at: str
    mail_from: str
    configuration_set: str | None
    subject: str | None
    message_id_header: str | None
    size: int
    client_ip: str
    auth_user: str | None
    mail: dict
    settings: dict
    mail_json: str | None = None  # `mail` serialised by `mail_json`, when the caller already has it


@dataclass(frozen=True)
class PendingCopy:
    message_id: str
    recipient: str
    attempts: int
    next_attempt_at: str | None


_VIEW = re.compile(r"CREATE VIEW IF NOT EXISTS (\w+)")


def create_schema(conn: sqlite3.Connection) -> None:
    """Tables and indexes are created when missing; views are replaced, so an upgrade brings their new
    definitions. One transaction: another process never sees a view missing."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in SCHEMA:
            view = _VIEW.match(statement)
            if view:
                conn.execute(f"DROP VIEW IF EXISTS {view.group(1)}")
            conn.execute(statement)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


class StoreClosed(RuntimeError):
    pass


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=OFF")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


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
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._queue: queue.Queue = queue.Queue()
        self._local = threading.local()
        conn = connect(self.path)
        create_schema(conn)
        self._writer_conn = conn
        self._closed = False
        self._thread = threading.Thread(target=self._writer, name="relay-store-writer", daemon=True)
        self._thread.start()

    # --- the group-commit writer -------------------------------------------------------------------------

    def submit(self, work: Callable[[sqlite3.Connection], T]) -> concurrent.futures.Future[T]:
        """Run `work(conn)` in the next batch; the future resolves after the batch's COMMIT is on disk."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if self._closed:
            future.set_exception(StoreClosed("store is closed"))
            return future
        self._queue.put((work, future))
        return future

    async def write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """As `submit`, awaited on the running loop. A caller cancelled meanwhile gets no result; its work is
        done all the same (a delivery outcome is still worth recording)."""
        if self._closed:
            raise StoreClosed("store is closed")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((work, _LoopResult(loop, future)))
        return await future

    def _writer(self) -> None:
        conn = self._writer_conn
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
                self._run_batch(conn, batch, live)
            except Exception as exc:  # never let the writer thread die: every later write would hang
                log.exception("store writer: unexpected error")
                for _, future in batch:
                    if id(future) in live and not future.done():
                        future.set_exception(exc)
        conn.close()

    def _run_batch(self, conn: sqlite3.Connection, batch: list, live: set[int]) -> None:
        try:
            conn.execute("BEGIN IMMEDIATE")
            results, failed = self._run_works(conn, batch)
            if failed is not None:  # its statements are mixed with the others': again, each work on its own
                if conn.in_transaction:  # (some errors end the transaction themselves)
                    conn.execute("ROLLBACK")
                conn.execute("BEGIN IMMEDIATE")
                results, _ = self._run_works(conn, batch, failed)
            conn.execute("COMMIT")
        except Exception as exc:  # disk full, I/O error: nothing in the batch is durable
            log.error("store commit failed: %s", exc)
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
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
    def _run_works(conn: sqlite3.Connection, batch: list, failed: tuple[int, Exception] | None = None
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

    # --- reads (a connection per thread; WAL lets them run beside the writer) -----------------------------

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = connect(self.path)
        return conn

    def query(self, sql: str, params: Iterable = ()) -> list[tuple]:
        return self._reader().execute(sql, tuple(params)).fetchall()

    # --- messages and the queue ----------------------------------------------------------------------------

    @staticmethod
    def accept_work(msg: MessageRow, recipients: list[str], raw: bytes, events: list[EventRow],
                    final: dict[str, tuple[str, str]] | None = None,
                    guard: Callable[[sqlite3.Connection], bool] | None = None):
        """The work that makes an accepted message durable: message, spool, recipients, Send events.
        `final`: recipients already final at acceptance (suppressed), recipient -> (state, last response);
        the body is spooled only when some recipient is left to deliver. `guard(conn)` runs first, in the same
        transaction: False when what the message was prepared from has changed; the work then writes nothing
        and returns False (not an error, so the rest of the batch is not run again)."""
        final = final or {}

        def work(conn: sqlite3.Connection) -> bool:
            if guard is not None and not guard(conn):
                return False
            conn.execute(
                "INSERT INTO messages (id, received_at, mail_from, configuration_set, subject, message_id_header,"
                " size, client_ip, auth_user, mail_json, settings_json) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (msg.id, msg.received_at, msg.mail_from, msg.configuration_set, msg.subject,
                 msg.message_id_header, msg.size, msg.client_ip, msg.auth_user,
                 msg.mail_json or mail_json(msg.mail), json.dumps(msg.settings, separators=(",", ":"))),
            )
            if any(r not in final for r in recipients):
                conn.execute("INSERT INTO spool (message_id, raw) VALUES (?, ?)", (msg.id, raw))
            conn.executemany(
                "INSERT INTO recipients (message_id, recipient, position, state, last_response, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [(msg.id, r, i, *final.get(r, ("queued", None)), msg.received_at) for i, r in enumerate(recipients)],
            )
            _insert_events(conn, events)
            return True

        return work

    @staticmethod
    def events_work(events: list[EventRow]):
        return lambda conn: _insert_events(conn, events)

    @staticmethod
    def recipient_work(
        message_id: str,
        recipient: str,
        state: str,
        attempts: int,
        next_attempt_at: str | None,
        last_response: str,
        now: str,
        events: list[EventRow],
        warnings: list[tuple[str, str]] = (),
    ):
        """Record a delivery attempt's outcome; drop the spooled body once every recipient is final."""

        def work(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE recipients SET state = ?, attempts = ?, next_attempt_at = ?, last_response = ?,"
                " updated_at = ? WHERE message_id = ? AND recipient = ?",
                (state, attempts, next_attempt_at, last_response, now, message_id, recipient),
            )
            _insert_events(conn, events)
            conn.executemany(
                "INSERT INTO message_warnings (message_id, recipient, time, stage, warning) VALUES (?,?,?,?,?)",
                [(message_id, recipient, now, stage, text) for stage, text in warnings],
            )
            if state != "queued":
                left = conn.execute(
                    "SELECT COUNT(*) FROM recipients WHERE message_id = ? AND state = 'queued'", (message_id,)
                ).fetchone()[0]
                if left == 0:
                    conn.execute("DELETE FROM spool WHERE message_id = ?", (message_id,))

        return work

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

    # --- tracking listener ---------------------------------------------------------------------------------

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

    def tracking_read(self, helper: Callable[..., T], *args) -> T:
        """Run a read helper of this section with this thread's reader connection (committed data only)."""
        return helper(self._reader(), *args)

    def verified_tracking_domains(self) -> set[str]:
        """Host names proved by `relay tracking-domain verify` (lower-case, without port)."""
        return {r[0] for r in self.query("SELECT domain FROM tracking_domains")}

    def is_tracking_domain_verified(self, domain: str) -> bool:
        host = domain.lower().rstrip(".")
        return bool(self.query("SELECT 1 FROM tracking_domains WHERE domain = ?", (host,)))

    @staticmethod
    def verified_domain_work(domain: str, address: str, scheme: str, now: str):
        def work(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO tracking_domains (domain, verified_at, address, scheme) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (domain) DO UPDATE SET verified_at = excluded.verified_at,"
                " address = excluded.address, scheme = excluded.scheme",
                (domain.lower().rstrip("."), now, address, scheme),
            )

        return work


def mail_json(mail: dict) -> str:
    """SES's `mail` object as stored (messages.mail_json) and as it appears inside every event record."""
    return json.dumps(mail, separators=(",", ":"))


def record_json(record: dict, mail: str | None = None) -> str:
    """An event record as JSON. With `mail` (the record's mail object, already serialised: most of its bytes)
    that text is spliced in instead of encoding the object again for every event of the message; the result is
    the same as encoding the whole record."""
    keys = list(record)
    if mail is None or keys[:2] != ["eventType", "mail"] or len(keys) < 3:
        return json.dumps(record, separators=(",", ":"))
    rest = json.dumps({k: record[k] for k in keys[2:]}, separators=(",", ":"))
    return f'{{"eventType":{json.dumps(record["eventType"])},"mail":{mail},{rest[1:]}'


def _insert_events(conn: sqlite3.Connection, events: list[EventRow]) -> None:
    conn.executemany(
        "INSERT INTO events (type, time, message_id, recipient, configuration_set, record) VALUES (?,?,?,?,?,?)",
        [(e.type, e.time, e.message_id, e.recipient, e.configuration_set, record_json(e.record, e.mail_json))
         for e in events],
    )


# --- tracking listener ---------------------------------------------------------------------------------------
# Open/Click events are written by the tracking listener in batches; each event gets a machine verdict row
# beside it (never a change to the event). The helpers below take a connection: the writer's inside a work,
# or this thread's reader through Store.tracking_read.

SCHEMA.extend([
    # The verdict of one Open/Click event and why; recomputable. `method` is a raw fact the SES record lacks.
    """CREATE TABLE IF NOT EXISTS tracking_verdicts (
        event_id INTEGER PRIMARY KEY,
        method TEXT NOT NULL,
        verdict TEXT NOT NULL,
        reasons TEXT NOT NULL,
        client TEXT,
        os TEXT,
        device TEXT,
        computed_at TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS tracking_verdicts_verdict ON tracking_verdicts (verdict)",
    # Tracking domains proved to reach the listener (DNS, CDN and proxy included).
    """CREATE TABLE IF NOT EXISTS tracking_domains (
        domain TEXT PRIMARY KEY,
        verified_at TEXT NOT NULL,
        address TEXT NOT NULL,
        scheme TEXT NOT NULL
    )""",
    # Per recipient copy: every open and click (SES counts them all) and the ones a person made. `opened` is
    # 1 when a real open (person or image proxy) or a human click exists: a click proves the message was
    # opened even when images were blocked (`opened_by_click_only`). Unique opens of a message:
    #   SELECT COUNT(*) FROM tracking_engagement WHERE message_id = ? AND opened = 1
    """CREATE VIEW IF NOT EXISTS tracking_engagement AS
    SELECT e.message_id, e.recipient,
        SUM(CASE WHEN e.type = 'Open' THEN 1 ELSE 0 END) AS opens,
        SUM(CASE WHEN e.type = 'Open' AND v.verdict IN ('human', 'proxy') THEN 1 ELSE 0 END) AS real_opens,
        SUM(CASE WHEN e.type = 'Click' THEN 1 ELSE 0 END) AS clicks,
        SUM(CASE WHEN e.type = 'Click' AND v.verdict = 'human' THEN 1 ELSE 0 END) AS human_clicks,
        MAX(CASE WHEN e.type = 'Open' AND v.verdict IN ('human', 'proxy') THEN 1
                 WHEN e.type = 'Click' AND v.verdict = 'human' THEN 1 ELSE 0 END) AS opened,
        CASE WHEN SUM(CASE WHEN e.type = 'Open' AND v.verdict IN ('human', 'proxy') THEN 1 ELSE 0 END) = 0
              AND SUM(CASE WHEN e.type = 'Click' AND v.verdict = 'human' THEN 1 ELSE 0 END) > 0
             THEN 1 ELSE 0 END AS opened_by_click_only,
        MIN(e.time) AS first_time,
        MAX(e.time) AS last_time
    FROM events e LEFT JOIN tracking_verdicts v ON v.event_id = e.id
    WHERE e.type IN ('Open', 'Click')
    GROUP BY e.message_id, e.recipient""",
])


@dataclass(frozen=True)
class VerdictRow:
    event_id: int
    method: str
    verdict: str
    reasons: list[dict] | str  # a list of {code, detail, verdict}, or that list already as JSON
    client: str
    os: str
    device: str
    computed_at: str


def tracking_mail(conn: sqlite3.Connection, message_id: str) -> tuple[str, str | None] | None:
    """The stored `mail` object as its JSON text (spliced into records unparsed) and the configuration set."""
    row = conn.execute("SELECT mail_json, configuration_set FROM messages WHERE id = ?", (message_id,)).fetchone()
    return (row[0], row[1]) if row else None


_ROWS_PER_STATEMENT = 100  # 6-8 parameters a row: well under SQLite's 999-parameter floor


def _insert_rows(conn: sqlite3.Connection, head: str, width: int, rows: list[tuple], tail: str = "") -> None:
    """INSERT many rows with multi-row VALUES statements. executemany runs (and releases the GIL for) one
    statement per row; the event loop then waits for the GIL after every socket call. One statement per
    hundred rows keeps the writer thread out of its way."""
    one = "(" + ",".join("?" * width) + ")"
    for start in range(0, len(rows), _ROWS_PER_STATEMENT):
        chunk = rows[start:start + _ROWS_PER_STATEMENT]
        conn.execute(f"{head} VALUES {','.join([one] * len(chunk))} {tail}", [v for row in chunk for v in row])


def insert_events_json(conn: sqlite3.Connection, rows: list[tuple]) -> range:
    """Insert events given as (type, time, message_id, recipient, configuration_set, record JSON); their ids.

    Without AUTOINCREMENT SQLite gives each new row max(id) + 1, so inside our write transaction the ids are
    consecutive: checked here, not assumed.
    """
    if not rows:
        return range(0)
    _insert_rows(conn, "INSERT INTO events (type, time, message_id, recipient, configuration_set, record)", 6, rows)
    last = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
    first = last - len(rows) + 1
    if conn.execute("SELECT COUNT(*) FROM events WHERE id >= ?", (first,)).fetchone()[0] != len(rows):
        raise RuntimeError("event ids were not assigned consecutively")
    return range(first, last + 1)


def copy_delivery_time(conn: sqlite3.Connection, message_id: str, recipient: str, since: str = "") -> str | None:
    """`delivery.timestamp` of the copy's Delivery event, if there is one; `since` (ISO) bounds the search from
    below (the message's acceptance time).

    The copy queries below read through events_recipient_time (recipient, type, time, then the rowid) and order by
    (time, id), so SQLite walks that index in order and stops at the LIMIT. Ordered by id alone, it preferred
    events_message (message_id, id) and scanned every event of the message (O(events of a bulk message) per
    lookup: 118 ms at 100k events), or read the whole time range and sorted it.
    """
    row = conn.execute(
        "SELECT record FROM events WHERE recipient = ? AND type = 'Delivery' AND time >= ? AND message_id = ?"
        " ORDER BY time, id LIMIT 1",
        (recipient, since, message_id),
    ).fetchone()
    return json.loads(row[0])["delivery"]["timestamp"] if row else None


def copy_clicks(conn: sqlite3.Connection, message_id: str, recipient: str, since: str, until: str,
                limit: int) -> list[tuple]:
    """(event id, record JSON, method) of the latest `limit` Click events of a copy with `since <= time <= until`
    (ISO strings), oldest first."""
    rows = conn.execute(
        "SELECT e.id, e.record, COALESCE(v.method, 'GET') FROM events e"
        " LEFT JOIN tracking_verdicts v ON v.event_id = e.id"
        " WHERE e.recipient = ? AND e.type = 'Click' AND e.time >= ? AND e.time <= ? AND e.message_id = ?"
        " ORDER BY e.time DESC, e.id DESC LIMIT ?",
        (recipient, since, until, message_id, limit),
    ).fetchall()
    rows.reverse()
    return rows


def tracking_events_after(conn: sqlite3.Connection, after_id: int, limit: int) -> list[tuple]:
    """(id, type, message_id, recipient, record JSON, method) of Open/Click events with id > after_id."""
    return conn.execute(
        "SELECT e.id, e.type, e.message_id, e.recipient, e.record, COALESCE(v.method, 'GET') FROM events e"
        " LEFT JOIN tracking_verdicts v ON v.event_id = e.id"
        " WHERE e.id > ? AND e.type IN ('Open', 'Click') ORDER BY e.id LIMIT ?",
        (after_id, limit),
    ).fetchall()


def upsert_verdicts(conn: sqlite3.Connection, rows: list[VerdictRow]) -> None:
    """Write verdicts; a recomputation replaces verdict, reasons and device but keeps the raw `method`."""
    upsert_verdict_values(conn, [
        (r.event_id, r.method, r.verdict, r.reasons if isinstance(r.reasons, str)
         else json.dumps(r.reasons, separators=(",", ":")), r.client, r.os, r.device, r.computed_at) for r in rows])


def upsert_verdict_values(conn: sqlite3.Connection, rows: list[tuple]) -> None:
    """`upsert_verdicts` of plain (event_id, method, verdict, reasons JSON, client, os, device, computed_at)
    tuples: the listener's writer work builds no VerdictRow per hit (its Python holds the GIL the loop wants)."""
    _insert_rows(
        conn, "INSERT INTO tracking_verdicts (event_id, method, verdict, reasons, client, os, device, computed_at)", 8,
        rows,
        "ON CONFLICT (event_id) DO UPDATE SET verdict = excluded.verdict, reasons = excluded.reasons,"
        " client = excluded.client, os = excluded.os, device = excluded.device, computed_at = excluded.computed_at",
    )


# --- configuration sets and destinations ---------------------------------------------------------------------
# Sets, tracking options, identities' default sets and event destinations created with the CLI (or the
# management API); the TOML file's are never stored here. `configuration_version.counter` moves with every
# change, so a running relay (another process) notices with one cheap read and reloads. Destination cursors
# are the durable outbox: the last events.id a destination has acknowledged.

SCHEMA.extend([
    """CREATE TABLE IF NOT EXISTS configuration_sets (
        name TEXT PRIMARY KEY,
        created_at TEXT NOT NULL
    )""",
    # level: account (scope ''), domain (scope = sending domain) or set (scope = set name); NULL = inherit.
    """CREATE TABLE IF NOT EXISTS tracking_options (
        level TEXT NOT NULL,
        scope TEXT NOT NULL,
        open_tracking INTEGER,
        click_tracking INTEGER,
        custom_redirect_domain TEXT,
        https_policy TEXT,
        pixel_position TEXT,
        PRIMARY KEY (level, scope)
    )""",
    # identity: an address or a domain (lower case).
    """CREATE TABLE IF NOT EXISTS identity_sets (
        identity TEXT PRIMARY KEY,
        configuration_set TEXT NOT NULL
    )""",
    # settings: the destination's target and retry settings as JSON (see relay.core.resolve.Destination).
    """CREATE TABLE IF NOT EXISTS event_destinations (
        configuration_set TEXT NOT NULL,
        name TEXT NOT NULL,
        enabled INTEGER NOT NULL,
        event_types TEXT NOT NULL,
        kind TEXT NOT NULL,
        settings TEXT NOT NULL,
        PRIMARY KEY (configuration_set, name)
    )""",
    # Per destination (TOML or database): the last event delivered (acknowledged), and whether the
    # destination was enabled when last seen: enabling it again starts from the newest event.
    """CREATE TABLE IF NOT EXISTS destination_cursors (
        configuration_set TEXT NOT NULL,
        destination TEXT NOT NULL,
        last_event_id INTEGER NOT NULL,
        enabled INTEGER NOT NULL,
        PRIMARY KEY (configuration_set, destination)
    )""",
    # Events a receiver kept refusing (4xx) and that were set aside so later events could go on.
    """CREATE TABLE IF NOT EXISTS destination_failures (
        configuration_set TEXT NOT NULL,
        destination TEXT NOT NULL,
        event_id INTEGER NOT NULL,
        time TEXT NOT NULL,
        status INTEGER,
        reason TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS configuration_version (
        id INTEGER PRIMARY KEY,
        counter INTEGER NOT NULL
    )""",
    "INSERT INTO configuration_version (id, counter) SELECT 1, 0"
    " WHERE NOT EXISTS (SELECT 1 FROM configuration_version WHERE id = 1)",
    "CREATE INDEX IF NOT EXISTS events_set ON events (configuration_set, id)",
])


@dataclass(frozen=True)
class StoredConfiguration:
    sets: list[str]
    tracking: list[tuple]  # (level, scope, open, click, domain, https_policy, pixel_position)
    identities: list[tuple[str, str]]
    destinations: list[tuple]  # (set, name, enabled, event_types JSON, kind, settings JSON)
    version: int
    suppression: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (set, reasons): set_suppression_options


def configuration_read(store: Store, helper: Callable[..., T], *args) -> T:
    """Run a helper of this section on this thread's reader connection."""
    return helper(store._reader(), *args)


def configuration_version(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT counter FROM configuration_version WHERE id = 1").fetchone()
    return row[0] if row else 0


def bump_configuration_version(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE configuration_version SET counter = counter + 1 WHERE id = 1")


def load_configuration(conn: sqlite3.Connection) -> StoredConfiguration:
    """Everything in one read transaction, so a concurrent change is seen whole or not at all."""
    conn.execute("BEGIN")
    try:
        return StoredConfiguration(
            sets=[r[0] for r in conn.execute("SELECT name FROM configuration_sets ORDER BY name")],
            tracking=conn.execute(
                "SELECT level, scope, open_tracking, click_tracking, custom_redirect_domain, https_policy,"
                " pixel_position FROM tracking_options ORDER BY level, scope").fetchall(),
            identities=conn.execute("SELECT identity, configuration_set FROM identity_sets ORDER BY identity")
            .fetchall(),
            destinations=conn.execute(
                "SELECT configuration_set, name, enabled, event_types, kind, settings FROM event_destinations"
                " ORDER BY configuration_set, name").fetchall(),
            version=configuration_version(conn),
            suppression=set_suppression_options(conn),
        )
    finally:
        conn.execute("COMMIT")


def last_event_id(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0]


def provision_cursor(conn: sqlite3.Connection, set_name: str, destination: str, enabled: bool) -> int:
    """Create a destination's cursor at the newest event (it receives what happens from now on), or move it
    there when the destination is enabled again (a disabled destination receives nothing). Returns it."""
    row = conn.execute("SELECT last_event_id, enabled FROM destination_cursors WHERE configuration_set = ?"
                       " AND destination = ?", (set_name, destination)).fetchone()
    newest = last_event_id(conn)
    if row is None:
        conn.execute("INSERT INTO destination_cursors (configuration_set, destination, last_event_id, enabled)"
                     " VALUES (?, ?, ?, ?)", (set_name, destination, newest, int(enabled)))
        return newest
    if enabled and not row[1]:
        conn.execute("UPDATE destination_cursors SET last_event_id = ?, enabled = 1 WHERE configuration_set = ?"
                     " AND destination = ?", (newest, set_name, destination))
        return newest
    if bool(row[1]) != enabled:
        conn.execute("UPDATE destination_cursors SET enabled = ? WHERE configuration_set = ? AND destination = ?",
                     (int(enabled), set_name, destination))
    return row[0]


def save_cursor(conn: sqlite3.Connection, set_name: str, destination: str, event_id: int) -> None:
    """Advance (never move back) a destination's cursor."""
    conn.execute("UPDATE destination_cursors SET last_event_id = ? WHERE configuration_set = ? AND destination = ?"
                 " AND last_event_id < ?", (event_id, set_name, destination, event_id))


def delete_cursor(conn: sqlite3.Connection, set_name: str, destination: str | None = None) -> None:
    if destination is None:
        conn.execute("DELETE FROM destination_cursors WHERE configuration_set = ?", (set_name,))
    else:
        conn.execute("DELETE FROM destination_cursors WHERE configuration_set = ? AND destination = ?",
                     (set_name, destination))


def destination_events(conn: sqlite3.Connection, set_name: str, types: tuple[str, ...], after: int,
                       limit: int) -> list[tuple[int, str]]:
    """(id, record JSON) of a set's events of the given eventTypes after `after`, oldest first."""
    marks = ",".join("?" * len(types))
    return conn.execute(
        f"SELECT id, record FROM events WHERE configuration_set = ? AND id > ? AND type IN ({marks})"
        " ORDER BY id LIMIT ?", (set_name, after, *types, limit)).fetchall()


def record_destination_failure(conn: sqlite3.Connection, set_name: str, destination: str, event_id: int,
                               time: str, status: int | None, reason: str) -> None:
    conn.execute("INSERT INTO destination_failures (configuration_set, destination, event_id, time, status,"
                 " reason) VALUES (?, ?, ?, ?, ?, ?)", (set_name, destination, event_id, time, status, reason))


# --- suppression list (issue 9) -------------------------------------------------------------------------------------
# The account's suppression list: one row per address and reason (an address may be listed for a bounce and
# later for a complaint); addresses are stored in lower case. A message is not sent to an address listed for
# one of the reasons its configuration set applies (TrackingSettings.suppression_reasons).

SCHEMA.extend([
    """CREATE TABLE IF NOT EXISTS suppressed_destinations (
        email_address TEXT NOT NULL,
        reason TEXT NOT NULL,
        last_update_time TEXT NOT NULL,
        message_id TEXT,
        feedback_id TEXT,
        PRIMARY KEY (email_address, reason)
    )""",
    "CREATE INDEX IF NOT EXISTS suppressed_destinations_time ON suppressed_destinations (last_update_time)",
    # SES's SuppressionOptions of sets made with the CLI or the API: the reasons (comma-separated; '' = none)
    # that stop a send; no row = the account's [suppression] reasons. The file's sets have suppression_reasons.
    """CREATE TABLE IF NOT EXISTS suppression_options (
        configuration_set TEXT PRIMARY KEY,
        reasons TEXT NOT NULL
    )""",
])


def suppress(conn: sqlite3.Connection, entries: Iterable[Suppression]) -> None:
    """Add or refresh entries (a newer report for the same address and reason replaces the older one)."""
    rows = [(e.email_address.strip().lower(), e.reason, e.last_update_time, e.message_id, e.feedback_id)
            for e in entries]
    conn.executemany("DELETE FROM suppressed_destinations WHERE email_address = ? AND reason = ?",
                     [r[:2] for r in rows])
    conn.executemany("INSERT INTO suppressed_destinations (email_address, reason, last_update_time, message_id,"
                     " feedback_id) VALUES (?, ?, ?, ?, ?)", rows)


def suppressed_among(conn: sqlite3.Connection, addresses: Iterable[str], reasons: Iterable[str]) -> dict[str, str]:
    """Of `addresses`, those listed for one of `reasons`: lower-case address -> the reason listed."""
    wanted = sorted({a.strip().lower() for a in addresses})
    reasons = tuple(reasons)
    if not wanted or not reasons:
        return {}
    found: dict[str, str] = {}
    for start in range(0, len(wanted), 500):
        chunk = wanted[start:start + 500]
        sql = (f"SELECT email_address, reason FROM suppressed_destinations WHERE email_address IN"
               f" ({','.join('?' * len(chunk))}) AND reason IN ({','.join('?' * len(reasons))})")
        for address, reason in conn.execute(sql, (*chunk, *reasons)):
            found.setdefault(address, reason)
    return found


def with_suppression(work: Callable[[sqlite3.Connection], T], entries: list[Suppression]):
    """`work`, then the suppression entries its event adds, in the same transaction."""
    if not entries:
        return work

    def both(conn: sqlite3.Connection) -> T:
        value = work(conn)
        suppress(conn, entries)
        return value

    return both


def suppression_entries(conn: sqlite3.Connection, address: str | None = None, reasons: Iterable[str] = (),
                        start: str | None = None, end: str | None = None, after: tuple[str, str] | None = None,
                        limit: int | None = None) -> list[Suppression]:
    """Entries by address and reason; filtered by `reasons`, `start` <= last update < `end` (ISO times) and
    keyset-paged: entries after the (address, reason) `after`, at most `limit`."""
    sql = ("SELECT email_address, reason, last_update_time, message_id, feedback_id FROM suppressed_destinations"
           " WHERE 1 = 1")
    params: list = []
    reasons = tuple(reasons)
    for clause, value in (("email_address = ?", address and address.strip().lower()),
                          ("last_update_time >= ?", start), ("last_update_time < ?", end)):
        if value:
            sql += f" AND {clause}"
            params.append(value)
    if reasons:
        sql += f" AND reason IN ({','.join('?' * len(reasons))})"
        params += reasons
    if after:
        sql += " AND (email_address > ? OR (email_address = ? AND reason > ?))"
        params += [after[0], after[0], after[1]]
    sql += " ORDER BY email_address, reason"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    return [Suppression(*row) for row in conn.execute(sql, params)]


def unsuppress(conn: sqlite3.Connection, address: str, reasons: Iterable[str] = ()) -> int:
    """Remove an address's entries (only those of `reasons` when given); how many were removed."""
    reasons = tuple(reasons)
    sql, params = "DELETE FROM suppressed_destinations WHERE email_address = ?", [address.strip().lower()]
    if reasons:
        sql += f" AND reason IN ({','.join('?' * len(reasons))})"
        params += reasons
    return conn.execute(sql, params).rowcount


def put_set_suppression(conn: sqlite3.Connection, set_name: str, reasons: tuple[str, ...] | None) -> None:
    """A database set's suppression reasons (None: follow the account's again); running relays reload."""
    conn.execute("DELETE FROM suppression_options WHERE configuration_set = ?", (set_name,))
    if reasons is not None:
        conn.execute("INSERT INTO suppression_options (configuration_set, reasons) VALUES (?, ?)",
                     (set_name, ",".join(reasons)))
    bump_configuration_version(conn)


def set_suppression_options(conn: sqlite3.Connection) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(set, reasons) of every database set with its own suppression reasons."""
    return tuple((name, tuple(r for r in text.split(",") if r)) for name, text in conn.execute(
        "SELECT configuration_set, reasons FROM suppression_options ORDER BY configuration_set"))
# --- one-click unsubscribe (issue 9) -----------------------------------------------------------------------
# A recipient's unsubscribe (the tracking listener's one-click POST, or mail to the unsub+ address) becomes a
# Subscription event beside the message's other events, so destinations publish it like any other, and an
# UNSUBSCRIBE entry on the suppression list when the message's set applies that reason.


def record_unsubscribe(conn: sqlite3.Connection, message_id: str, recipient: str, now_ms: int,
                       source: str = "UnsubscribeHeader") -> bool:
    """Record that `recipient` of `message_id` unsubscribed (call inside a work); False when this copy's
    unsubscribe was recorded before (receivers and people repeat the POST), True when something was added.

    A message already purged (retention) has no `mail` object and no set left: no event then, but the address
    is still suppressed (for UNSUBSCRIBE) - the person's request counts more than the record of it."""
    when = ev.iso_ms(now_ms)
    row = conn.execute("SELECT mail_json, configuration_set, settings_json FROM messages WHERE id = ?",
                       (message_id,)).fetchone()
    if row is None:
        if conn.execute("SELECT 1 FROM suppressed_destinations WHERE email_address = ? AND reason = ?"
                        " AND message_id = ?", (recipient.strip().lower(), "UNSUBSCRIBE", message_id)).fetchone():
            return False
        suppress(conn, [Suppression(recipient.strip().lower(), "UNSUBSCRIBE", when, message_id)])
        return True
    if conn.execute("SELECT 1 FROM events WHERE message_id = ? AND type = ? AND recipient = ?",
                    (message_id, ev.SUBSCRIPTION, recipient)).fetchone():
        return False
    mail_json, set_name, settings_json = row
    settings = TrackingSettings.from_json(json.loads(settings_json))
    record = ev.subscription_record(json.loads(mail_json), now_ms, set_name or "", source)
    _insert_events(conn, [EventRow(ev.SUBSCRIPTION, when, message_id, recipient, set_name, record)])
    suppress(conn, entries_for(record, recipient, settings.suppression_reasons, when))
    return True
# --- inbound reports (issue 9) ------------------------------------------------------------------------------
# Every report relay's SMTP listener accepts for the bounce domain or a complaints address, as received, with
# what came of it (`kind`: the parser's verdict; `outcome`: the event recorded or why none was), so a report
# that produced no event can still be read by the operator. Kept for retention.days, like events.

SCHEMA.extend([
    """CREATE TABLE IF NOT EXISTS inbound_reports (
        id INTEGER PRIMARY KEY,
        received_at TEXT NOT NULL,
        client_ip TEXT,
        mail_from TEXT NOT NULL,
        rcpt TEXT NOT NULL,
        size INTEGER NOT NULL,
        raw BLOB NOT NULL,
        kind TEXT NOT NULL,
        outcome TEXT NOT NULL,
        message_id TEXT,
        recipient TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS inbound_reports_received ON inbound_reports (received_at)",
    "CREATE INDEX IF NOT EXISTS inbound_reports_message ON inbound_reports (message_id)",
    # A complaint without VERP is matched by the original's Message-ID header.
    "CREATE INDEX IF NOT EXISTS messages_message_id_header ON messages (message_id_header)",
])


@dataclass(frozen=True)
class InboundReportRow:
    received_at: str
    client_ip: str
    mail_from: str
    rcpt: str
    raw: bytes
    kind: str
    outcome: str
    message_id: str | None
    recipient: str | None


@dataclass(frozen=True)
class ReportedMessage:
    """What a report needs of the message it is about."""

    id: str
    mail: dict
    configuration_set: str | None
    settings: dict


def reported_message(conn: sqlite3.Connection, message_id: str) -> ReportedMessage | None:
    row = conn.execute("SELECT id, mail_json, configuration_set, settings_json FROM messages WHERE id = ?",
                       (message_id,)).fetchone()
    return ReportedMessage(row[0], json.loads(row[1]), row[2], json.loads(row[3])) if row else None


def message_by_header(conn: sqlite3.Connection, message_id_header: str) -> str | None:
    """The id of the newest message sent with this Message-ID header (with or without angle brackets)."""
    bare = message_id_header.strip().strip("<>").strip()
    if not bare:
        return None
    row = conn.execute("SELECT id FROM messages WHERE message_id_header IN (?, ?, ?) ORDER BY received_at DESC"
                       " LIMIT 1", (f"<{bare}>", bare, f" <{bare}>")).fetchone()
    return row[0] if row else None


def record_report(conn: sqlite3.Connection, report: InboundReportRow, events: list[EventRow],
                  entries: Iterable[Suppression]) -> int:
    """Store a received report with the events and suppression entries it produced; its id."""
    cur = conn.execute(
        "INSERT INTO inbound_reports (received_at, client_ip, mail_from, rcpt, size, raw, kind, outcome,"
        " message_id, recipient) VALUES (?,?,?,?,?,?,?,?,?,?)",
        (report.received_at, report.client_ip, report.mail_from, report.rcpt, len(report.raw), report.raw,
         report.kind, report.outcome, report.message_id, report.recipient))
    _insert_events(conn, events)
    suppress(conn, entries)
    return cur.lastrowid


def inbound_reports(conn: sqlite3.Connection, limit: int = 100) -> list[dict]:
    """The newest reports without their raw text, newest first (the operator's view; tests)."""
    return _dicts(conn.execute(
        "SELECT id, received_at, client_ip, mail_from, rcpt, size, kind, outcome, message_id, recipient"
        " FROM inbound_reports ORDER BY id DESC LIMIT ?", (limit,)))


def forget_inbound_reports(conn: sqlite3.Connection, addresses: tuple[str, ...]) -> int:
    """Delete the reports about these recipients (`relay forget`): they quote the address and the message."""
    marks = ",".join("?" * len(addresses))
    return conn.execute(f"DELETE FROM inbound_reports WHERE recipient IN ({marks})", addresses).rowcount


def purge_inbound_reports_chunk(conn: sqlite3.Connection, cutoff: str, chunk: int) -> tuple[int, bool]:
    """Delete up to `chunk` reports received before `cutoff`: (deleted, more)."""
    deleted = conn.execute("DELETE FROM inbound_reports WHERE id IN (SELECT id FROM inbound_reports"
                           " WHERE received_at < ? ORDER BY received_at LIMIT ?)", (cutoff, chunk)).rowcount
    return deleted, deleted == chunk


# --- inspection views ---------------------------------------------------------------------------------------
# Issue 8: the questions a sender asks, each one short query in the sqlite3 CLI (README: "Reading the
# numbers"). Days are UTC days of the event's own time (an open today of yesterday's mail counts today, as in
# SES's dashboards). "Human" opens are the verdicts human and proxy (an image proxy fetches when a person
# opens); a human click counts as an open of its copy when images were blocked. Rates are on delivered.

FUNNEL_COUNTS = ("sent", "delivered", "bounced_permanent", "bounced_transient", "delayed", "complained", "rejected",
                 "opens", "unique_opens", "human_opens", "machine_opens", "unique_human_opens", "clicks",
                 "unique_clicks", "human_clicks", "machine_clicks", "unique_human_clicks")
# The funnel of the events of `where`, per set and UTC day. Bounces are counted apart, by index seeks, so the
# pass over every event never parses a record.
FUNNEL_LIVE = """SELECT e.configuration_set AS configuration_set, substr(e.time, 1, 10) AS day,
        SUM(e.type = 'Send') AS sent,
        SUM(e.type = 'Delivery') AS delivered,
        (SELECT COUNT(*) FROM events b WHERE b.configuration_set IS e.configuration_set
         AND substr(b.time, 1, 10) = substr(e.time, 1, 10) AND b.type = 'Bounce'
         AND json_extract(b.record, '$.bounce.bounceType') = 'Permanent') AS bounced_permanent,
        SUM(e.type = 'Bounce') - (SELECT COUNT(*) FROM events b WHERE b.configuration_set IS e.configuration_set
         AND substr(b.time, 1, 10) = substr(e.time, 1, 10) AND b.type = 'Bounce'
         AND json_extract(b.record, '$.bounce.bounceType') = 'Permanent') AS bounced_transient,
        SUM(e.type = 'DeliveryDelay') AS delayed,
        SUM(e.type = 'Complaint') AS complained,
        SUM(e.type = 'Reject') AS rejected,
        SUM(e.type = 'Open') AS opens,
        COUNT(DISTINCT CASE WHEN e.type = 'Open' THEN e.message_id || ' ' || e.recipient END) AS unique_opens,
        SUM(e.type = 'Open' AND v.verdict IN ('human', 'proxy')) AS human_opens,
        SUM(e.type = 'Open' AND v.verdict = 'machine') AS machine_opens,
        COUNT(DISTINCT CASE WHEN (e.type = 'Open' AND v.verdict IN ('human', 'proxy'))
                             OR (e.type = 'Click' AND v.verdict = 'human')
                            THEN e.message_id || ' ' || e.recipient END) AS unique_human_opens,
        SUM(e.type = 'Click') AS clicks,
        COUNT(DISTINCT CASE WHEN e.type = 'Click' THEN e.message_id || ' ' || e.recipient END) AS unique_clicks,
        SUM(e.type = 'Click' AND v.verdict = 'human') AS human_clicks,
        SUM(e.type = 'Click' AND v.verdict = 'machine') AS machine_clicks,
        COUNT(DISTINCT CASE WHEN e.type = 'Click' AND v.verdict = 'human'
                            THEN e.message_id || ' ' || e.recipient END) AS unique_human_clicks
    FROM events e LEFT JOIN tracking_verdicts v ON v.event_id = e.id AND e.type IN ('Open', 'Click')
    {where}
    GROUP BY e.configuration_set, substr(e.time, 1, 10)"""

# Per link of a set: unique = distinct recipient copies that clicked it. `where` narrows it (relay stats).
LINK_CLICKS = """SELECT e.configuration_set AS configuration_set,
        json_extract(e.record, '$.click.link') AS link,
        json_extract(e.record, '$.click.linkTags') AS link_tags,
        COUNT(*) AS clicks,
        COUNT(DISTINCT e.message_id || ' ' || e.recipient) AS unique_clicks,
        SUM(v.verdict = 'human') AS human_clicks,
        COUNT(DISTINCT CASE WHEN v.verdict = 'human' THEN e.message_id || ' ' || e.recipient END)
            AS unique_human_clicks,
        MIN(e.time) AS first_click,
        MAX(e.time) AS last_click
    FROM events e LEFT JOIN tracking_verdicts v ON v.event_id = e.id
    WHERE e.type = 'Click' {where}
    GROUP BY e.configuration_set, json_extract(e.record, '$.click.link'), json_extract(e.record, '$.click.linkTags')"""

# A click that is its copy's first of that link (and tags) among the events kept: counting these per day and
# summing the days gives LINK_CLICKS's all-time unique counts, so closed days can be rolled up (link_rollup).
_EARLIER_CLICK = """SELECT 1 FROM events p WHERE p.message_id = e.message_id AND p.id < e.id AND p.type = 'Click'
         AND p.recipient IS e.recipient
         AND json_extract(p.record, '$.click.link') IS json_extract(e.record, '$.click.link')
         AND json_extract(p.record, '$.click.linkTags') IS json_extract(e.record, '$.click.linkTags')"""
# The link rows of the clicks of `where` (per set, day and link), with first-click unique counts.
LINK_DAYS = f"""SELECT e.configuration_set AS configuration_set, substr(e.time, 1, 10) AS day,
        json_extract(e.record, '$.click.link') AS link,
        json_extract(e.record, '$.click.linkTags') AS link_tags,
        COUNT(*) AS clicks,
        SUM(NOT EXISTS ({_EARLIER_CLICK})) AS unique_clicks,
        SUM(v.verdict = 'human') AS human_clicks,
        SUM(v.verdict = 'human' AND NOT EXISTS ({_EARLIER_CLICK}
            AND EXISTS (SELECT 1 FROM tracking_verdicts pv WHERE pv.event_id = p.id AND pv.verdict = 'human')))
            AS unique_human_clicks,
        MIN(e.time) AS first_click,
        MAX(e.time) AS last_click
    FROM events e LEFT JOIN tracking_verdicts v ON v.event_id = e.id
    WHERE e.type = 'Click' {{where}}
    GROUP BY e.configuration_set, substr(e.time, 1, 10), json_extract(e.record, '$.click.link'),
        json_extract(e.record, '$.click.linkTags')"""
LINK_COUNTS = ("clicks", "unique_clicks", "human_clicks", "unique_human_clicks", "first_click", "last_click")
# Rollup marks (funnel_rollup_mark.id): every day up to and including `day` is rolled up in that table.
FUNNEL_MARK, LINK_MARK = 1, 2
# The events after a mark ('' = none rolled up): '~' sorts after every time of the mark's day, so an index on
# time serves it.
_AFTER_MARK = ("e.time > (SELECT CASE WHEN day = '' THEN '' ELSE day || '~' END FROM funnel_rollup_mark"
               " WHERE id = {mark})")

# recipient_engagement's columns (before bounce_state): name, SQL type, the aggregate over the events `e` (with
# their verdicts `v`) of one address, and how a later part (x) and an earlier one (y) combine.
_HUMAN_ENGAGED = ("e.type IN ('Open', 'Click') AND v.verdict IN ('human', 'proxy')"
                  " AND NOT (e.type = 'Click' AND v.verdict = 'proxy')")
_LATER = "COALESCE(max({x}, {y}), {x}, {y})"  # max() of SQLite is NULL when either is: the other then
_SUMMED = "{x} + {y}"
RECIPIENT_PARTS = (
    ("delivered", "INTEGER NOT NULL", "SUM(e.type = 'Delivery')", _SUMMED),
    ("last_delivered", "TEXT", "MAX(CASE WHEN e.type = 'Delivery' THEN e.time END)", _LATER),
    ("opens", "INTEGER NOT NULL", "SUM(e.type = 'Open')", _SUMMED),
    ("human_opens", "INTEGER NOT NULL", "SUM(e.type = 'Open' AND v.verdict IN ('human', 'proxy'))", _SUMMED),
    ("clicks", "INTEGER NOT NULL", "SUM(e.type = 'Click')", _SUMMED),
    ("human_clicks", "INTEGER NOT NULL", "SUM(e.type = 'Click' AND v.verdict = 'human')", _SUMMED),
    ("last_engaged", "TEXT", "MAX(CASE WHEN e.type IN ('Open', 'Click') THEN e.time END)", _LATER),
    ("last_human_engaged", "TEXT", f"MAX(CASE WHEN {_HUMAN_ENGAGED} THEN e.time END)", _LATER),
    ("last_bounce", "TEXT", "MAX(CASE WHEN e.type = 'Bounce' THEN e.time END)", _LATER),
    # the type of the latest bounce among the events summed
    ("bounce_type", "TEXT", "CASE WHEN MAX(e.type = 'Bounce') THEN (SELECT json_extract(b.record,"
     " '$.bounce.bounceType') FROM events b WHERE b.recipient = e.recipient AND b.type = 'Bounce' AND {range}"
     " ORDER BY b.time DESC LIMIT 1) END", None),
    ("complaints", "INTEGER NOT NULL", "SUM(e.type = 'Complaint')", _SUMMED),
)
RECIPIENT_COLUMNS = [(c, t) for c, t, _agg, _merge in RECIPIENT_PARTS]
RECIPIENT_EMPTY = ["NULL" if "NULL" not in t else "0" for _c, t in RECIPIENT_COLUMNS]
_RECIPIENT_MARK = "(SELECT last_event_id FROM recipient_rollup_mark WHERE id = 1)"
# The rows of recipient_rollup for the events of `where` (`range` narrows the bounce subquery alike).
RECIPIENT_ROWS = f"""SELECT e.recipient, {", ".join(agg for _c, _t, agg, _m in RECIPIENT_PARTS)}
    FROM events e LEFT JOIN tracking_verdicts v ON v.event_id = e.id AND e.type IN ('Open', 'Click')
    WHERE e.recipient IS NOT NULL AND {{where}}
    GROUP BY e.recipient"""


# The event types each column reads, so a seek for the events after the mark reads no others.
_TYPES = {"delivered": "'Delivery'", "last_delivered": "'Delivery'", "opens": "'Open'", "human_opens": "'Open'",
          "clicks": "'Click'", "human_clicks": "'Click'", "last_engaged": "'Open', 'Click'",
          "last_human_engaged": "'Open', 'Click'", "last_bounce": "'Bounce'", "bounce_type": "'Bounce'",
          "complaints": "'Complaint'"}


def _part(column: str, recipient: str, events: str) -> str:
    """One column over an address's events of condition `events` (on `e`), by seeks on events_recipient_time."""
    agg = next(a for c, _t, a, _m in RECIPIENT_PARTS if c == column)
    joined = "LEFT JOIN tracking_verdicts v ON v.event_id = e.id" if "v." in agg else ""
    return (f"(SELECT {agg.format(range=events.replace('e.', 'b.'))} FROM events e {joined}"
            f" WHERE e.recipient = {recipient} AND e.type IN ({_TYPES[column]}) AND {events})")


def _live(column: str) -> str:
    """One column of an address's events after the mark."""
    return _part(column, "a.recipient", f"e.id > {_RECIPIENT_MARK}")


def _merged(column: str, live: str, base: dict[str, str]) -> str:
    """A column of recipient_engagement: the rolled-up part `base` with, when `live` (an address with events
    after the mark), the events after the mark."""
    merge = next(m for c, _t, _a, m in RECIPIENT_PARTS if c == column)
    if merge is None:  # bounce_type: the live part's latest bounce when it is the later one
        return (f"CASE WHEN {live} AND {_live('last_bounce')} >= COALESCE({base['last_bounce']}, '')"
                f" THEN {_live(column)} ELSE {base['bounce_type']} END")
    later = merge.format(x=base[column], y=f"COALESCE({_live(column)}, {'0' if merge == _SUMMED else 'NULL'})")
    return f"CASE WHEN {live} THEN {later} ELSE {base[column]} END"


def _engagement(source: str, live: str, base: dict[str, str]) -> str:
    """recipient_engagement's columns over `source` (addresses as `a.recipient`)."""
    merged = {c: _merged(c, live, base) for c, _t in RECIPIENT_COLUMNS}
    # the latest bounce's type when no delivery came after it: the address bounces now
    merged["bounce_state"] = (f"CASE WHEN {merged['last_bounce']} >= COALESCE({merged['last_delivered']}, '')"
                              f" THEN {merged['bounce_type']} END")
    names = [c for c, _t in RECIPIENT_COLUMNS if c != "bounce_type"]
    names.insert(names.index("complaints"), "bounce_state")
    return f"SELECT a.recipient AS recipient, {', '.join(f'{merged[c]} AS {c}' for c in names)} FROM {source}"


# Two parts, each computing its own columns, so a query on the view computes only the columns it names:
# the addresses of recipient_rollup, and the addresses whose events all came after the mark (by the first).
RECIPIENT_ENGAGEMENT = f"WITH live AS (SELECT recipient FROM events WHERE id > {_RECIPIENT_MARK})\n" + _engagement(
    "recipient_rollup a LEFT JOIN (SELECT DISTINCT recipient FROM live) l ON l.recipient = a.recipient",
    "l.recipient IS NOT NULL",
    {c: f"a.{c}" for c, _t in RECIPIENT_COLUMNS}) + "\nUNION ALL\n" + _engagement(
    "(SELECT DISTINCT recipient FROM live) a WHERE a.recipient IS NOT NULL"
    " AND NOT EXISTS (SELECT 1 FROM recipient_rollup r WHERE r.recipient = a.recipient)",
    "1", dict(zip([c for c, _t in RECIPIENT_COLUMNS], RECIPIENT_EMPTY, strict=True)))

SCHEMA.extend([
    # The funnel's typical query names a set and a range of days: this index serves both.
    "CREATE INDEX IF NOT EXISTS events_set_day ON events (configuration_set, substr(time, 1, 10), type)",
    # Per-recipient MAX(time) per type without reading the events themselves.
    "CREATE INDEX IF NOT EXISTS events_recipient_time ON events (recipient, type, time)",
    # A set's clicks (link_clicks) without visiting its other events; partial, so only clicks pay for it.
    "CREATE INDEX IF NOT EXISTS events_click_set_time ON events (configuration_set, time) WHERE type = 'Click'",
    # Closed days of the funnel, computed once (funnel_day_rows, store_rollup_day) with the live query below: a
    # day's numbers never change once it is over (events are dated when they happen). configuration_set '' = none.
    f"""CREATE TABLE IF NOT EXISTS funnel_rollup (
        configuration_set TEXT NOT NULL,
        day TEXT NOT NULL,
        {", ".join(f"{c} INTEGER NOT NULL" for c in FUNNEL_COUNTS)},
        PRIMARY KEY (configuration_set, day)
    )""",
    # Every day up to and including `day` is in funnel_rollup; later days are computed from the events.
    "CREATE TABLE IF NOT EXISTS funnel_rollup_mark (id INTEGER PRIMARY KEY, day TEXT NOT NULL)",
    "INSERT INTO funnel_rollup_mark (id, day) SELECT 1, '' WHERE NOT EXISTS (SELECT 1 FROM funnel_rollup_mark)",
    "CREATE VIEW IF NOT EXISTS funnel_live AS " + FUNNEL_LIVE.format(
        where="WHERE substr(e.time, 1, 10) > (SELECT day FROM funnel_rollup_mark WHERE id = 1)"),
    f"""CREATE VIEW IF NOT EXISTS funnel_daily AS
    SELECT configuration_set, day, {", ".join(FUNNEL_COUNTS)},
        CASE WHEN delivered > 0 THEN ROUND(1.0 * unique_opens / delivered, 4) END AS open_rate,
        CASE WHEN delivered > 0 THEN ROUND(1.0 * unique_human_opens / delivered, 4) END AS human_open_rate,
        CASE WHEN delivered > 0 THEN ROUND(1.0 * unique_clicks / delivered, 4) END AS click_rate,
        CASE WHEN delivered > 0 THEN ROUND(1.0 * unique_human_clicks / delivered, 4) END AS human_click_rate
    FROM (SELECT NULLIF(configuration_set, '') AS configuration_set, day, {", ".join(FUNNEL_COUNTS)}
          FROM funnel_rollup WHERE day <= (SELECT day FROM funnel_rollup_mark WHERE id = 1)
          UNION ALL SELECT * FROM funnel_live)""",
    # Closed days of link_clicks (link_day_rows, store_rollup_day); '' = no set. Unique counts are first clicks.
    """CREATE TABLE IF NOT EXISTS link_rollup (
        configuration_set TEXT NOT NULL,
        day TEXT NOT NULL,
        link TEXT,
        link_tags TEXT,
        clicks INTEGER NOT NULL,
        unique_clicks INTEGER NOT NULL,
        human_clicks INTEGER,
        unique_human_clicks INTEGER,
        first_click TEXT NOT NULL,
        last_click TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS link_rollup_set_day ON link_rollup (configuration_set, day)",
    f"INSERT INTO funnel_rollup_mark (id, day) SELECT {LINK_MARK}, '' WHERE NOT EXISTS"
    f" (SELECT 1 FROM funnel_rollup_mark WHERE id = {LINK_MARK})",
    f"""CREATE VIEW IF NOT EXISTS link_clicks AS
    SELECT configuration_set, link, link_tags, SUM(clicks) AS clicks, SUM(unique_clicks) AS unique_clicks,
        SUM(human_clicks) AS human_clicks, SUM(unique_human_clicks) AS unique_human_clicks,
        MIN(first_click) AS first_click, MAX(last_click) AS last_click
    FROM (SELECT NULLIF(configuration_set, '') AS configuration_set, link, link_tags, {", ".join(LINK_COUNTS)}
          FROM link_rollup WHERE day <= (SELECT day FROM funnel_rollup_mark WHERE id = {LINK_MARK})
          UNION ALL SELECT configuration_set, link, link_tags, {", ".join(LINK_COUNTS)} FROM ({LINK_DAYS.format(
              where="AND " + _AFTER_MARK.format(mark=LINK_MARK))}))
    GROUP BY configuration_set, link, link_tags""",
    # Per recipient address: SES's "narrow a list to its engaged recipients". The events up to a mark (an event
    # id) are summed up in recipient_rollup, one row per address (rolled up hourly, recomputed for the addresses
    # a purge touches, deleted by `relay forget`); the events after it are read live by index seeks, only for
    # the addresses that have any, so the whole list costs one pass over recipient_rollup.
    f"""CREATE TABLE IF NOT EXISTS recipient_rollup (
        recipient TEXT PRIMARY KEY,
        {", ".join(f"{c} {t}" for c, t in RECIPIENT_COLUMNS)}
    )""",
    "CREATE TABLE IF NOT EXISTS recipient_rollup_mark (id INTEGER PRIMARY KEY, last_event_id INTEGER NOT NULL)",
    "INSERT INTO recipient_rollup_mark (id, last_event_id) SELECT 1, 0"
    " WHERE NOT EXISTS (SELECT 1 FROM recipient_rollup_mark)",
    "CREATE VIEW IF NOT EXISTS recipient_engagement AS " + RECIPIENT_ENGAGEMENT,
    # Every event of a message in order, with the listener's verdict of opens and clicks.
    """CREATE VIEW IF NOT EXISTS message_timeline AS
    SELECT e.message_id, e.id AS event_id, e.time, e.type, e.recipient, e.configuration_set,
        COALESCE(json_extract(e.record, '$.click.link'), json_extract(e.record, '$.bounce.bounceType'),
                 json_extract(e.record, '$.deliveryDelay.delayType'),
                 json_extract(e.record, '$.delivery.smtpResponse')) AS detail,
        COALESCE(json_extract(e.record, '$.open.ipAddress'), json_extract(e.record, '$.click.ipAddress')) AS ip,
        COALESCE(json_extract(e.record, '$.open.userAgent'), json_extract(e.record, '$.click.userAgent'))
            AS user_agent,
        v.verdict, v.reasons, v.device
    FROM events e LEFT JOIN tracking_verdicts v ON v.event_id = e.id""",
])


def _funnel_where(set_name: str | None) -> str:
    return "configuration_set IS NULL" if set_name is None else "configuration_set = ?"


def funnel_rows(conn: sqlite3.Connection, set_name: str | None, since_day: str) -> list[dict]:
    """funnel_daily of one set (None: mail sent without a set) from `since_day` (YYYY-MM-DD) on, by day."""
    params = ([] if set_name is None else [set_name]) + [since_day]
    cur = conn.execute(f"SELECT * FROM funnel_daily WHERE {_funnel_where(set_name)} AND day >= ? ORDER BY day",
                       params)
    return _dicts(cur)


def sets_with_events(conn: sqlite3.Connection) -> list[str | None]:
    """Every configuration_set value of the events (None last: mail sent without a set)."""
    return _event_sets(conn)


def link_rows(conn: sqlite3.Connection, set_name: str | None, since: str) -> list[dict]:
    """link_clicks of one set, counting only clicks at or after `since` (an ISO time), most clicked first."""
    where = "AND e.time >= ? AND " + ("e.configuration_set IS NULL" if set_name is None else "e.configuration_set = ?")
    params = [since] + ([] if set_name is None else [set_name])
    return _dicts(conn.execute(LINK_CLICKS.format(where=where) + " ORDER BY clicks DESC, link", params))


def recipient_rows(conn: sqlite3.Connection, since: str, limit: int) -> list[dict]:
    """recipient_engagement of the addresses delivered to, engaged or bounced since `since`, latest engaged
    first."""
    return _dicts(conn.execute(
        "SELECT * FROM recipient_engagement WHERE last_engaged >= ? OR last_delivered >= ? OR last_bounce >= ?"
        " ORDER BY last_engaged IS NULL, last_engaged DESC, recipient LIMIT ?", (since, since, since, limit)))


def events_after(conn: sqlite3.Connection, after_id: int, types: tuple[str, ...], set_name: str | None,
                 limit: int) -> list[tuple]:
    """(id, type, time, message_id, recipient, configuration_set, record JSON) with id > after_id."""
    sql = "SELECT id, type, time, message_id, recipient, configuration_set, record FROM events WHERE id > ?"
    params: list = [after_id]
    if types:
        sql += f" AND type IN ({','.join('?' * len(types))})"
        params += types
    if set_name is not None:
        sql += " AND configuration_set = ?"
        params.append(set_name)
    return conn.execute(sql + " ORDER BY id LIMIT ?", [*params, limit]).fetchall()


def _dicts(cur: sqlite3.Cursor) -> list[dict]:
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


# Metrics: cheap indexed reads at scrape time. Counters are kept by tailing the tables by id from where the
# previous scrape stopped, so each scrape reads only what is new, and events written by `relay track`
# workers (other processes) are counted too.

def queue_by_set(conn: sqlite3.Connection) -> list[tuple[str | None, int, str | None]]:
    """(configuration set, queued copies, oldest acceptance time) of the delivery queue."""
    return conn.execute(
        "SELECT m.configuration_set, COUNT(*), MIN(m.received_at) FROM recipients r"
        " JOIN messages m ON m.id = r.message_id WHERE r.state = 'queued' GROUP BY m.configuration_set").fetchall()


def outbox_by_destination(conn: sqlite3.Connection) -> list[tuple[str, str, int]]:
    """(set, destination, events of the set beyond the destination's cursor) of enabled destinations."""
    return conn.execute(
        "SELECT c.configuration_set, c.destination, (SELECT COUNT(*) FROM events e"
        " WHERE e.configuration_set = c.configuration_set AND e.id > c.last_event_id)"
        " FROM destination_cursors c WHERE c.enabled = 1").fetchall()


def high_water(conn: sqlite3.Connection) -> tuple[int, int, int]:
    """The newest events.id, messages rowid and message_warnings rowid."""
    return conn.execute("SELECT (SELECT COALESCE(MAX(id), 0) FROM events), (SELECT COALESCE(MAX(rowid), 0)"
                        " FROM messages), (SELECT COALESCE(MAX(rowid), 0) FROM message_warnings)").fetchone()


def counts_after(conn: sqlite3.Connection, marks: tuple[int, int, int], limit: int = 200_000) -> tuple[dict, tuple]:
    """Counts of what was written after `marks` (see high_water), and the new marks. Keys:
    ("event", set, type, detail) where detail is the bounce type or the verdict of an open/click,
    ("message", set) and ("warning", set, stage)."""
    counts: dict[tuple, int] = {}
    ev_mark, msg_mark, warn_mark = marks
    top = ev_mark
    for set_name, kind, detail, n, last in conn.execute(
            "SELECT e.configuration_set, e.type, CASE WHEN e.type = 'Bounce' THEN json_extract(e.record,"
            " '$.bounce.bounceType') WHEN e.type IN ('Open', 'Click') THEN (SELECT v.verdict FROM tracking_verdicts v"
            " WHERE v.event_id = e.id) END, COUNT(*), MAX(e.id) FROM (SELECT * FROM events WHERE id > ? ORDER BY id"
            " LIMIT ?) e GROUP BY 1, 2, 3", (ev_mark, limit)):
        counts[("event", set_name, kind, detail)] = n
        top = max(top, last)
    msg_top = msg_mark
    for set_name, n, last in conn.execute(
            "SELECT configuration_set, COUNT(*), MAX(rowid) FROM messages WHERE rowid > ? GROUP BY 1", (msg_mark,)):
        counts[("message", set_name)] = n
        msg_top = max(msg_top, last)
    warn_top = warn_mark
    for set_name, stage, n, last in conn.execute(
            "SELECT m.configuration_set, w.stage, COUNT(*), MAX(w.rowid) FROM message_warnings w"
            " LEFT JOIN messages m ON m.id = w.message_id WHERE w.rowid > ? GROUP BY 1, 2", (warn_mark,)):
        counts[("warning", set_name, stage)] = n
        warn_top = max(warn_top, last)
    return counts, (top, msg_top, warn_top)


# Retention. Event ids follow time (an event is written when it happens), so old events are the lowest ids:
# purging walks them in small chunks from the bottom, each chunk its own store work, so SMTP acceptance and
# tracking writes are never held behind one long DELETE.

def purge_events_chunk(conn: sqlite3.Connection, cutoff: str, chunk: int) -> tuple[int, bool]:
    """Delete events (and their verdicts) older than `cutoff` among the `chunk` lowest ids: (deleted, more)."""
    row = conn.execute("SELECT MIN(id) FROM events").fetchone()
    if row[0] is None:
        return 0, False
    lo, hi = row[0], row[0] + chunk - 1
    old = "SELECT id FROM events WHERE id BETWEEN ? AND ? AND time < ?"
    mark = recipient_mark(conn)
    rolled = conn.execute(RECIPIENT_ROWS.format(where=f"e.id IN ({old}) AND e.id <= {mark}", range="0"),
                          (lo, hi, cutoff)).fetchall()
    conn.execute(f"DELETE FROM tracking_verdicts WHERE event_id IN ({old})", (lo, hi, cutoff))
    deleted = conn.execute(f"DELETE FROM events WHERE id IN ({old})", (lo, hi, cutoff)).rowcount
    _unroll_recipients(conn, rolled, cutoff, mark)
    # a newer event in the chunk means the old ones are behind us (ids follow time)
    return deleted, deleted > 0 and conn.execute("SELECT COUNT(*) FROM events WHERE id BETWEEN ? AND ?",
                                                 (lo, hi)).fetchone()[0] == 0


def purge_messages_chunk(conn: sqlite3.Connection, cutoff: str, chunk: int) -> tuple[int, bool]:
    """Delete up to `chunk` message records accepted before `cutoff` with no copy still queued, with their
    recipients, warnings and spool: (deleted, more)."""
    ids = [r[0] for r in conn.execute(
        "SELECT id FROM messages m WHERE received_at < ? AND NOT EXISTS (SELECT 1 FROM recipients r"
        " WHERE r.message_id = m.id AND r.state = 'queued') ORDER BY received_at LIMIT ?", (cutoff, chunk))]
    for table, column in (("recipients", "message_id"), ("message_warnings", "message_id"),
                          ("spool", "message_id"), ("messages", "id")):
        conn.executemany(f"DELETE FROM {table} WHERE {column} = ?", [(i,) for i in ids])
    return len(ids), len(ids) == chunk


def forget_address(conn: sqlite3.Connection, addresses: tuple[str, ...],
                   redact: Callable[[str], str]) -> dict[str, int]:
    """Delete a recipient's personal data in the caller's transaction: recipients rows, events with that
    recipient and their verdicts, warnings; `redact(json)` rewrites the mail objects of messages it received
    (stored message records and other recipients' events). Counts of what changed."""
    marks = ",".join("?" * len(addresses))
    messages = [r[0] for r in conn.execute(
        f"SELECT DISTINCT message_id FROM recipients WHERE recipient IN ({marks}) UNION"
        f" SELECT DISTINCT message_id FROM events WHERE recipient IN ({marks})", addresses * 2)]
    out = {"verdicts": conn.execute(
        f"DELETE FROM tracking_verdicts WHERE event_id IN (SELECT id FROM events WHERE recipient IN ({marks}))",
        addresses).rowcount}
    out["events"] = conn.execute(f"DELETE FROM events WHERE recipient IN ({marks})", addresses).rowcount
    out["recipients"] = conn.execute(f"DELETE FROM recipients WHERE recipient IN ({marks})", addresses).rowcount
    out["warnings"] = conn.execute(f"DELETE FROM message_warnings WHERE recipient IN ({marks})", addresses).rowcount
    out["inbound_reports"] = forget_inbound_reports(conn, addresses)  # issue 9
    conn.execute(f"DELETE FROM recipient_rollup WHERE recipient IN ({marks})", addresses)
    _lower_recipient_mark(conn)
    out["messages"] = out["other_events"] = 0
    for message_id in messages:
        for mail_json, in conn.execute("SELECT mail_json FROM messages WHERE id = ?", (message_id,)).fetchall():
            new = redact(mail_json)
            if new != mail_json:
                conn.execute("UPDATE messages SET mail_json = ? WHERE id = ?", (new, message_id))
                out["messages"] += 1
        for event_id, record in conn.execute("SELECT id, record FROM events WHERE message_id = ?",
                                             (message_id,)).fetchall():
            new = redact(record)
            if new != record:
                conn.execute("UPDATE events SET record = ? WHERE id = ?", (new, event_id))
                out["other_events"] += 1
    # refused messages have no recipient rows: their Reject events name the address only in `mail`
    for event_id, record in conn.execute("SELECT id, record FROM events WHERE type = 'Reject'").fetchall():
        new = redact(record)
        if new != record:
            conn.execute("UPDATE events SET record = ? WHERE id = ?", (new, event_id))
            out["other_events"] += 1
    return out


def _event_sets(conn: sqlite3.Connection) -> list[str | None]:
    """Every configuration_set value of the events, by seeks on the index (a loose index scan), NULL last."""
    out: list[str | None] = []
    row = conn.execute("SELECT MIN(configuration_set) FROM events").fetchone()
    while row is not None and row[0] is not None:
        out.append(row[0])
        row = conn.execute("SELECT configuration_set FROM events WHERE configuration_set > ?"
                           " ORDER BY configuration_set LIMIT 1", (row[0],)).fetchone()
    if conn.execute("SELECT 1 FROM events WHERE configuration_set IS NULL LIMIT 1").fetchone():
        out.append(None)
    return out


def next_rollup_day(conn: sqlite3.Connection, first_open_day: str,
                    mark_id: int = FUNNEL_MARK) -> tuple[str, str] | None:
    """(current mark, the next day with events after it) when that day is before `first_open_day` (YYYY-MM-DD;
    events may still arrive from then on) and so can be rolled up; None when the rollup is up to date. Days
    without events are passed over (a database with a few old events does not roll up every day since)."""
    mark = conn.execute("SELECT day FROM funnel_rollup_mark WHERE id = ?", (mark_id,)).fetchone()[0]
    since = (date.fromisoformat(mark) + timedelta(days=1)).isoformat() if mark else ""
    # the oldest time of each type from `since` on, by seeks on events_type_time
    types = [r[0] for r in conn.execute("SELECT type FROM events WHERE type > ? ORDER BY type LIMIT 1", ("",))]
    while types and types[-1] is not None:
        row = conn.execute("SELECT type FROM events WHERE type > ? ORDER BY type LIMIT 1", (types[-1],)).fetchone()
        types.append(row[0] if row else None)
    times = [conn.execute("SELECT MIN(time) FROM events WHERE type = ? AND time >= ?", (t, since)).fetchone()[0]
             for t in types if t]
    times = [t for t in times if t is not None]
    if not times:
        return None
    day = min(times)[:10]
    return (mark, day) if day < first_open_day else None


def _per_set(conn: sqlite3.Connection, template: str, where: str, params: list, columns: str) -> list[tuple]:
    """`template` (FUNNEL_LIVE, LINK_DAYS) run once per set ('' for no set), so each run seeks the set's index."""
    rows = []
    for set_name in _event_sets(conn):
        narrowed = ("e.configuration_set IS NULL" if set_name is None else "e.configuration_set = ?") + where
        sql = template.format(where=("WHERE " if template is FUNNEL_LIVE else "AND ") + narrowed)
        rows += conn.execute(f"SELECT COALESCE(configuration_set, ''), day, {columns} FROM ({sql})",
                             ([] if set_name is None else [set_name]) + params).fetchall()
    return rows


def funnel_day_rows(conn: sqlite3.Connection, day: str) -> list[tuple]:
    """The funnel rows of one closed day, one per set ('' for no set), as funnel_rollup stores them. A read:
    run it on a reader connection, so the writer (and SMTP acceptance behind it) never waits for it."""
    return _per_set(conn, FUNNEL_LIVE, " AND substr(e.time, 1, 10) = ?", [day], ", ".join(FUNNEL_COUNTS))


def link_day_rows(conn: sqlite3.Connection, day: str) -> list[tuple]:
    """The link_clicks rows of one closed day, per set ('' for no set) and link, as link_rollup stores them."""
    return _per_set(conn, LINK_DAYS, " AND e.time >= ? AND e.time < ?", [day, day + "~"],
                    "link, link_tags, " + ", ".join(LINK_COUNTS))


# The rollups: mark id, the table and its columns, and the rows of one closed day.
ROLLUPS: dict[int, tuple[str, tuple[str, ...], Callable[[sqlite3.Connection, str], list[tuple]]]] = {
    FUNNEL_MARK: ("funnel_rollup", ("configuration_set", "day") + FUNNEL_COUNTS, funnel_day_rows),
    LINK_MARK: ("link_rollup", ("configuration_set", "day", "link", "link_tags") + LINK_COUNTS, link_day_rows),
}


def store_rollup_day(conn: sqlite3.Connection, mark_id: int, mark: str, day: str, rows: list[tuple]) -> bool:
    """Store a day's rows and move the mark to it, unless another process moved the mark meanwhile."""
    if conn.execute("SELECT day FROM funnel_rollup_mark WHERE id = ?", (mark_id,)).fetchone()[0] != mark:
        return False
    table, columns, _rows = ROLLUPS[mark_id]
    conn.execute(f"DELETE FROM {table} WHERE day = ?", (day,))
    conn.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({','.join('?' * len(columns))})", rows)
    conn.execute("UPDATE funnel_rollup_mark SET day = ? WHERE id = ?", (day, mark_id))
    return True


# recipient_rollup: the events up to recipient_rollup_mark, summed per address (see recipient_engagement).

def recipient_mark(conn: sqlite3.Connection) -> int:
    return conn.execute(f"SELECT {_RECIPIENT_MARK}").fetchone()[0]


def settled_event_id(conn: sqlite3.Connection, cutoff: str, scan: int = 200_000) -> int:
    """The newest event id older than `cutoff` (an ISO time), looking back from the newest event: the events
    after it may still change (a click's verdict is re-judged when the next clicks of its burst arrive)."""
    top = 0
    for event_id, time in conn.execute("SELECT id, time FROM events ORDER BY id DESC LIMIT ?", (scan,)):
        top = event_id - 1
        if time < cutoff:
            return event_id
    return top


_RECIPIENT_UPSERT = ", ".join(
    f"{c} = " + ("CASE WHEN excluded.last_bounce >= COALESCE(recipient_rollup.last_bounce, '')"
                 " THEN excluded.bounce_type ELSE recipient_rollup.bounce_type END" if m is None
                 else m.format(x=f"recipient_rollup.{c}", y=f"excluded.{c}"))
    for c, _t, _a, m in RECIPIENT_PARTS)


def roll_recipients(conn: sqlite3.Connection, mark: int, top: int) -> bool:
    """Add the events after `mark` up to `top` (ids) to recipient_rollup and move the mark to `top`, unless
    another process moved the mark meanwhile. In the writer: a purge or `relay forget` never interleaves."""
    if recipient_mark(conn) != mark:
        return False
    rows = RECIPIENT_ROWS.format(where="e.id > :lo AND e.id <= :hi", range="b.id > :lo AND b.id <= :hi")
    conn.execute(f"INSERT INTO recipient_rollup SELECT * FROM ({rows}) WHERE true"
                 f" ON CONFLICT (recipient) DO UPDATE SET {_RECIPIENT_UPSERT}", {"lo": mark, "hi": top})
    conn.execute("UPDATE recipient_rollup_mark SET last_event_id = ? WHERE id = 1", (top,))
    return True


def _unroll_recipients(conn: sqlite3.Connection, deleted: list[tuple], cutoff: str, mark: int) -> None:
    """Take deleted events out of recipient_rollup: `deleted` are their RECIPIENT_ROWS (events up to `mark`
    only), all older than `cutoff`. Counts are subtracted; a latest time older than `cutoff` may have been
    deleted, so it is sought again among the remaining events; an address with none left loses its row."""
    counted = [c for c, _t, _a, m in RECIPIENT_PARTS if m == _SUMMED]
    index = {c: i + 1 for i, (c, _t, _a, _m) in enumerate(RECIPIENT_PARTS)}
    conn.executemany(f"UPDATE recipient_rollup SET {', '.join(f'{c} = {c} - ?' for c in counted)}"
                     " WHERE recipient = ?", [[row[index[c]] for c in counted] + [row[0]] for row in deleted])
    remaining = {c: _part(c, "recipient_rollup.recipient", f"e.id <= {mark}") for c, _t in RECIPIENT_COLUMNS}
    sought = [c for c, _t, _a, m in RECIPIENT_PARTS if m == _LATER]
    fixes = [f"{c} = CASE WHEN {c} < :cutoff THEN {remaining[c]} ELSE {c} END" for c in sought]
    fixes.append(f"bounce_type = CASE WHEN last_bounce < :cutoff THEN {remaining['bounce_type']} ELSE bounce_type END")
    conn.executemany(f"UPDATE recipient_rollup SET {', '.join(fixes)} WHERE recipient = :recipient",
                     [{"cutoff": cutoff, "recipient": row[0]} for row in deleted])
    conn.executemany("DELETE FROM recipient_rollup WHERE recipient = ? AND NOT EXISTS (SELECT 1 FROM events e"
                     " WHERE e.recipient = ? AND e.id <= ?)", [(row[0], row[0], mark) for row in deleted])
    _lower_recipient_mark(conn)


def _lower_recipient_mark(conn: sqlite3.Connection) -> None:
    """After the newest events were deleted, their ids are given again: the mark must not cover them."""
    conn.execute("UPDATE recipient_rollup_mark SET last_event_id = (SELECT COALESCE(MAX(id), 0) FROM events)"
                 " WHERE last_event_id > (SELECT COALESCE(MAX(id), 0) FROM events)")


# recipient_engagement as it was before recipient_rollup, every address's events by index seeks (about 1 s for
# the whole list of 200k addresses and 10M events): the benchmark's baseline and the tests' oracle.
RECIPIENTS_BY_SEEKS = """SELECT a.recipient AS recipient,
    (SELECT COUNT(*) FROM events e WHERE e.recipient = a.recipient AND e.type = 'Delivery') AS delivered,
    (SELECT MAX(time) FROM events e WHERE e.recipient = a.recipient AND e.type = 'Delivery') AS last_delivered,
    (SELECT COUNT(*) FROM events e WHERE e.recipient = a.recipient AND e.type = 'Open') AS opens,
    (SELECT COUNT(*) FROM events e JOIN tracking_verdicts v ON v.event_id = e.id
     WHERE e.recipient = a.recipient AND e.type = 'Open' AND v.verdict IN ('human', 'proxy')) AS human_opens,
    (SELECT COUNT(*) FROM events e WHERE e.recipient = a.recipient AND e.type = 'Click') AS clicks,
    (SELECT COUNT(*) FROM events e JOIN tracking_verdicts v ON v.event_id = e.id
     WHERE e.recipient = a.recipient AND e.type = 'Click' AND v.verdict = 'human') AS human_clicks,
    (SELECT MAX(time) FROM events e WHERE e.recipient = a.recipient AND e.type IN ('Open', 'Click')) AS last_engaged,
    (SELECT MAX(e.time) FROM events e JOIN tracking_verdicts v ON v.event_id = e.id
     WHERE e.recipient = a.recipient AND e.type IN ('Open', 'Click')
       AND v.verdict IN ('human', 'proxy') AND NOT (e.type = 'Click' AND v.verdict = 'proxy')) AS last_human_engaged,
    (SELECT MAX(time) FROM events e WHERE e.recipient = a.recipient AND e.type = 'Bounce') AS last_bounce,
    (SELECT CASE WHEN b.time >= COALESCE((SELECT MAX(d.time) FROM events d WHERE d.recipient = a.recipient
                                            AND d.type = 'Delivery'), '')
                 THEN json_extract(b.record, '$.bounce.bounceType') END
     FROM events b WHERE b.recipient = a.recipient AND b.type = 'Bounce' ORDER BY b.time DESC LIMIT 1) AS bounce_state,
    (SELECT COUNT(*) FROM events e WHERE e.recipient = a.recipient AND e.type = 'Complaint') AS complaints
FROM (SELECT DISTINCT recipient FROM events WHERE recipient IS NOT NULL) a"""
