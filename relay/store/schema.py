"""The schema of both backends, and its migrations.

The tables are written once; `render` turns a statement into PostgreSQL's spelling where the engines differ
(identity columns, binary data, 64-bit event ids, an insertion order for tables without an id). Changes to
the schema are migrations: numbered, applied in order, each recorded in `schema_migrations` in the same
transaction as its statements, so a database is always at one known version and an older relay refuses a
newer database instead of misreading it. Views are not migrations: they hold no data and are replaced at
every start, so an upgrade brings their new definitions (relay.store.views).

Migration 1 is the schema as it stood when migrations began; a database made before then already has those
tables (every statement is CREATE ... IF NOT EXISTS), so it is recorded as applied without change.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from relay.store.dialect import Dialect
from relay.store.views import FUNNEL_COUNTS, LINK_MARK, RECIPIENT_COLUMNS, view_statements

BASELINE = [
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
    # The funnel's typical query names a set and a range of days: this index serves both.
    "CREATE INDEX IF NOT EXISTS events_set_day ON events (configuration_set, (substr(time, 1, 10)), type)",
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
]

# PostgreSQL's words for what SQLite spells otherwise, applied to every statement of a migration.
_POSTGRES_SPELLING = [
    # an id the database assigns (SQLite: the rowid); explicit ids (the one-row tables) are still allowed
    (re.compile(r"\bid INTEGER PRIMARY KEY\b"), "id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"),
    (re.compile(r"\b((?:last_)?event_id|last_tx) INTEGER\b"), r"\1 BIGINT"),  # ids and xids outgrow 32 bits
    (re.compile(r"\bBLOB\b"), "BYTEA"),
]
# Tables without an id of their own are read in insertion order (metrics): SQLite's implicit rowid; PostgreSQL
# has none, so they get a column for it.
_POSTGRES_EXTRA = [
    "ALTER TABLE messages ADD COLUMN IF NOT EXISTS seq BIGINT GENERATED ALWAYS AS IDENTITY",
    "CREATE INDEX IF NOT EXISTS messages_seq ON messages (seq)",
    "ALTER TABLE message_warnings ADD COLUMN IF NOT EXISTS seq BIGINT GENERATED ALWAYS AS IDENTITY",
    "CREATE INDEX IF NOT EXISTS message_warnings_seq ON message_warnings (seq)",
]


def render(statement: str, dialect: Dialect) -> str:
    if not dialect.postgres:
        return statement
    for pattern, replacement in _POSTGRES_SPELLING:
        statement = pattern.sub(replacement, statement)
    return statement


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: Callable[[Dialect], list[str]]


# Several nodes: a node claims the copies it delivers for a while (a lease it renews), and a destination's
# cursor is a position in commit order. Event ids are taken before commit, so on PostgreSQL, where several
# transactions commit at once, a later commit may bring a lower id: each event records the transaction that
# wrote it, and publishing follows (tx, id) only up to the oldest transaction still running. SQLite commits
# one transaction at a time, in id order: its cursors keep tx 0.
_LEASES_AND_POSITIONS = [
    "ALTER TABLE recipients ADD COLUMN lease_owner TEXT",
    "ALTER TABLE recipients ADD COLUMN lease_until TEXT",
    "ALTER TABLE destination_cursors ADD COLUMN last_tx INTEGER NOT NULL DEFAULT 0",
]
_POSTGRES_POSITIONS = [
    "ALTER TABLE events ADD COLUMN tx BIGINT NOT NULL DEFAULT (pg_current_xact_id()::text::bigint)",
    "CREATE INDEX events_set_tx ON events (configuration_set, tx, id)",
]

# SES's email templates (CreateTemplate / CreateEmailTemplate): the parts as given, rendered at send time.
_TEMPLATES = [
    """CREATE TABLE email_templates (
        name TEXT PRIMARY KEY,
        subject TEXT,
        text_part TEXT,
        html_part TEXT,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    )""",
]

# Sending control: pausing (the account, a set) with who and why, a set's delivery and reputation options,
# quota counters shared by every node, the per-minute outcomes the reputation guard and GetSendStatistics read
# (tailed from the events), and identities with their DKIM keys (encrypted, relay.identities).
_SENDING_CONTROL = [
    # scope '' = the account, else a configuration set's name (of the file or the database). No row: enabled.
    """CREATE TABLE sending_status (
        scope TEXT PRIMARY KEY,
        enabled INTEGER NOT NULL,
        reason TEXT NOT NULL,
        changed_by TEXT NOT NULL,
        changed_at TEXT NOT NULL,
        fresh_start TEXT
    )""",
    # Every pause and resume, kept: who, why, when.
    """CREATE TABLE sending_history (
        id INTEGER PRIMARY KEY,
        time TEXT NOT NULL,
        scope TEXT NOT NULL,
        enabled INTEGER NOT NULL,
        reason TEXT NOT NULL,
        changed_by TEXT NOT NULL
    )""",
    "CREATE INDEX sending_history_scope ON sending_history (scope, id)",
    # SES's DeliveryOptions and ReputationOptions of sets made with the CLI or the API; NULL: never set.
    """CREATE TABLE set_sending_options (
        configuration_set TEXT PRIMARY KEY,
        tls_policy TEXT,
        max_delivery_seconds INTEGER,
        reputation_metrics INTEGER
    )""",
    # Recipients accepted per quota scope ('account', 'set:NAME', 'user:NAME'), per second (unit 's') and per
    # minute ('m'), keyed by the epoch second or minute. The accepting transaction adds to them.
    """CREATE TABLE send_counts (
        scope TEXT NOT NULL,
        unit TEXT NOT NULL,
        bucket INTEGER NOT NULL,
        count INTEGER NOT NULL,
        PRIMARY KEY (scope, unit, bucket)
    )""",
    # Outcomes per set ('' = none) and epoch minute of the events' own time, summed from the events.
    """CREATE TABLE send_statistics (
        configuration_set TEXT NOT NULL,
        minute INTEGER NOT NULL,
        attempts INTEGER NOT NULL,
        delivered INTEGER NOT NULL,
        bounced INTEGER NOT NULL,
        permanent INTEGER NOT NULL,
        complaints INTEGER NOT NULL,
        rejects INTEGER NOT NULL,
        PRIMARY KEY (configuration_set, minute)
    )""",
    # The last event summed (events are summed once settled: relay.reputation).
    "CREATE TABLE send_statistics_mark (id INTEGER PRIMARY KEY, last_event_id INTEGER NOT NULL)",
    "INSERT INTO send_statistics_mark (id, last_event_id) VALUES (1, 0)",
    # An address or a domain (lower case) created with the CLI or the API; the file's [identities] are not here.
    """CREATE TABLE email_identities (
        identity TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        created_at TEXT NOT NULL,
        verification_token TEXT,
        verification_status TEXT NOT NULL,
        verified_at TEXT,
        checked_at TEXT,
        check_detail TEXT NOT NULL DEFAULT '',
        dkim_signing INTEGER NOT NULL,
        dkim_status TEXT NOT NULL,
        dkim_origin TEXT,
        dkim_selector TEXT,
        dkim_algorithm TEXT,
        dkim_key TEXT,
        dkim_key_created_at TEXT,
        mail_from_domain TEXT,
        mail_from_behavior TEXT,
        mail_from_status TEXT
    )""",
]

MIGRATIONS: list[Migration] = [
    Migration(1, "baseline: messages, queue, events, verdicts, configuration, suppression, reports, rollups",
              lambda d: [render(s, d) for s in BASELINE] + (_POSTGRES_EXTRA if d.postgres else [])),
    Migration(2, "several nodes: queue leases, destination positions in commit order",
              lambda d: [render(s, d) for s in _LEASES_AND_POSITIONS] + (_POSTGRES_POSITIONS if d.postgres else [])),
    Migration(3, "email templates (the sending API)", lambda d: [render(s, d) for s in _TEMPLATES]),
    Migration(4, "sending control: pauses, quotas, reputation statistics, identities and their DKIM keys",
              lambda d: [render(s, d) for s in _SENDING_CONTROL]),
]
LATEST = MIGRATIONS[-1].version


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer relay than this one."""


_MIGRATIONS_TABLE = ("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,"
                     " description TEXT NOT NULL, applied_at TEXT NOT NULL)")


def schema_version(conn) -> int:
    conn.execute(_MIGRATIONS_TABLE)
    return conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()[0]


def migrate(conn, now: str, lock: Callable[[], None] = lambda: None) -> list[int]:
    """Bring the schema up to date and replace the views; the versions applied. Runs inside the caller's
    transaction (`lock` first takes whatever makes it the only migrator: several nodes may start at once)."""
    lock()
    current = schema_version(conn)
    if current > LATEST:
        raise SchemaTooNew(f"the database is at schema version {current}, this relay knows up to {LATEST}:"
                           " upgrade relay")
    applied = []
    for migration in MIGRATIONS:
        if migration.version <= current:
            continue
        for statement in migration.statements(conn.dialect):
            conn.execute(statement)
        conn.execute("INSERT INTO schema_migrations (version, description, applied_at) VALUES (?, ?, ?)",
                     (migration.version, migration.description, now))
        applied.append(migration.version)
    for statement in view_statements(conn.dialect):
        conn.execute(statement)
    return applied
