"""Rollups, retention and the metrics' counters: the store's housekeeping.

Closed days of the funnel and of the links never change once over (events are dated when they happen), so
they are computed once into funnel_rollup and link_rollup; each address's events up to a mark are summed in
recipient_rollup. Retention walks the oldest events in small chunks, each its own store work, so SMTP
acceptance and tracking writes are never held behind one long DELETE. Metrics tail the tables from where the
previous scrape stopped, so each scrape reads only what is new, and events written by other processes
(`relay track` workers, other nodes) are counted too."""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, timedelta
from typing import Any

from relay.store.reports import forget_inbound_reports
from relay.store.views import (
    DAY_END,
    FUNNEL_COUNTS,
    FUNNEL_MARK,
    LATER,
    LINK_COUNTS,
    LINK_MARK,
    RECIPIENT_COLUMN_KINDS,
    RECIPIENT_COLUMNS,
    RECIPIENT_MARK,
    SUMMED,
    queries,
)

# Metrics: cheap indexed reads at scrape time. Counters are kept by tailing the tables by id from where the
# previous scrape stopped, so each scrape reads only what is new, and events written by `relay track`
# workers (other processes) are counted too.

def queue_by_set(conn) -> list[tuple[str | None, int, str | None]]:
    """(configuration set, queued copies, oldest acceptance time) of the delivery queue."""
    return conn.execute(
        "SELECT m.configuration_set, COUNT(*), MIN(m.received_at) FROM recipients r"
        " JOIN messages m ON m.id = r.message_id WHERE r.state = 'queued' GROUP BY m.configuration_set").fetchall()


def outbox_by_destination(conn) -> list[tuple[str, str, int]]:
    """(set, destination, events of the set beyond the destination's cursor) of enabled destinations."""
    return conn.execute(
        "SELECT c.configuration_set, c.destination, (SELECT COUNT(*) FROM events e"
        f" WHERE e.configuration_set = c.configuration_set AND {_beyond_cursor(conn)})"
        " FROM destination_cursors c WHERE c.enabled = 1").fetchall()


def _beyond_cursor(conn) -> str:
    """An event `e` after the destination cursor `c` (configuration.destination_events)."""
    return "(e.tx, e.id) > (c.last_tx, c.last_event_id)" if conn.dialect.postgres else "e.id > c.last_event_id"


def high_water(conn) -> tuple[int, int, int]:
    """The newest events.id, messages rowid and message_warnings rowid."""
    rowid = conn.dialect.rowid
    return conn.execute(f"SELECT (SELECT COALESCE(MAX(id), 0) FROM events), (SELECT COALESCE(MAX({rowid}), 0)"
                        f" FROM messages), (SELECT COALESCE(MAX({rowid}), 0) FROM message_warnings)").fetchone()


def counts_after(conn, marks: tuple[int, int, int], limit: int = 200_000) -> tuple[dict, tuple]:
    """Counts of what was written after `marks` (see high_water), and the new marks. Keys:
    ("event", set, type, detail) where detail is the bounce type or the verdict of an open/click,
    ("message", set) and ("warning", set, stage)."""
    counts: dict[tuple, int] = {}
    d = conn.dialect
    ev_mark, msg_mark, warn_mark = marks
    top = ev_mark
    for set_name, kind, detail, n, last in conn.execute(
            "SELECT e.configuration_set, e.type, CASE WHEN e.type = 'Bounce' THEN"
            f" {d.json_text('e.record', 'bounce', 'bounceType')} WHEN e.type IN ('Open', 'Click') THEN"
            " (SELECT v.verdict FROM tracking_verdicts v WHERE v.event_id = e.id) END, COUNT(*), MAX(e.id)"
            " FROM (SELECT * FROM events WHERE id > ? ORDER BY id LIMIT ?) e GROUP BY 1, 2, 3", (ev_mark, limit)):
        counts[("event", set_name, kind, detail)] = n
        top = max(top, last)
    msg_top = msg_mark
    for set_name, n, last in conn.execute(
            f"SELECT configuration_set, COUNT(*), MAX({d.rowid}) FROM messages WHERE {d.rowid} > ? GROUP BY 1",
            (msg_mark,)):
        counts[("message", set_name)] = n
        msg_top = max(msg_top, last)
    warn_top = warn_mark
    for set_name, stage, n, last in conn.execute(
            f"SELECT m.configuration_set, w.stage, COUNT(*), MAX(w.{d.rowid}) FROM message_warnings w"
            f" LEFT JOIN messages m ON m.id = w.message_id WHERE w.{d.rowid} > ? GROUP BY 1, 2", (warn_mark,)):
        counts[("warning", set_name, stage)] = n
        warn_top = max(warn_top, last)
    return counts, (top, msg_top, warn_top)


