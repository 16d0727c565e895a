"""Sending control's shell: pausing the account or a set (with who and why), sets' delivery and reputation
options, quota counting in the accepting transaction, and the account's numbers (quota, statistics).

The CLI (relay/control_cli.py), the API (relay/api/account.py) and the reputation guard (relay/reputation.py)
call these functions; each change is one store transaction that moves configuration_version, so every node
applies it to the next message (relay/resolve.py).
"""

from __future__ import annotations

import getpass
import time
from collections.abc import Callable
from typing import Any, TypeVar

from relay.config import Config
from relay.core import control as core
from relay.core.control import ACCOUNT, Outcomes, QuotaLimits, Refused, SendingState, Thresholds
from relay.core.events import iso_ms, ms_from_iso
from relay.core.resolve import SetDef
from relay.resolve import Resolver
from relay.sets import no_such_set, writable_set
from relay.store import EventRow, Store
from relay.store import control as sql

T = TypeVar("T")
PAUSED, RESUMED = "SendingPaused", "SendingResumed"  # eventType of the notices a set's destinations receive
NOTICE_TYPES = (PAUSED, RESUMED)


class OverQuota(Exception):
    """Raised inside the accepting transaction: a quota would be exceeded; the transaction is rolled back."""

    def __init__(self, refused: Refused):
        super().__init__(refused.reply)
        self.refused = refused


def counted(work: Callable[[Any], T], scopes: list[tuple[str, QuotaLimits]], recipients: int,
            now_s: int) -> Callable[[Any], T]:
    """The accepting work, then the message's recipients counted on each quota scope (account, set, SMTP user)
    in the same transaction; OverQuota when one is over, so nothing of the message is kept. The counters live in
    the store, so every node counts on them."""
    if not scopes:
        return work

    def both(conn) -> T:
        written = work(conn)
        if written:
            for scope, limits in scopes:
                refused = core.over_quota(limits, *sql.add_to_quota(conn, scope, recipients, now_s))
                if refused is not None:
                    raise OverQuota(refused)
        return written

    return both


def who(prefix: str = "cli") -> str:
    """Who changes something from here: `cli:<login>`; the API passes `api:<access key id>`."""
    try:
        return f"{prefix}:{getpass.getuser()}"
    except (KeyError, OSError):  # no login name (a container without /etc/passwd entry)
        return prefix


def _now() -> str:
    return iso_ms(int(time.time() * 1000))


def _run(store: Store, work: Callable[[Any], T]) -> T:
    return store.submit(work).result()


def _set(cfg: Config, store: Store, name: str) -> SetDef:
    s = Resolver(cfg, store).model().sets.get(name)
    if s is None:
        raise no_such_set(name)
    return s


# --- pausing ---------------------------------------------------------------------------------------------------

def notice(set_name: str, enabled: bool, reason: str, by: str, now: str, details: dict | None = None) -> EventRow:
    """The event a set's destinations receive when its sending is paused or resumed (relay's own eventType)."""
    kind = RESUMED if enabled else PAUSED
    body = {"configurationSet": set_name, "reason": reason, "changedBy": by, "timestamp": now, **(details or {})}
    key = "sendingResumed" if enabled else "sendingPaused"
    return EventRow(kind, now, "", None, set_name, {"eventType": kind, key: body})


def set_sending(cfg: Config, store: Store, set_name: str, enabled: bool, reason: str, by: str,
                details: dict | None = None) -> bool:
    """Pause or resume a set (of the file or the database); False when it already was so. The change is also
    an event of the set (SendingPaused, SendingResumed): its destinations hear of it, the metrics count it."""
    _set(cfg, store, set_name)
    now = _now()
    event = notice(set_name, enabled, reason, by, now, details)
    return _run(store, lambda conn: sql.put_sending(conn, set_name, enabled, reason, by, now, event))


def set_account_sending(store: Store, enabled: bool, reason: str, by: str) -> bool:
    now = _now()
    return _run(store, lambda conn: sql.put_sending(conn, ACCOUNT, enabled, reason, by, now))


