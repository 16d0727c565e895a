"""The reputation guard: each configuration set's bounce and complaint rates over a rolling window, and a pause
for the set that reaches its thresholds, before SES's review levels or a mailbox provider's limits are reached.

Every `reputation.check_interval` one node (the one leading the job, Store.try_lead):
1. sums the events recorded since its last pass into send_statistics, per set and minute of the events' own
   time (Send recipients, deliveries, bounces, permanent ones, complaints, rejects). The events are the one
   record every path writes (delivery, bounce and complaint reports, the suppression list), and each pass reads
   only what is new. On PostgreSQL, events are read once settled (SETTLE_S old): an event's id is taken before
   its transaction commits, so a younger id may still be in flight;
2. reads each sending set's outcomes in its window (from its fresh start, when later: a resumed set is judged
   on what it sends from then on) and pauses a set at its threshold, once it sent `min_volume` messages there.
   The pause names the rate, is recorded with who (reputation-guard) and why, logged, counted in the metrics,
   and written as a SendingPaused event for the set's destinations. `relay config-set resume NAME` (or the API's
   sending switch) resumes it.

The same numbers feed SES's GetSendStatistics and SentLast24Hours, `relay stats --by reputation` and /metrics.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from relay import control
from relay.config import Config
from relay.core import control as core
from relay.core.control import GUARD, Outcomes, Thresholds
from relay.core.events import iso_ms, ms_from_iso
from relay.core.resolve import Model, SetDef
from relay.resolve import Resolver
from relay.store import Store, last_event_id, settled_event_id
from relay.store import control as sql

log = logging.getLogger("relay.reputation")
JOB = "reputation guard"
BATCH = 20_000  # events summed per store work: a long backlog is taken in steps, never in one transaction
SETTLE_S = 10.0  # PostgreSQL: events this old have committed (a transaction of the writer lasts milliseconds)
KEEP_DAYS = core.STATISTICS_DAYS + 1  # GetSendStatistics' two weeks, and a day's window beyond them


# --- summing the events -------------------------------------------------------------------------------------------

def sum_events(store: Store, now_ms: int, batch: int = BATCH) -> int:
    """Add the events recorded since the last pass to send_statistics; how many were read."""
    total = 0
    while True:
        mark = store.read(sql.statistics_mark)
        upto = store.read(_settled, now_ms)
        if upto <= mark:
            return total
        events = store.read(sql.counted_events, mark, upto, batch)
        top = events[-1].id if len(events) == batch else upto
        rows = core.minute_counts([(e.configuration_set, e.type, ms_from_iso(e.time), e.bounce_type,
                                    e.bounce_sub_type, e.recipients) for e in events])
        keep = now_ms // 60000 - KEEP_DAYS * sql.DAY_MINUTES
        if not store.submit(functools.partial(sql.add_statistics, mark=mark, top=top, rows=rows,
                                              keep_after_minute=keep)).result():
            return total  # another process summed meanwhile
        total += len(events)
        if top == upto:
            return total


def _settled(conn, now_ms: int) -> int:
    """The newest event id whose transaction has surely committed (SQLite commits in id order)."""
    if not conn.dialect.postgres:
        return last_event_id(conn)
    return settled_event_id(conn, iso_ms(now_ms - int(SETTLE_S * 1000)))


# --- judging the sets ---------------------------------------------------------------------------------------------

def judged_sets(cfg: Config, store: Store, model: Model, now_s: int
                ) -> Iterator[tuple[SetDef, Outcomes, Thresholds]]:
    """Every set with its outcomes in its window and its thresholds."""
    common_start = now_s // 60 - int(cfg.reputation.defaults.window_s // 60) + 1
    common = store.read(sql.outcomes_since, common_start)
    for s in sorted(model.sets.values(), key=lambda s: s.name):
        thresholds = cfg.reputation.thresholds(s.name)
        start = control.window_start(now_s, thresholds, s.sending)
        counts = common.get(s.name) if start == common_start else \
            store.read(sql.outcomes_since, start, s.name).get(s.name)
        yield s, Outcomes(*counts) if counts else Outcomes(), thresholds


def check(cfg: Config, store: Store, model: Model, now_s: int) -> list[str]:
    """Pause every sending set at its thresholds; the names of the sets paused."""
    paused = []
    for s, outcomes, thresholds in judged_sets(cfg, store, model, now_s):
        if not s.sending.enabled:
            continue
        why = core.guard_verdict(outcomes, thresholds)
        if why is None:
            continue
        details = {"bounceRate": round(outcomes.bounce_rate, 6), "complaintRate": round(outcomes.complaint_rate, 6),
                   "delivered": outcomes.delivered, "bounced": outcomes.bounced,
                   "permanentBounces": outcomes.permanent, "complaints": outcomes.complaints,
                   "windowSeconds": thresholds.window_s, "minVolume": thresholds.min_volume,
                   "bounceRateThreshold": thresholds.bounce_rate,
                   "complaintRateThreshold": thresholds.complaint_rate}
        if control.set_sending(cfg, store, s.name, False, why, GUARD, details):
            log.warning("reputation guard paused configuration set %s: %s; resume with `relay config-set resume"
                        " %s`", s.name, why, s.name)
            paused.append(s.name)
    return paused


def one_pass(cfg: Config, store: Store, resolver: Resolver, now_ms: int | None = None) -> list[str]:
    """Sum the new events, then judge the sets (a thread's work: every step reads or writes the store)."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    sum_events(store, now_ms)
    if not cfg.reputation.enabled:
        return []
    return check(cfg, store, resolver.model(), now_ms // 1000)


class Guard:
    """Runs `one_pass` every check_interval while this node leads the job."""

    def __init__(self, config: Callable[[], Config], store: Store, resolver: Resolver):
        self.config, self.store, self.resolver = config, store, resolver
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run(), name="relay-reputation-guard")

    async def _run(self) -> None:
        while True:
            try:
                if await asyncio.to_thread(self.store.try_lead, JOB):
                    await asyncio.to_thread(one_pass, self.config(), self.store, self.resolver)
            except Exception as exc:  # a store hiccup: the next pass sums from the same mark
                log.error("reputation guard: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(self.config().reputation.check_interval)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            await asyncio.to_thread(self.store.resign, JOB)


# --- what it shows: relay stats --by reputation, /metrics -------------------------------------------------------

def reputation_rows(cfg: Config, store: Store, only: str | None = None) -> list[dict]:
    model = Resolver(cfg, store).model()
    return [{"configuration_set": s.name, "sending": "yes" if s.sending.enabled else "PAUSED",
             "delivered": o.delivered, "bounced": o.bounced, "permanent": o.permanent, "complaints": o.complaints,
             "bounce_rate": core.percent(o.bounce_rate), "complaint_rate": core.percent(o.complaint_rate),
             "thresholds": f"{core.percent(t.bounce_rate)} / {core.percent(t.complaint_rate)}"
                           f" over {core.duration_text(t.window_s)}, min {t.min_volume}",
             "paused_because": "" if s.sending.enabled else s.sending.reason}
            for s, o, t in judged_sets(cfg, store, model, int(time.time()))
            if only is None or s.name == only]


REPUTATION_COLUMNS = [("configuration_set", "set"), ("sending", "sending"), ("delivered", "delivered"),
                      ("bounced", "bounced"), ("permanent", "permanent"), ("complaints", "complaints"),
                      ("bounce_rate", "bounce rate"), ("complaint_rate", "complaint rate"),
                      ("thresholds", "pauses at"), ("paused_because", "paused because")]


class ControlCollector:
    """Prometheus: the switches and each set's rates in its window."""

    def __init__(self, config: Callable[[], Config], store: Store, resolver: Resolver):
        self.config, self.store, self.resolver = config, store, resolver

    def collect(self) -> Iterator[Metric]:
        model = self.resolver.model()
        yield GaugeMetricFamily("relay_account_sending_enabled", "1 while the account may send, 0 while paused",
                                value=int(model.account_sending.enabled))
        families = {
            "enabled": GaugeMetricFamily("relay_set_sending_enabled", "1 while the set may send, 0 while paused",
                                         labels=["configuration_set"]),
            "bounce": GaugeMetricFamily("relay_reputation_bounce_rate", "Permanent bounces over delivered +"
                                        " bounced in the set's window", labels=["configuration_set"]),
            "complaint": GaugeMetricFamily("relay_reputation_complaint_rate", "Complaints over delivered in the"
                                           " set's window", labels=["configuration_set"]),
            "volume": GaugeMetricFamily("relay_reputation_volume", "Delivered + bounced in the set's window",
                                        labels=["configuration_set"]),
        }
        for s, o, _ in judged_sets(self.config(), self.store, model, int(time.time())):
            families["enabled"].add_metric([s.name], int(s.sending.enabled))
            families["bounce"].add_metric([s.name], o.bounce_rate)
            families["complaint"].add_metric([s.name], o.complaint_rate)
            families["volume"].add_metric([s.name], o.volume)
        yield from families.values()