# Retention. Event ids follow time (an event is written when it happens), so old events are the lowest ids:
# purging walks them in small chunks from the bottom, each chunk its own store work, so SMTP acceptance and
# tracking writes are never held behind one long DELETE.

def purge_events_chunk(conn, cutoff: str, chunk: int) -> tuple[int, bool]:
    """Delete events (and their verdicts) older than `cutoff` among the `chunk` lowest ids: (deleted, more)."""
    row = conn.execute("SELECT MIN(id) FROM events").fetchone()
    if row[0] is None:
        return 0, False
    lo, hi = row[0], row[0] + chunk - 1
    old = "SELECT id FROM events WHERE id BETWEEN ? AND ? AND time < ?"
    mark = recipient_mark(conn)
    rows = queries(conn.dialect).recipient_rows.format(where=f"e.id IN ({old}) AND e.id <= {mark}", range="false")
    rolled = conn.execute(rows, (lo, hi, cutoff)).fetchall()
    conn.execute(f"DELETE FROM tracking_verdicts WHERE event_id IN ({old})", (lo, hi, cutoff))
    deleted = conn.execute(f"DELETE FROM events WHERE id IN ({old})", (lo, hi, cutoff)).rowcount
    _unroll_recipients(conn, rolled, cutoff, mark)
    # a newer event in the chunk means the old ones are behind us (ids follow time)
    return deleted, deleted > 0 and conn.execute("SELECT COUNT(*) FROM events WHERE id BETWEEN ? AND ?",
                                                 (lo, hi)).fetchone()[0] == 0


def purge_bodies_chunk(conn, cutoff: str, chunk: int) -> tuple[int, bool]:
    """Delete up to `chunk` kept bodies of messages accepted before `cutoff` whose copies are all final:
    (deleted, more). A queued copy's body stays, whatever its age: it is still to be delivered."""
    ids = [r[0] for r in conn.execute(
        "SELECT s.message_id FROM spool s JOIN messages m ON m.id = s.message_id WHERE m.received_at < ?"
        " AND NOT EXISTS (SELECT 1 FROM recipients r WHERE r.message_id = s.message_id AND r.state = 'queued')"
        " LIMIT ?", (cutoff, chunk))]
    conn.executemany("DELETE FROM spool WHERE message_id = ?", [(i,) for i in ids])
    return len(ids), len(ids) == chunk


def purge_messages_chunk(conn, cutoff: str, chunk: int) -> tuple[int, bool]:
    """Delete up to `chunk` message records accepted before `cutoff` with no copy still queued, with their
    recipients, warnings and spool: (deleted, more)."""
    ids = [r[0] for r in conn.execute(
        "SELECT id FROM messages m WHERE received_at < ? AND NOT EXISTS (SELECT 1 FROM recipients r"
        " WHERE r.message_id = m.id AND r.state = 'queued') ORDER BY received_at LIMIT ?", (cutoff, chunk))]
    for table, column in (("recipients", "message_id"), ("message_warnings", "message_id"),
                          ("spool", "message_id"), ("messages", "id")):
        conn.executemany(f"DELETE FROM {table} WHERE {column} = ?", [(i,) for i in ids])
    return len(ids), len(ids) == chunk


