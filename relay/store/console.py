"""The web console's reads: the questions its pages ask that the inspection views do not answer as they are.

Each helper is a read (Store.read): a function of a connection, in the SQL both engines read alike, asking
the connection's dialect where they differ. A set is chosen by `scope`: EVERY_SET, or one set's name (None:
mail sent without a set). Times are ISO strings as the events table keeps them; days are YYYY-MM-DD (UTC).
Every query seeks an index (relay.store.schema); what a page costs is measured by bench/bench_console.py.
"""

from __future__ import annotations

import json
from datetime import date, timedelta
from typing import Final

from relay.core.suppression import Suppression
from relay.store.rollups import sets_with_events
from relay.store.views import DAY_END, FUNNEL_COUNTS, FUNNEL_MARK, LINK_COUNTS, LINK_MARK, dicts, queries

EVERY_SET: Final = "\0every set"  # not a set name (those are A-Z a-z 0-9 _ -)
Scope = str | None
_COPY = "e.message_id || ' ' || e.recipient"


def _set_clause(scope: Scope, column: str = "configuration_set") -> tuple[str, list]:
    """The condition on `column` that chooses `scope`, and its parameters ('' when every set)."""
    if scope == EVERY_SET:
        return "", []
    if scope is None:
        return f" AND {column} IS NULL", []
    return f" AND {column} = ?", [scope]


def _containing(text: str) -> str:
    """A LIKE pattern (ESCAPE '\\') of the values that contain `text` as it is, % and _ included."""
    return "%" + text.strip().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _domain_of(conn, column: str) -> str:
    """The lower-case domain of an address column."""
    at = f"strpos({column}, '@')" if conn.dialect.postgres else f"instr({column}, '@')"
    return f"lower(substr({column}, {at} + 1))"


# --- the funnel ---------------------------------------------------------------------------------------------

def funnel_days(conn, scope: Scope, since_day: str, until_day: str) -> list[dict]:
    """funnel_daily's rows (one per set and day) from `since_day` to `until_day`, both included.

    The closed days come from funnel_rollup, the days after its mark from funnel_daily with the mark given as a
    value: compared with the view's own subquery, the planner would walk the set's index from `since_day` on,
    a long range's every event. Both in one snapshot, so a rollup moving the mark meanwhile counts no day twice.
    Every set is read one set at a time, as `relay stats` does (unnamed, the planner scans every event)."""
    conn.execute(conn.dialect.begin_snapshot)
    try:
        names = sets_with_events(conn) if scope == EVERY_SET else [scope]
        mark = conn.execute(f"SELECT day FROM funnel_rollup_mark WHERE id = {FUNNEL_MARK}").fetchone()[0]
        live_since = _after(since_day, mark)  # one lower bound: of two, the planner may bound the index by either
        rows = []
        for name in names:
            where, params = _set_clause(name)
            rolled = "configuration_set = ?", ["" if name is None else name]
            rows += dicts(conn.execute(
                f"SELECT NULLIF(configuration_set, '') AS configuration_set, day, {', '.join(FUNNEL_COUNTS)}"
                f" FROM funnel_rollup WHERE {rolled[0]} AND day >= ? AND day <= ? AND day <= ? ORDER BY day",
                [*rolled[1], since_day, until_day, mark]))
            rows += dicts(conn.execute(
                f"SELECT configuration_set, day, {', '.join(FUNNEL_COUNTS)} FROM funnel_daily"
                f" WHERE day >= ? AND day <= ?{where} ORDER BY day", [live_since, until_day, *params]))
        return rows
    finally:
        conn.execute("COMMIT")


_PLAIN = "('Send', 'Delivery', 'Bounce', 'Complaint')"
_ENGAGED = "('Open', 'Click')"


