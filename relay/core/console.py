"""The web console's arithmetic: time ranges, chart series, rates and reputation levels (pure).

The console's pages (relay/console) read the store and hand the rows here; nothing in this module does I/O.
Counts follow the inspection views (README, "Reading the numbers"): days and hours are UTC; a "human" open is
the listener's verdict human or proxy (an image proxy fetches when a person opens), a human click the verdict
human; what has no verdict yet counts apart ("other"). Rates are on delivered copies, bounces on sent ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

PRESETS = {"24h": timedelta(hours=24), "7d": timedelta(days=7),
           "30d": timedelta(days=30), "90d": timedelta(days=90)}
DEFAULT_PRESET = "7d"
# A day by hour: hourly counts are read from the events (closed days are rolled up by day only), and a day of
# a 10-million-event database (170k events) is what a page can count within its 300 ms. Longer goes by day.
MAX_HOURS = 24
# A year of days is the longest range a chart shows; a longer one is cut to its last 366 days.
MAX_DAYS = 366
SERIES = ("sent", "delivered", "bounced", "complained", "human_opens", "machine_opens", "other_opens",
          "human_clicks", "machine_clicks", "other_clicks")
# SES reviews an account from a 5% bounce rate and may pause its sending from 10%; for complaints from 0.1%
# and 0.5% (Amazon SES Developer Guide, "Reputation metrics"). Bounces here are permanent bounces of sent copies,
# complaints are of delivered copies, as SES counts them.
BOUNCE_LEVELS = (0.05, 0.10)
COMPLAINT_LEVELS = (0.001, 0.005)


@dataclass(frozen=True)
class TimeRange:
    since: datetime  # included
    until: datetime  # excluded
    by: str  # "hour" or "day"
    preset: str  # the preset chosen, "" for dates given
    note: str = ""  # why the range or the step is not what was asked

    @property
    def since_day(self) -> str:
        return self.since.date().isoformat()

    @property
    def until_day(self) -> str:
        """The last day of the range (included)."""
        return (self.until - timedelta(microseconds=1)).date().isoformat()

    def hours(self) -> list[tuple[str, str]]:
        """(start, end) of each hour of an hourly range, as ISO times comparable with the events'."""
        starts = [self.since + timedelta(hours=i) for i in range(len(self.buckets()))] if self.by == "hour" else []
        return [(_iso(h), _iso(h + timedelta(hours=1))) for h in starts]

    def buckets(self) -> list[str]:
        """The labels of the chart's bars: YYYY-MM-DD, or YYYY-MM-DDTHH by hour (as substr(time, 1, 13))."""
        if self.by == "hour":
            hours = int((self.until - self.since).total_seconds() // 3600)
            return [(self.since + timedelta(hours=i)).strftime("%Y-%m-%dT%H") for i in range(hours)]
        first = self.since.date()
        return [(first + timedelta(days=i)).isoformat() for i in range((self.until.date() - first).days)]

    def query(self) -> dict[str, str]:
        """The page's query parameters that give this range again (links between pages keep it)."""
        if self.preset:
            return {"range": self.preset, "by": self.by}
        return {"from": self.since_day, "to": self.until_day, "by": self.by}


def _iso(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _day(text: str) -> date | None:
    try:
        return date.fromisoformat(text.strip())
    except ValueError:
        return None


def parse_range(params: Mapping[str, str], now: datetime) -> TimeRange:
    """The range a page shows from its query: `range` (24h, 7d, 30d, 90d), or `from` and `to` (dates,
    both included); `by` hour or day (default: by hour up to MAX_HOURS, else by day). Anything unreadable
    gives the default range with a note, never an error."""
    now = now.astimezone(UTC)
    by = params.get("by", "")
    first, last = _day(params.get("from", "")), _day(params.get("to", ""))
    note = ""
    if first or last:
        last = last or now.date()
        first = first or last - timedelta(days=6)
        if first > last:
            first, last = last, first
        if (last - first).days >= MAX_DAYS:
            first = last - timedelta(days=MAX_DAYS - 1)
            note = f"a range is at most {MAX_DAYS} days: showing its last {MAX_DAYS}"
        since = datetime.combine(first, datetime.min.time(), UTC)
        until = datetime.combine(last + timedelta(days=1), datetime.min.time(), UTC)
        preset = ""
    else:
        preset = params.get("range", DEFAULT_PRESET)
        if preset not in PRESETS:
            note, preset = f"unknown range {preset!r}: showing {DEFAULT_PRESET}", DEFAULT_PRESET
        span = PRESETS[preset]
        if by == "hour" or (by != "day" and span <= timedelta(hours=MAX_HOURS)):
            until = now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
            since = until - span
        else:
            until = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), UTC)
            since = until - timedelta(days=span.days)
    hours = (until - since).total_seconds() / 3600
    if by not in ("hour", "day"):
        by = "hour" if hours <= MAX_HOURS else "day"
    elif by == "hour" and hours > MAX_HOURS:
        by, note = "day", note or f"by hour only up to {MAX_HOURS} hours: shown by day"
    return TimeRange(since, until, by, preset, note)


# --- series -------------------------------------------------------------------------------------------------

def _empty(buckets: list[str]) -> dict[str, list[int]]:
    return {name: [0] * len(buckets) for name in SERIES}


