"""The inspection views: the questions a sender asks, each one short query in `sqlite3` or `psql`.

Days are UTC days of the event's own time (an open today of yesterday's mail counts today, as in SES's
dashboards). "Human" opens are the verdicts human and proxy (an image proxy fetches when a person opens); a
human click counts as an open of its copy when images were blocked. Rates are on delivered.

Each view is built for a dialect (relay.store.dialect): the same query, in each engine's words. Closed days
of the funnel and of the links, and the events of each address up to a mark, are rolled up into tables
(relay.store.rollups); the views add what came after.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from relay.store.dialect import SQLITE, Dialect

FUNNEL_COUNTS = ("sent", "delivered", "bounced_permanent", "bounced_transient", "delayed", "complained", "rejected",
                 "opens", "unique_opens", "human_opens", "machine_opens", "unique_human_opens", "clicks",
                 "unique_clicks", "human_clicks", "machine_clicks", "unique_human_clicks")
LINK_COUNTS = ("clicks", "unique_clicks", "human_clicks", "unique_human_clicks", "first_click", "last_click")
# Rollup marks (funnel_rollup_mark.id): every day up to and including `day` is rolled up in that table.
FUNNEL_MARK, LINK_MARK = 1, 2
# Appended to a day: after every time of that day and before the next day's, in any collation (an hour is at
# most 23; a '~' sorts after digits only in byte order, and PostgreSQL databases often sort as a person would).
DAY_END = "T99"
# The events after a mark ('' = none rolled up): compared on the whole time, so an index on time serves it.
_AFTER_MARK = (f"e.time > (SELECT CASE WHEN day = '' THEN '' ELSE day || '{DAY_END}' END FROM funnel_rollup_mark"
               " WHERE id = {mark})")
RECIPIENT_MARK = "(SELECT last_event_id FROM recipient_rollup_mark WHERE id = 1)"
_HUMAN_ENGAGED = ("e.type IN ('Open', 'Click') AND v.verdict IN ('human', 'proxy')"
                  " AND NOT (e.type = 'Click' AND v.verdict = 'proxy')")
# How a later part (x) and an earlier one (y) of a recipient_engagement column combine.
SUMMED, LATER = "sum", "later"
# recipient_engagement's columns (before bounce_state): name, SQL type, how parts combine (None: bounce_type).
RECIPIENT_COLUMN_KINDS = (
    ("delivered", "INTEGER NOT NULL", SUMMED), ("last_delivered", "TEXT", LATER), ("opens", "INTEGER NOT NULL", SUMMED),
    ("human_opens", "INTEGER NOT NULL", SUMMED), ("clicks", "INTEGER NOT NULL", SUMMED),
    ("human_clicks", "INTEGER NOT NULL", SUMMED), ("last_engaged", "TEXT", LATER),
    ("last_human_engaged", "TEXT", LATER), ("last_bounce", "TEXT", LATER), ("bounce_type", "TEXT", None),
    ("complaints", "INTEGER NOT NULL", SUMMED),
)
RECIPIENT_COLUMNS = [(c, t) for c, t, _m in RECIPIENT_COLUMN_KINDS]
RECIPIENT_EMPTY = ["NULL" if "NULL" not in t else "0" for _c, t in RECIPIENT_COLUMNS]
# The event types each column reads, so a seek for the events after the mark reads no others.
_TYPES = {"delivered": "'Delivery'", "last_delivered": "'Delivery'", "opens": "'Open'", "human_opens": "'Open'",
          "clicks": "'Click'", "human_clicks": "'Click'", "last_engaged": "'Open', 'Click'",
          "last_human_engaged": "'Open', 'Click'", "last_bounce": "'Bounce'", "bounce_type": "'Bounce'",
          "complaints": "'Complaint'"}
VIEW_NAMES = ("tracking_engagement", "funnel_live", "funnel_daily", "link_clicks", "recipient_engagement",
              "message_timeline")


@dataclass(frozen=True)
class Queries:
    """The view and rollup SQL of one dialect. Templates take `{where}` (and RECIPIENT_ROWS `{range}`)."""

    d: Dialect
    funnel_live: str  # the funnel of the events of `where`, per set and UTC day
    link_clicks: str  # per link of a set: unique = distinct recipient copies that clicked it
    link_days: str  # link rows per set, day and link, with first-click unique counts (summable over days)
    recipient_aggregates: dict[str, str]  # column -> its aggregate over the events `e` (verdicts `v`) of an address
    recipient_rows: str  # the rows of recipient_rollup for the events of `where`
    recipient_engagement: str
    recipients_by_seeks: str

    def merge(self, column: str, x: str, y: str) -> str:
        """A summed or latest-time column of a later part `x` and an earlier part `y`."""
        kind = next(m for c, _t, m in RECIPIENT_COLUMN_KINDS if c == column)
        return f"{x} + {y}" if kind == SUMMED else self.d.later(x, y)

    def part(self, column: str, recipient: str, events: str) -> str:
        """One column over an address's events of condition `events` (on `e`), by seeks on
        events_recipient_time."""
        agg = self.recipient_aggregates[column]
        joined = "LEFT JOIN tracking_verdicts v ON v.event_id = e.id" if "v." in agg else ""
        return (f"(SELECT {agg.format(range=events.replace('e.', 'b.'), who=recipient)} FROM events e {joined}"
                f" WHERE e.recipient = {recipient} AND e.type IN ({_TYPES[column]}) AND {events})")


def _same(d: Dialect, x: str, y: str) -> str:
    """x equals y, NULL equal to NULL."""
    return f"{x} IS NOT DISTINCT FROM {y}" if d.postgres else f"{x} IS {y}"


def _funnel_live(d: Dialect) -> str:
    """On SQLite bounces are counted apart, by index seeks, so the pass over every event never parses a record;
    PostgreSQL refuses a grouped expression inside a subquery and counts them in the same pass."""
    if d.postgres:
        is_permanent = f"{d.json_text('e.record', 'bounce', 'bounceType')} = 'Permanent'"
        permanent = f"COUNT(*) FILTER (WHERE e.type = 'Bounce' AND {is_permanent})"
    else:
        permanent = ("(SELECT COUNT(*) FROM events b WHERE b.configuration_set IS e.configuration_set"
                     "\n         AND substr(b.time, 1, 10) = substr(e.time, 1, 10) AND b.type = 'Bounce'"
                     f"\n         AND {d.json_text('b.record', 'bounce', 'bounceType')} = 'Permanent')")
    copy = "e.message_id || ' ' || e.recipient"
    human_open = "e.type = 'Open' AND v.verdict IN ('human', 'proxy')"
    return f"""SELECT e.configuration_set AS configuration_set, substr(e.time, 1, 10) AS day,
        {d.sum_if("e.type = 'Send'")} AS sent,
        {d.sum_if("e.type = 'Delivery'")} AS delivered,
        {permanent} AS bounced_permanent,
        {d.sum_if("e.type = 'Bounce'")} - {permanent} AS bounced_transient,
        {d.sum_if("e.type = 'DeliveryDelay'")} AS delayed,
        {d.sum_if("e.type = 'Complaint'")} AS complained,
        {d.sum_if("e.type = 'Reject'")} AS rejected,
        {d.sum_if("e.type = 'Open'")} AS opens,
        COUNT(DISTINCT CASE WHEN e.type = 'Open' THEN {copy} END) AS unique_opens,
        {d.sum_if(human_open)} AS human_opens,
        {d.sum_if("e.type = 'Open' AND v.verdict = 'machine'")} AS machine_opens,
        COUNT(DISTINCT CASE WHEN ({human_open})
                             OR (e.type = 'Click' AND v.verdict = 'human')
                            THEN {copy} END) AS unique_human_opens,
        {d.sum_if("e.type = 'Click'")} AS clicks,
        COUNT(DISTINCT CASE WHEN e.type = 'Click' THEN {copy} END) AS unique_clicks,
        {d.sum_if("e.type = 'Click' AND v.verdict = 'human'")} AS human_clicks,
        {d.sum_if("e.type = 'Click' AND v.verdict = 'machine'")} AS machine_clicks,
        COUNT(DISTINCT CASE WHEN e.type = 'Click' AND v.verdict = 'human'
                            THEN {copy} END) AS unique_human_clicks
    FROM events e LEFT JOIN tracking_verdicts v ON v.event_id = e.id AND e.type IN ('Open', 'Click')
    {{where}}
    GROUP BY e.configuration_set, substr(e.time, 1, 10)"""


def _link_clicks(d: Dialect) -> str:
    link, tags = d.json_text("e.record", "click", "link"), d.json_text("e.record", "click", "linkTags")
    return f"""SELECT e.configuration_set AS configuration_set,
        {link} AS link,
        {tags} AS link_tags,
        COUNT(*) AS clicks,
        COUNT(DISTINCT e.message_id || ' ' || e.recipient) AS unique_clicks,
        {d.sum_if("v.verdict = 'human'")} AS human_clicks,
        COUNT(DISTINCT CASE WHEN v.verdict = 'human' THEN e.message_id || ' ' || e.recipient END)
            AS unique_human_clicks,
        MIN(e.time) AS first_click,
        MAX(e.time) AS last_click
    FROM events e LEFT JOIN tracking_verdicts v ON v.event_id = e.id
    WHERE e.type = 'Click' {{where}}
    GROUP BY e.configuration_set, {link}, {tags}"""


def _link_days(d: Dialect) -> str:
    """A click that is its copy's first of that link (and tags) among the events kept: counting these per day
    and summing the days gives link_clicks's all-time unique counts, so closed days can be rolled up."""
    link, tags = d.json_text("e.record", "click", "link"), d.json_text("e.record", "click", "linkTags")
    earlier = f"""SELECT 1 FROM events p WHERE p.message_id = e.message_id AND p.id < e.id AND p.type = 'Click'
         AND {_same(d, 'p.recipient', 'e.recipient')}
         AND {_same(d, d.json_text('p.record', 'click', 'link'), link)}
         AND {_same(d, d.json_text('p.record', 'click', 'linkTags'), tags)}"""
    unique_human = (f"v.verdict = 'human' AND NOT EXISTS ({earlier}\n            AND EXISTS (SELECT 1 FROM"
                    f" tracking_verdicts pv WHERE pv.event_id = p.id AND pv.verdict = 'human'))")
    return f"""SELECT e.configuration_set AS configuration_set, substr(e.time, 1, 10) AS day,
        {link} AS link,
        {tags} AS link_tags,
        COUNT(*) AS clicks,
        {d.sum_if(f"NOT EXISTS ({earlier})")} AS unique_clicks,
        {d.sum_if("v.verdict = 'human'")} AS human_clicks,
        {d.sum_if(unique_human)}
            AS unique_human_clicks,
        MIN(e.time) AS first_click,
        MAX(e.time) AS last_click
    FROM events e LEFT JOIN tracking_verdicts v ON v.event_id = e.id
    WHERE e.type = 'Click' {{where}}
    GROUP BY e.configuration_set, substr(e.time, 1, 10), {link},
        {tags}"""