def history(store: Store, scope: str, limit: int = 20) -> list[dict]:
    return [{"Time": t, "SendingEnabled": e, "Reason": r, "ChangedBy": b}
            for t, e, r, b in store.read(sql.sending_history, scope, limit)]


def state_json(state: SendingState) -> dict:
    data: dict = {"SendingEnabled": state.enabled}
    if state.changed_at:
        data.update(Reason=state.reason, ChangedBy=state.changed_by, ChangedAt=state.changed_at)
    if state.fresh_start:
        data["LastFreshStart"] = state.fresh_start
    return data


def account_state(cfg: Config, store: Store) -> SendingState:
    return Resolver(cfg, store).model().account_sending


def with_new_set(set_name: str, enabled: bool | None, options: dict, by: str, reason: str):
    """The sending switch and options of a set being created, written in its creating transaction (relay.sets
    create_set's `also`); None when there is nothing to write."""
    if enabled is not False and not options:
        return None
    now = _now()

    def also(conn) -> None:
        if enabled is False:
            sql.put_sending(conn, set_name, False, reason, by, now)
        if options:
            sql.put_set_options(conn, set_name, options)

    return also


# --- a set's delivery and reputation options ----------------------------------------------------------------------

def put_set_options(cfg: Config, store: Store, set_name: str, values: dict) -> None:
    """DeliveryOptions / ReputationOptions of a set of the database (the file's sets are read-only here)."""

    def work(conn) -> None:
        writable_set(cfg, conn, set_name)
        sql.put_set_options(conn, set_name, values)

    _run(store, work)


# --- quotas and statistics ----------------------------------------------------------------------------------------

def sent_last_24_hours(cfg: Config, store: Store, now_s: int | None = None) -> int:
    """Recipients sent in the last 24 hours: the account's quota counter when it has a quota, else the
    counts summed from the events."""
    now_s = int(time.time()) if now_s is None else now_s
    if cfg.quotas.account.limited:
        return store.read(sql.quota_sent, "account", now_s)
    rows = store.read(sql.account_minutes, now_s // 60 - sql.DAY_MINUTES + 1)
    return sum(r[1] or 0 for r in rows)


def send_statistics(store: Store, now_s: int | None = None) -> list[core.DataPoint]:
    """SES's GetSendStatistics: 15-minute points of the last two weeks."""
    now_s = int(time.time()) if now_s is None else now_s
    first = now_s // 60 - core.STATISTICS_DAYS * sql.DAY_MINUTES
    return core.data_points(store.read(sql.account_minutes, first))


def set_outcomes(cfg: Config, store: Store, s: SetDef, now_s: int | None = None) -> tuple[Outcomes, Thresholds]:
    """A set's outcomes in its reputation window (from its fresh start, when later) and its thresholds."""
    now_s = int(time.time()) if now_s is None else now_s
    thresholds = cfg.reputation.thresholds(s.name)
    first = window_start(now_s, thresholds, s.sending)
    counts = store.read(sql.outcomes_since, first, s.name).get(s.name)
    return Outcomes(*counts) if counts else Outcomes(), thresholds


def account_outcomes(cfg: Config, store: Store, now_s: int | None = None) -> tuple[Outcomes, Thresholds]:
    """Every set's outcomes together (mail without a set included) in the default window."""
    now_s = int(time.time()) if now_s is None else now_s
    thresholds = cfg.reputation.defaults
    counts = store.read(sql.outcomes_since, window_start(now_s, thresholds, core.ENABLED)).values()
    return Outcomes(*(sum(c[i] for c in counts) for i in range(4))), thresholds


def window_start(now_s: int, t: Thresholds, state: SendingState) -> int:
    """The first epoch minute a set's window counts: the window's, or the minute after its fresh start."""
    first = now_s // 60 - int(t.window_s // 60) + 1
    if state.fresh_start:
        first = max(first, ms_from_iso(state.fresh_start) // 60000 + 1)
    return first
