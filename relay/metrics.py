"""Prometheus metrics on their own listener: `[metrics] listen = "127.0.0.1:9108"`, path /metrics.

Not on the tracking listener: that one faces the internet, and queue depths and volumes are nobody's business.

Everything is computed at scrape time from the store with cheap indexed reads, so no hot path counts anything:
- counters (messages accepted, events by type: delivered, bounced, delayed, complaints, opens and clicks by
  verdict; instrumentation and DKIM warnings) tail the tables by id from where the previous scrape stopped:
  each scrape reads only what was written since, and events written by `relay track` workers (other
  processes) are counted as well. They start at 0 when relay starts, as Prometheus counters do;
- gauges (queue depth and age of the oldest queued copy, webhook outbox depth) are one grouped query each;
- delivery outcomes waiting for the store (disk full, I/O error) are counted by the delivery queue in the process;
- SMTP sessions are counted in the process: the SMTP handler's session set is swapped for one that counts
  what is added to it (relay/smtp.py stays as it is);
- the tracking listener's buffer of hits (this process's): hits waiting for the store now, and hits answered but
  never recorded, by reason. The recorder counts those drops as they happen (rare: never on the hot path).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from relay import store as store_module
from relay.config import Config

log = logging.getLogger("relay.metrics")

# eventType -> (metric name, help); Open/Click carry the verdict, Bounce its bounceType
EVENT_METRICS = {
    "Send": ("relay_sent", "Send events: messages accepted for delivery (one per message, as SES)"),
    "Delivery": ("relay_delivered", "Copies delivered (Delivery events)"),
    "Bounce": ("relay_bounced", "Copies bounced (Bounce events), by bounce type"),
    "DeliveryDelay": ("relay_delayed", "Delivery attempts deferred (DeliveryDelay events)"),
    "Complaint": ("relay_complaints", "Complaint events"),
    "Reject": ("relay_rejected", "Messages refused (Reject events)"),
    "Open": ("relay_opens", "Open events, by the listener's verdict"),
    "Click": ("relay_clicks", "Click events, by the listener's verdict"),
    "SendingPaused": ("relay_sets_paused", "Pauses of the set's sending (by the reputation guard, the CLI, the API)"),
}


def label(set_name: str | None) -> str:
    return set_name or ""


class CountingSet(set):
    """A set that counts additions: the SMTP handler adds each new session to its `sessions` set."""

    def __init__(self, items=()):
        super().__init__(items)
        self.added = 0

    def add(self, item) -> None:
        self.added += 1
        super().add(item)


class StoreCollector:
    """A prometheus_client collector over the store (see the module docstring)."""

    def __init__(self, store: store_module.Store, sessions: Callable[[], tuple[int, int]] | None = None,
                 sets: Callable[[], list[str]] = list, clock: Callable[[], float] = time.time,
                 unrecorded: Callable[[], int] | None = None):
        self.store, self.sessions, self.sets, self.clock = store, sessions, sets, clock
        self.unrecorded = unrecorded
        self._lock = threading.Lock()
        self._marks = store_module.configuration_read(store, store_module.high_water)
        self._totals: dict[tuple, int] = {}

    def _update(self) -> None:
        counts, self._marks = store_module.configuration_read(self.store, store_module.counts_after, self._marks)
        for key, n in counts.items():
            self._totals[key] = self._totals.get(key, 0) + n

    def collect(self) -> Iterator[Metric]:
        if self.unrecorded is not None:  # first: it matters most when the store is in trouble
            yield GaugeMetricFamily("relay_delivery_outcomes_unrecorded", "Delivery outcomes waiting for the store"
                                    " to take them (disk full, I/O error); no new delivery starts meanwhile",
                                    value=self.unrecorded())
        with self._lock:
            self._update()
            totals = dict(self._totals)
        yield from self._counters(totals)
        yield from self._gauges()

    def _counters(self, totals: dict[tuple, int]) -> Iterator[Metric]:
        known = [label(s) for s in self.sets()]
        accepted = CounterMetricFamily("relay_messages_accepted", "Messages accepted (answered 250)",
                                       labels=["configuration_set"])
        families = {kind: CounterMetricFamily(name, text, labels=["configuration_set"]
                                              + (["bounce_type"] if kind == "Bounce" else [])
                                              + (["verdict"] if kind in ("Open", "Click") else []))
                    for kind, (name, text) in EVENT_METRICS.items()}
        warnings = {stage: CounterMetricFamily(name, text, labels=["configuration_set"]) for stage, name, text in (
            ("instrument", "relay_instrumentation_warnings", "Warnings of instrumentation (a part left as it was)"),
            ("sign", "relay_dkim_warnings", "DKIM signing failures and warnings (no key, a key that failed)"))}
        seen: dict[tuple, int] = {("message", s): 0 for s in known}
        seen.update({("event", s, k, None): 0 for s in known for k in ("Send", "Delivery", "DeliveryDelay")})
        seen.update({("warning", s, st): 0 for s in known for st in warnings})
        for key in totals:
            seen[(key[0], label(key[1]), *key[2:])] = seen.get((key[0], label(key[1]), *key[2:]), 0) + totals[key]
        for key, n in sorted(seen.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
            if key[0] == "message":
                accepted.add_metric([key[1]], n)
            elif key[0] == "warning" and key[2] in warnings:
                warnings[key[2]].add_metric([key[1]], n)
            elif key[0] == "event" and key[2] in families:
                extra = [key[3] or "unknown"] if key[2] in ("Bounce", "Open", "Click") else []
                families[key[2]].add_metric([key[1], *extra], n)
        yield accepted
        yield from families.values()
        yield from warnings.values()
        if self.sessions is not None:
            total, active = self.sessions()
            yield CounterMetricFamily("relay_smtp_sessions", "SMTP connections accepted", value=total)
            yield GaugeMetricFamily("relay_smtp_sessions_active", "SMTP connections open now", value=active)

    def _gauges(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily("relay_queue_depth", "Recipient copies waiting for delivery",
                                  labels=["configuration_set"])
        age = GaugeMetricFamily("relay_queue_oldest_age_seconds", "Age of the oldest queued copy's message",
                                labels=["configuration_set"])
        queued = {label(s): (n, oldest) for s, n, oldest in
                  store_module.configuration_read(self.store, store_module.queue_by_set)}
        for s in self.sets():
            queued.setdefault(label(s), (0, None))
        now = self.clock()
        for s, (n, oldest) in sorted(queued.items()):
            depth.add_metric([s], n)
            age.add_metric([s], max(0.0, now - _epoch(oldest)) if oldest else 0.0)
        outbox = GaugeMetricFamily("relay_webhook_outbox_depth", "Events of the set beyond the destination's cursor",
                                   labels=["configuration_set", "destination"])
        for s, dest, n in store_module.configuration_read(self.store, store_module.outbox_by_destination):
            outbox.add_metric([s, dest], n)
        yield from (depth, age, outbox)


DROP_HELP = ("Tracking hits answered but never recorded, by reason: buffer_full (the store was behind and "
             "tracking.max_buffered_hits waited already), rejected (the store refused the hit itself), shutdown "
             "(still waiting for a failing store when relay stopped)")


class RecorderCollector:
    """The tracking listener's hit buffer (relay.tracking.Recorder) in this process."""

    def __init__(self, recorder):
        self.recorder = recorder

    def collect(self) -> Iterator[Metric]:
        dropped = CounterMetricFamily("relay_tracking_hits_dropped", DROP_HELP, labels=["reason"])
        for reason, n in list(self.recorder.dropped.items()):  # its keys never change: safe beside the loop
            dropped.add_metric([reason], n)
        yield dropped
        yield GaugeMetricFamily("relay_tracking_buffered_hits", "Tracking hits in memory waiting for the store "
                                "(buffered and being written)", value=self.recorder.depth)