def _recipient_aggregates(d: Dialect) -> dict[str, str]:
    bounce_type, bounced = d.json_text("b.record", "bounce", "bounceType"), d.any_if("e.type = 'Bounce'")
    return {
        "delivered": d.sum_if("e.type = 'Delivery'"),
        "last_delivered": "MAX(CASE WHEN e.type = 'Delivery' THEN e.time END)",
        "opens": d.sum_if("e.type = 'Open'"),
        "human_opens": d.sum_if("e.type = 'Open' AND v.verdict IN ('human', 'proxy')"),
        "clicks": d.sum_if("e.type = 'Click'"),
        "human_clicks": d.sum_if("e.type = 'Click' AND v.verdict = 'human'"),
        "last_engaged": "MAX(CASE WHEN e.type IN ('Open', 'Click') THEN e.time END)",
        "last_human_engaged": f"MAX(CASE WHEN {_HUMAN_ENGAGED} THEN e.time END)",
        "last_bounce": "MAX(CASE WHEN e.type = 'Bounce' THEN e.time END)",
        # the type of the latest bounce among the events summed
        "bounce_type": f"CASE WHEN {bounced} THEN (SELECT {bounce_type} FROM events b"
                       " WHERE b.recipient = {who} AND b.type = 'Bounce' AND {range}"
                       " ORDER BY b.time DESC LIMIT 1) END",
        "complaints": d.sum_if("e.type = 'Complaint'"),
    }


