"""The tracking listener: open pixel, click redirects, health, domain challenges (the HTTP shell).

Every decision is made by the core: tokens (`relay.core.tokens`), SES records (`relay.core.events`), machine
verdicts (`relay.core.verdicts`), device summaries (`relay.core.useragent`), domain rules
(`relay.core.domains`). This module only talks HTTP and hands hits to the store.

Hot path: a request is answered from memory (token check, constant GIF or a 302) after its hit is appended to
an in-memory buffer. Every request is read by llhttp (httptools) under one set of limits (`_RequestReader`);
plain GET/HEAD pixel and click requests never build aiohttp request or response objects (`_FastConnection`);
every other request goes through aiohttp and `_handle`. Connections are accepted by the listener itself, at most
`tracking.max_connections` (below the open-file limit), idle ones closed first to make room. Every `flush_interval` (or
`flush_batch` hits) the buffer becomes SES records and verdicts on the event loop, and one insert-only work in
the store's group commit, one at a time (`Recorder`: bounded, retried while the store cannot write, drops
counted). `stop()` closes the sockets, waits for in-flight requests, then drains the buffer (a store that cannot
write gets `drain_timeout`). `relay track` can run several worker processes on one port (SO_REUSEPORT), each
with its own buffer into the shared store.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email
import email.policy
import gc
import html
import ipaddress
import json
import logging
import os
import re
import resource
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterable
from email.utils import formatdate
from pathlib import Path
from urllib.parse import parse_qsl

import httptools
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from relay import config as config_module
from relay import store as store_module
from relay.config import Config, TrackingConfig
from relay.core import events, verdicts
from relay.core.challenge import CHALLENGE_PATH, challenge_answer
from relay.core.settings import CLICK_PATH, OPEN_PATH, UNSUBSCRIBE_PATH
from relay.core.tokens import ClickClaims, Keyring, OpenClaims, UnsubscribeClaims, verify
from relay.core.uri import to_uri
from relay.core.useragent import summarize
from relay.inspect import scrubber as privacy_scrubber  # privacy (issue 8)
from relay.store import Store, open_store

log = logging.getLogger("relay.tracking")

DATA_DIR = Path(__file__).resolve().parent / "data"
# The smallest transparent GIF (1x1, 43 bytes).
GIF = (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00"
       b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;")
NO_STORE = "no-store, no-cache, must-revalidate, private"

_PIXEL_HEADERS = {"Content-Type": "image/gif", "Cache-Control": NO_STORE, "Pragma": "no-cache", "Expires": "0",
                  "X-Content-Type-Options": "nosniff"}
# The token carries the recipient's address: the destination must not receive the tracking URL as Referer.
_REDIRECT_HEADERS = {"Cache-Control": NO_STORE, "Referrer-Policy": "no-referrer"}
_PAGE_HEADERS = {"Content-Type": "text/html; charset=utf-8", "Cache-Control": NO_STORE,
                 "X-Content-Type-Options": "nosniff", "Content-Security-Policy": "default-src 'none'",
                 "Referrer-Policy": "no-referrer"}
# Static pages: nothing from the request is ever written into them.
LANDING = (b"<!doctype html><html><head><meta charset=utf-8><title>Link tracking</title></head><body>"
           b"<h1>Link tracking</h1><p>This address serves the links and images of email messages: it records "
           b"that a message was opened or a link followed, then forwards you to the link's destination.</p>"
           b"<p>There is nothing else to see here.</p></body></html>")
NOT_FOUND = (b"<!doctype html><html><head><meta charset=utf-8><title>Link not found</title></head><body>"
             b"<h1>Link not found</h1><p>This link is damaged, incomplete or no longer valid. Copy the whole "
             b"link from the message, or contact its sender.</p></body></html>")
BAD_REQUEST = b"<!doctype html><title>Bad request</title><h1>Bad request</h1>"
UNSUBSCRIBED = (b"<!doctype html><html><head><meta charset=utf-8><meta name=viewport content=\"width=device-width\">"
                b"<title>Unsubscribed</title></head><body><h1>You are unsubscribed</h1><p>You will no longer "
                b"receive these emails at this address.</p></body></html>")
UNSUBSCRIBE_FAILED = (b"<!doctype html><html><head><meta charset=utf-8><title>Please try again</title></head><body>"
                      b"<h1>Please try again</h1><p>Your request could not be recorded just now. Please try "
                      b"again in a few minutes.</p></body></html>")
ONE_CLICK_FIELD = ("List-Unsubscribe", "One-Click")  # the POST body RFC 8058 defines, as a form field
ONE_CLICK_BODY_LIMIT = 4096  # RFC 8058's body is 26 bytes; multipart adds a boundary and a part header
_UNSAFE_URL_CHAR = re.compile("[\x00-\x1f\x7f]")


# --- verdict lists ------------------------------------------------------------------------------------------

def load_lists(cfg: TrackingConfig) -> verdicts.Lists:
    """The operator's lists (Apple egress ranges, scanner user agents and networks); defaults from relay/data."""
    def read(path: Path | None, default: str | None) -> str:
        path = path or (DATA_DIR / default if default else None)
        if path is None:
            return ""
        try:
            return path.read_text(encoding="utf-8")
        except OSError as exc:
            log.warning("verdict list %s not loaded: %s", path, exc)
            return ""

    apple, problems = verdicts.parse_networks(read(cfg.apple_egress_file, None), "apple")
    networks, more = verdicts.parse_networks(read(cfg.scanner_networks_file, "scanner-networks.txt"), "scanner")
    for problem in problems + more:
        log.warning("verdict list: %s", problem)
    if cfg.apple_egress_file is None:
        log.info("no tracking.apple_egress_file: Apple Mail Privacy Protection opens will not be recognised")
    uas = verdicts.parse_user_agents(read(cfg.scanner_user_agents_file, "scanner-user-agents.txt"))
    return verdicts.Lists(apple_egress=apple, scanner_user_agents=tuple(uas), scanner_networks=networks)


def thresholds(cfg: TrackingConfig) -> verdicts.Thresholds:
    return verdicts.Thresholds(cfg.early_click_seconds, cfg.burst_window_seconds, cfg.burst_min_links)


# --- from hits to stored events and verdicts -----------------------------------------------------------------

_MAIL_SLOT = "\x00mail\x00"  # the stored mail JSON is spliced in unparsed (it is most of a record's bytes)
_compact_json = json.JSONEncoder(separators=(",", ":")).encode  # json.dumps(..., separators) builds one per call


_IP_SLOT, _TIME_SLOT, _UA_SLOT = "\x00ip\x00", "\x00time\x00", "\x00ua\x00"
_TEMPLATE_SLOTS = (_MAIL_SLOT, _IP_SLOT, _TIME_SLOT, _UA_SLOT)  # in the order a record holds them
_json_string = json.encoder.encode_basestring_ascii  # what _compact_json writes for a string


def _template(record_json: str) -> tuple[str, ...]:
    """A record's JSON with slots for mail, ip, timestamp and user agent, as the five texts around the slots.
    The slots come before the link and its tags (key order), so a tag holding a slot's text cannot move them;
    the timestamp's slot keeps its quotes (a timestamp needs no escaping)."""
    parts, pos = [], 0
    for slot in _TEMPLATE_SLOTS:
        text = json.dumps(slot)[1:-1] if slot == _TIME_SLOT else json.dumps(slot)
        at = record_json.index(text, pos)
        parts.append(record_json[pos:at])
        pos = at + len(text)
    parts.append(record_json[pos:])
    return tuple(parts)


def _id_time_ms(message_id: str) -> int | None:
    """Acceptance time packed in an SES-format id (`0100` + 12 hex digits of Unix ms)."""
    try:
        return int(message_id[4:16], 16) if len(message_id) > 16 and message_id[16] == "-" else None
    except ValueError:
        return None


class _Click:
    """A click of one copy, kept in memory while later clicks can still form a burst with it. Its event id is
    set by the store's writer thread when the batch that inserts it runs."""

    __slots__ = ("event_id", "hit", "size")

    def __init__(self, event_id: int | None, hit: verdicts.Hit):
        self.event_id, self.hit, self.size = event_id, hit, None