def funnel_hours(conn, scope: Scope, hours: list[tuple[str, str]]) -> list[tuple[str, str, str | None, int]]:
    """(hour as YYYY-MM-DDTHH, event type, the verdict of an open or click, events) of each hour of `hours`
    ((start, end) ISO times). The counts come from events_type_time, which holds type, time and id, so no
    event row is read: every set hour by hour (each count follows the index's order, with no sorting); one
    set in one pass over the range, keeping the ids that events_set_day gives for the set and those days."""
    if not hours:
        return []
    if scope == EVERY_SET:
        out = []
        for start, end in hours:
            label = start[:13]
            out += [(label, kind, None, n) for kind, n in conn.execute(
                f"SELECT type, COUNT(*) FROM events WHERE type IN {_PLAIN} AND time >= ? AND time < ?"
                " GROUP BY type", (start, end))]
            out += [(label, kind, verdict, n) for kind, verdict, n in conn.execute(
                "SELECT e.type, v.verdict, COUNT(*) FROM events e LEFT JOIN tracking_verdicts v ON v.event_id = e.id"
                f" WHERE e.type IN {_ENGAGED} AND e.time >= ? AND e.time < ? GROUP BY e.type, v.verdict",
                (start, end))]
        return out
    since, until = hours[0][0], hours[-1][1]
    where, chosen = _set_clause(scope)
    of_set = ("e.id IN (SELECT id FROM events WHERE substr(time, 1, 10) >= ? AND substr(time, 1, 10) <= ?"
              f"{where})")
    params = [since, until, since[:10], until[:10], *chosen]
    plain = (f"SELECT substr(e.time, 1, 13), e.type, NULL, COUNT(*) FROM events e WHERE e.type IN {_PLAIN}"
             f" AND e.time >= ? AND e.time < ? AND {of_set} GROUP BY e.type, substr(e.time, 1, 13)")
    engaged = ("SELECT substr(e.time, 1, 13), e.type, v.verdict, COUNT(*) FROM events e"
               f" LEFT JOIN tracking_verdicts v ON v.event_id = e.id WHERE e.type IN {_ENGAGED}"
               f" AND e.time >= ? AND e.time < ? AND {of_set} GROUP BY e.type, substr(e.time, 1, 13), v.verdict")
    return [tuple(row) for sql in (plain, engaged) for row in conn.execute(sql, params).fetchall()]


def domain_rows(conn, scope: Scope, since_day: str, until_day: str, sample: int) -> list[dict]:
    """Per recipient domain, what became of the copies of the newest `sample` messages accepted from `since_day`
    to `until_day` (a message's copies are its recipients; one Send event stands for all of them):
    copies sent, delivered, bounced, complained, opened (by anyone, by a person: a human or proxy open, or a
    human click) and clicked (by anyone, by a person). Counted per copy, so a copy opened twice is one."""
    where, params = _set_clause(scope)
    d = conn.dialect
    human = ("(e.type = 'Open' AND v.verdict IN ('human', 'proxy')) OR (e.type = 'Click' AND v.verdict = 'human')")
    return dicts(conn.execute(f"""
        WITH sent AS (SELECT id FROM messages WHERE substr(received_at, 1, 10) >= ?
                      AND substr(received_at, 1, 10) <= ?{where} ORDER BY received_at DESC LIMIT ?),
             copies AS (SELECT message_id, recipient FROM recipients WHERE message_id IN (SELECT id FROM sent))
        SELECT {_domain_of(conn, 'c.recipient')} AS domain,
            COUNT(DISTINCT c.message_id || ' ' || c.recipient) AS sent,
            COUNT(DISTINCT CASE WHEN e.type = 'Delivery' THEN {_COPY} END) AS delivered,
            COUNT(DISTINCT CASE WHEN e.type = 'Bounce' THEN {_COPY} END) AS bounced,
            COUNT(DISTINCT CASE WHEN e.type = 'Complaint' THEN {_COPY} END) AS complained,
            COUNT(DISTINCT CASE WHEN e.type = 'Open' THEN {_COPY} END) AS opened,
            COUNT(DISTINCT CASE WHEN {human} THEN {_COPY} END) AS human_opened,
            COUNT(DISTINCT CASE WHEN e.type = 'Click' THEN {_COPY} END) AS clicked,
            {d.sum_if("e.type = 'Click' AND v.verdict = 'human'")} AS human_clicks
        FROM copies c JOIN events e ON e.message_id = c.message_id AND e.recipient = c.recipient
        LEFT JOIN tracking_verdicts v ON v.event_id = e.id AND e.type IN ('Open', 'Click')
        GROUP BY {_domain_of(conn, 'c.recipient')}
        ORDER BY sent DESC, domain""", [since_day, until_day, *params, sample]))


