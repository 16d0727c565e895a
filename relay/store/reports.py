"""Inbound reports: every report relay's SMTP listener accepts for the bounce domain or a complaints address,
as received, with what came of it (`kind`: the parser's verdict; `outcome`: the event recorded or why none
was), so a report that produced no event can still be read by the operator. Kept for retention.days."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from relay.core.suppression import Suppression
from relay.store.messages import EventRow, insert_events
from relay.store.suppression import suppress
from relay.store.views import dicts


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


def reported_message(conn, message_id: str) -> ReportedMessage | None:
    row = conn.execute("SELECT id, mail_json, configuration_set, settings_json FROM messages WHERE id = ?",
                       (message_id,)).fetchone()
    return ReportedMessage(row[0], json.loads(row[1]), row[2], json.loads(row[3])) if row else None


def message_by_header(conn, message_id_header: str) -> str | None:
    """The id of the newest message sent with this Message-ID header (with or without angle brackets)."""
    bare = message_id_header.strip().strip("<>").strip()
    if not bare:
        return None
    row = conn.execute("SELECT id FROM messages WHERE message_id_header IN (?, ?, ?) ORDER BY received_at DESC"
                       " LIMIT 1", (f"<{bare}>", bare, f" <{bare}>")).fetchone()
    return row[0] if row else None


def record_report(conn, report: InboundReportRow, events: list[EventRow],
                  entries: Iterable[Suppression]) -> int:
    """Store a received report with the events and suppression entries it produced; its id."""
    report_id = conn.execute(
        "INSERT INTO inbound_reports (received_at, client_ip, mail_from, rcpt, size, raw, kind, outcome,"
        " message_id, recipient) VALUES (?,?,?,?,?,?,?,?,?,?) RETURNING id",
        (report.received_at, report.client_ip, report.mail_from, report.rcpt, len(report.raw), report.raw,
         report.kind, report.outcome, report.message_id, report.recipient)).fetchone()[0]
    insert_events(conn, events)
    suppress(conn, entries)
    return report_id


def inbound_reports(conn, limit: int = 100) -> list[dict]:
    """The newest reports without their raw text, newest first (the operator's view; tests)."""
    return dicts(conn.execute(
        "SELECT id, received_at, client_ip, mail_from, rcpt, size, kind, outcome, message_id, recipient"
        " FROM inbound_reports ORDER BY id DESC LIMIT ?", (limit,)))


def forget_inbound_reports(conn, addresses: tuple[str, ...]) -> int:
    """Delete the reports about these recipients (`relay forget`): they quote the address and the message."""
    marks = ",".join("?" * len(addresses))
    return conn.execute(f"DELETE FROM inbound_reports WHERE recipient IN ({marks})", addresses).rowcount


def purge_inbound_reports_chunk(conn, cutoff: str, chunk: int) -> tuple[int, bool]:
    """Delete up to `chunk` reports received before `cutoff`: (deleted, more)."""
    deleted = conn.execute("DELETE FROM inbound_reports WHERE id IN (SELECT id FROM inbound_reports"
                           " WHERE received_at < ? ORDER BY received_at LIMIT ?)", (cutoff, chunk)).rowcount
    return deleted, deleted == chunk