class EventWriter:
    """Turns hits into SES records and verdicts.

    `prepare` does all the Python work on the caller's thread (the event loop's, for the listener) and returns
    a small work for the store's writer thread that only inserts. Python on the writer thread would hold the
    GIL while the event loop waits for it after every socket call (a convoy that cost half the throughput).
    `read(helper, *args)` runs a store read helper on a connection the caller's thread may use.
    """

    scrub = staticmethod(lambda record: None)  # privacy (issue 8): relay.inspect.scrubber, set by TrackingServer
    MAX_RECENT = 64  # clicks kept per copy; a copy clicked more often than this within seconds is a flood
    MAX_COPIES = 20000
    NO_DELIVERY_TTL_MS = 2000  # how long "no Delivery event yet" is believed before asking the store again
    CLOCK_SKEW_MS = 60_000  # between the node that accepted a message and the one that delivered it

    def __init__(self, account_id: str, lists: verdicts.Lists, th: verdicts.Thresholds, read):
        self.account_id, self.read = account_id, read
        self.configure(lists, th)
        self._mails: dict[str, tuple[str, str | None, int | None]] = {}
        self._delivered: dict[tuple[str, str], tuple[int | None, int]] = {}  # copy -> (ms or None, asked at)
        self._recent: dict[tuple[str, str], list[_Click]] = {}
        self._templates: dict[tuple, tuple[str, ...]] = {}
        self._second: tuple[int, str] = (-1, "")

    def configure(self, lists: verdicts.Lists, th: verdicts.Thresholds) -> None:
        self.lists, self.th = lists, th
        self.window_ms = int(th.burst_window_seconds * 1000)
        # (type, method, ip, user agent) -> what they alone say, with these lists (`_judgement`)
        self._hit_judgements: dict[tuple[str, str, str, str], tuple[tuple, tuple]] = {}

    def forget(self) -> None:
        """After a failed batch: its clicks never reached the store, so the memory of recent clicks is wrong."""
        self._recent.clear()

    def _mail(self, message_id: str, recipient: str) -> tuple[str, str | None, int | None]:
        cached = self._mails.get(message_id)
        if cached is not None:
            return cached
        row = self.read(store_module.tracking_mail, message_id)
        if row is None:
            # The message row is gone (purged or another node's database): the event still counts.
            ms = _id_time_ms(message_id)
            mail = {"timestamp": events.iso_ms(ms) if ms is not None else "", "source": "",
                    "sendingAccountId": self.account_id, "messageId": message_id, "destination": [recipient],
                    "headersTruncated": False, "headers": [], "commonHeaders": {}, "tags": {}}
            return json.dumps(mail, separators=(",", ":")), None, ms
        mail_json, cset = row
        ts = json.loads(mail_json).get("timestamp")
        entry = (mail_json, cset, events.ms_from_iso(ts) if ts else None)
        if len(self._mails) >= 4096:
            self._mails.clear()
        self._mails[message_id] = entry
        return entry

    def prepare(self, hits: list[tuple]):
        """Records and verdicts for hits (kind, method, claims, ip, user agent, ms); the store work that writes
        them and returns how many events it inserted."""
        now = events.iso_ms(int(time.time() * 1000))
        records, verdict_rows, placed = [], [], []
        copies: dict[tuple[str, str], list[_Click]] = {}
        for i, (kind, method, claims, ip, ua, ms) in enumerate(hits):
            mail_json, cset, _ = self._mail(claims.message_id, claims.recipient)
            if kind == events.OPEN:
                verdict_rows.append((i, (*self._judge_open(method, ip, ua, ms), now)))
            else:
                click = _Click(None, verdicts.Hit(kind, method, ip, ua, ms, claims.url))
                copies.setdefault((claims.message_id, claims.recipient), []).append(click)
                placed.append((click, i))
            stamp = self._stamp(ms)
            records.append((kind, stamp, claims.message_id, claims.recipient, cset,
                            self._record_json(kind, claims, ip, ua, stamp, mail_json)))
        for copy, new in copies.items():
            verdict_rows += self._judge_new_clicks(copy, new, now)

        def work(conn) -> int:
            try:
                ids = store_module.insert_events_json(conn, records)
                for click, i in placed:
                    click.event_id = ids[i]
                rows = []
                for target, fields in verdict_rows:
                    event_id = ids[target] if isinstance(target, int) else target.event_id
                    if event_id is not None:  # None: an earlier batch holding that click failed
                        rows.append((event_id, *fields))
                store_module.upsert_verdict_values(conn, rows)
            except BaseException:
                for click, _ in placed:  # rolled back: these ids may be given to other rows
                    click.event_id = None
                raise
            return len(records)

        return work

    def _stamp(self, ms: int) -> str:
        """`events.iso_ms(ms)`, its date and time formatted once a second (hits come thousands a second)."""
        second, milli = divmod(ms, 1000)
        if second != self._second[0]:
            self._second = (second, events.iso_ms(second * 1000)[:-4])  # without "000Z"
        return f"{self._second[1]}{milli:03d}Z"

    def _record_json(self, kind: str, claims, ip: str, ua: str, stamp: str, mail_json: str) -> str:
        """The JSON of the core's open/click record, as `scrub` leaves it, with the mail's JSON spliced in: from
        a template per pixel or per link, so the record's dicts are built and encoded once, not for every hit."""
        detail = {"ipAddress": ip, "userAgent": ua}
        self.scrub({events.DETAIL_KEY[kind]: detail})  # privacy (issue 8): the verdict is judged from the hit
        key = (kind,) if kind == events.OPEN else (kind, claims.url, *(
            (k, *v) for k, v in claims.tags.items()))
        parts = self._templates.get(key)
        if parts is None:
            if len(self._templates) >= 4096:
                self._templates.clear()
            if kind == events.OPEN:
                record = events.open_record(_MAIL_SLOT, 0, _IP_SLOT, _UA_SLOT)
            else:
                record = events.click_record(_MAIL_SLOT, 0, _IP_SLOT, _UA_SLOT, claims.url, claims.tags)
            record[events.DETAIL_KEY[kind]]["timestamp"] = _TIME_SLOT
            parts = self._templates[key] = _template(_compact_json(record))
        return "".join((parts[0], mail_json, parts[1], _json_string(detail["ipAddress"]), parts[2], stamp,
                        parts[3], _json_string(detail["userAgent"]), parts[4]))

    def _judge_open(self, method: str, ip: str, ua: str, ms: int) -> tuple:
        """An open's verdict row fields after the event id, without `computed_at`."""
        known = self._hit_judgements.get((events.OPEN, method, ip, ua))
        if known is None:
            known = self._judgement(verdicts.Hit(events.OPEN, method, ip, ua, ms))
        return known[1]

    def _judgement(self, hit: verdicts.Hit) -> tuple[tuple, tuple]:
        """(reasons, verdict row fields without `computed_at`) of what a hit's type, method, IP and User-Agent
        alone say: judged once per distinct quadruple (image proxies, scanners and repeat readers send the same
        ones over and over; the User-Agent summary alone costs tens of microseconds)."""
        if len(self._hit_judgements) >= 8192:
            self._hit_judgements.clear()
        reasons = verdicts.hit_reasons(hit, self.lists)
        known = self._hit_judgements[(hit.type, hit.method, hit.ip, hit.user_agent)] = (
            reasons, self._fields(hit, verdicts.verdict_of(reasons)))
        return known

    def _judge(self, hit: verdicts.Hit, ctx: verdicts.Context, now: str) -> tuple:
        """A verdict row's fields after the event id."""
        known = self._hit_judgements.get((hit.type, hit.method, hit.ip, hit.user_agent)) or self._judgement(hit)
        timing = verdicts.click_timing_reasons(hit, ctx, self.th) if hit.type == events.CLICK else ()
        if not timing:
            return (*known[1], now)
        return (*self._fields(hit, verdicts.verdict_of(known[0] + timing)), now)

    @staticmethod
    def _fields(hit: verdicts.Hit, v: verdicts.Verdict) -> tuple:
        d = summarize(hit.user_agent)
        kind = verdicts.PROXY if v.verdict == verdicts.PROXY else d.kind
        reasons = _compact_json(v.reasons_json()) if v.reasons else "[]"
        return hit.method, v.verdict, reasons, d.client, d.os, kind

    def _delivered_ms(self, message_id: str, recipient: str, now_ms: int) -> tuple[int | None, str]:
        key = (message_id, recipient)
        known = self._delivered.get(key)
        if known is None or (known[0] is None and now_ms - known[1] > self.NO_DELIVERY_TTL_MS):
            accepted = self._mail(message_id, recipient)[2]  # a Delivery comes after acceptance (bounds the search)
            since = events.iso_ms(accepted - self.CLOCK_SKEW_MS) if accepted is not None else ""
            stamp = self.read(store_module.copy_delivery_time, message_id, recipient, since)
            if len(self._delivered) >= 65536:
                self._delivered.clear()
            known = self._delivered[key] = (events.ms_from_iso(stamp) if stamp else None, now_ms)
        if known[0] is not None:
            return known[0], "delivery"
        return self._mail(message_id, recipient)[2], "message"

    def _stored_clicks(self, copy: tuple[str, str], since: int, until: int, limit: int) -> list[_Click]:
        out = []
        for event_id, record_json, method in self.read(
                store_module.copy_clicks, copy[0], copy[1], events.iso_ms(since), events.iso_ms(until), limit):
            c = json.loads(record_json)["click"]
            hit = verdicts.Hit(events.CLICK, method, c["ipAddress"], c["userAgent"], events.ms_from_iso(c["timestamp"]),
                               c["link"])
            out.append(_Click(event_id, hit))
        return out

    def _judge_new_clicks(self, copy: tuple[str, str], new: list[_Click], now: str) -> list:
        """Judge a copy's new clicks, and judge again its recent ones whose burst the new clicks changed."""
        recent = self._recent.pop(copy, None)
        if recent is None:
            recent = self._stored_clicks(copy, new[0].hit.time_ms - self.window_ms, new[-1].hit.time_ms,
                                         self.MAX_RECENT)
        clicks = recent + new
        rows = self._judge_clicks(copy, clicks, now, force=False)
        # only clicks within one window of the latest can share a window with clicks still to come
        latest = clicks[-1].hit.time_ms
        self._recent[copy] = [c for c in clicks if c.hit.time_ms >= latest - self.window_ms][-self.MAX_RECENT:]
        while len(self._recent) > self.MAX_COPIES:
            del self._recent[next(iter(self._recent))]
        return rows

    def _judge_clicks(self, copy: tuple[str, str], clicks: list[_Click], now: str, force: bool) -> list:
        """(click, verdict fields) for the clicks whose burst size changed (all of them when `force`)."""
        sizes = verdicts.burst_sizes([(c.hit.time_ms, c.hit.link) for c in clicks], self.window_ms)
        delivered, source = self._delivered_ms(copy[0], copy[1], clicks[-1].hit.time_ms)
        rows = []
        for click, size in zip(clicks, sizes, strict=True):
            if force or click.size != size:
                click.size = size
                rows.append((click, self._judge(click.hit, verdicts.Context(delivered, source, size), now)))
        return rows

    def recompute(self, after_id: int, limit: int) -> tuple[list[store_module.VerdictRow], int, int]:
        """Verdicts of up to `limit` Open/Click events after `after_id`: (rows, last id seen, count)."""
        now = events.iso_ms(int(time.time() * 1000))
        batch = self.read(store_module.tracking_events_after, after_id, limit)
        rows, copies = [], {}
        for event_id, kind, message_id, recipient, record_json, method in batch:
            if kind == events.OPEN:
                o = json.loads(record_json)["open"]
                hit = verdicts.Hit(kind, method, o["ipAddress"], o["userAgent"], events.ms_from_iso(o["timestamp"]))
                rows.append(store_module.VerdictRow(event_id, *self._judge(hit, verdicts.Context(), now)))
            else:
                ms = events.ms_from_iso(json.loads(record_json)["click"]["timestamp"])
                copies.setdefault((message_id, recipient), []).append((event_id, ms))
        for copy, page in copies.items():
            ids = {event_id for event_id, _ in page}
            times = [ms for _, ms in page]
            # the page's clicks with every click of the copy they could share a burst window with
            clicks = self._stored_clicks(copy, min(times) - self.window_ms, max(times) + self.window_ms, 1_000_000)
            rows += [store_module.VerdictRow(c.event_id, *fields)
                     for c, fields in self._judge_clicks(copy, clicks, now, force=True) if c.event_id in ids]
        return rows, (batch[-1][0] if batch else after_id), len(batch)


