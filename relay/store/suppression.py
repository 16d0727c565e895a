"""The account's suppression list: one row per address and reason (an address may be listed for a bounce
and later for a complaint); addresses are stored in lower case. A message is not sent to an address listed
for one of the reasons its configuration set applies (TrackingSettings.suppression_reasons).

A recipient's unsubscribe (the tracking listener's one-click POST, or mail to the unsub+ address) becomes a
Subscription event beside the message's other events, so destinations publish it like any other, and an
UNSUBSCRIBE entry on the suppression list when the message's set applies that reason."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from relay.core import events as ev
from relay.core.settings import TrackingSettings
from relay.core.suppression import Suppression, entries_for
from relay.store.messages import EventRow, insert_events

T = TypeVar("T")


def suppress(conn, entries: Iterable[Suppression]) -> None:
    """Add or refresh entries (a newer report for the same address and reason replaces the older one)."""
    rows = [(e.email_address.strip().lower(), e.reason, e.last_update_time, e.message_id, e.feedback_id)
            for e in entries]
    conn.executemany("DELETE FROM suppressed_destinations WHERE email_address = ? AND reason = ?",
                     [r[:2] for r in rows])
    conn.executemany("INSERT INTO suppressed_destinations (email_address, reason, last_update_time, message_id,"
                     " feedback_id) VALUES (?, ?, ?, ?, ?)", rows)


def suppressed_among(conn, addresses: Iterable[str], reasons: Iterable[str]) -> dict[str, str]:
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


def with_suppression(work: Callable[[Any], T], entries: list[Suppression]):
    """`work`, then the suppression entries its event adds, in the same transaction."""
    if not entries:
        return work

    def both(conn) -> T:
        value = work(conn)
        suppress(conn, entries)
        return value

    return both


def suppression_entries(conn, address: str | None = None, reasons: Iterable[str] = (),
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


def unsuppress(conn, address: str, reasons: Iterable[str] = ()) -> int:
    """Remove an address's entries (only those of `reasons` when given); how many were removed."""
    reasons = tuple(reasons)
    sql, params = "DELETE FROM suppressed_destinations WHERE email_address = ?", [address.strip().lower()]
    if reasons:
        sql += f" AND reason IN ({','.join('?' * len(reasons))})"
        params += reasons
    return conn.execute(sql, params).rowcount


def record_unsubscribe(conn, message_id: str, recipient: str, now_ms: int,
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
    insert_events(conn, [EventRow(ev.SUBSCRIPTION, when, message_id, recipient, set_name, record)])
    suppress(conn, entries_for(record, recipient, settings.suppression_reasons, when))
