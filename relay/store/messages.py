"""Messages, their recipient copies and their events: the works that accept a message, record a delivery
attempt and add events, and the rows they write."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


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


Lease = tuple[str, str]  # (node id, ISO time until which that node alone delivers the copy)


@dataclass(frozen=True)
class PendingCopy:
    message_id: str
    recipient: str
    attempts: int
    next_attempt_at: str | None


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


def insert_events(conn, events: list[EventRow]) -> None:
    conn.executemany(
        "INSERT INTO events (type, time, message_id, recipient, configuration_set, record) VALUES (?,?,?,?,?,?)",
        [(e.type, e.time, e.message_id, e.recipient, e.configuration_set, record_json(e.record, e.mail_json))
         for e in events],
    )


def accept_work(msg: MessageRow, recipients: list[str], raw: bytes, events: list[EventRow],
                final: dict[str, tuple[str, str]] | None = None,
                guard: Callable[[Any], bool] | None = None, lease: Lease | None = None):
    """The work that makes an accepted message durable: message, spool, recipients, Send events.
    `final`: recipients already final at acceptance (suppressed), recipient -> (state, last response);
    the body is spooled only when some recipient is left to deliver. `guard(conn)` runs first, in the same
    transaction: False when what the message was prepared from has changed; the work then writes nothing
    and returns False (not an error, so the rest of the batch is not run again). `lease`: the accepting node
    claims the copies it is about to deliver (no other node takes them while it renews the lease)."""
    final = final or {}

    def work(conn) -> bool:
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
            "INSERT INTO recipients (message_id, recipient, position, state, last_response, updated_at, lease_owner,"
            " lease_until) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(msg.id, r, i, *final.get(r, ("queued", None)), msg.received_at, *(lease or (None, None)))
             for i, r in enumerate(recipients)],
        )
        insert_events(conn, events)
        return True

    return work


def events_work(events: list[EventRow]):
    return lambda conn: insert_events(conn, events)


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
    keep_body: bool = False,
):
    """Record a delivery attempt's outcome; drop the spooled body once every recipient is final, unless it is
    kept for a while (retention.message_bodies: the console shows the message as delivered)."""

    def work(conn) -> None:
        conn.execute(
            "UPDATE recipients SET state = ?, attempts = ?, next_attempt_at = ?, last_response = ?,"
            " updated_at = ? WHERE message_id = ? AND recipient = ?",
            (state, attempts, next_attempt_at, last_response, now, message_id, recipient),
        )
        insert_events(conn, events)
        conn.executemany(
            "INSERT INTO message_warnings (message_id, recipient, time, stage, warning) VALUES (?,?,?,?,?)",
            [(message_id, recipient, now, stage, text) for stage, text in warnings],
        )
        if state != "queued" and not keep_body:
            left = conn.execute(
                "SELECT COUNT(*) FROM recipients WHERE message_id = ? AND state = 'queued'", (message_id,)
            ).fetchone()[0]
            if left == 0:
                conn.execute("DELETE FROM spool WHERE message_id = ?", (message_id,))

    return work


# --- leases: which node delivers which queued copy ------------------------------------------------------------
# A node delivers only the copies it holds a lease on: those it accepted, and those it claimed because nobody
# held them (a lease that ran out: its node died or lost the database). It renews its leases while it lives.
# Times are ISO strings from the nodes' clocks, which must agree to well within a lease (NTP).

def claim_work(node: str, now: str, until: str, limit: int):
    """Claim up to `limit` queued copies that are free (no lease, or one that ran out) or already this node's;
    the work returns them as PendingCopy, soonest due first. Concurrent claims on PostgreSQL skip each other's
    rows (FOR UPDATE SKIP LOCKED) instead of waiting."""

    def work(conn) -> list[PendingCopy]:
        lock = " FOR UPDATE SKIP LOCKED" if conn.dialect.postgres else ""
        rows = conn.execute(
            "UPDATE recipients SET lease_owner = ?, lease_until = ? WHERE (message_id, recipient) IN ("
            "SELECT message_id, recipient FROM recipients WHERE state = 'queued'"
            " AND (lease_owner IS NULL OR lease_owner = ? OR lease_until < ?)"
            f" ORDER BY COALESCE(next_attempt_at, ''), message_id, position LIMIT ?{lock})"
            " RETURNING message_id, recipient, attempts, next_attempt_at",
            (node, until, node, now, limit)).fetchall()
        return sorted((PendingCopy(*r) for r in rows), key=lambda c: c.next_attempt_at or "")

    return work


def renew_work(node: str, until: str):
    """Extend every lease of this node on a copy still queued; the work returns the (message id, recipient)
    pairs it holds, so a copy another node took meanwhile (this node's lease had run out) is given up."""

    def work(conn) -> set[tuple[str, str]]:
        return {tuple(r) for r in conn.execute(
            "UPDATE recipients SET lease_until = ? WHERE lease_owner = ? AND state = 'queued'"
            " RETURNING message_id, recipient", (until, node))}

    return work