def day_series(rows: Iterable[Mapping], buckets: list[str]) -> dict[str, list[int]]:
    """Chart series per day from funnel_daily rows (any number of sets: summed)."""
    out, index = _empty(buckets), {b: i for i, b in enumerate(buckets)}
    for row in rows:
        i = index.get(row["day"])
        if i is None:
            continue
        n = {k: row.get(k) or 0 for k in row}
        adds = {"sent": n["sent"], "delivered": n["delivered"],
                "bounced": n["bounced_permanent"] + n["bounced_transient"], "complained": n["complained"],
                "human_opens": n["human_opens"], "machine_opens": n["machine_opens"],
                "other_opens": max(0, n["opens"] - n["human_opens"] - n["machine_opens"]),
                "human_clicks": n["human_clicks"], "machine_clicks": n["machine_clicks"],
                "other_clicks": max(0, n["clicks"] - n["human_clicks"] - n["machine_clicks"])}
        for name, value in adds.items():
            out[name][i] += value
    return out


_TYPE_SERIES = {"Send": "sent", "Delivery": "delivered", "Bounce": "bounced", "Complaint": "complained"}


def _engagement_series(kind: str, verdict: str | None) -> str:
    """The series of an Open or Click of a verdict (a proxy click is no person's: it counts as other)."""
    noun = "opens" if kind == "Open" else "clicks"
    if verdict == "human" or (verdict == "proxy" and kind == "Open"):
        return f"human_{noun}"
    return f"machine_{noun}" if verdict == "machine" else f"other_{noun}"


def hour_series(rows: Iterable[tuple[str, str, str | None, int]], buckets: list[str]) -> dict[str, list[int]]:
    """Chart series per hour from (hour, type, verdict, events) rows (relay.store.console.funnel_hours)."""
    out, index = _empty(buckets), {b: i for i, b in enumerate(buckets)}
    for hour, kind, verdict, n in rows:
        i = index.get(hour)
        if i is None:
            continue
        name = _TYPE_SERIES.get(kind) or _engagement_series(kind, verdict)
        out[name][i] += n
    return out


# --- rates --------------------------------------------------------------------------------------------------

def ratio(part: float | None, whole: float | None) -> float | None:
    return round(part / whole, 4) if part is not None and whole else None


def with_rates(totals: Mapping) -> dict:
    """A funnel row (or a sum of rows) with its rates: delivery and bounces of sent copies; complaints, opens
    and clicks of delivered ones."""
    out = dict(totals)
    sent, delivered = out.get("sent") or 0, out.get("delivered") or 0
    bounced = (out.get("bounced_permanent") or 0) + (out.get("bounced_transient") or 0)
    out.update(bounced=bounced, delivery_rate=ratio(delivered, sent), bounce_rate=ratio(bounced, sent),
               complaint_rate=ratio(out.get("complained") or 0, delivered),
               open_rate=ratio(out.get("unique_opens") or 0, delivered),
               human_open_rate=ratio(out.get("unique_human_opens") or 0, delivered),
               click_rate=ratio(out.get("unique_clicks") or 0, delivered),
               human_click_rate=ratio(out.get("unique_human_clicks") or 0, delivered))
    return out


def totals_by_set(rows: Iterable[Mapping], summed: Iterable[str]) -> dict[str | None, dict]:
    """funnel_daily rows summed per set over their days (unique counts are per day: a copy engaged on two
    days counts twice, as `relay stats` sums them)."""
    out: dict[str | None, dict] = {}
    for row in rows:
        total = out.setdefault(row["configuration_set"], {k: 0 for k in summed})
        for key in summed:
            total[key] += row.get(key) or 0
    return out


def level(rate: float | None, levels: tuple[float, float]) -> str:
    """"ok", "review" (SES would review the account) or "pause" (SES may pause its sending)."""
    if rate is None or rate < levels[0]:
        return "ok"
    return "review" if rate < levels[1] else "pause"


def reputation(totals: Mapping) -> dict:
    """A set's bounce rate (permanent bounces of sent copies) and complaint rate (of delivered copies) with
    where each stands against SES's review and pause levels."""
    bounce = ratio(totals.get("bounced_permanent") or 0, totals.get("sent") or 0)
    complaint = ratio(totals.get("complained") or 0, totals.get("delivered") or 0)
    return {"sent": totals.get("sent") or 0, "delivered": totals.get("delivered") or 0,
            "bounced_permanent": totals.get("bounced_permanent") or 0, "complained": totals.get("complained") or 0,
            "bounce_rate": bounce, "bounce_level": level(bounce, BOUNCE_LEVELS),
            "complaint_rate": complaint, "complaint_level": level(complaint, COMPLAINT_LEVELS)}


def domain_rates(row: Mapping) -> dict:
    """A row of the domain breakdown with its rates (delivery, bounces of sent copies; opens, clicks of
    delivered ones)."""
    out = dict(row)
    out.update(delivery_rate=ratio(row["delivered"], row["sent"]), bounce_rate=ratio(row["bounced"], row["sent"]),
               open_rate=ratio(row["opened"], row["delivered"]),
               human_open_rate=ratio(row["human_opened"], row["delivered"]),
               click_rate=ratio(row["clicked"], row["delivered"]))
    return out


def percent(rate: float | None, digits: int = 1) -> str:
    """0.1234 -> "12.3%"; None -> "-" (nothing to divide by)."""
    return "-" if rate is None else f"{rate * 100:.{digits}f}%"
