"""Event publishing: every configuration set's events to its webhook and file destinations.

The outbox is the `events` table itself: each destination has a cursor (`destination_cursors.last_event_id`)
and a task of its own that reads the set's matching events after it, in id order, sends them one at a time,
and moves the cursor on only after the receiver answered 2xx (a file: after the lines are fsync'd). So:
- nothing is lost: a receiver down for hours, or relay stopped, only delays; the cursor is on disk;
- delivery is at least once: a crash between the 2xx and the cursor write resends a few events (each carries
  `X-Relay-Event-Id`, and an SNS envelope a stable MessageId, to deduplicate on);
- order holds per destination, hence per message; one slow or failing destination holds up only itself;
- SQLite records every event whatever happens here; a disabled destination has no task and, enabled again,
  starts from the newest event (it receives nothing of what happened while it was disabled).
Failures are retried with exponential backoff (destination's retry_initial, doubling up to retry_max),
forever for connection errors, timeouts, 408, 429 and 5xx. A 4xx is the receiver saying this request is
wrong: after `max_refusals` of them the event is set aside in `destination_failures` (with the status and
body) and the destination goes on with the next event, so one malformed or unwanted event cannot stall it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import threading
import time
from pathlib import Path

from relay.config import Config
from relay.control import NOTICE_TYPES
from relay.core import publish
from relay.core.events import iso_ms
from relay.core.resolve import EVENT_TYPES, Destination
from relay.resolve import Resolver
from relay.store import (
    Store,
    configuration_read,
    destination_events,
    provision_cursor,
    record_destination_failure,
    save_cursor,
)

log = logging.getLogger("relay.destinations")
POLL_S = 0.1  # how often an idle destination looks for new events, and the supervisor for changes
BATCH = 200  # events read per query
SAVE_EVERY_S = 0.2  # a busy webhook destination writes its cursor this often
LEAD_CHECK_S = 2.0  # how often a node checks which destinations it publishes (several nodes, one database)


async def _write(store: Store, work):
    """store.write, shielded: a worker cancelled (stop, reconfiguration) while its write is queued must not
    cancel the store's future under the writer thread, which sets its result later."""
    return await asyncio.shield(store.write(work))


