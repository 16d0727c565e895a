"""The queue stage: schedules every recipient copy that is durable in the store until it is final.

The store is the truth (recipients with state 'queued'); this module keeps an in-memory schedule of them, runs
at most `concurrency` deliveries at once, and reloads the schedule from the store at start, so a crash or a
restart resumes where it stopped. A copy whose delivery was cut off by a crash is delivered again: delivery
is at-least-once, never at-most-once.

A copy the upstream has answered is never sent again because its outcome could not be written (disk full, I/O
error): the outcome waits in memory and its write is retried, with backoff, until the store takes it. While any
outcome waits no new copy starts, so at most `concurrency` outcomes wait (a few KB each). A crash meanwhile loses
them; the store still lists those copies queued, so they are delivered again after the restart.

Several nodes share one store: a node delivers only the copies it holds a lease on (relay.store.messages): the
ones it accepted, and free ones it claims every CLAIM_EVERY of the lease (copies nobody holds: their node died,
or lost the database for longer than the lease). It renews its leases every RENEW_EVERY of the lease; a renewal
that does not return a copy means another node took it (this node's lease had run out), so this node drops it.
While renewals fail (the database is away), no new delivery starts once the last renewed lease has run out: the
copies may belong to another node by then. One node alone (SQLite) claims and renews the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from relay.core.events import iso_ms, ms_from_iso
from relay.core.outcome import QUEUED, Outcome
from relay.core.settings import TrackingSettings
from relay.pipeline import OutcomeNotRecorded, QueuedMessage
from relay.store import Store
from relay.store.messages import PendingCopy, claim_work, renew_work

log = logging.getLogger("relay.queue")
CACHE_BYTES = 64 * 1024 * 1024  # queued message bodies kept in memory; the rest are read back from the store
CRASH_RETRY_S = 30.0
# An outcome the store refused is written again after STORE_RETRY_FIRST_S (as Postfix's in_flow_delay, 1 s, paces
# mail while its queue cannot take it), doubling up to STORE_RETRY_MAX_S: a failed write is one small transaction,
# so a disk the operator frees is noticed within seconds at no real cost.
STORE_RETRY_FIRST_S = 1.0
STORE_RETRY_MAX_S = 10.0
REPORT_EVERY_S = 1.0  # at most one log line a second on outcomes waiting, however many wait
RENEW_EVERY = 1 / 3  # of the lease: two renewals may fail before another node may take the copies
CLAIM_EVERY = 1 / 6  # of the lease: how often a node looks for free copies (a dead node's, after its lease)
CLAIM_BATCH = 5000  # copies claimed at most at once (start, and each look)
LEASE_MARGIN_S = 2.0  # a node stops starting deliveries this long before its last renewed lease runs out


class MessageCache:
    """Queued messages by id, bounded by size; evicted ones are reloaded from the store when due."""

    def __init__(self, store: Store, limit: int = CACHE_BYTES):
        self.store, self.limit, self.size = store, limit, 0
        self._items: OrderedDict[str, QueuedMessage] = OrderedDict()

    def put(self, msg: QueuedMessage) -> None:
        if msg.id in self._items:
            return
        self._items[msg.id] = msg
        self.size += len(msg.raw)
        while self.size > self.limit and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self.size -= len(old.raw)

    def drop(self, message_id: str) -> None:
        msg = self._items.pop(message_id, None)
        if msg is not None:
            self.size -= len(msg.raw)

    async def get(self, message_id: str) -> QueuedMessage | None:
        msg = self._items.get(message_id)
        if msg is not None:
            self._items.move_to_end(message_id)
            return msg
        loaded = await asyncio.to_thread(self.store.load_message, message_id)
        if loaded is None:
            return None
        row, raw = loaded
        msg = QueuedMessage(row.id, row.mail_from, raw, row.mail, row.configuration_set,
                            TrackingSettings.from_json(row.settings), ms_from_iso(row.received_at),
                            mail_json=row.mail_json)
        self.put(msg)
        return msg


class DeliveryQueue:
    def __init__(self, store: Store, deliver: Callable[[QueuedMessage, str, int], Awaitable[Outcome]],
                 concurrency: int, clock: Callable[[], float] = time.time,
                 store_retry_s: tuple[float, float] = (STORE_RETRY_FIRST_S, STORE_RETRY_MAX_S),
                 node: str = "relay", lease_s: float = 60.0):
        self.store = store
        self.node, self.lease_s = node, lease_s
        self._held: set[tuple[str, str]] = set()  # (message id, recipient) of the copies this node delivers
        self._lease_valid_until = float("inf")  # monotonic: when the last renewed lease runs out
        self._leases: asyncio.Task | None = None
        self.deliver = deliver
        self.cache = MessageCache(store)
        self.clock = clock
        self.store_retry_s = store_retry_s
        self.unrecorded = 0  # outcomes the upstream gave that wait for the store (a gauge in relay.metrics)
        self._store_takes_writes = asyncio.Event()
        self._store_takes_writes.set()
        self._reported = float("-inf")
        self._heap: list[tuple[float, int, str, str, int]] = []
        self._seq = itertools.count()
        self._pending: dict[str, int] = {}  # message id -> copies not yet final
        self._slots = asyncio.Semaphore(concurrency)
        self._wakeup = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._dispatcher: asyncio.Task | None = None
        self._stopping = False

    async def start(self) -> None:
        claimed = await self._claim()
        if claimed:
            log.info("resuming %d queued copies", claimed)
        self._lease_valid_until = time.monotonic() + self.lease_s - LEASE_MARGIN_S
        self._dispatcher = asyncio.create_task(self._dispatch(), name="relay-queue")
        self._leases = asyncio.create_task(self._keep_leases(), name="relay-queue-leases")

    def lease_for_new(self) -> tuple[str, str]:
        """The lease a message accepted now is written with: this node delivers its copies."""
        return self.node, iso_ms(int((self.clock() + self.lease_s) * 1000))

    def add(self, msg: QueuedMessage, recipients: list[str]) -> None:
        """A message that is durable in the store, its copies leased to this node; they are due now."""
        if not recipients:  # every recipient already final (suppressed): nothing to deliver or to cache
            return
        self.cache.put(msg)
        for rcpt in recipients:
            self._schedule(0.0, msg.id, rcpt, 0)

    async def _claim(self) -> int:
        """Take the free copies (and this node's own, from before a restart) that are not scheduled here yet."""
        now = self.clock()
        copies: list[PendingCopy] = await self.store.write(claim_work(
            self.node, iso_ms(int(now * 1000)), iso_ms(int((now + self.lease_s) * 1000)), CLAIM_BATCH))
        new = [c for c in copies if (c.message_id, c.recipient) not in self._held]
        for copy in new:
            due = ms_from_iso(copy.next_attempt_at) / 1000 if copy.next_attempt_at else 0.0
            self._schedule(due, copy.message_id, copy.recipient, copy.attempts)
        return len(new)

    async def _keep_leases(self) -> None:
        """Renew this node's leases, and claim free copies, for as long as the queue runs (start just claimed)."""
        renew_at = time.monotonic() + self.lease_s * RENEW_EVERY
        claim_at = time.monotonic() + self.lease_s * CLAIM_EVERY
        while not self._stopping:
            await asyncio.sleep(max(0.0, min(renew_at, claim_at) - time.monotonic()))
            try:
                if time.monotonic() >= renew_at:
                    renew_at = time.monotonic() + self.lease_s * RENEW_EVERY
                    await self._renew()
                if time.monotonic() >= claim_at:
                    claim_at = time.monotonic() + self.lease_s * CLAIM_EVERY
                    claimed = await self._claim()
                    if claimed:
                        log.info("claimed %d queued copies no node held", claimed)
            except Exception as exc:  # the database is away: deliveries stop when the leases run out
                log.error("queue leases: %s; deliveries pause in %.0fs unless the store answers", exc,
                          max(0.0, self._lease_valid_until - time.monotonic()))

    async def _renew(self) -> None:
        started, before = time.monotonic(), set(self._held)  # copies added meanwhile were not asked about
        held = await self.store.write(renew_work(self.node, iso_ms(int((self.clock() + self.lease_s) * 1000))))
        lost = (before - held) & self._held
        if lost:
            log.warning("%d queued copies are now another node's (this node's lease ran out): dropped", len(lost))
            self._held -= lost
        self._lease_valid_until = started + self.lease_s - LEASE_MARGIN_S
        self._wakeup.set()

    def _schedule(self, due: float, message_id: str, recipient: str, attempts: int) -> None:
        self._held.add((message_id, recipient))
        heapq.heappush(self._heap, (due, next(self._seq), message_id, recipient, attempts))
        self._pending[message_id] = self._pending.get(message_id, 0) + 1
        self._wakeup.set()

    async def _dispatch(self) -> None:
        while not self._stopping:
            if not self._heap:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            wait = self._heap[0][0] - self.clock()
            if wait > 0:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), timeout=min(wait, 60.0))
                except TimeoutError:
                    pass
                continue
            if not self._store_takes_writes.is_set():  # outcomes wait for the store: no new copy starts
                await self._store_takes_writes.wait()
                continue
            if time.monotonic() >= self._lease_valid_until:  # leases not renewed: the copies may be another's
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), timeout=1.0)
                continue
            await self._slots.acquire()
            if self._stopping or not self._heap or not self._store_takes_writes.is_set():
                self._slots.release()  # (an outcome may have begun to wait while this waited for a slot)
                continue
            _, _, message_id, recipient, attempts = heapq.heappop(self._heap)
            task = asyncio.create_task(self._attempt(message_id, recipient, attempts + 1))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _attempt(self, message_id: str, recipient: str, attempts: int) -> None:
        try:
            if (message_id, recipient) not in self._held:  # another node's now
                self._finished(message_id, recipient)
                return
            msg = await self.cache.get(message_id)
            if msg is None:  # already final (a duplicate schedule after restart) or purged
                self._finished(message_id, recipient)
                return
            try:
                outcome = await self.deliver(msg, recipient, attempts)
            except OutcomeNotRecorded as late:
                outcome = late.outcome
                await self._record_late(late, f"{message_id} to {recipient}")
            if outcome.state == QUEUED:
                self._pending[message_id] -= 1
                due = (outcome.next_attempt_ms or 0) / 1000
                self._schedule(due, message_id, recipient, attempts)
            else:
                self._finished(message_id, recipient)
        except asyncio.CancelledError:
            raise  # shutting down: the copy stays queued in the store and is retried after restart
        except Exception:
            # A bug or a store failure while recording: the copy is still queued in the store; try again later.
            log.exception("delivery of %s to %s failed unexpectedly; retrying in %ss", message_id, recipient,
                          CRASH_RETRY_S)
            self._pending[message_id] -= 1
            self._schedule(self.clock() + CRASH_RETRY_S, message_id, recipient, attempts - 1)
        finally:
            self._slots.release()

    async def _record_late(self, late: OutcomeNotRecorded, copy: str) -> None:
        """Write the outcome of a copy the upstream answered until the store takes it (the copy is not sent again).
        An error that is not the store's (a fault in the record itself) would fail every time: logged, not retried;
        the store still lists the copy queued, so a restart delivers it again."""
        if not self.store.unavailable(late.error):
            log.error("the outcome of %s could not be recorded; not delivered again before a restart", copy,
                      exc_info=late.error)
            return
        self.unrecorded += 1
        self._store_takes_writes.clear()
        delay, error = self.store_retry_s[0], late.error
        try:
            while True:
                self._report_waiting(error, delay)
                await asyncio.sleep(delay)
                try:
                    await self.store.write(late.work)
                except Exception as exc:
                    delay, error = min(2 * delay, self.store_retry_s[1]), exc
                    continue
                log.info("the store took the outcome of %s; %d outcome(s) still wait", copy, self.unrecorded - 1)
                return
        finally:
            self.unrecorded -= 1
            if not self.unrecorded:
                self._store_takes_writes.set()

    def _report_waiting(self, error: Exception, delay: float) -> None:
        now = asyncio.get_running_loop().time()
        if now - self._reported >= REPORT_EVERY_S:
            self._reported = now
            log.error("%d delivery outcome(s) wait for the store (%s): their copies are not sent again, no new"
                      " delivery starts until the store takes them; next write in %gs", self.unrecorded, error,
                      delay)

    def _finished(self, message_id: str, recipient: str) -> None:
        self._held.discard((message_id, recipient))
        left = self._pending.get(message_id, 1) - 1
        if left <= 0:
            self._pending.pop(message_id, None)
            self.cache.drop(message_id)
        else:
            self._pending[message_id] = left

    async def stop(self, grace: float = 10.0) -> None:
        """Let deliveries in flight finish for up to `grace` seconds; the rest stay queued in the store."""
        self._stopping = True
        self._wakeup.set()
        for task in (self._dispatcher, self._leases):
            if task:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._tasks:
            _, slow = await asyncio.wait(set(self._tasks), timeout=grace)
            if self.unrecorded:
                log.error("stopping with %d delivery outcome(s) the store never took: those copies are delivered"
                          " again after the restart", self.unrecorded)
            for task in slow:
                task.cancel()
            await asyncio.gather(*slow, return_exceptions=True)

