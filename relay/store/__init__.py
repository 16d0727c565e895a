"""The store: everything relay keeps, in SQLite (the embedded default) or PostgreSQL (several nodes).

- base: the interface the rest of relay talks to (group-committed writes, reads, leadership)
- sqlite, postgres: the two backends
- dialect: where the two engines spell the same SQL differently
- schema: tables, indexes and their versioned migrations
- views: the inspection views and the queries behind them
- messages, tracking, configuration, suppression, reports, rollups: the works and read helpers of each part

The rest of relay imports from here and never learns which backend it talks to.
"""

from __future__ import annotations

from pathlib import Path

from relay.store.base import MAX_BATCH, Store, StoreClosed
from relay.store.configuration import (
    StoredConfiguration,
    bump_configuration_version,
    configuration_read,
    configuration_version,
    delete_cursor,
    destination_events,
    last_event_id,
    load_configuration,
    provision_cursor,
    put_set_suppression,
    record_destination_failure,
    save_cursor,
    set_suppression_options,
)
from relay.store.messages import EventRow, MessageRow, PendingCopy, mail_json, record_json
from relay.store.reports import (
    InboundReportRow,
    ReportedMessage,
    forget_inbound_reports,
    inbound_reports,
    message_by_header,
    purge_inbound_reports_chunk,
    record_report,
    reported_message,
)
from relay.store.rollups import (
    ROLLUPS,
    counts_after,
    forget_address,
    funnel_day_rows,
    high_water,
    link_day_rows,
    next_rollup_day,
    outbox_by_destination,
    purge_bodies_chunk,
    purge_events_chunk,
    purge_messages_chunk,
    queue_by_set,
    recipient_mark,
    roll_recipients,
    sets_with_events,
    settled_event_id,
    store_rollup_day,
)
from relay.store.sqlite import SqliteStore
from relay.store.suppression import (
    record_unsubscribe,
    suppress,
    suppressed_among,
    suppression_entries,
    unsuppress,
    with_suppression,
)
from relay.store.tracking import (
    VerdictRow,
    copy_clicks,
    copy_delivery_time,
    insert_events_json,
    tracking_events_after,
    tracking_mail,
    upsert_verdict_values,
    upsert_verdicts,
    verified_domain_work,
)
from relay.store.views import (
    FUNNEL_COUNTS,
    LINK_CLICKS,
    LINK_COUNTS,
    RECIPIENTS_BY_SEEKS,
    events_after,
    funnel_rows,
    link_rows,
    recipient_rows,
)


def is_url(target: str | Path) -> bool:
    return isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))


def has_database(target: str | Path) -> bool:
    """Whether there is a database at `target` for a command to read: a SQLite file that exists (opening would
    make an empty one), or any PostgreSQL URL (the operator made that database; the server answers for it)."""
    return is_url(target) or Path(target).exists()


def open_store(target: str | Path) -> Store:
    """The store at `target`: a PostgreSQL URL, or the path of a SQLite file."""
    if is_url(target):
        from relay.store.postgres import PostgresStore  # psycopg is needed only for PostgreSQL

        return PostgresStore(str(target))
    return SqliteStore(Path(target))


__all__ = [
    "EventRow",
    "FUNNEL_COUNTS",
    "InboundReportRow",
    "LINK_CLICKS",
    "LINK_COUNTS",
    "MAX_BATCH",
    "MessageRow",
    "PendingCopy",
    "RECIPIENTS_BY_SEEKS",
    "ROLLUPS",
    "ReportedMessage",
    "SqliteStore",
    "Store",
    "StoreClosed",
    "StoredConfiguration",
    "VerdictRow",
    "bump_configuration_version",
    "configuration_read",
    "configuration_version",
    "copy_clicks",
    "copy_delivery_time",
    "counts_after",
    "delete_cursor",
    "destination_events",
    "events_after",
    "forget_address",
    "forget_inbound_reports",
    "funnel_day_rows",
    "funnel_rows",
    "high_water",
    "inbound_reports",
    "insert_events_json",
    "last_event_id",
    "link_day_rows",
    "link_rows",
    "load_configuration",
    "mail_json",
    "message_by_header",
    "next_rollup_day",
    "outbox_by_destination",
    "provision_cursor",
    "purge_bodies_chunk",
    "purge_events_chunk",
    "purge_inbound_reports_chunk",
    "purge_messages_chunk",
    "put_set_suppression",
    "queue_by_set",
    "recipient_mark",
    "recipient_rows",
    "record_destination_failure",
    "record_json",
    "record_report",
    "record_unsubscribe",
    "reported_message",
    "roll_recipients",
    "save_cursor",
    "set_suppression_options",
    "sets_with_events",
    "settled_event_id",
    "store_rollup_day",
    "suppress",
    "suppressed_among",
    "suppression_entries",
    "tracking_events_after",
    "tracking_mail",
    "unsuppress",
    "upsert_verdict_values",
    "upsert_verdicts",
    "verified_domain_work",
    "with_suppression",
    "has_database",
    "is_url",
    "open_store",
]
