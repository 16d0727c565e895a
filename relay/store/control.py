"""Sending control's SQL: pausing (with its history), sets' delivery and reputation options, the quota
counters every node adds to, the per-minute outcomes summed from the events (the reputation guard's and
GetSendStatistics' numbers) and identities with their DKIM keys.

Works (functions of a connection) run in the store's writer; the others are read helpers (Store.read).
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.store.configuration import bump_configuration_version
from relay.store.messages import EventRow, insert_events

# --- pausing ------------------------------------------------------------------------------------------------------

STATUS_COLUMNS = "scope, enabled, reason, changed_by, changed_at, fresh_start"


def sending_states(conn) -> list[tuple]:
    """(scope, enabled, reason, changed_by, changed_at, fresh_start) of every scope that was ever switched."""
    return conn.execute(f"SELECT {STATUS_COLUMNS} FROM sending_status ORDER BY scope").fetchall()


def put_sending(conn, scope: str, enabled: bool, reason: str, by: str, now: str,
                notice: EventRow | None = None) -> bool:
    """Switch a scope ('' = the account, else a set) on or off, recording who and why; False when it already was
    so (nothing is written). Resuming gives the scope's reputation a fresh start: the guard counts from now on,
    not the window that paused it. `notice`: an event for the set's destinations, written with the change."""
    row = conn.execute("SELECT enabled, fresh_start FROM sending_status WHERE scope = ?", (scope,)).fetchone()
    was_enabled = True if row is None else bool(row[0])
    if was_enabled == enabled:
        return False
    fresh_start = now if enabled else (row[1] if row else None)
    conn.execute("DELETE FROM sending_status WHERE scope = ?", (scope,))
    conn.execute(f"INSERT INTO sending_status ({STATUS_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                 (scope, int(enabled), reason, by, now, fresh_start))
    conn.execute("INSERT INTO sending_history (time, scope, enabled, reason, changed_by) VALUES (?, ?, ?, ?, ?)",
                 (now, scope, int(enabled), reason, by))
    if notice is not None:
        insert_events(conn, [notice])
    bump_configuration_version(conn)
    return True


def sending_history(conn, scope: str, limit: int = 20) -> list[tuple[str, bool, str, str]]:
    """(time, enabled, reason, changed_by) of a scope's last changes, newest first."""
    return [(t, bool(e), r, b) for t, e, r, b in conn.execute(
        "SELECT time, enabled, reason, changed_by FROM sending_history WHERE scope = ? ORDER BY id DESC LIMIT ?",
        (scope, limit))]


def forget_set_control(conn, set_name: str) -> None:
    """A deleted set's switch and options go with it (its history stays: who paused what is worth keeping)."""
    conn.execute("DELETE FROM sending_status WHERE scope = ?", (set_name,))
    conn.execute("DELETE FROM set_sending_options WHERE configuration_set = ?", (set_name,))


# --- a set's DeliveryOptions and ReputationOptions ------------------------------------------------------------

OPTION_COLUMNS = ("tls_policy", "max_delivery_seconds", "reputation_metrics")


def set_options(conn) -> list[tuple]:
    """(set, tls_policy, max_delivery_seconds, reputation_metrics) of every set given any of them."""
    return conn.execute(f"SELECT configuration_set, {', '.join(OPTION_COLUMNS)} FROM set_sending_options"
                        " ORDER BY configuration_set").fetchall()


def put_set_options(conn, set_name: str, values: dict) -> None:
    """Replace the given options of a set (None clears one); the others keep their value."""
    row = conn.execute(f"SELECT {', '.join(OPTION_COLUMNS)} FROM set_sending_options WHERE configuration_set = ?",
                       (set_name,)).fetchone()
    merged = {**dict(zip(OPTION_COLUMNS, row or (None,) * len(OPTION_COLUMNS), strict=True)), **values}
    conn.execute("DELETE FROM set_sending_options WHERE configuration_set = ?", (set_name,))
    if any(v is not None for v in merged.values()):
        conn.execute(f"INSERT INTO set_sending_options (configuration_set, {', '.join(OPTION_COLUMNS)})"
                     " VALUES (?, ?, ?, ?)", (set_name, *(merged[c] for c in OPTION_COLUMNS)))
    bump_configuration_version(conn)


# --- quota counters -------------------------------------------------------------------------------------------

DAY_MINUTES = 1440
_ADD = ("INSERT INTO send_counts (scope, unit, bucket, count) VALUES (?, ?, ?, ?) ON CONFLICT (scope, unit, bucket)"
        " DO UPDATE SET count = send_counts.count + excluded.count RETURNING count")


def add_to_quota(conn, scope: str, recipients: int, now_s: int) -> tuple[int, int]:
    """Count `recipients` on a scope now; (its count this second, its count in the last 24 hours), both with
    them. In the accepting transaction: the row of this minute stays locked until it commits, so nodes adding
    to the same scope on PostgreSQL take turns and none reads a count without another's."""
    minute = now_s // 60
    in_minute = conn.execute(_ADD, (scope, "m", minute, recipients)).fetchone()[0]
    in_second = conn.execute(_ADD, (scope, "s", now_s, recipients)).fetchone()[0]
    if in_minute == recipients:  # the first of a new minute: counts too old to matter go, once a minute
        conn.execute("DELETE FROM send_counts WHERE scope = ? AND ((unit = 's' AND bucket < ?) OR"
                     " (unit = 'm' AND bucket <= ?))", (scope, now_s - 60, minute - DAY_MINUTES))
    day = conn.execute("SELECT COALESCE(SUM(count), 0) FROM send_counts WHERE scope = ? AND unit = 'm'"
                       " AND bucket > ?", (scope, minute - DAY_MINUTES)).fetchone()[0]
    return in_second, day


def quota_sent(conn, scope: str, now_s: int) -> int:
    """Recipients counted on a scope in the last 24 hours."""
    return conn.execute("SELECT COALESCE(SUM(count), 0) FROM send_counts WHERE scope = ? AND unit = 'm'"
                        " AND bucket > ?", (scope, now_s // 60 - DAY_MINUTES)).fetchone()[0]


# --- outcomes per set and minute, summed from the events ------------------------------------------------------

_COUNTED = ("Send", "Delivery", "Bounce", "Complaint", "Reject")
STATISTIC_COLUMNS = ("attempts", "delivered", "bounced", "permanent", "complaints", "rejects")


@dataclass(frozen=True)
class CountedEvent:
    id: int
    configuration_set: str  # '' = none
    type: str
    time: str
    bounce_type: str | None
    bounce_sub_type: str | None
    recipients: int  # a Send's recipients (one Send per message lists them all in mail.destination)


def statistics_mark(conn) -> int:
    return conn.execute("SELECT last_event_id FROM send_statistics_mark WHERE id = 1").fetchone()[0]


def counted_events(conn, after: int, upto: int, limit: int) -> list[CountedEvent]:
    """The events that count, after event id `after` up to `upto`, in id order."""
    d = conn.dialect
    marks = ",".join("?" * len(_COUNTED))
    rows = conn.execute(
        f"SELECT id, COALESCE(configuration_set, ''), type, time,"
        f" CASE WHEN type = 'Bounce' THEN {d.json_text('record', 'bounce', 'bounceType')} END,"
        f" CASE WHEN type = 'Bounce' THEN {d.json_text('record', 'bounce', 'bounceSubType')} END,"
        f" CASE WHEN type = 'Send' AND recipient IS NULL THEN {_destination_count(d)} ELSE 1 END"
        f" FROM events WHERE id > ? AND id <= ? AND type IN ({marks}) ORDER BY id LIMIT ?",
        (after, upto, *_COUNTED, limit)).fetchall()
    return [CountedEvent(*r) for r in rows]


def _destination_count(d) -> str:
    if d.postgres:
        return "json_array_length(record::json -> 'mail' -> 'destination')"
    return "json_array_length(record, '$.mail.destination')"


def add_statistics(conn, mark: int, top: int, rows: dict[tuple[str, int], tuple[int, ...]],
                   keep_after_minute: int) -> bool:
    """Add per-(set, minute) counts and move the mark from `mark` to `top`, unless another process moved it
    meanwhile (False: nothing written). Minutes before `keep_after_minute` are dropped."""
    if statistics_mark(conn) != mark:
        return False
    updates = ", ".join(f"{c} = send_statistics.{c} + excluded.{c}" for c in STATISTIC_COLUMNS)
    conn.executemany(
        f"INSERT INTO send_statistics (configuration_set, minute, {', '.join(STATISTIC_COLUMNS)})"
        f" VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (configuration_set, minute) DO UPDATE SET {updates}",
        [(s, m, *counts) for (s, m), counts in sorted(rows.items())])
    conn.execute("UPDATE send_statistics_mark SET last_event_id = ? WHERE id = 1", (top,))
    conn.execute("DELETE FROM send_statistics WHERE minute < ?", (keep_after_minute,))
    return True


def outcomes_since(conn, first_minute: int, set_name: str | None = None) -> dict[str, tuple[int, int, int, int]]:
    """set -> (delivered, bounced, permanent, complaints) from `first_minute` (epoch minute) on."""
    sql = ("SELECT configuration_set, SUM(delivered), SUM(bounced), SUM(permanent), SUM(complaints)"
           " FROM send_statistics WHERE minute >= ?")
    params: list = [first_minute]
    if set_name is not None:
        sql += " AND configuration_set = ?"
        params.append(set_name)
    return {r[0]: tuple(int(x or 0) for x in r[1:]) for r in conn.execute(sql + " GROUP BY configuration_set",
                                                                          params)}


def account_minutes(conn, first_minute: int) -> list[tuple[int, int, int, int, int]]:
    """(minute, attempts, bounces, complaints, rejects) of every set together, from `first_minute` on."""
    return conn.execute(
        "SELECT minute, SUM(attempts), SUM(bounced), SUM(complaints), SUM(rejects) FROM send_statistics"
        " WHERE minute >= ? GROUP BY minute ORDER BY minute", (first_minute,)).fetchall()
