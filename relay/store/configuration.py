"""Configuration sets, tracking options, identities' default sets and event destinations created with the
CLI (or the management API); the TOML file's are never stored here. `configuration_version.counter`
moves with every change, so a running relay (another process, another node) notices with one cheap read
and reloads. Destination cursors are the durable outbox: the last events.id a destination has acknowledged."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

@dataclass(frozen=True)
class StoredConfiguration:
    sets: list[str]
    tracking: list[tuple]  # (level, scope, open, click, domain, https_policy, pixel_position)
    identities: list[tuple[str, str]]
    destinations: list[tuple]  # (set, name, enabled, event_types JSON, kind, settings JSON)
    version: int
    suppression: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (set, reasons): set_suppression_options
    sending: tuple[tuple, ...] = ()  # sending switches (store.control.sending_states)
    set_options: tuple[tuple, ...] = ()  # sets' delivery and reputation options (store.control.set_options)
    sending_identities: tuple = ()  # store.identities.IdentityRow of every identity made with the CLI or the API


def configuration_read(store, helper: Callable[..., T], *args) -> T:
    """Run a helper of this section on a reader connection (Store.read)."""
    return store.read(helper, *args)


def configuration_version(conn) -> int:
    row = conn.execute("SELECT counter FROM configuration_version WHERE id = 1").fetchone()
    return row[0] if row else 0


def bump_configuration_version(conn) -> None:
    conn.execute("UPDATE configuration_version SET counter = counter + 1 WHERE id = 1")


def load_configuration(conn) -> StoredConfiguration:
    """Everything in one read transaction, so a concurrent change is seen whole or not at all."""
    from relay.store import control, identities

    conn.execute(conn.dialect.begin_snapshot)
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
            sending=tuple(control.sending_states(conn)),
            set_options=tuple(control.set_options(conn)),
            sending_identities=tuple(identities.identity_rows(conn)),
        )
    finally:
        conn.execute("COMMIT")


def last_event_id(conn) -> int:
    return conn.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0]


Position = tuple[int, int]  # (tx, id): where a destination is in the events, in commit order (schema.py)


def newest_position(conn) -> Position:
    """Just after every event committed so far (PostgreSQL: at the oldest transaction still running, so an
    event of a transaction that commits later is never behind the cursor)."""
    if conn.dialect.postgres:
        return conn.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint").fetchone()[0], 0
    return 0, last_event_id(conn)


def provision_cursor(conn, set_name: str, destination: str, enabled: bool) -> Position:
    """Create a destination's cursor at the newest event (it receives what happens from now on), or move it
    there when the destination is enabled again (a disabled destination receives nothing). Returns it."""
    row = conn.execute("SELECT last_tx, last_event_id, enabled FROM destination_cursors WHERE configuration_set = ?"
                       " AND destination = ?", (set_name, destination)).fetchone()
    newest = newest_position(conn)
    if row is None:
        conn.execute("INSERT INTO destination_cursors (configuration_set, destination, last_tx, last_event_id,"
                     " enabled) VALUES (?, ?, ?, ?, ?)", (set_name, destination, *newest, int(enabled)))
        return newest
    if enabled and not row[2]:
        conn.execute("UPDATE destination_cursors SET last_tx = ?, last_event_id = ?, enabled = 1"
                     " WHERE configuration_set = ? AND destination = ?", (*newest, set_name, destination))
        return newest
    if bool(row[2]) != enabled:
        conn.execute("UPDATE destination_cursors SET enabled = ? WHERE configuration_set = ? AND destination = ?",
                     (int(enabled), set_name, destination))
    return row[0], row[1]


def save_cursor(conn, set_name: str, destination: str, position: Position) -> None:
    """Advance (never move back) a destination's cursor."""
    conn.execute("UPDATE destination_cursors SET last_tx = ?, last_event_id = ? WHERE configuration_set = ?"
                 " AND destination = ? AND (last_tx, last_event_id) < (?, ?)",
                 (*position, set_name, destination, *position))


def delete_cursor(conn, set_name: str, destination: str | None = None) -> None:
    if destination is None:
        conn.execute("DELETE FROM destination_cursors WHERE configuration_set = ?", (set_name,))
    else:
        conn.execute("DELETE FROM destination_cursors WHERE configuration_set = ? AND destination = ?",
                     (set_name, destination))


def destination_events(conn, set_name: str, types: tuple[str, ...], after: Position,
                       limit: int) -> list[tuple[int, int, str]]:
    """(tx, id, record JSON) of a set's events of the given eventTypes after `after`, in commit order. On
    PostgreSQL only events of transactions older than every one still running: none can commit behind them."""
    marks = ",".join("?" * len(types))
    if conn.dialect.postgres:
        return conn.execute(
            f"SELECT tx, id, record FROM events WHERE configuration_set = ? AND (tx, id) > (?, ?)"
            f" AND tx < pg_snapshot_xmin(pg_current_snapshot())::text::bigint AND type IN ({marks})"
            " ORDER BY tx, id LIMIT ?", (set_name, *after, *types, limit)).fetchall()
    return conn.execute(
        f"SELECT 0, id, record FROM events WHERE configuration_set = ? AND id > ? AND type IN ({marks})"
        " ORDER BY id LIMIT ?", (set_name, after[1], *types, limit)).fetchall()


def record_destination_failure(conn, set_name: str, destination: str, event_id: int,
                               time: str, status: int | None, reason: str) -> None:
    conn.execute("INSERT INTO destination_failures (configuration_set, destination, event_id, time, status,"
                 " reason) VALUES (?, ?, ?, ?, ?, ?)", (set_name, destination, event_id, time, status, reason))


def put_set_suppression(conn, set_name: str, reasons: tuple[str, ...] | None) -> None:
    """A database set's suppression reasons (None: follow the account's again); running relays reload."""
    conn.execute("DELETE FROM suppression_options WHERE configuration_set = ?", (set_name,))
    if reasons is not None:
        conn.execute("INSERT INTO suppression_options (configuration_set, reasons) VALUES (?, ?)",
                     (set_name, ",".join(reasons)))
    bump_configuration_version(conn)


def set_suppression_options(conn) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(set, reasons) of every database set with its own suppression reasons."""
    return tuple((name, tuple(r for r in text.split(",") if r)) for name, text in conn.execute(
        "SELECT configuration_set, reasons FROM suppression_options ORDER BY configuration_set"))