def _engagement(q: Queries, source: str, live: str, base: dict[str, str]) -> str:
    """recipient_engagement's columns over `source` (addresses as `a.recipient`): the rolled-up part `base`
    with, when `live` (an address with events after the mark), the events after the mark."""

    def after_mark(column: str) -> str:
        return q.part(column, "a.recipient", f"e.id > {RECIPIENT_MARK}")

    merged = {}
    for column, _t, kind in RECIPIENT_COLUMN_KINDS:
        if kind is None:  # bounce_type: the live part's latest bounce when it is the later one
            merged[column] = (f"CASE WHEN {live} AND {after_mark('last_bounce')} >= COALESCE({base['last_bounce']},"
                              f" '') THEN {after_mark(column)} ELSE {base['bounce_type']} END")
            continue
        later = q.merge(column, base[column], f"COALESCE({after_mark(column)}, {'0' if kind == SUMMED else 'NULL'})")
        merged[column] = f"CASE WHEN {live} THEN {later} ELSE {base[column]} END"
    # the latest bounce's type when no delivery came after it: the address bounces now
    merged["bounce_state"] = (f"CASE WHEN {merged['last_bounce']} >= COALESCE({merged['last_delivered']}, '')"
                              f" THEN {merged['bounce_type']} END")
    names = [c for c, _t in RECIPIENT_COLUMNS if c != "bounce_type"]
    names.insert(names.index("complaints"), "bounce_state")
    return f"SELECT a.recipient AS recipient, {', '.join(f'{merged[c]} AS {c}' for c in names)} FROM {source}"


