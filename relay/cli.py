"""The `relay` command: one function per subcommand, each calling the core or a service.

Heavy modules are imported inside the subcommand that needs them, so `relay instrument` (run once per message
by scripts) starts quickly. What an operator can fix (a file, a port, a key) ends the command with one line
naming it and exit status 1; the traceback is printed only with -v.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

from relay import __version__
from relay import config as config_module

DESCRIPTION = ("relay: an SMTP relay for your applications' mail that tracks opens and clicks, signs with DKIM "
               "and records every event, the way Amazon SES does.")
EPILOG = ("Start with `relay init /etc/relay --domain example.com --tracking-host track.example.com`. Commands "
          "that read a configuration take --config FILE, else $RELAY_CONFIG, else /etc/relay/relay.toml when it "
          "exists. Errors are one line; -v adds the traceback.")
CONFIG_HELP = "configuration file (default: $RELAY_CONFIG, else /etc/relay/relay.toml when it exists)"


def print_errors(lines: list[str], kind: str = "error") -> None:
    for line in lines:
        print(f"{kind}: {line}", file=sys.stderr)


def cmd_serve(args: argparse.Namespace) -> int:
    from relay.check import access_problems, listen_problems, needs, serve_listeners

    cfg = config_module.load(args.config)
    problems = access_problems([n for n in needs(cfg, args.config) if n.at_start])
    problems += listen_problems(serve_listeners(cfg))
    if problems:  # said plainly now, rather than as a traceback from deep inside the start
        print_errors(problems)
        return 1
    from relay.service import serve

    return serve(args.config)


def cmd_check(args: argparse.Namespace) -> int:
    from relay.check import (
        Account,
        access_problems,
        needs,
        production_findings,
        production_warnings,
        reaches_beyond_loopback,
    )
    from relay.sign import check_keys

    try:
        cfg = config_module.load(args.config)
        account = Account.named(args.user) if args.user else None
    except config_module.ConfigError as exc:
        print_errors(exc.problems)
        return 1
    except LookupError as exc:
        print_errors([f"--user: {exc}"])
        return 1
    errors = check_keys(cfg.dkim)
    notes = config_module.warnings(cfg)
    unreachable, findings = access_problems(needs(cfg, args.config), account), production_findings(cfg)
    if args.production:
        errors += unreachable + findings
        notes += production_warnings(cfg)
        if account is None and os.geteuid() == 0:
            notes.append("--user: files were checked for root, who may read anything: --user relay checks them"
                         " for the service user")
    else:  # a trial on loopback keeps the example's capture upstream and localhost links without a word
        notes += unreachable + (findings if reaches_beyond_loopback(cfg.smtp.listen_host) else [])
    print_errors(errors)
    print_errors(notes, "warning")
    if check_database(cfg) or errors:
        return 1
    print(f"{args.config}: ok ({len(cfg.configuration_sets)} configuration sets)")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from relay.init import init_command

    return init_command(args)


def cmd_passwd(args: argparse.Namespace) -> int:
    password = sys.stdin.readline().rstrip("\n") if not sys.stdin.isatty() else getpass.getpass("Password: ")
    if not password:
        print("error: empty password", file=sys.stderr)
        return 1
    print(config_module.hash_password(password))
    return 0


def cmd_instrument(args: argparse.Namespace) -> int:
    from relay.instrument import dry_run

    return dry_run(args)


def cmd_dkim(args: argparse.Namespace) -> int:
    from relay.sign import dkim_command

    return dkim_command(args)


def cmd_track(args: argparse.Namespace) -> int:
    from relay.check import listen_problems, track_listeners
    from relay.tracking import WORKER_ENV, track_command

    if WORKER_ENV not in os.environ:  # a worker binds ports its parent already holds
        cfg = config_module.load(args.config)
        problems = listen_problems(track_listeners(cfg), reuse_port=cfg.tracking.workers > 1)
        if problems:
            print_errors(problems)
            return 1
    return track_command(args)


def cmd_tracking_domain(args: argparse.Namespace) -> int:
    from relay.tracking_domain import tracking_domain_command

    return tracking_domain_command(args)


def cmd_config_set(args: argparse.Namespace) -> int:
    from relay.sets_cli import config_set_command

    return config_set_command(args)


def cmd_tracking(args: argparse.Namespace) -> int:
    from relay.sets_cli import tracking_command

    return tracking_command(args)


def cmd_destination(args: argparse.Namespace) -> int:
    from relay.sets_cli import destination_command

    return destination_command(args)


def cmd_stats(args: argparse.Namespace) -> int:
    from relay.inspect import stats_command

    return stats_command(args)


def cmd_events(args: argparse.Namespace) -> int:
    from relay.inspect import tail_command

    return tail_command(args)


def cmd_purge(args: argparse.Namespace) -> int:
    from relay.inspect import purge_command

    return purge_command(args)


def cmd_forget(args: argparse.Namespace) -> int:
    from relay.inspect import forget_command

    return forget_command(args)


def cmd_suppression(args: argparse.Namespace) -> int:
    from relay.suppression import suppression_command

    return suppression_command(args)


def check_database(cfg) -> int:
    """`relay check`: the sets, levels and identities held in the database, and conflicts with the file."""
    from relay.store import has_database, open_store

    if not has_database(cfg.store_target):  # no database yet: identities can only name sets of the file
        missing = [f"identities.{i}.default_configuration_set: configuration set <{s}> does not exist"
                   for i, s in cfg.identities.items() if s not in cfg.configuration_sets]
        for line in missing:
            print(f"error: {line}", file=sys.stderr)
        return len(missing)
    from relay.sets import check_database as check

    store = open_store(cfg.store_target)
    try:
        problems, conflicts = check(cfg, store)
    finally:
        store.close()
    for line in conflicts:
        print(f"warning: conflict: {line}", file=sys.stderr)
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    return len(problems)


def cmd_store(args: argparse.Namespace) -> int:
    from relay.store import is_url
    from relay.store.transfer import TargetNotEmpty, transfer

    source = Path(args.source)
    if not source.is_file():
        print(f"error: no SQLite database at {source}", file=sys.stderr)
        return 1
    if not is_url(args.target):
        print("error: --to: a postgresql:// URL", file=sys.stderr)
        return 1
    try:
        done = transfer(source, args.target, lambda table, n: print(f"  {table}: {n} rows", file=sys.stderr))
    except TargetNotEmpty as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    total = sum(t.rows for t in done)
    print(f"copied {total} rows in {len(done)} tables from {source}; point [store] url at the target and start the"
          " nodes")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relay", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, and tracebacks with errors")
    parser.add_argument("--version", action="version", version=f"relay {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="write a production configuration, DKIM and tracking keys; print DNS records")
    p.add_argument("dir", help="folder for relay.toml and the keys, e.g. /etc/relay (created)")
    p.add_argument("--domain", required=True, help="the domain your mail is sent from (its DKIM key is made)")
    p.add_argument("--tracking-host", required=True, help="public host name of the pixel and links, e.g."
                   " track.example.com")
    p.add_argument("--data-dir", default="/var/lib/relay", help="database and queue (default: /var/lib/relay, the"
                   " unit's StateDirectory)")
    p.add_argument("--user", help="service user to own the files (when run as root), e.g. relay")
    p.add_argument("--upstream", help="HOST[:PORT] of the smarthost relay delivers through (default port 587);"
                   " without it mail is captured to files and `relay check --production` refuses the file")
    p.add_argument("--smtp-listen", default="127.0.0.1:2525", help="address your applications send to"
                   " (default: 127.0.0.1:2525)")
    p.add_argument("--hostname", help="relay's name in greetings and Message-IDs (default: this machine's)")
    p.add_argument("--selector", default="relay1", help="DKIM selector (default: relay1)")
    p.add_argument("--bounce-domain", help="receive bounces and complaints at this domain (VERP)")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("serve", help="run the SMTP listener, delivery and the tracking listener")
    p.add_argument("--config", required=True)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("check", help="validate a configuration file (--production: as the systemd unit does)")
    p.add_argument("--config", required=True)
    p.add_argument("--production", action="store_true", help="refuse what cannot serve real mail: a capture"
                   " upstream, loopback tracking hosts, files the service user cannot use")
    p.add_argument("--user", help="check file access for this user (the service user) instead of the caller")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("passwd", help="hash an SMTP password (read from standard input) for smtp.users")
    p.set_defaults(func=cmd_passwd)

    p = sub.add_parser("instrument", help="dry run: instrument a message from stdin as relay would deliver it")
    p.add_argument("--config", required=True)
    p.add_argument("--config-set", help="default: the message's X-SES-CONFIGURATION-SET, else its sender's"
                   " default set")
    p.add_argument("--recipient", help="default: the first To, Cc or Bcc address of the message")
    p.add_argument("--report-json", help="write the instrumentation report here")
    p.add_argument("--message-id", help="relay message id to sign into tracking URLs (default: a new one)")
    p.set_defaults(func=cmd_instrument)

    p = sub.add_parser("dkim", help="DKIM keys: keygen, check")
    dkim_sub = p.add_subparsers(dest="dkim_command", required=True)
    k = dkim_sub.add_parser("keygen", help="write a private key and print the DNS TXT record")
    k.add_argument("--domain", required=True)
    k.add_argument("--selector", required=True)
    k.add_argument("--algorithm", choices=("rsa", "ed25519"), default="rsa")
    k.add_argument("--bits", type=int, default=2048)
    k.add_argument("--out", help="private key file (default: ./<domain>.<selector>.pem)")
    k = dkim_sub.add_parser("check", help="compare the published DNS record with the configured key")
    k.add_argument("--config", required=True)
    k.add_argument("--domain", required=True)
    k.add_argument("--selector")
    k.add_argument("--nameserver")
    k.add_argument("--port", type=int, default=53)
    p.set_defaults(func=cmd_dkim)

    p = sub.add_parser("track", help="run only the tracking listener (pixel and click redirects)")
    p.add_argument("--config", required=True)
    p.set_defaults(func=cmd_track)

    p = sub.add_parser("tracking-domain", help="tracking domains: verify")
    td_sub = p.add_subparsers(dest="tracking_domain_command", required=True)
    v = td_sub.add_parser("verify", help="prove that DOMAIN reaches this tracking listener")
    v.add_argument("domain")
    v.add_argument("--config", required=True)
    v.add_argument("--nameserver")
    v.add_argument("--port", type=int, default=53)
    p.set_defaults(func=cmd_tracking_domain)

    p = sub.add_parser("store", help="the database: migrate a single node's SQLite database into PostgreSQL")
    store_sub = p.add_subparsers(dest="store_command", required=True)
    m = store_sub.add_parser("migrate", help="copy every row of a SQLite database into an empty PostgreSQL one")
    m.add_argument("--from", dest="source", required=True, help="the SQLite file (data_dir/relay.sqlite3)")
    m.add_argument("--to", dest="target", required=True, help="postgresql://user@host/dbname")
    p.set_defaults(func=cmd_store)

    from relay.sets_cli import add_parsers  # config-set, tracking, destination

    before = set(sub.choices)
    add_parsers(sub)
    funcs = {"config-set": cmd_config_set, "tracking": cmd_tracking, "destination": cmd_destination}
    for name in set(sub.choices) - before:
        sub.choices[name].set_defaults(func=funcs[name])
    from relay.inspect import add_parsers as add_inspection  # stats, events tail, purge, forget

    add_inspection(sub, {"stats": cmd_stats, "events": cmd_events, "purge": cmd_purge, "forget": cmd_forget})
    from relay.suppression import add_parser as add_suppression

    add_suppression(sub)
    sub.choices["suppression"].set_defaults(func=cmd_suppression)
    from relay.template_cli import add_parser as add_template  # the sending API's templates

    add_template(sub)
    sub.choices["template"].set_defaults(func=cmd_template)
    from relay.control_cli import add_parsers as add_control  # sending control: account
    from relay.identity_cli import add_parsers as add_identity  # sending identities and their DKIM keys

    add_control(sub)
    add_identity(sub)
    _config_from_environment(parser, config_module.default_config_path())
    return parser


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """`parser` and every subcommand's parser below it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                yield from _parsers(child)