class FileSink:
    """JSON Lines appended to a file; `reopen()` (SIGHUP) closes it so logrotate's rename takes effect."""

    def __init__(self, path: str):
        self.path = Path(path)
        self._file = None
        self._lock = threading.Lock()

    def write(self, lines: list[bytes]) -> None:
        with self._lock:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "ab")  # noqa: SIM115 - kept open between batches
            self._file.write(b"".join(lines))
            self._file.flush()
            os.fsync(self._file.fileno())

    def reopen(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    close = reopen


class Worker:
    """Sends one destination's events, in order, from its cursor on."""

    def __init__(self, publisher: Publisher, set_name: str, dest: Destination):
        self.p, self.set_name, self.dest = publisher, set_name, dest
        self.types = tuple(EVENT_TYPES[t] for t in dest.event_types)
        if publisher.config.reputation.notify_destinations:  # a pause of the set concerns every destination
            self.types += NOTICE_TYPES
        self.sink = FileSink(dest.path) if dest.kind == "file" else None
        self.task: asyncio.Task | None = None
        self.cursor = self.saved = (-1, -1)  # position (store.configuration) of the last event delivered / saved
        self._saved_at = time.monotonic()

    @property
    def key(self) -> tuple[str, str]:
        return self.set_name, self.dest.name

    async def run(self) -> None:
        store = self.p.store
        self.cursor = self.saved = await _write(store,
            lambda c: provision_cursor(c, self.set_name, self.dest.name, True))
        while True:
            rows = await asyncio.to_thread(configuration_read, store, destination_events, self.set_name,
                                           self.types, self.cursor, BATCH)
            if not rows:
                await self.save()
                await asyncio.sleep(POLL_S)
                continue
            if self.sink is not None:
                await self._write_file(rows)
                self.cursor = rows[-1][:2]
                await self.save()
                continue
            for tx, event_id, record in rows:
                await self._post(event_id, record)
                self.cursor = tx, event_id
                if time.monotonic() - self._saved_at > SAVE_EVERY_S:
                    await self.save()

    async def save(self) -> None:
        """Persist the cursor. Webhook cursors are written at most every SAVE_EVERY_S while busy (not one fsync
        per event), on idle and at stop; a crash in between resends those events (at least once)."""
        if self.cursor == self.saved:
            return
        position = self.cursor
        await _write(self.p.store, lambda c: save_cursor(c, self.set_name, self.dest.name, position))
        self.saved, self._saved_at = position, time.monotonic()

    async def _write_file(self, rows: list[tuple[int, int, str]]) -> None:
        lines = [publish.jsonl_line(record) for _, _, record in rows]
        attempt = 0
        while True:
            try:
                await asyncio.to_thread(self.sink.write, lines)
                return
            except OSError as exc:  # disk full, permissions: retry, never skip
                attempt += 1
                delay = publish.backoff(attempt, self.dest.retry_initial, self.dest.retry_max)
                log.error("destination %s/%s: writing %s failed (%s); retrying in %.1fs", *self.key,
                          self.dest.path, exc, delay)
                self.sink.reopen()
                await asyncio.sleep(delay)

    async def _post(self, event_id: int, record: str) -> None:
        """Until the receiver takes it (2xx) or has refused it max_refusals times."""
        d = self.dest
        attempt = refusals = 0
        while True:
            attempt += 1
            body, headers = publish.webhook_request(
                record, event_id=event_id, set_name=self.set_name, destination=d.name, secret=d.secret,
                sns=d.sns_envelope, arn=self.p.arn(self.set_name, d), timestamp=iso_ms(int(time.time() * 1000)))
            status, detail = await self.p.post(d.url, body, headers, d.timeout)
            verdict = publish.classify(status) if status else "retry"
            if verdict == "ok":
                return
            if verdict == "refused":
                refusals += 1
                if refusals >= d.max_refusals:
                    log.error("destination %s/%s: event %d refused %d times (HTTP %d), set aside in"
                              " destination_failures", *self.key, event_id, refusals, status)
                    await _write(self.p.store, functools.partial(
                        record_destination_failure, set_name=self.set_name, destination=d.name, event_id=event_id,
                        time=iso_ms(int(time.time() * 1000)), status=status, reason=detail))
                    return
            delay = publish.backoff(attempt, d.retry_initial, d.retry_max)
            log.warning("destination %s/%s: event %d: %s; retry %d in %.1fs", *self.key, event_id,
                        f"HTTP {status}" if status else detail, attempt, delay)
            await asyncio.sleep(delay)


def _job(key: tuple[str, str]) -> str:
    return f"destination {key[0]}/{key[1]}"


class Publisher:
    """Runs one Worker per enabled destination of every set, following configuration changes."""

    def __init__(self, config: Config, store: Store, resolver: Resolver):
        self.config, self.store, self.resolver = config, store, resolver
        self.workers: dict[tuple[str, str], Worker] = {}
        self._session = None
        self._supervisor: asyncio.Task | None = None
        self._model = None
        self._led: set[tuple[str, str]] = set()  # destinations this node publishes (Store.try_lead)
        self._lead_checked = -LEAD_CHECK_S

    def arn(self, set_name: str, d: Destination) -> str:
        return publish.topic_arn(self.config.region, self.config.account_id, set_name, d.name, d.topic_arn)

    async def start(self) -> None:
        import aiohttp

        self._session = aiohttp.ClientSession(auto_decompress=False)
        await self._sync()
        self._supervisor = asyncio.create_task(self._supervise(), name="relay-publisher")

    async def post(self, url: str, body: bytes, headers: dict, timeout: float) -> tuple[int, str]:
        """(HTTP status, first bytes of the answer) or (0, the error) when no answer came."""
        import aiohttp

        try:
            async with self._session.post(url, data=body, headers=headers, allow_redirects=False,
                                          timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                text = (await resp.content.read(500)).decode("utf-8", "replace")
                return resp.status, text
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return 0, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            try:
                await self._sync()
            except Exception as exc:  # a database hiccup must not end publishing
                log.error("publisher: reading the configuration failed: %s", exc)

    async def _sync(self) -> None:
        """Start workers for new or changed enabled destinations this node leads, stop the others; record
        disabled ones."""
        model = await asyncio.to_thread(self.resolver.model)  # a read: never on the loop, which serves SMTP
        lead_check = time.monotonic() - self._lead_checked >= LEAD_CHECK_S
        if (model is self._model and not lead_check
                and all(w.task is not None and not w.task.done() for w in self.workers.values())):
            return
        self._model = model
        wanted: dict[tuple[str, str], Destination] = {}
        disabled = []
        for s in model.sets.values():
            for d in s.destinations:
                if d.enabled:
                    wanted[(s.name, d.name)] = d
                else:
                    disabled.append((s.name, d.name))
        # Remember which are disabled, so enabling one later (even in the file) starts from the newest event.
        await _write(self.store, lambda c: [provision_cursor(c, s, n, False) for s, n in disabled])
        if lead_check:
            await self._check_leadership(wanted)
        wanted = {key: d for key, d in wanted.items() if key in self._led}
        for key, worker in list(self.workers.items()):
            if wanted.get(key) != worker.dest or worker.task is None or worker.task.done():
                await self._stop_worker(key)
        for key, d in wanted.items():
            if key not in self.workers:
                worker = Worker(self, key[0], d)
                worker.task = asyncio.create_task(self._guard(worker), name=f"relay-destination-{key[0]}-{key[1]}")
                self.workers[key] = worker

    async def _check_leadership(self, wanted: dict[tuple[str, str], Destination]) -> None:
        """Exactly one node publishes each destination: the one holding its lock. A node that dies loses its
        locks with its connection, and another node's next check takes its destinations over from the cursor
        the dead node saved (events after it are sent again: at least once)."""
        self._lead_checked = time.monotonic()
        for key in self._led - wanted.keys():
            await asyncio.to_thread(self.store.resign, _job(key))
        self._led = {key for key in wanted if await asyncio.to_thread(self.store.try_lead, _job(key))}

    async def _guard(self, worker: Worker) -> None:
        try:
            await worker.run()
        except asyncio.CancelledError:
            raise
        except Exception:  # restarted by the supervisor from the saved cursor
            log.exception("destination %s/%s stopped; restarting", *worker.key)
            await asyncio.sleep(1.0)

    async def _stop_worker(self, key: tuple[str, str]) -> None:
        worker = self.workers.pop(key)
        if worker.task is not None:
            worker.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await worker.task
        with contextlib.suppress(Exception):  # what was delivered before the stop
            await worker.save()
        if worker.sink is not None:
            worker.sink.close()

    def reopen(self, config: Config | None = None) -> None:
        """SIGHUP: reopen every file (logrotate), follow a reloaded configuration."""
        if config is not None:
            self.config = config
        for worker in self.workers.values():
            if worker.sink is not None:
                worker.sink.reopen()

    async def stop(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        for key in list(self.workers):
            await self._stop_worker(key)
        if self._session is not None:
            await self._session.close()
