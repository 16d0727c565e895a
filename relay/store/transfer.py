"""`relay store migrate`: a single node's SQLite database moved into PostgreSQL, history and queue included.

Both sides are first brought to this relay's schema (opening a store migrates it). Every row of every table
is copied with COPY in one PostgreSQL transaction: a failure leaves the target as it was. Ids are kept (events,
reports), so destination cursors, verdicts and the queue keep pointing at the same rows; the identity
sequences are moved past them. The migrated events all carry the transaction that copied them, and each
destination cursor is placed in that transaction at the event it had reached, so nothing is published twice
and nothing is skipped. A target that already holds data is refused: merging two histories is not a copy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from relay.store.postgres import PostgresStore
from relay.store.sqlite import SqliteStore

# In an order that keeps references resolvable for whoever reads the target while it fills (none do: one
# transaction), and every table of the schema. The one-row tables (marks, version counter) are replaced.
TABLES = ("messages", "spool", "recipients", "message_warnings", "events", "tracking_verdicts", "tracking_domains",
          "configuration_sets", "tracking_options", "identity_sets", "event_destinations", "destination_cursors",
          "destination_failures", "suppressed_destinations", "suppression_options", "inbound_reports",
          "funnel_rollup", "link_rollup", "recipient_rollup", "configuration_version", "funnel_rollup_mark",
          "recipient_rollup_mark", "email_templates", "sending_status", "sending_history", "set_sending_options",
          "send_counts", "send_statistics", "send_statistics_mark", "email_identities")
SINGLETONS = ("configuration_version", "funnel_rollup_mark", "recipient_rollup_mark", "send_statistics_mark")
# tables whose ids PostgreSQL assigns: their sequences move on
IDENTITIES = ("events", "inbound_reports", "sending_history")
COPY_BATCH = 5000


class TargetNotEmpty(Exception):
    pass


@dataclass(frozen=True)
class Transferred:
    table: str
    rows: int


def _columns(conn, table: str) -> list[str]:
    if conn.dialect.postgres:
        return [r[0] for r in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = ? AND table_schema ="
            " current_schema() AND is_generated = 'NEVER' AND identity_generation IS DISTINCT FROM 'ALWAYS'"
            " ORDER BY ordinal_position", (table,))]
    return [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]


def _data_rows(conn) -> dict[str, int]:
    return {t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in TABLES if t not in SINGLETONS}


def transfer(source: Path, target_url: str, progress: Callable[[str, int], None] = lambda t, n: None
             ) -> list[Transferred]:
    """Copy every row of the SQLite database at `source` into the PostgreSQL database at `target_url`."""
    src = SqliteStore(source)
    dst = PostgresStore(target_url)
    try:
        filled = {t: n for t, n in dst.read(_data_rows).items() if n}
        if filled:
            held = ", ".join(f"{t}: {n}" for t, n in filled.items())
            raise TargetNotEmpty(f"{dst.description} already holds data ({held}); relay store migrate copies"
                                 " into an empty database only")
        with src._reading() as reader:
            return dst.submit(lambda conn: _copy_all(reader, conn, progress)).result()
    finally:
        src.close()
        dst.close()


def _copy_all(reader, conn, progress: Callable[[str, int], None]) -> list[Transferred]:
    """Inside the target's write transaction (one commit for everything)."""
    done = []
    for table in TABLES:
        wanted = _columns(conn, table)
        columns = [c for c in _columns(reader, table) if c in wanted]
        if table in SINGLETONS:
            conn.execute(f"DELETE FROM {table}")
        count = 0
        with conn.raw.cursor().copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
            for row in reader.execute(f"SELECT {', '.join(columns)} FROM {table}"):
                copy.write_row(row)
                count += 1
                if count % COPY_BATCH == 0:
                    progress(table, count)
        progress(table, count)
        done.append(Transferred(table, count))
    for table in IDENTITIES:
        conn.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
                     f" GREATEST((SELECT MAX(id) FROM {table}), 1))")
    # every copied event carries this transaction: cursors continue inside it, at the event each had reached
    conn.execute("UPDATE destination_cursors SET last_tx = pg_current_xact_id()::text::bigint")
    return done