def _config_from_environment(parser: argparse.ArgumentParser, default: str | None) -> None:
    """Every --config falls back on `default` ($RELAY_CONFIG or /etc/relay/relay.toml); each subcommand also
    takes -v after its name (`relay serve -v`)."""
    for p in _parsers(parser):
        for action in p._actions:
            if "--config" in action.option_strings:
                action.required, action.default, action.help = default is None, default, CONFIG_HELP
        if p is not parser and not any(isinstance(a, argparse._SubParsersAction) for a in p._actions):
            p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                           help="debug logging, and tracebacks with errors")


def operator_error(exc: BaseException) -> str | None:
    """One line for what an operator can fix (a file, a port, a database out of reach); None for a bug."""
    if isinstance(exc, OSError):
        what = exc.strerror or str(exc)
        return f"{exc.filename}: {what}" if exc.filename else str(exc).split("] ", 1)[-1]
    if type(exc).__name__ == "OperationalError" and type(exc).__module__.split(".")[0] in ("sqlite3", "psycopg"):
        return f"database: {str(exc).strip().splitlines()[0]}"
    return None


def cmd_template(args: argparse.Namespace) -> int:
    from relay.template_cli import run

    return run(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    # The format names no thread or process: leave those out of every record (a cost per log line at load).
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    try:
        return args.func(args)
    except config_module.ConfigError as exc:
        if args.verbose:
            traceback.print_exc()
        print_errors(exc.problems)
        return 1
    except Exception as exc:
        line = operator_error(exc)
        if line is None:
            raise
        if args.verbose:
            traceback.print_exc()
        print_errors([line])
        return 1


if __name__ == "__main__":
    sys.exit(main())