def link_range_rows(conn, scope: Scope, since_day: str, until_day: str) -> list[dict]:
    """link_clicks of one set over the days from `since_day` to `until_day`: the rolled-up days from
    link_rollup, the days after its mark from the set's clicks (events_click_set_time), as the link_clicks view
    adds them up. Unique counts are copies whose first click of the link fell in the range; most clicked first."""
    if scope == EVERY_SET:
        raise ValueError("link_range_rows: one set at a time")
    where, params = _set_clause(scope, "e.configuration_set")
    columns = ", ".join(LINK_COUNTS)
    conn.execute(conn.dialect.begin_snapshot)
    try:
        mark = conn.execute(f"SELECT day FROM funnel_rollup_mark WHERE id = {LINK_MARK}").fetchone()[0]
        live = queries(conn.dialect).link_days.format(where=f"{where} AND e.time >= ? AND e.time < ?")
        return dicts(conn.execute(f"""
            SELECT link, link_tags, SUM(clicks) AS clicks, SUM(unique_clicks) AS unique_clicks,
                SUM(human_clicks) AS human_clicks, SUM(unique_human_clicks) AS unique_human_clicks,
                MIN(first_click) AS first_click, MAX(last_click) AS last_click
            FROM (SELECT link, link_tags, {columns} FROM link_rollup
                  WHERE configuration_set = ? AND day >= ? AND day <= ? AND day <= ?
                  UNION ALL SELECT link, link_tags, {columns} FROM ({live}) days) l
            GROUP BY link, link_tags ORDER BY clicks DESC, link""",
            ["" if scope is None else scope, since_day, until_day, mark,
             *params, _after(since_day, mark), until_day + DAY_END]))
    finally:
        conn.execute("COMMIT")


def _after(since_day: str, mark: str) -> str:
    """The first day from `since_day` on that a rollup with `mark` has not rolled up."""
    return max(since_day, (date.fromisoformat(mark) + timedelta(days=1)).isoformat() if mark else "")


# --- messages -----------------------------------------------------------------------------------------------

def find_messages(conn, *, recipient: str | None = None, message_id: str | None = None,
                  subject: str | None = None, since: str | None = None, until: str | None = None,
                  limit: int = 50) -> list[dict]:
    """Messages by relay's message id or their Message-ID header, by recipient, by subject (a part of it, in any
    case) or
    by time (`since` <= sent < `until`), newest first: {message_id, time, configuration_set, mail_from,
    subject, recipients}. By recipient and by time the Send events are sought (events_recipient_time,
    events_type_time); by subject the messages accepted in the time range (messages_received)."""
    found: list[tuple[str, str, str | None]] = []  # (message id, time, set)
    window = ([" AND time >= ?"], [since]) if since else ([], [])
    if until:
        window[0].append(" AND time < ?")
        window[1].append(until)
    if message_id:
        wanted = message_id.strip()
        header = wanted if wanted.startswith("<") else f"<{wanted}>"
        found = conn.execute(
            "SELECT id, received_at, configuration_set FROM messages WHERE id = ? OR message_id_header IN (?, ?)",
            (wanted, wanted, header)).fetchall()
        if not found:  # a message whose record was purged while its events stay, or the events alone
            found = conn.execute("SELECT message_id, MIN(time), MIN(configuration_set) FROM events"
                                 " WHERE message_id = ? GROUP BY message_id", (wanted,)).fetchall()
    elif recipient:
        addresses = tuple(dict.fromkeys([recipient.strip(), recipient.strip().lower()]))
        marks = ",".join("?" * len(addresses))
        found = conn.execute(  # the message records' recipients, then the events of records already purged
            f"SELECT m.id, m.received_at, m.configuration_set FROM recipients r JOIN messages m ON m.id = r.message_id"
            f" WHERE r.recipient IN ({marks}){''.join(window[0]).replace('time', 'm.received_at')}"
            " ORDER BY m.received_at DESC LIMIT ?", [*addresses, *window[1], limit]).fetchall()
        found += conn.execute(
            f"SELECT message_id, MIN(time), MIN(configuration_set) FROM events WHERE recipient IN ({marks})"
            f" AND type IN ('Delivery', 'Bounce', 'DeliveryDelay'){''.join(window[0])}"
            " GROUP BY message_id ORDER BY MIN(time) DESC LIMIT ?", [*addresses, *window[1], limit]).fetchall()
    elif subject:
        found = conn.execute(
            "SELECT id, received_at, configuration_set FROM messages WHERE lower(subject) LIKE ? ESCAPE '\\'"
            f"{''.join(window[0]).replace('time', 'received_at')} ORDER BY received_at DESC LIMIT ?",
            [_containing(subject.lower()), *window[1], limit]).fetchall()
    else:
        found = conn.execute(
            f"SELECT message_id, time, configuration_set FROM events WHERE type = 'Send'{''.join(window[0])}"
            " ORDER BY time DESC LIMIT ?", [*window[1], limit]).fetchall()  # one Send per message
    return _decorated(conn, found, limit)


