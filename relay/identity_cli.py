"""`relay identity create|show|list|delete|verify|confirm|dkim`: sending identities from the command line
(relay/identities.py, the same operations as the API's). `show` prints the DNS records to publish.

Imports nothing heavy at module level: build_parser() runs for every `relay` command.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from relay.config import Config
    from relay.store import Store


def _shown(cfg: Config, store: Store, name: str) -> dict:
    from relay import identities
    from relay.api.common import Context
    from relay.api.identities import file_identity_json, identity_json

    ctx = Context(cfg, store, "cli")
    identity, _ = identities.normalised(name)
    if identity in identities.file_identities(cfg):
        return {"Identity": identity, "Source": "config", **file_identity_json(ctx, identity)}
    row = identities.row_of(cfg, store, identity)
    return {"Identity": identity, "Source": "database", **identity_json(ctx, row), "CheckDetail": row.check_detail}


def _identity_cmd(cfg: Config, store: Store, args: argparse.Namespace):
    from relay import identities
    from relay.core import identities as core

    cmd = args.identity_command
    if cmd == "list":
        return "\n".join(f"{r['IdentityName']}\t{r['IdentityType']}\t{r['VerificationStatus']}\t{r['Source']}"
                         for r in identities.listing(cfg, store)) or None
    if cmd == "create":
        key = Path(args.key_file).read_text() if args.key_file else None
        length = core.ED25519 if args.algorithm == "ed25519" else core.RSA_2048
        identities.create(cfg, store, args.name, selector=args.selector, private_key=key, length=length,
                          set_name=args.config_set)
    elif cmd == "delete":
        identities.delete(cfg, store, args.name)
        return None
    elif cmd == "verify":
        row = identities.row_of(cfg, store, args.name)
        if row.verification_status == core.FAILED and row.kind == core.DOMAIN:
            identities.ensure_token(cfg, store, row.identity)  # a new 72 hours, as SES's Verify* start one
        identities.check_now(cfg, store, row.identity)
    elif cmd == "confirm":
        identities.confirm_address(cfg, store, args.name)
    elif cmd == "dkim":
        identities.set_dkim_signing(cfg, store, args.name, args.switch == "on")
    return _shown(cfg, store, args.name)


def identity_command(args: argparse.Namespace) -> int:
    from relay.sets_cli import _cli

    return _cli(_identity_cmd)(args)


def add_parsers(sub) -> None:
    p = sub.add_parser("identity", help="sending identities (addresses, domains) and their DKIM keys")
    s = p.add_subparsers(dest="identity_command", required=True)
    c = s.add_parser("list", help="every identity, of the file and the database")
    c.add_argument("--config", required=True)
    c = s.add_parser("create", help="an address or a domain; a domain gets a DKIM key (RSA-2048 unless told)")
    c.add_argument("name")
    c.add_argument("--algorithm", choices=("rsa", "ed25519"), default="rsa", help="the key relay makes")
    c.add_argument("--selector", help="the key's selector (default: a new relay... one)")
    c.add_argument("--key-file", help="bring your own key: a PEM private key (RSA 2048+ or Ed25519)")
    c.add_argument("--config-set", help="the identity's default configuration set")
    c.add_argument("--config", required=True)
    for name, help_text in (("show", "status, DKIM attributes and the DNS records to publish (JSON)"),
                            ("delete", "delete an identity of the database (its key goes with it)"),
                            ("verify", "look its DNS records up now (a FAILED domain gets a new 72 hours)"),
                            ("confirm", "vouch for an address: relay sends no verification mail")):
        c = s.add_parser(name, help=help_text)
        c.add_argument("name")
        c.add_argument("--config", required=True)
    c = s.add_parser("dkim", help="switch a domain's DKIM signing on or off")
    c.add_argument("name")
    c.add_argument("switch", choices=("on", "off"))
    c.add_argument("--config", required=True)
    p.set_defaults(func=identity_command)
