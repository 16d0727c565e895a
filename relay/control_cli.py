"""`relay config-set pause|resume`, `relay account show|pause|resume`: sending control from the command line
(relay/control.py). Every pause and resume is recorded with who (cli:<login>) and why (--reason).

Imports nothing heavy at module level: build_parser() runs for every `relay` command.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from relay.config import Config
    from relay.store import Store


def add_config_set_parsers(s) -> None:
    """`pause` and `resume` under `relay config-set`."""
    for name, help_text in (("pause", "stop a set's sending: new mail is refused (554), queued mail still goes"),
                            ("resume", "let a set send again (its reputation starts afresh)")):
        c = s.add_parser(name, help=help_text)
        c.add_argument("name")
        c.add_argument("--reason", default="", help="why (recorded with who did it)")
        c.add_argument("--config", required=True)


def config_set_switch(cfg: Config, store: Store, args: argparse.Namespace) -> str:
    from relay import control

    enabled = args.config_set_command == "resume"
    reason = args.reason or ("resumed" if enabled else "paused") + " from the command line"
    changed = control.set_sending(cfg, store, args.name, enabled, reason, control.who())
    state = "sending" if enabled else "paused"
    return f"configuration set {args.name}: {state}" + ("" if changed else f" (it already was {state})")


def set_report(cfg: Config, store: Store, name: str) -> dict:
    """What `relay config-set show` adds: the switch, the last changes, the reputation in its window."""
    from relay import control
    from relay.core.control import percent
    from relay.resolve import Resolver

    s = Resolver(cfg, store).model().sets[name]
    outcomes, thresholds = control.set_outcomes(cfg, store, s)
    return {"Sending": {**control.state_json(s.sending), "History": control.history(store, name, 10)},
            "Reputation": {"Delivered": outcomes.delivered, "Bounced": outcomes.bounced,
                           "PermanentBounces": outcomes.permanent, "Complaints": outcomes.complaints,
                           "BounceRate": percent(outcomes.bounce_rate),
                           "ComplaintRate": percent(outcomes.complaint_rate),
                           "Thresholds": {"Window": thresholds.window_s, "MinVolume": thresholds.min_volume,
                                          "BounceRate": percent(thresholds.bounce_rate),
                                          "ComplaintRate": percent(thresholds.complaint_rate)}}}


def _account_cmd(cfg: Config, store: Store, args: argparse.Namespace):
    from relay import control

    if args.account_command == "show":
        limits = cfg.quotas.account
        return {**control.state_json(control.account_state(cfg, store)),
                "SendQuota": {"Max24HourSend": limits.max_24_hour_send or -1,
                              "MaxSendRate": limits.max_send_rate or -1,
                              "SentLast24Hours": control.sent_last_24_hours(cfg, store)},
                "History": control.history(store, "", 10)}
    enabled = args.account_command == "resume"
    reason = args.reason or ("resumed" if enabled else "paused") + " from the command line"
    changed = control.set_account_sending(store, enabled, reason, control.who())
    state = "sending" if enabled else "paused"
    return f"account: {state}" + ("" if changed else f" (it already was {state})")


def account_command(args: argparse.Namespace) -> int:
    from relay.sets_cli import _cli

    return _cli(_account_cmd)(args)


def add_parsers(sub) -> None:
    """`relay account show|pause|resume`."""
    p = sub.add_parser("account", help="the account's sending: show (switch, quota, history), pause, resume")
    s = p.add_subparsers(dest="account_command", required=True)
    for name, help_text in (("show", "sending switch, quota and the last changes (JSON)"),
                            ("pause", "stop all sending: new mail is refused (554), queued mail still goes"),
                            ("resume", "let the account send again")):
        c = s.add_parser(name, help=help_text)
        if name != "show":
            c.add_argument("--reason", default="", help="why (recorded with who did it)")
        c.add_argument("--config", required=True)
    p.set_defaults(func=account_command)