def _decorated(conn, found: list[tuple[str, str, str | None]], limit: int) -> list[dict]:
    """Each found message once, with its sender, subject and number of recipients (from its record when
    kept, else from its first event's mail object)."""
    seen: dict[str, dict] = {}
    for message_id, when, set_name in found:
        if message_id not in seen and len(seen) < limit:
            seen[message_id] = {"message_id": message_id, "time": when, "configuration_set": set_name,
                                "mail_from": None, "subject": None, "recipients": None}
    if not seen:
        return []
    marks = ",".join("?" * len(seen))
    for message_id, mail_from, subject, recipients in conn.execute(
            f"SELECT m.id, m.mail_from, m.subject, (SELECT COUNT(*) FROM recipients r WHERE r.message_id = m.id)"
            f" FROM messages m WHERE m.id IN ({marks})", list(seen)):
        seen[message_id].update(mail_from=mail_from, subject=subject, recipients=recipients)
    for message_id, row in seen.items():
        if row["mail_from"] is None:
            record = conn.execute("SELECT record FROM events WHERE message_id = ? ORDER BY id LIMIT 1",
                                  (message_id,)).fetchone()
            mail = json.loads(record[0]).get("mail", {}) if record else {}
            row.update(mail_from=mail.get("source"), subject=mail.get("commonHeaders", {}).get("subject"),
                       recipients=len(mail.get("destination") or []) or None)
    return list(seen.values())


def message_detail(conn, message_id: str) -> dict | None:
    """A message as the console shows it: its record (or its first event's mail object once the record is
    purged), its recipient copies, warnings, every event with verdict and reasons (message_timeline), and the
    clicks of each link and tags. None when relay knows nothing of it."""
    row = conn.execute(
        "SELECT id, received_at, mail_from, configuration_set, subject, message_id_header, size, client_ip,"
        " auth_user, (SELECT COUNT(*) FROM spool s WHERE s.message_id = m.id) FROM messages m WHERE id = ?",
        (message_id,)).fetchone()
    timeline = dicts(conn.execute(
        "SELECT event_id, time, type, recipient, detail, ip, user_agent, verdict, reasons, device"
        " FROM message_timeline WHERE message_id = ? ORDER BY event_id", (message_id,)))
    if row is None and not timeline:
        return None
    if row is not None:
        keys = ("message_id", "received_at", "mail_from", "configuration_set", "subject", "message_id_header",
                "size", "client_ip", "auth_user", "has_body")
        message = dict(zip(keys, row, strict=True))
        message["has_body"] = bool(message["has_body"])
    else:
        first = conn.execute("SELECT record, configuration_set FROM events WHERE message_id = ? ORDER BY id"
                             " LIMIT 1", (message_id,)).fetchone()
        mail = json.loads(first[0]).get("mail", {})
        message = {"message_id": message_id, "received_at": mail.get("timestamp"), "mail_from": mail.get("source"),
                   "configuration_set": first[1], "subject": mail.get("commonHeaders", {}).get("subject"),
                   "message_id_header": mail.get("commonHeaders", {}).get("messageId"), "size": None,
                   "client_ip": mail.get("sourceIp"), "auth_user": None, "has_body": False}
    for event in timeline:
        event["reasons"] = json.loads(event["reasons"]) if event["reasons"] else []
    return {
        "message": message,
        "recipients": dicts(conn.execute(
            "SELECT recipient, state, attempts, next_attempt_at, last_response, updated_at FROM recipients"
            " WHERE message_id = ? ORDER BY position", (message_id,))),
        "warnings": dicts(conn.execute(
            "SELECT time, recipient, stage, warning FROM message_warnings WHERE message_id = ? ORDER BY time",
            (message_id,))),
        "timeline": timeline,
        "links": message_links(conn, message_id),
    }


def message_links(conn, message_id: str) -> list[dict]:
    """Per link and tags of a message's clicks: clicks, copies that clicked it, clicks a person made."""
    d = conn.dialect
    link, tags = d.json_text("e.record", "click", "link"), d.json_text("e.record", "click", "linkTags")
    human = d.sum_if("v.verdict = 'human'")
    return dicts(conn.execute(
        f"SELECT {link} AS link, {tags} AS link_tags, COUNT(*) AS clicks,"
        f" COUNT(DISTINCT e.recipient) AS unique_clicks, {human} AS human_clicks"
        " FROM events e LEFT JOIN tracking_verdicts v ON v.event_id = e.id"
        f" WHERE e.message_id = ? AND e.type = 'Click' GROUP BY {link}, {tags} ORDER BY clicks DESC",
        (message_id,)))