def _recipient_engagement(q: Queries) -> str:
    """Two parts, each computing its own columns, so a query on the view computes only the columns it names:
    the addresses of recipient_rollup, and the addresses whose events all came after the mark."""
    return f"WITH live AS (SELECT recipient FROM events WHERE id > {RECIPIENT_MARK})\n" + _engagement(
        q, "recipient_rollup a LEFT JOIN (SELECT DISTINCT recipient FROM live) l ON l.recipient = a.recipient",
        "l.recipient IS NOT NULL",
        {c: f"a.{c}" for c, _t in RECIPIENT_COLUMNS}) + "\nUNION ALL\n" + _engagement(
        q, "(SELECT DISTINCT recipient FROM live) a WHERE a.recipient IS NOT NULL"
        " AND NOT EXISTS (SELECT 1 FROM recipient_rollup r WHERE r.recipient = a.recipient)",
        "true", dict(zip([c for c, _t in RECIPIENT_COLUMNS], RECIPIENT_EMPTY, strict=True)))


def _recipients_by_seeks(d: Dialect) -> str:
    """recipient_engagement as it was before recipient_rollup, every address's events by index seeks (about
    1 s for 200k addresses and 10M events on SQLite): the benchmark's baseline and the tests' oracle."""
    return f"""SELECT a.recipient AS recipient,
    (SELECT COUNT(*) FROM events e WHERE e.recipient = a.recipient AND e.type = 'Delivery') AS delivered,
    (SELECT MAX(time) FROM events e WHERE e.recipient = a.recipient AND e.type = 'Delivery') AS last_delivered,
    (SELECT COUNT(*) FROM events e WHERE e.recipient = a.recipient AND e.type = 'Open') AS opens,
    (SELECT COUNT(*) FROM events e JOIN tracking_verdicts v ON v.event_id = e.id
     WHERE e.recipient = a.recipient AND e.type = 'Open' AND v.verdict IN ('human', 'proxy')) AS human_opens,
    (SELECT COUNT(*) FROM events e WHERE e.recipient = a.recipient AND e.type = 'Click') AS clicks,
    (SELECT COUNT(*) FROM events e JOIN tracking_verdicts v ON v.event_id = e.id
     WHERE e.recipient = a.recipient AND e.type = 'Click' AND v.verdict = 'human') AS human_clicks,
    (SELECT MAX(time) FROM events e WHERE e.recipient = a.recipient AND e.type IN ('Open', 'Click')) AS last_engaged,
    (SELECT MAX(e.time) FROM events e JOIN tracking_verdicts v ON v.event_id = e.id
     WHERE e.recipient = a.recipient AND e.type IN ('Open', 'Click')
       AND v.verdict IN ('human', 'proxy') AND NOT (e.type = 'Click' AND v.verdict = 'proxy')) AS last_human_engaged,
    (SELECT MAX(time) FROM events e WHERE e.recipient = a.recipient AND e.type = 'Bounce') AS last_bounce,
    (SELECT CASE WHEN b.time >= COALESCE((SELECT MAX(d.time) FROM events d WHERE d.recipient = a.recipient
                                            AND d.type = 'Delivery'), '')
                 THEN {d.json_text('b.record', 'bounce', 'bounceType')} END
     FROM events b WHERE b.recipient = a.recipient AND b.type = 'Bounce' ORDER BY b.time DESC LIMIT 1) AS bounce_state,
    (SELECT COUNT(*) FROM events e WHERE e.recipient = a.recipient AND e.type = 'Complaint') AS complaints
FROM (SELECT DISTINCT recipient FROM events WHERE recipient IS NOT NULL) a"""


