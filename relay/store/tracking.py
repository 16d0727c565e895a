"""The tracking listener's helpers: Open/Click events written in batches, each with a machine verdict row
beside it (never a change to the event), and the tracking domains proved to reach the listener. The
helpers take a connection: the writer's inside a work, or a reader's through Store.read."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass


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


def tracking_mail(conn, message_id: str) -> tuple[str, str | None] | None:
    """The stored `mail` object as its JSON text (spliced into records unparsed) and the configuration set."""
    row = conn.execute("SELECT mail_json, configuration_set FROM messages WHERE id = ?", (message_id,)).fetchone()
    return (row[0], row[1]) if row else None


_ROWS_PER_STATEMENT = 100  # 6-8 parameters a row: well under SQLite's 999-parameter floor


def _insert_rows(conn, head: str, width: int, rows: list[tuple], tail: str = "") -> list[int]:
    """INSERT many rows with multi-row VALUES statements. executemany runs (and releases the GIL for) one
    statement per row; the event loop then waits for the GIL after every socket call. One statement per
    hundred rows keeps the writer thread out of its way. With a RETURNING `tail`: the first column returned,
    row by row."""
    one = "(" + ",".join("?" * width) + ")"
    returned: list[int] = []
    for start in range(0, len(rows), _ROWS_PER_STATEMENT):
        chunk = rows[start:start + _ROWS_PER_STATEMENT]
        cur = conn.execute(f"{head} VALUES {','.join([one] * len(chunk))} {tail}", [v for row in chunk for v in row])
        if "RETURNING" in tail:
            returned += [r[0] for r in cur.fetchall()]
    return returned


def insert_events_json(conn, rows: list[tuple]) -> Sequence[int]:
    """Insert events given as (type, time, message_id, recipient, configuration_set, record JSON); their ids,
    in the order of `rows`.

    PostgreSQL returns them (RETURNING). Without AUTOINCREMENT SQLite gives each new row max(id) + 1, so inside
    our write transaction the ids are consecutive: checked here, not assumed.
    """
    if not rows:
        return range(0)
    head = "INSERT INTO events (type, time, message_id, recipient, configuration_set, record)"
    if conn.dialect.postgres:
        return _insert_rows(conn, head, 6, rows, "RETURNING id")
    _insert_rows(conn, head, 6, rows)
    last = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
    first = last - len(rows) + 1
    if conn.execute("SELECT COUNT(*) FROM events WHERE id >= ?", (first,)).fetchone()[0] != len(rows):
        raise RuntimeError("event ids were not assigned consecutively")
    return range(first, last + 1)


def copy_delivery_time(conn, message_id: str, recipient: str, since: str = "") -> str | None:
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


def copy_clicks(conn, message_id: str, recipient: str, since: str, until: str,
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


def tracking_events_after(conn, after_id: int, limit: int) -> list[tuple]:
    """(id, type, message_id, recipient, record JSON, method) of Open/Click events with id > after_id."""
    return conn.execute(
        "SELECT e.id, e.type, e.message_id, e.recipient, e.record, COALESCE(v.method, 'GET') FROM events e"
        " LEFT JOIN tracking_verdicts v ON v.event_id = e.id"
        " WHERE e.id > ? AND e.type IN ('Open', 'Click') ORDER BY e.id LIMIT ?",
        (after_id, limit),
    ).fetchall()


def upsert_verdicts(conn, rows: list[VerdictRow]) -> None:
    """Write verdicts; a recomputation replaces verdict, reasons and device but keeps the raw `method`."""
    upsert_verdict_values(conn, [
        (r.event_id, r.method, r.verdict, r.reasons if isinstance(r.reasons, str)
         else json.dumps(r.reasons, separators=(",", ":")), r.client, r.os, r.device, r.computed_at) for r in rows])


def upsert_verdict_values(conn, rows: list[tuple]) -> None:
    """`upsert_verdicts` of plain (event_id, method, verdict, reasons JSON, client, os, device, computed_at)
    tuples: the listener's writer work builds no VerdictRow per hit (its Python holds the GIL the loop wants)."""
    _insert_rows(
        conn, "INSERT INTO tracking_verdicts (event_id, method, verdict, reasons, client, os, device, computed_at)", 8,
        rows,
        "ON CONFLICT (event_id) DO UPDATE SET verdict = excluded.verdict, reasons = excluded.reasons,"
        " client = excluded.client, os = excluded.os, device = excluded.device, computed_at = excluded.computed_at",
    )


def verified_domain_work(domain: str, address: str, scheme: str, now: str):
    """The work that records a tracking domain as proved (`relay tracking-domain verify`)."""

    def work(conn) -> None:
        conn.execute(
            "INSERT INTO tracking_domains (domain, verified_at, address, scheme) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (domain) DO UPDATE SET verified_at = excluded.verified_at,"
            " address = excluded.address, scheme = excluded.scheme",
            (domain.lower().rstrip("."), now, address, scheme),
        )

    return work