def message_body(conn, message_id: str) -> tuple[bytes, str, str | None] | None:
    """(the message as received, its tracking settings JSON, its first recipient) while the spool keeps it
    (until every copy is final); None after."""
    row = conn.execute(
        "SELECT s.raw, m.settings_json, (SELECT recipient FROM recipients r WHERE r.message_id = m.id"
        " ORDER BY position LIMIT 1) FROM messages m JOIN spool s ON s.message_id = m.id WHERE m.id = ?",
        (message_id,)).fetchone()
    return (bytes(row[0]), row[1], row[2]) if row else None


# --- the queue and the destinations -------------------------------------------------------------------------

def queue_replies(conn, limit: int) -> list[dict]:
    """Queued copies grouped by the upstream's last reply (None: not tried yet), the most common first."""
    return dicts(conn.execute(
        "SELECT last_response, COUNT(*) AS copies, MIN(updated_at) AS oldest, MAX(attempts) AS most_attempts"
        " FROM recipients WHERE state = 'queued' GROUP BY last_response ORDER BY copies DESC, last_response"
        " LIMIT ?", (limit,)))


def queue_oldest(conn, limit: int) -> list[dict]:
    """The queued copies accepted first: what has waited longest."""
    return dicts(conn.execute(
        "SELECT r.message_id, r.recipient, m.received_at, m.configuration_set, r.attempts, r.next_attempt_at,"
        " r.last_response, r.lease_owner FROM recipients r JOIN messages m ON m.id = r.message_id"
        " WHERE r.state = 'queued' ORDER BY m.received_at, r.message_id, r.position LIMIT ?", (limit,)))


def destination_states(conn) -> list[dict]:
    """Per destination cursor: whether enabled, where it is, the oldest event of its set it has not taken yet
    (its lag), and the events it set aside (destination_failures)."""
    beyond = ("(e.tx, e.id) > (c.last_tx, c.last_event_id)" if conn.dialect.postgres
              else "e.id > c.last_event_id")
    return dicts(conn.execute(
        "SELECT c.configuration_set, c.destination, c.enabled, c.last_event_id,"
        " (SELECT e.time FROM events e WHERE e.configuration_set = c.configuration_set AND"
        f" {beyond} ORDER BY e.id LIMIT 1) AS oldest_waiting,"
        " (SELECT COUNT(*) FROM destination_failures f WHERE f.configuration_set = c.configuration_set"
        " AND f.destination = c.destination) AS set_aside,"
        " (SELECT MAX(f.time) FROM destination_failures f WHERE f.configuration_set = c.configuration_set"
        " AND f.destination = c.destination) AS last_set_aside"
        " FROM destination_cursors c ORDER BY c.configuration_set, c.destination"))


def destination_failure_rows(conn, limit: int) -> list[dict]:
    """The events set aside last (a receiver refused them `max_refusals` times), newest first."""
    return dicts(conn.execute(
        "SELECT configuration_set, destination, event_id, time, status, reason FROM destination_failures"
        " ORDER BY time DESC LIMIT ?", (limit,)))


# --- the suppression list -----------------------------------------------------------------------------------

def suppression_search(conn, text: str, reason: str | None, after: tuple[str, str] | None,
                       limit: int) -> list[Suppression]:
    """Entries whose address contains `text` (all when empty), of `reason` when given, by address after the
    (address, reason) `after`: keyset pages, as suppression_entries."""
    sql = ("SELECT email_address, reason, last_update_time, message_id, feedback_id FROM suppressed_destinations"
           " WHERE 1 = 1")
    params: list = []
    if text.strip():
        sql += " AND email_address LIKE ? ESCAPE '\\'"
        params.append(_containing(text.lower()))
    if reason:
        sql += " AND reason = ?"
        params.append(reason)
    if after:
        sql += " AND (email_address > ? OR (email_address = ? AND reason > ?))"
        params += [after[0], after[0], after[1]]
    sql += " ORDER BY email_address, reason LIMIT ?"
    return [Suppression(*row) for row in conn.execute(sql, [*params, limit])]


def suppression_counts(conn) -> dict[str, int]:
    """Entries per reason."""
    return dict(conn.execute("SELECT reason, COUNT(*) FROM suppressed_destinations GROUP BY reason").fetchall())