def forget_address(conn, addresses: tuple[str, ...],
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
    # the bodies of its messages kept for the console quote the address: gone with it (a body still to be
    # delivered to someone else stays)
    out["bodies"] = sum(conn.execute(
        "DELETE FROM spool WHERE message_id = ? AND NOT EXISTS (SELECT 1 FROM recipients r WHERE r.message_id = ?"
        " AND r.state = 'queued')", (m, m)).rowcount for m in messages)
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


def _event_sets(conn) -> list[str | None]:
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


def sets_with_events(conn) -> list[str | None]:
    """Every configuration_set value of the events (None last: mail sent without a set)."""
    return _event_sets(conn)


def next_rollup_day(conn, first_open_day: str,
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


def _per_set(conn, template: str, where: str, params: list, columns: str, joiner: str) -> list[tuple]:
    """`template` (funnel_live, link_days) run once per set ('' for no set), so each run seeks the set's index."""
    rows = []
    for set_name in _event_sets(conn):
        narrowed = ("e.configuration_set IS NULL" if set_name is None else "e.configuration_set = ?") + where
        sql = template.format(where=joiner + narrowed)
        rows += conn.execute(f"SELECT COALESCE(configuration_set, ''), day, {columns} FROM ({sql}) per_set",
                             ([] if set_name is None else [set_name]) + params).fetchall()
    return rows


def funnel_day_rows(conn, day: str) -> list[tuple]:
    """The funnel rows of one closed day, one per set ('' for no set), as funnel_rollup stores them. A read:
    run it on a reader connection, so the writer (and SMTP acceptance behind it) never waits for it."""
    return _per_set(conn, queries(conn.dialect).funnel_live, " AND substr(e.time, 1, 10) = ?", [day],
                    ", ".join(FUNNEL_COUNTS), "WHERE ")


def link_day_rows(conn, day: str) -> list[tuple]:
    """The link_clicks rows of one closed day, per set ('' for no set) and link, as link_rollup stores them."""
    return _per_set(conn, queries(conn.dialect).link_days, " AND e.time >= ? AND e.time < ?", [day, day + DAY_END],
                    "link, link_tags, " + ", ".join(LINK_COUNTS), "AND ")


# The rollups: mark id, the table and its columns, and the rows of one closed day.
ROLLUPS: dict[int, tuple[str, tuple[str, ...], Callable[[Any, str], list[tuple]]]] = {
    FUNNEL_MARK: ("funnel_rollup", ("configuration_set", "day") + FUNNEL_COUNTS, funnel_day_rows),
    LINK_MARK: ("link_rollup", ("configuration_set", "day", "link", "link_tags") + LINK_COUNTS, link_day_rows),
}


def store_rollup_day(conn, mark_id: int, mark: str, day: str, rows: list[tuple]) -> bool:
    """Store a day's rows and move the mark to it, unless another process moved the mark meanwhile."""
    if conn.execute("SELECT day FROM funnel_rollup_mark WHERE id = ?", (mark_id,)).fetchone()[0] != mark:
        return False
    table, columns, _rows = ROLLUPS[mark_id]
    conn.execute(f"DELETE FROM {table} WHERE day = ?", (day,))
    conn.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({','.join('?' * len(columns))})", rows)
    conn.execute("UPDATE funnel_rollup_mark SET day = ? WHERE id = ?", (day, mark_id))
    return True


# recipient_rollup: the events up to recipient_rollup_mark, summed per address (see recipient_engagement).

def recipient_mark(conn) -> int:
    return conn.execute(f"SELECT {RECIPIENT_MARK}").fetchone()[0]


def settled_event_id(conn, cutoff: str, scan: int = 200_000) -> int:
    """The newest event id older than `cutoff` (an ISO time), looking back from the newest event: the events
    after it may still change (a click's verdict is re-judged when the next clicks of its burst arrive)."""
    top = 0
    for event_id, time in conn.execute("SELECT id, time FROM events ORDER BY id DESC LIMIT ?", (scan,)):
        top = event_id - 1
        if time < cutoff:
            return event_id
    return top


def _recipient_upsert(conn) -> str:
    """How a row of events after the mark (`excluded`) adds to an address's row of recipient_rollup."""
    q = queries(conn.dialect)
    return ", ".join(
        f"{c} = " + ("CASE WHEN excluded.last_bounce >= COALESCE(recipient_rollup.last_bounce, '')"
                     " THEN excluded.bounce_type ELSE recipient_rollup.bounce_type END" if m is None
                     else q.merge(c, f"recipient_rollup.{c}", f"excluded.{c}"))
        for c, _t, m in RECIPIENT_COLUMN_KINDS)


def roll_recipients(conn, mark: int, top: int) -> bool:
    """Add the events after `mark` up to `top` (ids) to recipient_rollup and move the mark to `top`, unless
    another process moved the mark meanwhile. In the writer: a purge or `relay forget` never interleaves."""
    if recipient_mark(conn) != mark:
        return False
    rows = queries(conn.dialect).recipient_rows.format(where="e.id > :lo AND e.id <= :hi",
                                                       range="b.id > :lo AND b.id <= :hi")
    conn.execute(f"INSERT INTO recipient_rollup SELECT * FROM ({rows}) rolled WHERE true"
                 f" ON CONFLICT (recipient) DO UPDATE SET {_recipient_upsert(conn)}", {"lo": mark, "hi": top})
    conn.execute("UPDATE recipient_rollup_mark SET last_event_id = ? WHERE id = 1", (top,))
    return True


def _unroll_recipients(conn, deleted: list[tuple], cutoff: str, mark: int) -> None:
    """Take deleted events out of recipient_rollup: `deleted` are their RECIPIENT_ROWS (events up to `mark`
    only), all older than `cutoff`. Counts are subtracted; a latest time older than `cutoff` may have been
    deleted, so it is sought again among the remaining events; an address with none left loses its row."""
    counted = [c for c, _t, m in RECIPIENT_COLUMN_KINDS if m == SUMMED]
    index = {c: i + 1 for i, (c, _t, _m) in enumerate(RECIPIENT_COLUMN_KINDS)}
    conn.executemany(f"UPDATE recipient_rollup SET {', '.join(f'{c} = {c} - ?' for c in counted)}"
                     " WHERE recipient = ?", [[row[index[c]] for c in counted] + [row[0]] for row in deleted])
    q = queries(conn.dialect)
    remaining = {c: q.part(c, "recipient_rollup.recipient", f"e.id <= {mark}") for c, _t in RECIPIENT_COLUMNS}
    sought = [c for c, _t, m in RECIPIENT_COLUMN_KINDS if m == LATER]
    fixes = [f"{c} = CASE WHEN {c} < :cutoff THEN {remaining[c]} ELSE {c} END" for c in sought]
    fixes.append(f"bounce_type = CASE WHEN last_bounce < :cutoff THEN {remaining['bounce_type']} ELSE bounce_type END")
    conn.executemany(f"UPDATE recipient_rollup SET {', '.join(fixes)} WHERE recipient = :recipient",
                     [{"cutoff": cutoff, "recipient": row[0]} for row in deleted])
    conn.executemany("DELETE FROM recipient_rollup WHERE recipient = ? AND NOT EXISTS (SELECT 1 FROM events e"
                     " WHERE e.recipient = ? AND e.id <= ?)", [(row[0], row[0], mark) for row in deleted])
    _lower_recipient_mark(conn)


def _lower_recipient_mark(conn) -> None:
    """After the newest events were deleted, their ids are given again: the mark must not cover them."""
    conn.execute("UPDATE recipient_rollup_mark SET last_event_id = (SELECT COALESCE(MAX(id), 0) FROM events)"
                 " WHERE last_event_id > (SELECT COALESCE(MAX(id), 0) FROM events)")