def recompute_verdicts(store: Store, cfg: Config, page: int = 2000) -> int:
    """Recompute every Open/Click verdict with the current lists (after an update of Apple's ranges, say);
    the number of events judged. Raw events are only read."""
    lists, th = load_lists(cfg.tracking), thresholds(cfg.tracking)

    def work(conn, after: int) -> tuple[int, int]:
        writer = EventWriter(cfg.account_id, lists, th, read=lambda helper, *args: helper(conn, *args))
        rows, last, count = writer.recompute(after, page)
        store_module.upsert_verdicts(conn, rows)
        return last, count

    last, total = 0, 0
    while True:
        last, count = store.submit(lambda conn, after=last: work(conn, after)).result()
        total += count
        if count < page:
            return total


DROP_REASONS = ("buffer_full", "rejected", "shutdown")  # why an answered hit was never recorded
RETRY_FIRST_S = 0.1  # a store that failed is asked again soon: a lock or a freed disk clears within moments
RETRY_MAX_S = 5.0  # and at least this often: hits reach the store within 5 s of its recovery (one transaction a try)
WARN_EVERY_S = 10.0  # one warning per kind per 10 s: a stall of an hour logs 360 lines, not one per retry or hit


def _retry_delay(failures: int) -> float:
    """Exponential backoff after `failures` failed tries in a row (1, 2, ...): 0.1, 0.2, 0.4 ... 5 s."""
    return min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** min(failures - 1, 16))