def _epoch(iso_time: str) -> float:
    return datetime.strptime(iso_time, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


class MetricsServer:
    """The /metrics listener; collection runs in a thread (SQLite reads stay off the event loop)."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int):
        self.registry, self.host, self.requested_port = registry, host, port
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.requested_port, reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    async def _metrics(self, request: web.Request) -> web.Response:
        body = await asyncio.to_thread(generate_latest, self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


class Operations:
    """What `relay serve` runs for operations: the metrics listener and the maintenance task (rollups, retention)."""

    def __init__(self):
        self.server: MetricsServer | None = None
        self.retention: asyncio.Task | None = None

    async def start(self, relay) -> None:
        from relay.inspect import retention_task

        cfg: Config = relay.config
        if cfg.metrics.listen_host is not None:
            handler = relay.handler
            handler.sessions = CountingSet(handler.sessions)
            registry = CollectorRegistry(auto_describe=False)
            ProcessCollector(registry=registry)

            def sets() -> list[str]:
                return sorted(relay.config.configuration_sets)

            registry.register(StoreCollector(relay.store, lambda: (handler.sessions.added, len(handler.sessions)),
                                             sets, unrecorded=lambda: relay.queue.unrecorded))
            if relay.tracking is not None:
                registry.register(RecorderCollector(relay.tracking.recorder))
            from relay.reputation import ControlCollector  # sending switches and reputation

            registry.register(ControlCollector(lambda: relay.config, relay.store, relay.pipeline.resolver))
            self.server = MetricsServer(registry, cfg.metrics.listen_host, cfg.metrics.listen_port)
            await self.server.start()
        self.retention = asyncio.get_running_loop().create_task(retention_task(relay.store, lambda: relay.config))

    async def stop(self) -> None:
        if self.retention is not None:
            self.retention.cancel()
            await asyncio.gather(self.retention, return_exceptions=True)
        if self.server is not None:
            await self.server.stop()


async def start_operations(relay) -> Operations:
    ops = Operations()
    await ops.start(relay)
    return ops


async def stop_operations(relay) -> None:
    ops = getattr(relay, "operations", None)  # None: relay.start never ran
    if ops is not None:
        await ops.stop()
