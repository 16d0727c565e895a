"""The instrumentation stage: per-recipient copies for the delivery pipeline, and the `relay instrument` dry run.

The work is in relay.core.instrument (pure); this module caches each message's analysed plan so every further
recipient costs only its token substitution, turns any failure into "deliver the input unchanged", and reads
and writes files for the CLI.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from relay import offload
from relay.core import instrument as core
from relay.core.intake import heavy, many_parts
from relay.core.settings import TrackingSettings
from relay.core.tokens import Keyring, sign_address, sign_unsubscribe
from relay.core.unsubscribe import add_list_unsubscribe

log = logging.getLogger(__name__)


@dataclass
class Rendered:
    data: bytes  # the whole CRLF message for this recipient, ready for DKIM signing
    changed: bool  # False when the bytes equal the input (no tracking for the set, no HTML, ...)
    copy: core.Copy

    @property
    def warnings(self) -> list[str]:
        return self.copy.warnings

    @property
    def report(self) -> dict:
        """The per-message report (same shape as the dry run's JSON), built when first read."""
        return self.copy.report


class Instrumenter:
    def __init__(self, keyring: Keyring, cache_size: int = 256):
        self.keyring = keyring
        self.cache_size = cache_size
        self._plans: OrderedDict[tuple[str, TrackingSettings], core.Plan] = OrderedDict()
        self._lock = threading.Lock()  # copies of big messages are made in threads (copy_async)

    def plan(self, message_id: str, raw: bytes, settings: TrackingSettings) -> core.Plan:
        if not settings.enabled and b"text/html" not in raw.lower():
            # Without tracking, analysis only removes SES markers and placeholders from HTML parts; a message
            # without the type's name anywhere has no HTML part, so its plan is empty (the copy is the input).
            return core.Plan(settings=settings, size=len(raw), settings_json=settings.to_json())
        key = (message_id, settings)
        with self._lock:
            plan = self._cached(key, raw)
            if plan is not None:
                self._plans.move_to_end(key)
                return plan
        plan = core.analyse(raw, settings)
        with self._lock:
            self._plans[key] = plan
            while len(self._plans) > self.cache_size:
                self._plans.popitem(last=False)
        return plan

    def _cached(self, key: tuple[str, TrackingSettings], raw: bytes) -> core.Plan | None:
        plan = self._plans.get(key)
        return plan if plan is not None and plan.size == len(raw) else None

    async def copy_async(self, message_id: str, raw: bytes, settings: TrackingSettings, recipient: str,
                         issued: int, position: int = 0) -> Rendered:
        """`copy`, made in a thread (relay.offload) when it is much work for the event loop: a big message, or
        the first copy of one with many MIME parts (later copies reuse its analysis)."""
        off_loop = heavy(raw) or (self._cached((message_id, settings), raw) is None and many_parts(raw))
        return await offload.run(off_loop, self.copy, message_id, raw, settings, recipient, issued, position)

    def copy(self, message_id: str, raw: bytes, settings: TrackingSettings, recipient: str, issued: int,
             position: int = 0) -> Rendered:
        """This recipient's copy; never raises: when instrumenting fails the input goes out unchanged (with its
        one-click unsubscribe fields, if the set adds them), with a warning. `position` is the recipient's index
        in the message's recipient list (for the mailto unsubscribe)."""
        try:
            plan = self.plan(message_id, raw, settings)
            out = core.render(raw, plan, self.keyring, message_id, recipient, issued)
        except Exception as exc:  # noqa: BLE001 - losing mail is worse than an untracked copy
            log.exception("instrumentation of %s failed; delivering it unmodified", message_id)
            warnings = [f"message left unmodified: {type(exc).__name__}: {exc}"]
            out = core.Copy(raw, warnings, lambda: {"message_id": message_id, "recipient": recipient, "parts": [],
                                                    "warnings": warnings})
        data = out.data
        if settings.list_unsubscribe:
            data = self._with_list_unsubscribe(data, message_id, settings, recipient, issued, position, out)
        for warning in out.warnings:
            log.warning("%s: %s", message_id, warning)
        changed = data is not raw and data != raw
        out.extra["changed"] = changed
        return Rendered(data, changed, out)

    def _with_list_unsubscribe(self, data: bytes, message_id: str, settings: TrackingSettings, recipient: str,
                               issued: int, position: int, out: core.Copy) -> bytes:
        """`data` with this recipient's one-click unsubscribe fields; on any failure `data` unchanged and a
        warning (the copy still goes out). The mailto needs the bounce domain, which relay receives mail for."""
        try:
            url = settings.unsubscribe_url(sign_unsubscribe(self.keyring, message_id, recipient, issued))
            mailto = None
            if settings.return_path_domain and position >= 0:
                mailto = sign_address(self.keyring, "unsub", message_id, position, settings.return_path_domain)
            added = add_list_unsubscribe(data, url, mailto)
        except Exception as exc:  # noqa: BLE001 - the copy goes out without the fields rather than not at all
            log.exception("List-Unsubscribe for %s failed; delivering without it", message_id)
            out.warnings.append(f"List-Unsubscribe not added: {type(exc).__name__}: {exc}")
            out.extra["list_unsubscribe"] = "failed"
            return data
        out.extra["list_unsubscribe"] = "kept the message's own" if added is None else "added"
        return data if added is None else added


def dry_run(args: argparse.Namespace) -> int:
    """`relay instrument`: stdin → what relay would deliver to a recipient (before DKIM), and the report. The set
    and the recipient are the message's own (its X-SES-CONFIGURATION-SET or its sender's default set, its
    first To/Cc/Bcc address) unless --config-set and --recipient name others."""
    from relay import config as config_module
    from relay.core.events import mint_message_id
    from relay.core.headers import HeaderError, first_recipient
    from relay.core.intake import intake
    from relay.core.resolve import UnknownSet, sender_identity

    cfg = config_module.load(args.config)
    now_ms = int(time.time() * 1000)
    message_id = args.message_id or mint_message_id(now_ms)
    try:
        item = intake(sys.stdin.buffer.read(), "", message_id, cfg.hostname)
    except HeaderError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    recipient = args.recipient or first_recipient(item.block)
    if recipient is None:
        print("error: --recipient: the message has no To, Cc or Bcc address; name the recipient", file=sys.stderr)
        return 1
    try:
        resolution = _resolve(cfg, args.config_set or item.control.configuration_set,
                              sender_identity(item.block, ""))
    except UnknownSet as exc:
        print(f"Configuration Set does not exist: Configuration set <{exc.name}> does not exist.", file=sys.stderr)
        return 1
    rendered = Instrumenter(cfg.keyring()).copy(message_id, item.raw, resolution.settings, recipient,
                                                now_ms // 1000)
    sys.stdout.buffer.write(rendered.data)
    sys.stdout.buffer.flush()
    rendered.report["configuration_set"] = resolution.set_name
    if args.report_json:
        with open(args.report_json, "w", encoding="utf-8") as f:
            json.dump(rendered.report, f, indent=2)
            f.write("\n")
    return 0  # warnings went to the log (stderr) and the report


def _resolve(cfg, set_name: str | None, identity: str):
    """The set and settings exactly as delivery would resolve them (every level, sets made with the CLI too);
    raises UnknownSet."""
    from relay.resolve import Resolver
    from relay.store import open_store

    store = open_store(cfg.store_target)
    try:
        return Resolver(cfg, store).resolve(set_name, identity)
    finally:
        store.close()