class Recorder:
    """A bounded in-memory buffer of hits, written through the store's group commit one batch at a time.

    One batch in flight: hits arriving while it commits wait for the next one, so batches grow with the load,
    not the store's queue (a prepared batch holds each record's JSON, kilobytes a hit), and the store's writer
    thread runs a few large inserts rather than many small ones (each of which waited for the GIL while uvloop
    held it: `relay serve` fell seconds behind a flood that `relay track` kept up with).
    A store that cannot write (disk full, I/O error, lock) gets the batch again, first in line, with exponential
    backoff, for as long as it takes. At most `capacity` hits wait in memory (buffered and in flight); beyond that
    a hit is answered but dropped and counted in `dropped`, so memory stays bounded when the store stalls or is
    merely slower than the listener.
    """

    def __init__(self, store: Store, writer: EventWriter, interval: float, batch: int, capacity: int = 100_000,
                 drain_timeout: float = 30.0):
        self.store, self.writer, self.interval, self.batch = store, writer, interval, batch
        self.capacity, self.drain_timeout = capacity, drain_timeout
        self._pending: deque[tuple] = deque()  # oldest first
        self._writing: list[tuple] = []  # the batch the store has now
        self._timer: asyncio.TimerHandle | None = None  # the flush of a partial batch, or the next retry
        self._failures = 0  # failed tries in a row of a store that takes no writes
        self._failing_since = 0.0
        self._alone = 0  # hits first in line to write one per batch: a batch of them failed, maybe for one
        self._stopped = False  # after drain's deadline: nothing is retried any more
        self._idle = asyncio.Event()  # nothing buffered, nothing in flight
        self._idle.set()
        self._warned: dict[str, float] = {}
        self.written = 0
        self.dropped = dict.fromkeys(DROP_REASONS, 0)

    @property
    def depth(self) -> int:
        """Hits in memory: buffered and in flight."""
        return len(self._pending) + len(self._writing)

    @property
    def failed(self) -> int:
        """Answered hits never recorded, whatever the reason."""
        return sum(self.dropped.values())

    def add(self, hit: tuple) -> None:
        if len(self._pending) + len(self._writing) >= self.capacity:
            self.dropped["buffer_full"] += 1
            if self._due("buffer_full"):
                log.warning("tracking: %d hits wait for the store (tracking.max_buffered_hits): new hits are "
                            "answered but not recorded; %d dropped so far", self.depth, self.dropped["buffer_full"])
            return
        self._pending.append(hit)
        self._idle.clear()
        if self._writing or self._failures:  # the end of the write in flight, or the retry timer, takes it
            return
        if len(self._pending) >= self.batch:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.interval, self.flush)

    def flush(self) -> None:
        """Hand the oldest buffered hits, one batch, to the store, unless a batch is in flight already."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._writing or not self._pending:
            return
        size = min(1 if self._alone else self.batch, len(self._pending))
        self._writing = [self._pending.popleft() for _ in range(size)]
        try:
            work = self.writer.prepare(self._writing)
        except Exception as exc:  # a store read failed, or a hit the writer cannot make a record of
            self._failed(exc)
            return
        asyncio.wrap_future(self.store.submit(work)).add_done_callback(self._done)

    def _done(self, future: asyncio.Future) -> None:
        exc = future.exception() if not future.cancelled() else asyncio.CancelledError()
        if exc is not None:
            self._failed(exc)
            return
        self.written += len(self._writing)
        self._writing = []
        self._alone = max(0, self._alone - 1)
        if self._failures:
            log.warning("tracking: the store takes writes again after %.1f s (%d tries); %d hits to write",
                        time.monotonic() - self._failing_since, self._failures + 1, self.depth)
            self._failures = 0
        self._next()

    def _failed(self, exc: BaseException) -> None:
        hits, self._writing = self._writing, []
        self.writer.forget()
        if isinstance(exc, store_module.StoreClosed) or self._stopped:
            self.dropped["shutdown"] += len(hits)
            log.error("tracking: %d hits not recorded: %s", len(hits), exc)
        elif self.store.unavailable(exc):  # retried until it passes; a bad hit is tried once alone
            self._pending.extendleft(reversed(hits))  # first in line again
            if not self._failures:
                self._failing_since = time.monotonic()
            self._failures += 1
            delay = _retry_delay(self._failures)
            if self._due("retry"):
                log.warning("tracking: %d hits wait for the store (%s); try %d in %.1f s", self.depth, exc,
                            self._failures + 1, delay)
            self._timer = asyncio.get_running_loop().call_later(delay, self.flush)
            return
        elif len(hits) > 1:  # perhaps one bad hit: each on its own from here, so it cannot take the others down
            log.warning("tracking: writing %d hits failed (%s); writing them one by one", len(hits), exc)
            self._pending.extendleft(reversed(hits))
            self._alone = len(hits)
        else:
            self._alone = max(0, self._alone - 1)
            self.dropped["rejected"] += 1
            if self._due("rejected"):
                log.error("tracking: a hit the store refused is not recorded (%s); %d so far", exc,
                          self.dropped["rejected"])
        self._next()

    def _next(self) -> None:
        if self._pending:
            self.flush()  # at once: these hits waited for the write that just ended
        elif not self._writing:
            self._idle.set()

    def _due(self, kind: str) -> bool:
        """Whether a warning of this kind may be logged now (at most one per WARN_EVERY_S)."""
        now = time.monotonic()
        if now - self._warned.get(kind, -WARN_EVERY_S) < WARN_EVERY_S:
            return False
        self._warned[kind] = now
        return True

    async def drain(self, timeout: float | None = None) -> None:
        """Write everything buffered and wait until it is committed, a failing store retried for up to `timeout`
        seconds (drain_timeout); hits still waiting then are counted as dropped (reason: shutdown)."""
        timeout = self.drain_timeout if timeout is None else timeout
        self.flush()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            self._give_up(timeout)

    def _give_up(self, waited: float) -> None:
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        count = len(self._pending)
        self._pending.clear()
        self.dropped["shutdown"] += count
        log.error("tracking: %d hits still waiting for the store after %.0f s are not recorded", count, waited)
        if not self._writing:
            self._idle.set()


# --- the HTTP server ----------------------------------------------------------------------------------------

_BACKLOG = 1024  # connections the kernel queues while the listener is at its cap or busy
_LOG_INTERVAL = 60.0  # seconds between two messages about the cap or failed accepts: a flood must not flood the log
_SETTLE_S = 0.05  # the longest the cap waits for starting connections to settle (a TLS handshake may not)
_ACCEPT_RETRY = 0.5  # seconds without accepting after accept() failed for want of descriptors (as nginx)


def connection_cap(configured: int, nofile: int) -> int:
    """How many tracking connections may be open: `configured`, but at most three quarters of the open-file
    limit, so SMTP, delivery and the store keep a quarter (Debian's nginx: 768 worker_connections under the
    usual limit of 1,024). 0 configured: that ceiling."""
    if nofile == resource.RLIM_INFINITY or nofile > 1 << 20:
        nofile = 1 << 20  # Linux's default nr_open: no process gets more descriptors than this
    ceiling = max(nofile * 3 // 4, 1)
    return ceiling if configured <= 0 else min(configured, ceiling)


class _Server(web.Server):
    """aiohttp's low-level server under the listener's own accept loop: every connection starts as a
    `_FastConnection`, at most `cap` of them are open (the oldest idle ones closed first to make room, as nginx
    reuses keep-alive connections), and a connection that sends no complete request for `timeout` seconds is
    closed (aiohttp has no timeout on reading a request's headers: slowloris)."""

    def __init__(self, handler, settings: TrackingConfig, cap: int, nofile: int, fast, **kwargs):
        super().__init__(handler, **kwargs)
        self.settings, self.cap, self.nofile = settings, cap, nofile
        self.timeout = settings.client_timeout
        self.fast = fast  # TrackingServer._fast_answer
        # A request the listener refuses after aiohttp took the connection goes to aiohttp as a request for this
        # path, answered 400 by `_handle`, so answers stay in order; nobody outside can guess it.
        self.refused_path = "/.refused-" + secrets.token_hex(16)
        self.tick = 0.0  # coarse clock, advanced by the sweeper (cheaper than a clock call per request)
        self.seen: dict[_FastConnection, float] = {}  # every connection, when it last completed a request
        self.idle: dict[_FastConnection, None] = {}  # answered everything, nothing buffered: oldest first
        self.open = 0  # accepted sockets, those still in a TLS handshake included
        self._room = asyncio.Event()
        self._evicted, self._last_cap_log, self._last_accept_log = 0, -_LOG_INTERVAL, -_LOG_INTERVAL
        self._starved = False  # at the cap with no connection to close
        self._starting: set[asyncio.Task] = set()

    def aiohttp_connection(self) -> RequestHandler:
        return _AiohttpConnection(self, loop=self._loop, **self._kwargs)

    # --- accepting, within the cap ---

    async def serve(self, sock: socket.socket, ssl_context: ssl.SSLContext | None) -> None:
        """Accept connections on a listening socket; beyond `cap`, one waits until a connection makes way (the
        others wait in the kernel's queue)."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except ConnectionAbortedError:  # reset while queued
                continue
            except OSError as exc:  # out of descriptors (SMTP and delivery used up theirs too), or memory
                if self.tick - self._last_accept_log >= _LOG_INTERVAL:
                    self._last_accept_log = self.tick
                    log.warning("tracking listener: accepting failed (%s); trying again every %.1f s", exc,
                                _ACCEPT_RETRY)
                await asyncio.sleep(_ACCEPT_RETRY)
                continue
            self.open += 1
            try:
                while self.open > self.cap:
                    if self._starting:  # sockets accepted but not set up yet (a client may have gone already,
                        # a port probe): let them settle before closing a connection that is only starting
                        await asyncio.wait(set(self._starting), timeout=_SETTLE_S)
                        if self.open <= self.cap:
                            break
                    if self._make_room():
                        break
                    self._room.clear()
                    await self._room.wait()
            except asyncio.CancelledError:  # stopping
                conn.close()
                raise
            task = loop.create_task(self._connect(conn, ssl_context))
            self._starting.add(task)
            task.add_done_callback(self._starting.discard)

    async def _connect(self, conn: socket.socket, ssl_context: ssl.SSLContext | None) -> None:
        connection = _FastConnection(self)
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # answers are small, written whole
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: connection, conn, ssl=ssl_context,
                ssl_handshake_timeout=self.timeout if ssl_context is not None else None)
        except OSError as exc:  # reset, or a TLS handshake that failed or timed out
            conn.close()
            if connection.transport is None:
                self.release()
            log.debug("tracking connection not set up: %s", exc)

    def release(self) -> None:
        self.open -= 1
        if self.open <= self.cap:
            self._room.set()

    def became_idle(self, connection: _FastConnection) -> None:
        self.idle[connection] = None
        if self._starved:  # the cap is reached and nothing was idle: this one can make room
            self._room.set()

    def _make_room(self) -> bool:
        """Over the cap: close the connection idle the longest, as nginx reuses keep-alive connections. With none
        idle, ask aiohttp's oldest connection to close after its answer, and say no room was made yet."""
        made = bool(self.idle)
        if made:
            connection = next(iter(self.idle))
            del self.idle[connection]
            connection.transport.close()
            self._evicted += 1
        else:
            asked = next((c for c in self.seen if c.handler is not None and not c.asked_to_close), None)
            if asked is not None:
                asked.asked_to_close = True
                asked.handler.close()  # idle: closes now; busy: after its answer
        self._starved = not made
        if self.tick - self._last_cap_log >= _LOG_INTERVAL:
            self._last_cap_log = self.tick
            log.warning("tracking listener at its connection cap (%d, open-file limit %d): %d idle connections "
                        "closed since the last message%s", self.cap, self.nofile, self._evicted,
                        "" if made else "; every connection is busy, new ones wait")
            self._evicted = 0
        return made

    # --- aiohttp's bookkeeping of its connections ---

    def pre_shutdown(self) -> None:
        """After the listening sockets closed: connections on the fast path have nothing in flight (each answer is
        written whole, its hit already buffered), so they close now; aiohttp's finish their requests."""
        super().pre_shutdown()
        for connection in list(self.seen):
            if connection.handler is None:
                connection.transport.close()

    async def sweep(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.tick += 1.0
            for connection, last in list(self.seen.items()):
                if self.tick - last > self.timeout:
                    connection.transport.close()


class _AiohttpConnection(RequestHandler):
    """aiohttp's connection, for the requests the listener does not answer itself. A request its parser refuses
    gets the listener's 400 page (aiohttp's quotes the request back) and no traceback in the log."""

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status != 400:
            return super().handle_error(request, status, exc, message)
        log.debug("bad request from %s: %s", request.remote, exc)
        response = web.Response(status=400, body=BAD_REQUEST, headers=_PAGE_HEADERS)
        response.force_close()
        return response


class _Request:
    """A request head as `_RequestReader` read it."""

    __slots__ = ("method", "target", "http11", "keep_alive", "user_agent", "forwarded_for", "head", "body",
                 "passthrough")

    def __init__(self, reader: _RequestReader, head: bytes, http11: bool, passthrough: bool):
        self.method, self.target, self.http11 = reader.method, reader.target, http11
        self.keep_alive = not passthrough and reader.keep_alive
        self.user_agent, self.forwarded_for = reader.user_agent, reader.forwarded_for
        self.head, self.passthrough = head, passthrough
        self.body = 0 if reader.complete or passthrough else reader.content_length


class _Refused(Exception):
    """The request cannot be read, or is over a limit: 400, and the connection closes after it. `method`: HEAD
    or GET, how to answer it."""

    def __init__(self, method: bytes = b"GET"):
        super().__init__(method)
        self.method = method


# aiohttp refuses a second one of these; so does the listener, whichever side answers (ambiguous framing,
# host and agent: RFC 9112 §3.2, §6.3)
_SINGLE_FIELDS = frozenset({b"content-length", b"content-location", b"content-range", b"content-type", b"etag",
                            b"host", b"max-forwards", b"server", b"transfer-encoding", b"user-agent"})
_RAW_NON_ASCII = re.compile(rb"[\x80-\xff]")


class _RequestReader:
    """The requests of one connection, framed and judged by llhttp (httptools, as uvicorn uses it) under one set
    of limits, whichever side answers them. `next()` gives each request's head (with the exact bytes that carried
    it), then its body as bytes; `_Refused` for a request that breaks HTTP/1.1 or a limit.

    Heads are fed to llhttp as they arrive (a malformed line is refused at once), and each ends at its blank line,
    so a request after one aiohttp answers is judged here too. A raw non-ASCII byte in a request target, which
    llhttp refuses, is read as its %XX escape: what a browser sends for the same link."""

    def __init__(self, settings: TrackingConfig):
        self.max_line, self.max_header_bytes = settings.max_request_line, settings.max_header_bytes
        self.max_headers = settings.max_headers
        self.parser = httptools.HttpRequestParser(self)
        self.buffer = b""
        self.start = 0  # where the current request begins in buffer
        self.fed = 0  # how far llhttp has read buffer
        self.line_start = 0  # where the line being read begins
        self.body_left = 0
        self.passthrough = False  # after a chunked body or an upgrade: the rest is aiohttp's, unread
        self.ended = False  # after a request that closes the connection (and its body): nothing more is read
        self.single: set[bytes] = set()
        self._begin()

    def _begin(self) -> None:
        self.target = b""
        self.line_end = 0  # where the request line ends (after its CRLF), once read
        self.fields = 0
        self.single.clear()  # the _SINGLE_FIELDS seen
        self.user_agent = self.forwarded_for = None
        self.content_length = 0
        self.method, self.keep_alive, self.complete = b"GET", False, False

    def feed(self, data: bytes) -> None:
        if self.ended and not self.body_left and not self.passthrough:
            return  # after the last request: nothing more is read
        if self.start:  # what earlier requests took is dropped: the buffer holds one request and what follows
            self.buffer = self.buffer[self.start:] + data if self.start < len(self.buffer) else data
            self.fed -= self.start
            self.line_start -= self.start
            self.line_end -= self.start if self.line_end else 0
            self.start = 0
        else:
            self.buffer += data

    @property
    def idle(self) -> bool:
        """Nothing of a next request received."""
        return self.start == len(self.buffer) and not self.body_left and not self.passthrough

    # llhttp's callbacks

    def on_url(self, url: bytes) -> None:
        self.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields += 1
        if self.fields > self.max_headers:
            raise _Refused
        name = name.lower()
        if name in _SINGLE_FIELDS:
            if name in self.single:
                raise _Refused
            self.single.add(name)
            if name == b"user-agent":
                self.user_agent = value.rstrip(b" \t")
            elif name == b"content-length":
                self.content_length = int(value)  # llhttp checked the digits
        elif name == b"x-forwarded-for" and self.forwarded_for is None:
            self.forwarded_for = value.rstrip(b" \t")

    def on_headers_complete(self) -> None:
        # llhttp forgets both once the message is complete
        self.method, self.keep_alive = self.parser.get_method(), self.parser.should_keep_alive()

    def on_message_complete(self) -> None:
        self.complete = True

    # framing

    def next(self) -> _Request | bytes | None:
        """The next head or body bytes; None until more arrive. Raises _Refused."""
        if self.passthrough or self.body_left:
            return self._body()
        if self.ended or self.fed == len(self.buffer):
            return None
        try:
            if not self.line_end:
                whole = self._read_whole_head()
                if whole:
                    return self._complete(whole)
                if not self._read_line():
                    return None
            return self._read_head()
        except httptools.HttpParserUpgrade:  # an upgrade or CONNECT: aiohttp reads the rest as it arrives
            return self._head(len(self.buffer), self._http11(), passthrough=True)
        except (httptools.HttpParserError, _Refused) as exc:
            raise _Refused(self._method()) from exc

    def _read_whole_head(self) -> int:
        """The usual case in one call to llhttp: a whole head, nothing of it read yet, an ASCII request line.
        Where the head ends; 0 to read it line by line."""
        if self.fed != self.start:
            return 0
        end = self.buffer.find(b"\r\n\r\n", self.fed) + 4
        line_end = self.buffer.find(b"\n", self.fed) + 1
        if end < 4 or line_end <= self.fed + 2 or not self.buffer[self.fed:line_end].isascii():
            return 0  # not whole, a blank line first, or a target to escape
        if line_end - self.fed > self.max_line + 2 or end - line_end - 2 > self.max_header_bytes:
            raise _Refused
        self.line_end = line_end
        self.parser.feed_data(self.buffer[self.fed:end])
        self.fed = end
        return end

    def _read_line(self) -> bool:
        """Feed the request line as it arrives; whether it is whole."""
        while True:
            end = self.buffer.find(b"\n", self.fed)
            stop = len(self.buffer) if end < 0 else end + 1
            piece = self.buffer[self.fed:stop]
            if not piece.isascii():
                piece = self._escaped(piece, stop)
            self.parser.feed_data(piece)
            self.fed += len(piece)
            if self.fed - self.line_start > self.max_line + 2:
                raise _Refused
            if end < 0:
                return False
            if self.target:
                self.line_end = self.fed
                return True
            self.line_start = self.fed  # an empty line before the request line: llhttp skips it

    def _escaped(self, piece: bytes, stop: int) -> bytes:
        """A request line's raw non-ASCII bytes as %XX, in the buffer too (aiohttp gets the same line). Only the
        target can hold them: in the method or version they stay an error."""
        piece = _RAW_NON_ASCII.sub(lambda m: b"%%%02X" % m[0][0], piece)
        self.buffer = self.buffer[:self.fed] + piece + self.buffer[stop:]
        return piece

    def _read_head(self) -> _Request | None:
        end = self.buffer.find(b"\r\n\r\n", max(self.fed - 3, self.line_end - 2))
        if end < 0:
            self.parser.feed_data(self.buffer[self.fed:])
            self.fed = len(self.buffer)
            if self.fed - self.line_end > self.max_header_bytes + 2:
                raise _Refused
            return None
        end += 4
        if end - self.line_end - 2 > self.max_header_bytes:
            raise _Refused
        self.parser.feed_data(self.buffer[self.fed:end])
        self.fed = end
        return self._complete(end)

    def _complete(self, end: int) -> _Request:
        """The request whose head llhttp read up to `end`, if HTTP/1.1 and the listener allow it."""
        http11 = self._http11()
        if http11 and b"host" not in self.single:  # RFC 9112 §3.2: a server MUST answer 400
            raise _Refused
        if not _served_target(self.method, self.target):
            raise _Refused
        return self._head(end, http11, passthrough=not self.complete and b"content-length" not in self.single)

    def _http11(self) -> bool:
        return self.buffer[self.line_end - 10:self.line_end - 2] == b"HTTP/1.1"

    def _head(self, end: int, http11: bool, passthrough: bool) -> _Request:
        request = _Request(self, self.buffer[self.start:end], http11, passthrough)
        self.start = self.fed = self.line_start = end
        self.body_left, self.passthrough, self.ended = request.body, passthrough, not request.keep_alive
        self._begin()
        return request

    def _body(self) -> bytes | None:
        if self.passthrough:
            end = len(self.buffer)
        else:
            end = min(self.start + self.body_left, len(self.buffer))
            self.body_left -= end - self.start
            try:
                self.parser.feed_data(self.buffer[self.start:end])  # keeps llhttp at the next request
            except httptools.HttpParserError as exc:
                raise _Refused from exc
        piece = self.buffer[self.start:end]
        self.start = self.fed = self.line_start = end
        return piece or None

    def _method(self) -> bytes:
        """HEAD if the request being refused is one (its answer has no body), else GET."""
        return b"HEAD" if self.buffer.startswith(b"HEAD ", self.line_start) else b"GET"


def _served_target(method: bytes, target: bytes) -> bool:
    """The request-target forms aiohttp takes (RFC 9112 §3.2): a path, an absolute URL with a host, `*` for
    OPTIONS (CONNECT's authority form never gets here: llhttp reads it as an upgrade)."""
    if target[:1] == b"/":
        return True
    if target == b"*":
        return method == b"OPTIONS"
    try:
        return bool(httptools.parse_url(target).host)
    except httptools.HttpParserInvalidURLError:
        return False


class _FastConnection(asyncio.Protocol):
    """A connection of the listener. Every request on it is read and judged by `_RequestReader`; plain GET/HEAD
    pixel and click requests are answered here, keep-alive, in order. At the first request that is anything else
    (another path or method, a body, HTTP/1.0, a damaged click token) aiohttp's RequestHandler takes over the
    answers, and from then on gets each request this connection has judged: one set of limits and one 400 page
    whichever side answers, and every behaviour beyond them aiohttp's and `_handle`'s.

    Why: aiohttp's request and response objects were most of the listener's CPU per hit (measured: a bare
    protocol answered the GIF at ~3x aiohttp's rate on the same machine and load)."""

    def __init__(self, server: _Server):
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.reader = _RequestReader(server.settings)
        self.handler: RequestHandler | None = None  # aiohttp's, once it answers
        self.asked_to_close = False
        self.closing = False  # after a request that ends the connection: whatever follows is not read
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else ""
        self.server.seen[self] = self.server.tick
        self.server.became_idle(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.seen.pop(self, None)
        self.server.idle.pop(self, None)
        self.server.release()
        if self.handler is not None:
            self.handler.connection_lost(exc)

    def eof_received(self) -> bool | None:
        return self.handler.eof_received() if self.handler is not None else None

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.server.idle.pop(self, None)
        self.reader.feed(data)
        self._answer_buffered()

    def pause_writing(self) -> None:
        if self.handler is not None:
            self.handler.pause_writing()
        else:  # the client does not read: stop reading its requests (bounded memory)
            self.paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.handler is not None:
            self.handler.resume_writing()
        else:
            self.paused = False
            self.transport.resume_reading()
            self._answer_buffered()

    def _answer_buffered(self) -> None:
        while not self.paused and not self.closing:
            try:
                item = self.reader.next()
            except _Refused as refused:
                self._refuse(refused.method)
                return
            if item is None:
                break
            if isinstance(item, bytes):
                self.server.seen[self] = self.server.tick  # a body, or anything after an upgrade
                self.handler.data_received(item)
                continue
            self.server.seen[self] = self.server.tick
            if self.handler is None and not self._answer(item):
                self.handler = self.server.aiohttp_connection()
                self.handler.connection_made(self.transport)
            if self.handler is not None:
                self.handler.data_received(item.head)
        if self.handler is None and not self.closing and self.reader.idle:
            self.server.became_idle(self)

    def _answer(self, request: _Request) -> bool:
        """Answer a plain pixel or click request here; False for aiohttp to answer."""
        if (request.body or request.passthrough or not request.http11 or request.method not in (b"GET", b"HEAD")
                or not request.target.startswith(_FAST_PATHS)):
            return False
        try:
            answer = self.server.fast(request, self.peer)
        except Exception:  # answered like aiohttp answers a handler's error (its hit may be buffered: no replay)
            log.exception("tracking request failed")
            answer = _INTERNAL_ERROR
        if answer is None:
            return False
        self.transport.write(answer)
        if not request.keep_alive or answer is _INTERNAL_ERROR:
            self.closing = True
            self.transport.close()
        return True

    def _refuse(self, method: bytes) -> None:
        """400 and close, in order: written here, or by aiohttp after the answers it owes."""
        self.closing = True
        if self.handler is None:
            self.transport.write(_fast_response(_REFUSED_HEAD, BAD_REQUEST if method != b"HEAD" else b"", True))
            self.transport.close()
        else:
            self.handler.data_received(method + b" " + self.server.refused_path.encode("ascii")
                                       + b" HTTP/1.1\r\nHost: refused\r\nConnection: close\r\n\r\n")


_FAST_PATHS = (OPEN_PATH.encode("ascii"), CLICK_PATH.encode("ascii"))
_INTERNAL_ERROR = (b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain; charset=utf-8\r\n"
                   b"Content-Length: 25\r\nConnection: close\r\n\r\n500 Internal Server Error")


def _listening_sockets(host: str, port: int, reuse_port: bool) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for host:port, one per address the name has (as asyncio's
    create_server binds them); the listener accepts on them itself, so it can stop at its cap."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(_BACKLOG)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _header_block(status: str, headers: dict[str, str]) -> bytes:
    return (f"HTTP/1.1 {status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())).encode("ascii")


_PIXEL_HEAD = _header_block("200 OK", {**_PIXEL_HEADERS, "Content-Length": str(len(GIF))})
_REDIRECT_HEAD = _header_block("302 Found", _REDIRECT_HEADERS)
_REFUSED_HEAD = _header_block("400 Bad Request", {**_PAGE_HEADERS, "Content-Length": str(len(BAD_REQUEST))})
_date_line = [0, b""]  # (second, b"Date: ...\r\n"): formatted once a second


def _fast_response(head: bytes, body: bytes, close: bool) -> bytes:
    now = int(time.time())
    if now != _date_line[0]:
        _date_line[:] = [now, b"Date: " + formatdate(now, usegmt=True).encode("ascii") + b"\r\n"]
    return head + _date_line[1] + (b"Connection: close\r\n\r\n" if close else b"\r\n") + body


def _tls_context(certs) -> ssl.SSLContext:
    """The first certificate is the default; SNI picks a domain's own (exact name, then `*.parent`)."""
    by_name: dict[str, ssl.SSLContext] = {}
    default = None
    for c in certs:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(["http/1.1"])
        ctx.load_cert_chain(c.certificate, c.key)
        for name in c.domains:
            by_name[name.lower()] = ctx
        default = default or ctx

    def pick(sslobj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        if server_name:
            name = server_name.lower()
            ctx = by_name.get(name) or by_name.get("*." + name.partition(".")[2])
            if ctx is not None:
                sslobj.context = ctx

    assert default is not None
    default.sni_callback = pick
    return default


def _client_ip(peer: str, forwarded: str | None, trusted: verdicts.NetworkSet) -> str:
    """The first address, walking back from our peer, that is not a trusted proxy (RFC 7239 practice)."""
    hops = [h.strip() for h in forwarded.split(",")] if forwarded else []
    ip = peer
    while trusted.lookup(ip) is not None and hops:
        candidate = hops.pop()
        try:
            ipaddress.ip_address(candidate)
        except ValueError:
            break  # garbage in the chain: keep the last address a trusted proxy vouched for
        ip = candidate
    return ip


def _headers_size(raw_headers: Iterable[tuple[bytes, bytes]]) -> int:
    return sum(len(k) + len(v) + 4 for k, v in raw_headers)


def _safe_destination(url: str) -> bool:
    """Only http(s) URLs without control characters leave as a Location (the token is trusted; this is
    defence in depth against a bad instrumenter)."""
    head = url[:8].lower()
    return (head.startswith("http://") or head.startswith("https://")) and _UNSAFE_URL_CHAR.search(url) is None


def mask_address(address: str) -> str:
    """`j***@example.com`: enough for its owner to recognise, little for someone the page was forwarded to."""
    local, at, domain = address.rpartition("@")
    if not at:
        return "this address"
    return f"{local[:1]}***@{domain}"


def unsubscribe_page(recipient: str) -> bytes:
    """The confirmation page a GET shows: self-contained (the listener's CSP allows no external resource, not
    even inline style), one button posting what a mail client's one-click POST sends, to the same URL."""
    shown = html.escape(mask_address(recipient))
    return ("<!doctype html><html><head><meta charset=utf-8><meta name=viewport content=\"width=device-width\">"
            f"<title>Unsubscribe</title></head><body><h1>Unsubscribe</h1><p>Unsubscribe {shown} from these "
            "emails?</p><form method=post enctype=application/x-www-form-urlencoded>"
            f"<button type=submit name=List-Unsubscribe value=One-Click>Unsubscribe</button></form>"
            "</body></html>").encode()


async def _one_click_body(request: web.BaseRequest) -> bool:
    """Whether the POST carries RFC 8058's `List-Unsubscribe=One-Click`, form-encoded or as multipart/form-data
    (both are what mail clients send); at most ONE_CLICK_BODY_LIMIT bytes are read."""
    if (request.content_length or 0) > ONE_CLICK_BODY_LIMIT:
        return False
    body = b""
    while chunk := await request.content.read(ONE_CLICK_BODY_LIMIT + 1 - len(body)):
        body += chunk
        if len(body) > ONE_CLICK_BODY_LIMIT:
            return False
    if request.content_type == "application/x-www-form-urlencoded":
        return ONE_CLICK_FIELD in parse_qsl(body.decode("ascii", "replace"))
    if request.content_type == "multipart/form-data":
        return _multipart_one_click(body, request.headers.get("Content-Type", ""))
    return False


def _multipart_one_click(body: bytes, content_type: str) -> bool:
    """A form-data part named List-Unsubscribe whose content is One-Click."""
    head = b"Content-Type: " + content_type.encode("latin-1", "replace") + b"\r\n\r\n"
    try:
        message = email.message_from_bytes(head + body, policy=email.policy.HTTP)
        name, value = ONE_CLICK_FIELD
        return message.is_multipart() and any(
            part.get_param("name", header="content-disposition") == name
            and (part.get_payload(decode=True) or b"").strip() == value.encode("ascii")
            for part in message.iter_parts())
    except Exception:  # noqa: BLE001 - a body the email package cannot read is simply not a one-click POST
        return False


class TrackingServer:
    """The tracking listener; `relay serve` runs it beside SMTP, `relay track` runs it alone."""

    def __init__(self, config: Config, store: Store, keyring: Keyring):
        self.config, self.store, self.keyring = config, store, keyring
        t = self.settings = config.tracking
        self.lists = load_lists(t)
        summarize("Mozilla/5.0 (X11; Linux x86_64)")  # ua-parser loads its regexes on first use (~0.1 s)
        writer = EventWriter(config.account_id, self.lists, thresholds(t), read=store.tracking_read)
        writer.scrub = privacy_scrubber(config.privacy)  # privacy (issue 8)
        self.recorder = Recorder(store, writer, t.flush_interval, t.flush_batch, t.max_buffered_hits, t.drain_timeout)
        self._trusted = verdicts.NetworkSet([(net, "proxy") for net in t.trusted_proxies])
        self._max_age = int(t.max_link_age)
        self._server: _Server | None = None
        self._sockets: list[socket.socket] = []
        self._tasks: list[asyncio.Task] = []  # the accept loops and the sweeper
        self._port = 0
        self._tls_port = 0

    # --- lifecycle ---

    async def start(self) -> None:
        t = self.settings
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        cap = connection_cap(t.max_connections, nofile)
        if t.max_connections > cap:
            log.warning("tracking.max_connections %d lowered to %d: three quarters of the open-file limit %d "
                        "(raise LimitNOFILE to allow more)", t.max_connections, cap, nofile)
        # aiohttp's parser gets the same limits, so it never refuses a request the listener's reader let through
        self._server = _Server(self._handle, t, cap, nofile, self._fast_answer, access_log=None,
                               keepalive_timeout=t.client_timeout, max_line_size=t.max_request_line,
                               max_field_size=t.max_header_bytes, max_headers=t.max_headers)
        reuse_port = t.workers > 1  # `relay track` workers share the listening ports
        loop = asyncio.get_running_loop()
        plain = _listening_sockets(t.listen_host, t.listen_port, reuse_port)
        self._sockets += plain
        self._tasks += [loop.create_task(self._server.serve(sock, None)) for sock in plain]
        self._port = plain[0].getsockname()[1]
        if t.tls_listen_host is not None:
            tls, context = _listening_sockets(t.tls_listen_host, t.tls_listen_port, reuse_port), _tls_context(
                t.certificates)
            self._sockets += tls
            self._tasks += [loop.create_task(self._server.serve(sock, context)) for sock in tls]
            self._tls_port = tls[0].getsockname()[1]
        self._tasks.append(loop.create_task(self._server.sweep()))
        log.info("tracking listener on http://%s:%s%s, at most %d connections (open-file limit %d)",
                 t.listen_host, self._port, f" and https://{t.tls_listen_host}:{self._tls_port}"
                 if self._tls_port else "", cap, nofile)

    def reload(self, config: Config, keyring: Keyring | None = None) -> None:
        """Take verdict lists, thresholds, trusted proxies, link age and keys from a reloaded configuration
        (SIGHUP); listen addresses, certificates, batching, the connection cap and request limits need a restart.
        Call on the loop's thread."""
        t = self.settings = config.tracking
        self.config = config
        self.lists = load_lists(t)
        self.recorder.writer.configure(self.lists, thresholds(t))
        self.recorder.writer.scrub = privacy_scrubber(config.privacy)  # privacy (issue 8)
        self._trusted = verdicts.NetworkSet([(net, "proxy") for net in t.trusted_proxies])
        self._max_age = int(t.max_link_age)
        if keyring is not None:
            self.keyring = keyring

    @property
    def port(self) -> int:
        return self._port

    @property
    def tls_port(self) -> int:
        return self._tls_port

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish, then write every buffered event durably."""
        for task in self._tasks:
            task.cancel()
        for sock in self._sockets:
            sock.close()
        self._tasks, self._sockets = [], []
        if self._server is not None:
            await asyncio.sleep(0)  # requests already read start before idle connections are closed
            self._server.pre_shutdown()
            await self._server.shutdown(5.0)
            self._server = None
        await self.recorder.drain()

    # --- requests ---

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.raw_path.split("?", 1)[0]
        limits = self._server.settings  # as the connection's reader judged it (limits take a restart)
        if path == self._server.refused_path or _headers_size(request.raw_headers) > limits.max_header_bytes:
            return web.Response(status=400, body=BAD_REQUEST, headers=_PAGE_HEADERS)
        method = request.method
        if path.startswith(OPEN_PATH):
            if method in ("GET", "HEAD"):
                return self._pixel(request, path[len(OPEN_PATH):], method)
            return web.Response(status=405, headers={"Allow": "GET, HEAD"})
        if path.startswith(CLICK_PATH):
            if method in ("GET", "HEAD"):
                return self._click(request, path[len(CLICK_PATH):], method)
            return web.Response(status=405, headers={"Allow": "GET, HEAD"})
        if path.startswith(UNSUBSCRIBE_PATH):
            return await self._unsubscribe(request, path[len(UNSUBSCRIBE_PATH):], method)
        if method not in ("GET", "HEAD"):
            return web.Response(status=405, headers={"Allow": "GET, HEAD"})
        if path == "/healthz":
            return web.Response(text="ok\n", headers={"Cache-Control": NO_STORE})
        if path == "/":
            return web.Response(body=LANDING, headers=_PAGE_HEADERS)
        if path.startswith(CHALLENGE_PATH):
            return self._challenge(request, path[len(CHALLENGE_PATH):])
        return self._not_found()

    def _pixel(self, request: web.BaseRequest, token: str, method: str) -> web.Response:
        self._count_open(token, method, request.remote or "", request.headers.get("X-Forwarded-For"),
                         request.headers.get("User-Agent", ""))
        return web.Response(body=GIF, headers=_PIXEL_HEADERS)

    def _click(self, request: web.BaseRequest, token: str, method: str) -> web.Response:
        url = self._count_click(token, method, request.remote or "", request.headers.get("X-Forwarded-For"),
                                request.headers.get("User-Agent", ""))
        if url is None:
            return self._not_found()
        return web.Response(status=302, headers={**_REDIRECT_HEADERS, "Location": to_uri(url)})

    def _count_open(self, token: str, method: str, peer: str, forwarded: str | None, ua: str) -> None:
        try:
            claims = verify(self.keyring, token)
            if isinstance(claims, OpenClaims) and not self._expired(claims.issued):
                self._record(events.OPEN, method, claims, peer, forwarded, ua)
        except Exception:  # never a broken image in someone's mailbox, whatever went wrong here
            log.exception("pixel hit not recorded")

    def _count_click(self, token: str, method: str, peer: str, forwarded: str | None, ua: str) -> str | None:
        """The destination of a genuine click token (the click recorded for a GET), else None."""
        claims = verify(self.keyring, token)
        if not isinstance(claims, ClickClaims) or self._expired(claims.issued) or not _safe_destination(claims.url):
            return None
        if method == "GET":  # HEAD is what link scanners send: answer it, never count it
            self._record(events.CLICK, method, claims, peer, forwarded, ua)
        return claims.url

    def _fast_answer(self, request: _Request, peer: str) -> bytes | None:
        """The whole response to a plain GET/HEAD of a pixel or a genuine click; None hands the request to
        aiohttp and `_handle` (a damaged click, say)."""
        path = request.target.partition(b"?")[0].decode("latin-1")  # llhttp let only URL characters through
        method = "GET" if request.method == b"GET" else "HEAD"
        forwarded = request.forwarded_for.decode("latin-1") if request.forwarded_for is not None else None
        ua = request.user_agent.decode("utf-8", "replace") if request.user_agent is not None else ""
        close = not request.keep_alive
        if path.startswith(OPEN_PATH):
            self._count_open(path[len(OPEN_PATH):], method, peer, forwarded, ua)
            return _fast_response(_PIXEL_HEAD, GIF if method == "GET" else b"", close)
        url = self._count_click(path[len(CLICK_PATH):], method, peer, forwarded, ua)
        if url is None:
            return None
        length = b"\r\nContent-Length: 0\r\n" if method == "GET" else b"\r\n"  # as aiohttp: none on a HEAD
        return _fast_response(_REDIRECT_HEAD + b"Location: " + to_uri(url).encode("ascii") + length, b"", close)

    async def _unsubscribe(self, request: web.BaseRequest, token: str, method: str) -> web.Response:
        """RFC 8058 one-click: a POST of `List-Unsubscribe=One-Click` unsubscribes; GET and HEAD only show a
        page with a button posting the same (link scanners and prefetchers GET every URL in a message). The
        link never expires (max_link_age does not apply): RFC 8058 wants it to work long after delivery, and
        the token is bound to one message and recipient."""
        claims = verify(self.keyring, token)
        if not isinstance(claims, UnsubscribeClaims):
            return self._not_found()
        if method in ("GET", "HEAD"):
            return web.Response(body=unsubscribe_page(claims.recipient), headers=_PAGE_HEADERS)
        if method != "POST":
            return web.Response(status=405, headers={"Allow": "GET, HEAD, POST"})
        if not await _one_click_body(request):
            return web.Response(status=400, body=BAD_REQUEST, headers=_PAGE_HEADERS)
        now_ms = int(time.time() * 1000)
        try:
            added = await self.store.write(lambda conn: store_module.record_unsubscribe(
                conn, claims.message_id, claims.recipient, now_ms))
        except Exception:  # the person is told to try again rather than told a lie
            log.exception("unsubscribe from %s not recorded", claims.message_id)  # no address in logs (privacy)
            return web.Response(status=503, body=UNSUBSCRIBE_FAILED, headers=_PAGE_HEADERS)
        log.info("unsubscribe id=%s recorded=%s", claims.message_id, added)
        return web.Response(body=UNSUBSCRIBED, headers=_PAGE_HEADERS)

    def _challenge(self, request: web.BaseRequest, token: str) -> web.Response:
        answer = challenge_answer(self.keyring, token, int(time.time()))
        if answer is None:
            return self._not_found()
        scheme = self._scheme(request)
        return web.Response(text=f"relay-tracking {answer} {scheme}\n", headers={"Cache-Control": NO_STORE})

    def _not_found(self) -> web.Response:
        return web.Response(status=404, body=NOT_FOUND, headers=_PAGE_HEADERS)

    def _expired(self, issued: int) -> bool:
        return self._max_age > 0 and time.time() - issued > self._max_age

    def _record(self, kind: str, method: str, claims, peer: str, forwarded: str | None, ua: str) -> None:
        ip = peer
        if self._trusted.lookup(ip) is not None:
            ip = _client_ip(ip, forwarded, self._trusted)
        if not ua.isascii():  # aiohttp keeps undecodable bytes as lone surrogates; SQLite refuses those
            ua = ua.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        self.recorder.add((kind, method, claims, ip, ua, int(time.time() * 1000)))

    def _scheme(self, request: web.BaseRequest) -> str:
        scheme = "https" if request.transport and request.transport.get_extra_info("sslcontext") else "http"
        if self._trusted.lookup(request.remote or "") is not None:
            proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
            if proto in ("http", "https"):
                scheme = proto
        return scheme


# --- `relay track` ------------------------------------------------------------------------------------------

WORKER_ENV = "RELAY_TRACK_WORKER_PORTS"  # set for the extra worker processes: "http-port,tls-port" to share


def track_command(args) -> int:
    cfg = config_module.load(args.config)
    shared = os.environ.get(WORKER_ENV)
    if shared:  # a worker started by the first `relay track`: bind the ports that one already holds
        http_port, tls_port = (int(p) for p in shared.split(","))
        cfg = dataclasses.replace(cfg, tracking=dataclasses.replace(
            cfg.tracking, listen_port=http_port, tls_listen_port=tls_port))
    # asyncio's own loop: with uvloop the listener measured slower here (the store's writer thread shares the GIL).
    return asyncio.run(_track(cfg, args.config, spawn=not shared))


def _spawn_workers(config_path: str, count: int, http_port: int, tls_port: int) -> list[subprocess.Popen]:
    """More processes on the same ports (SO_REUSEPORT: the kernel spreads connections), each with its own
    event loop and its own batched writer into the shared SQLite store."""
    env = {**os.environ, WORKER_ENV: f"{http_port},{tls_port}"}
    return [subprocess.Popen([sys.executable, "-m", "relay.cli", "track", "--config", config_path], env=env)
            for _ in range(count)]


def _stop_workers(children: list[subprocess.Popen]) -> list[int]:
    codes = []
    for child in children:
        try:
            codes.append(child.wait(60))
        except subprocess.TimeoutExpired:
            child.kill()
            codes.append(child.wait())
    return codes


async def _track(cfg: Config, config_path: str, spawn: bool) -> int:
    store = open_store(cfg.store_target)
    server = TrackingServer(cfg, store, cfg.keyring())
    children: list[subprocess.Popen] = []
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):  # before the first request can be answered
        loop.add_signal_handler(sig, stopping.set)
    try:
        await server.start()
        # Everything loaded so far (aiohttp, ua-parser's regexes, the lists) lives as long as the process: out of
        # the collector's sight, a full collection walks only request garbage (measured: 30-135 ms pauses of
        # the event loop with ~50k startup objects, 2-8 ms without them).
        gc.freeze()
        print(f"relay track: listening on {cfg.tracking.listen_host}:{server.port} (pid {os.getpid()})",
              file=sys.stderr, flush=True)
        if spawn and cfg.tracking.workers > 1:
            children = _spawn_workers(config_path, cfg.tracking.workers - 1, server.port, server.tls_port)
        await stopping.wait()
        log.info("stopping: draining tracking events")
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)  # each worker drains its own buffer
        await server.stop()
    finally:
        await asyncio.to_thread(store.close)
        codes = await asyncio.to_thread(_stop_workers, children)
    lost = server.recorder.failed
    print(f"relay track: stopped (pid {os.getpid()}), {server.recorder.written} events written, {lost} lost",
          file=sys.stderr, flush=True)
    # A worker killed by SIGTERM never got as far as handling signals, so it had not answered anything either.
    failed = [code for code in codes if code not in (0, -signal.SIGTERM)]
    return 1 if lost or failed else 0
