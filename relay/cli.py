"""The `relay` command: one function per subcommand, each calling the core or a service.

Heavy modules are imported inside the subcommand that needs them, so `relay instrument` (run once per message
by scripts) starts quickly.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import sys
from pathlib import Path

from relay import config as config_module


def cmd_serve(args: argparse.Namespace) -> int:
    from relay.service import serve

    return serve(args.config)


def cmd_check(args: argparse.Namespace) -> int:
    try:
        cfg = config_module.load(args.config)
    except config_module.ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 1
    from relay.sign import check_keys

    problems = check_keys(cfg.dkim)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    for warning in config_module.warnings(cfg):
        print(f"warning: {warning}", file=sys.stderr)
    if check_database(cfg) or problems:  # issue 6: the SQLite-held configuration too
        return 1
    print(f"{args.config}: ok ({len(cfg.configuration_sets)} configuration sets)")
    return 0


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
    from relay.tracking import track_command

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
    """`relay check`, issue 6: the SQLite-held sets, levels and identities, and conflicts with the file."""
    if not cfg.database_path.exists():  # no database yet: identities can only name sets of the file
        missing = [f"identities.{i}.default_configuration_set: configuration set <{s}> does not exist"
                   for i, s in cfg.identities.items() if s not in cfg.configuration_sets]
        for line in missing:
            print(f"error: {line}", file=sys.stderr)
        return len(missing)
    from relay.sets import check_database as check
    from relay.store import open_store

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
    parser = argparse.ArgumentParser(prog="relay", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the SMTP listener, delivery and the tracking listener")
    p.add_argument("--config", required=True)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("check", help="validate a configuration file")
    p.add_argument("--config", required=True)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("passwd", help="hash an SMTP password (read from standard input) for smtp.users")
    p.set_defaults(func=cmd_passwd)

    p = sub.add_parser("instrument", help="dry run: instrument a message from stdin as relay would deliver it")
    p.add_argument("--config", required=True)
    p.add_argument("--config-set", required=True)
    p.add_argument("--recipient", required=True)
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

    from relay.sets_cli import add_parsers  # issue 6: config-set, tracking, destination

    before = set(sub.choices)
    add_parsers(sub)
    funcs = {"config-set": cmd_config_set, "tracking": cmd_tracking, "destination": cmd_destination}
    for name in set(sub.choices) - before:
        sub.choices[name].set_defaults(func=funcs[name])
    from relay.inspect import add_parsers as add_inspection  # issue 8: stats, events tail, purge, forget

    add_inspection(sub, {"stats": cmd_stats, "events": cmd_events, "purge": cmd_purge, "forget": cmd_forget})
    from relay.suppression import add_parser as add_suppression  # issue 9

    add_suppression(sub)
    sub.choices["suppression"].set_defaults(func=cmd_suppression)
    from relay.control_cli import add_parsers as add_control  # sending control: account
    from relay.identity_cli import add_parsers as add_identity  # sending identities and their DKIM keys

    add_control(sub)
    add_identity(sub)
    return parser


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
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