@functools.cache
def queries(d: Dialect) -> Queries:
    aggregates = _recipient_aggregates(d)
    rows = f"""SELECT e.recipient, {", ".join(aggregates[c] for c, _t in RECIPIENT_COLUMNS)}
    FROM events e LEFT JOIN tracking_verdicts v ON v.event_id = e.id AND e.type IN ('Open', 'Click')
    WHERE e.recipient IS NOT NULL AND {{where}}
    GROUP BY e.recipient""".replace("{who}", "e.recipient")
    q = Queries(d, _funnel_live(d), _link_clicks(d), _link_days(d), aggregates, rows, "", _recipients_by_seeks(d))
    return Queries(**{**q.__dict__, "recipient_engagement": _recipient_engagement(q)})


def view_statements(d: Dialect) -> list[str]:
    """Statements that replace every view (dropped first, all of them: they depend on one another)."""
    q = queries(d)
    cascade = " CASCADE" if d.postgres else ""
    drops = [f"DROP VIEW IF EXISTS {name}{cascade}" for name in reversed(VIEW_NAMES)]
    detail = ", ".join(d.json_text("e.record", *path) for path in (
        ("click", "link"), ("bounce", "bounceType"), ("deliveryDelay", "delayType"), ("delivery", "smtpResponse")))
    return drops + [
        # Per recipient copy: every open and click (SES counts them all) and the ones a person made. `opened` is
        # 1 when a real open (person or image proxy) or a human click exists: a click proves the message was
        # opened even when images were blocked (`opened_by_click_only`). Unique opens of a message:
        #   SELECT COUNT(*) FROM tracking_engagement WHERE message_id = ? AND opened = 1
        """CREATE VIEW tracking_engagement AS
    SELECT e.message_id, e.recipient,
        SUM(CASE WHEN e.type = 'Open' THEN 1 ELSE 0 END) AS opens,
        SUM(CASE WHEN e.type = 'Open' AND v.verdict IN ('human', 'proxy') THEN 1 ELSE 0 END) AS real_opens,
        SUM(CASE WHEN e.type = 'Click' THEN 1 ELSE 0 END) AS clicks,
        SUM(CASE WHEN e.type = 'Click' AND v.verdict = 'human' THEN 1 ELSE 0 END) AS human_clicks,
        MAX(CASE WHEN e.type = 'Open' AND v.verdict IN ('human', 'proxy') THEN 1
                 WHEN e.type = 'Click' AND v.verdict = 'human' THEN 1 ELSE 0 END) AS opened,
        CASE WHEN SUM(CASE WHEN e.type = 'Open' AND v.verdict IN ('human', 'proxy') THEN 1 ELSE 0 END) = 0
              AND SUM(CASE WHEN e.type = 'Click' AND v.verdict = 'human' THEN 1 ELSE 0 END) > 0
             THEN 1 ELSE 0 END AS opened_by_click_only,
        MIN(e.time) AS first_time,
        MAX(e.time) AS last_time
    FROM events e LEFT JOIN tracking_verdicts v ON v.event_id = e.id
    WHERE e.type IN ('Open', 'Click')
    GROUP BY e.message_id, e.recipient""",
        "CREATE VIEW funnel_live AS " + q.funnel_live.format(
            where="WHERE substr(e.time, 1, 10) > (SELECT day FROM funnel_rollup_mark WHERE id = 1)"),
        f"""CREATE VIEW funnel_daily AS
    SELECT configuration_set, day, {", ".join(FUNNEL_COUNTS)},
        CASE WHEN delivered > 0 THEN {d.real("ROUND(1.0 * unique_opens / delivered, 4)")} END AS open_rate,
        CASE WHEN delivered > 0 THEN {d.real("ROUND(1.0 * unique_human_opens / delivered, 4)")} END AS human_open_rate,
        CASE WHEN delivered > 0 THEN {d.real("ROUND(1.0 * unique_clicks / delivered, 4)")} END AS click_rate,
        CASE WHEN delivered > 0 THEN {d.real("ROUND(1.0 * unique_human_clicks / delivered, 4)")} END
            AS human_click_rate
    FROM (SELECT NULLIF(configuration_set, '') AS configuration_set, day, {", ".join(FUNNEL_COUNTS)}
          FROM funnel_rollup WHERE day <= (SELECT day FROM funnel_rollup_mark WHERE id = 1)
          UNION ALL SELECT * FROM funnel_live) f""",
        f"""CREATE VIEW link_clicks AS
    SELECT configuration_set, link, link_tags, SUM(clicks) AS clicks, SUM(unique_clicks) AS unique_clicks,
        SUM(human_clicks) AS human_clicks, SUM(unique_human_clicks) AS unique_human_clicks,
        MIN(first_click) AS first_click, MAX(last_click) AS last_click
    FROM (SELECT NULLIF(configuration_set, '') AS configuration_set, link, link_tags, {", ".join(LINK_COUNTS)}
          FROM link_rollup WHERE day <= (SELECT day FROM funnel_rollup_mark WHERE id = {LINK_MARK})
          UNION ALL SELECT configuration_set, link, link_tags, {", ".join(LINK_COUNTS)} FROM ({q.link_days.format(
              where="AND " + _AFTER_MARK.format(mark=LINK_MARK))}) days) l
    GROUP BY configuration_set, link, link_tags""",
        "CREATE VIEW recipient_engagement AS " + q.recipient_engagement,
        # Every event of a message in order, with the listener's verdict of opens and clicks.
        f"""CREATE VIEW message_timeline AS
    SELECT e.message_id, e.id AS event_id, e.time, e.type, e.recipient, e.configuration_set,
        COALESCE({detail}) AS detail,
        COALESCE({d.json_text('e.record', 'open', 'ipAddress')}, {d.json_text('e.record', 'click', 'ipAddress')}) AS ip,
        COALESCE({d.json_text('e.record', 'open', 'userAgent')}, {d.json_text('e.record', 'click', 'userAgent')})
            AS user_agent,
        v.verdict, v.reasons, v.device
    FROM events e LEFT JOIN tracking_verdicts v ON v.event_id = e.id""",
    ]


