"""`relay config-set`, `relay tracking`, `relay destination`: argument parsing and printing around relay/sets.py.

Imports nothing heavy at module level: build_parser() runs for every `relay` command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from relay.config import Config
    from relay.core.resolve import TrackingOptions
    from relay.store import Store


# --- the CLI -----------------------------------------------------------------------------------------------

def open_config_and_store(args: argparse.Namespace):
    from relay import config as config_module
    from relay.store import open_store

    cfg = config_module.load(args.config)
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    return cfg, open_store(cfg.store_target)


def _cli(fn):
    """Run a command; SES errors and bad input go to stderr with a non-zero exit code."""

    def run(args: argparse.Namespace) -> int:
        from relay.sets import SesError

        cfg, store = open_config_and_store(args)
        try:
            out = fn(cfg, store, args)
        except SesError as exc:
            print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
            return 1
        finally:
            store.close()
        if out is not None:
            print(out if isinstance(out, str) else json.dumps(out, indent=2))
        return 0

    return run


def _switch(value: str | None) -> bool | None:
    return None if value in (None, "inherit") else value == "on"


def _options_from_args(args: argparse.Namespace) -> tuple[TrackingOptions, frozenset[str]]:
    from relay import sets

    cleared = {f for f, v in (("open_tracking", args.open), ("click_tracking", args.click),
                              ("custom_redirect_domain", args.custom_redirect_domain),
                              ("https_policy", args.https_policy), ("pixel_position", args.pixel_position))
               if v == "inherit"}
    opts = sets.TrackingOptions(
        open_tracking=_switch(args.open), click_tracking=_switch(args.click),
        custom_redirect_domain=None if args.custom_redirect_domain in (None, "inherit")
        else args.custom_redirect_domain,
        https_policy=None if args.https_policy in (None, "inherit") else args.https_policy.upper(),
        pixel_position=None if args.pixel_position in (None, "inherit") else args.pixel_position.lower(),
    )
    return opts, frozenset(cleared)


def _level(args: argparse.Namespace) -> tuple[str, str]:
    if args.account:
        return "account", ""
    if args.domain:
        return "domain", args.domain
    return "set", args.config_set


def _config_set_cmd(cfg: Config, store: Store, args: argparse.Namespace):
    from relay import sets

    cmd = args.config_set_command
    if cmd == "list":
        return "\n".join(f"{s['Name']}\t{s['Source']}" for s in sets.list_sets(cfg, store)) or None
    if cmd == "show":
        from relay.control_cli import set_report

        return {**sets.describe_set(cfg, store, args.name), **set_report(cfg, store, args.name)}
    if cmd in ("pause", "resume"):
        from relay.control_cli import config_set_switch

        return config_set_switch(cfg, store, args)
    if cmd == "create":
        sets.create_set(cfg, store, args.name)
    elif cmd == "delete":
        sets.delete_set(cfg, store, args.name)
    elif cmd == "default":
        sets.set_identity_default(cfg, store, args.identity, None if args.clear else args.set)
    return None


def _tracking_cmd(cfg: Config, store: Store, args: argparse.Namespace):
    from relay import sets

    cmd = args.tracking_command
    if cmd == "show":
        r = sets.show_tracking(cfg, store, args.sender, args.config_set)
        if args.json:
            return {"ConfigurationSet": r.set_name, "ChosenBy": r.set_reason, "Settings": r.settings.to_json(),
                    "Provenance": r.provenance}
        lines = [f"configuration set: {r.set_name or '(none)'}  [{r.set_reason}]"]
        values = {"open_tracking": r.settings.open_tracking, "click_tracking": r.settings.click_tracking,
                  "custom_redirect_domain": r.settings.host, "https_policy": r.settings.https_policy,
                  "pixel_position": r.settings.pixel_position}
        lines += [f"{f}: {str(v).lower() if isinstance(v, bool) else v}  [{r.provenance[f]}]"
                  for f, v in values.items()]
        return "\n".join(lines)
    level, scope = _level(args)
    if cmd == "delete":
        sets.delete_tracking(cfg, store, level, scope)
        return None
    opts, cleared = _options_from_args(args)
    mode = "create" if args.create else "update" if args.update else "put"
    stored = sets.put_tracking(cfg, store, level, scope, opts, cleared, mode)
    return {"Level": level, "Scope": scope, "TrackingOptions": stored.to_json()}


def _destination_fields(args: argparse.Namespace) -> dict:
    secret = args.secret
    if args.secret_file:
        with open(args.secret_file, encoding="utf-8") as f:
            secret = f.read().strip()
    fields = {"event_types": tuple(t for t in (args.events or "").split(",") if t) if args.events else None,
              "kind": args.type, "url": args.url, "secret": secret, "path": args.path, "topic_arn": args.topic_arn,
              "sns_envelope": args.sns_envelope, "timeout": args.timeout, "retry_initial": args.retry_initial,
              "retry_max": args.retry_max, "max_refusals": args.max_refusals}
    if fields["path"]:
        fields["path"] = os.path.abspath(fields["path"])  # the relay may run in another directory
    return {k: v for k, v in fields.items() if v is not None}


def _destination_cmd(cfg: Config, store: Store, args: argparse.Namespace):
    from relay import sets

    cmd, set_name, name = args.destination_command, args.set, args.name
    if cmd == "add":
        fields = _destination_fields(args)
        fields.setdefault("event_types", ())
        fields.setdefault("kind", "webhook")
        d = sets.Destination(name=name, enabled=not args.disabled, **fields)
        sets.add_destination(cfg, store, set_name, d)
    elif cmd == "update":
        changes = _destination_fields(args)
        if args.no_sns_envelope:
            changes["sns_envelope"] = False
        return sets.update_destination(cfg, store, set_name, name, changes).public_json()
    elif cmd in ("enable", "disable"):
        sets.update_destination(cfg, store, set_name, name, {"enabled": cmd == "enable"})
    elif cmd == "delete":
        sets.delete_destination(cfg, store, set_name, name)
    return None


config_set_command = _cli(_config_set_cmd)
tracking_command = _cli(_tracking_cmd)
destination_command = _cli(_destination_cmd)


def add_parsers(sub) -> None:
    """`relay config-set`, `relay tracking`, `relay destination`."""
    p = sub.add_parser("config-set", help="configuration sets: list, show, create, delete, pause, resume, default")
    s = p.add_subparsers(dest="config_set_command", required=True)
    c = s.add_parser("list", help="every set, from the file and the database")
    c.add_argument("--config", required=True)
    for name, help_text in (("show", "a set's tracking options and destinations (JSON)"),
                            ("create", "create a set (in the database)"), ("delete", "delete a set")):
        c = s.add_parser(name, help=help_text)
        c.add_argument("name")
        c.add_argument("--config", required=True)
    from relay.control_cli import add_config_set_parsers

    add_config_set_parsers(s)  # pause, resume
    c = s.add_parser("default", help="an identity's (address or domain) default configuration set")
    c.add_argument("identity")
    g = c.add_mutually_exclusive_group(required=True)
    g.add_argument("--set", help="the default set")
    g.add_argument("--clear", action="store_true", help="remove the default")
    c.add_argument("--config", required=True)

    p = sub.add_parser("tracking", help="tracking options at account, sending domain or set level: set, show, delete")
    s = p.add_subparsers(dest="tracking_command", required=True)
    for name in ("set", "delete"):
        c = s.add_parser(name, help=f"{name} the tracking options of one level")
        g = c.add_mutually_exclusive_group(required=True)
        g.add_argument("--account", action="store_true", help="account level (all sending domains)")
        g.add_argument("--domain", help="a sending domain's level")
        g.add_argument("--config-set", help="a configuration set's level")
        c.add_argument("--config", required=True)
        if name == "set":
            onoff = ("on", "off", "inherit")
            c.add_argument("--open", choices=onoff, help="open tracking switch (inherit: unset)")
            c.add_argument("--click", choices=onoff, help="click tracking switch (inherit: unset)")
            c.add_argument("--custom-redirect-domain", help="tracking host (inherit: unset)")
            c.add_argument("--https-policy", help="REQUIRE | REQUIRE_OPEN_ONLY | OPTIONAL | inherit")
            c.add_argument("--pixel-position", help="bottom | top | auto | inherit")
            m = c.add_mutually_exclusive_group()
            m.add_argument("--create", action="store_true", help="fail if the level already has options")
            m.add_argument("--update", action="store_true", help="fail if the level has no options yet")
    c = s.add_parser("show", help="effective settings for a sender (and set), and where each value came from")
    c.add_argument("--sender", required=True, help="the From address of the message")
    c.add_argument("--config-set", help="its X-SES-CONFIGURATION-SET (default: the identity's default set)")
    c.add_argument("--json", action="store_true")
    c.add_argument("--config", required=True)

    p = sub.add_parser("destination", help="event destinations: add, update, enable, disable, delete")
    s = p.add_subparsers(dest="destination_command", required=True)
    for name in ("add", "update", "enable", "disable", "delete"):
        c = s.add_parser(name, help=f"{name} an event destination")
        c.add_argument("set", help="configuration set")
        c.add_argument("name", help="destination name")
        c.add_argument("--config", required=True)
        if name in ("add", "update"):
            c.add_argument("--type", choices=("webhook", "file"))
            c.add_argument("--events", help="MatchingEventTypes, comma-separated: SEND,DELIVERY,OPEN,CLICK,...")
            c.add_argument("--url", help="webhook: http(s) URL")
            c.add_argument("--secret", help="webhook: HMAC-SHA256 key for X-Relay-Signature")
            c.add_argument("--secret-file", help="webhook: read the secret from this file")
            c.add_argument("--sns-envelope", action="store_true", default=None, help="webhook: SNS Notification")
            c.add_argument("--topic-arn", help="webhook: TopicArn in the SNS envelope")
            c.add_argument("--path", help="file: JSON Lines file")
            c.add_argument("--timeout", type=float)
            c.add_argument("--retry-initial", type=float)
            c.add_argument("--retry-max", type=float)
            c.add_argument("--max-refusals", type=int)
        if name == "add":
            c.add_argument("--disabled", action="store_true", help="create it disabled")
        if name == "update":
            c.add_argument("--no-sns-envelope", action="store_true")