# The SQLite spellings under their old names, for the benchmark and the tests that compare with them.
LINK_CLICKS = queries(SQLITE).link_clicks
RECIPIENTS_BY_SEEKS = queries(SQLITE).recipients_by_seeks


# --- reading the views -------------------------------------------------------------------------------------

def _funnel_where(set_name: str | None) -> str:
    return "configuration_set IS NULL" if set_name is None else "configuration_set = ?"


def funnel_rows(conn, set_name: str | None, since_day: str) -> list[dict]:
    """funnel_daily of one set (None: mail sent without a set) from `since_day` (YYYY-MM-DD) on, by day."""
    params = ([] if set_name is None else [set_name]) + [since_day]
    cur = conn.execute(f"SELECT * FROM funnel_daily WHERE {_funnel_where(set_name)} AND day >= ? ORDER BY day",
                       params)
    return dicts(cur)


def link_rows(conn, set_name: str | None, since: str) -> list[dict]:
    """link_clicks of one set, counting only clicks at or after `since` (an ISO time), most clicked first."""
    where = "AND e.time >= ? AND " + ("e.configuration_set IS NULL" if set_name is None else "e.configuration_set = ?")
    params = [since] + ([] if set_name is None else [set_name])
    return dicts(conn.execute(queries(conn.dialect).link_clicks.format(where=where) + " ORDER BY clicks DESC, link",
                              params))


def recipient_rows(conn, since: str, limit: int) -> list[dict]:
    """recipient_engagement of the addresses delivered to, engaged or bounced since `since`, latest engaged
    first."""
    return dicts(conn.execute(
        "SELECT * FROM recipient_engagement WHERE last_engaged >= ? OR last_delivered >= ? OR last_bounce >= ?"
        " ORDER BY last_engaged IS NULL, last_engaged DESC, recipient LIMIT ?", (since, since, since, limit)))


def events_after(conn, after_id: int, types: tuple[str, ...], set_name: str | None, limit: int) -> list[tuple]:
    """(id, type, time, message_id, recipient, configuration_set, record JSON) with id > after_id."""
    sql = "SELECT id, type, time, message_id, recipient, configuration_set, record FROM events WHERE id > ?"
    params: list = [after_id]
    if types:
        sql += f" AND type IN ({','.join('?' * len(types))})"
        params += types
    if set_name is not None:
        sql += " AND configuration_set = ?"
        params.append(set_name)
    return conn.execute(sql + " ORDER BY id LIMIT ?", [*params, limit]).fetchall()


def dicts(cur) -> list[dict]:
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

