"""The account suppression list: its operations and `relay suppression list|add|remove|import|export`
(and `options`, a set's reasons).

The operations are SES's (PutSuppressedDestination, GetSuppressedDestination, DeleteSuppressedDestination,
ListSuppressedDestinations, PutConfigurationSetSuppressionOptions) and fail with SesError, so the CLI here and
the management API (relay/api/v2.py) call the same functions. Entries are added automatically by the events
that carry a reason (relay/core/suppression.py entries_for); here they are managed by hand. Each change is one
store work (one transaction); a running relay sees it at its next message, as it reads the list per message.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from relay.core.settings import SUPPRESSION_REASONS

if TYPE_CHECKING:  # imported where used: build_parser() imports this module for every `relay` command
    from relay.config import Config
    from relay.core.suppression import Suppression
    from relay.store import Store

IMPORT_CHUNK = 5000  # entries per store work: a big import never holds SMTP acceptance behind one long write
CSV_HEADER = ("email", "reason")


# --- pure parts --------------------------------------------------------------------------------------------

class InvalidEntry(ValueError):
    pass


def check_address(address: str) -> str:
    """An email address as the list stores it (lower case); InvalidEntry when it is not one."""
    a = address.strip().lower()
    local, _, domain = a.rpartition("@")
    if not local or not domain or "." not in domain.strip(".") or any(c in a for c in " \t\r\n,<>\"()[];:"):
        raise InvalidEntry(f"not an email address: {address.strip()!r}")
    return a


def check_reason(reason: str) -> str:
    r = reason.strip().upper()
    if r not in SUPPRESSION_REASONS:
        raise InvalidEntry(f"reason {reason.strip()!r} is not one of {', '.join(SUPPRESSION_REASONS)}")
    return r


def iso_now(now: float | None = None) -> str:
    from relay.core.events import iso_ms

    return iso_ms(int((time.time() if now is None else now) * 1000))


@dataclass(frozen=True)
class ParsedCsv:
    entries: list[Suppression]
    bad: list[tuple[int, str]]  # (line number, why)


def parse_csv(text: str, when: str) -> ParsedCsv:
    """`email,reason` lines (SES's bulk import file; a header line is optional) -> entries dated `when`, and
    the bad lines with their numbers. A later line for the same address and reason wins."""
    from relay.core.suppression import Suppression

    entries: dict[tuple[str, str], Suppression] = {}
    bad: list[tuple[int, str]] = []
    for number, row in enumerate(csv.reader(io.StringIO(text)), 1):
        cells = [c.strip() for c in row]
        if not any(cells):
            continue
        if number == 1 and "@" not in cells[0] and cells[-1].upper() not in SUPPRESSION_REASONS:  # a header
            continue
        if len(cells) != 2:
            bad.append((number, f"expected 2 fields (email,reason), got {len(cells)}"))
            continue
        try:
            address, reason = check_address(cells[0]), check_reason(cells[1])
        except InvalidEntry as exc:
            bad.append((number, str(exc)))
            continue
        entries[(address, reason)] = Suppression(address, reason, when)
    return ParsedCsv(list(entries.values()), bad)


def to_csv(entries: Iterable[Suppression]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    writer.writerows((e.email_address, e.reason) for e in entries)
    return out.getvalue()


def entry_json(e: Suppression) -> dict:
    """An entry as the CLI's --json prints it (SES's member names)."""
    data = {"EmailAddress": e.email_address, "Reason": e.reason, "LastUpdateTime": e.last_update_time}
    if e.message_id:
        data["MessageId"] = e.message_id
    if e.feedback_id:
        data["FeedbackId"] = e.feedback_id
    return data


def table(entries: list[Suppression]) -> str:
    rows = [("EMAIL", "REASON", "LAST UPDATE", "MESSAGE ID")]
    rows += [(e.email_address, e.reason, e.last_update_time, e.message_id or "-") for e in entries]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3] for r in rows)


# --- operations (SES's) --------------------------------------------------------------------------------------

def _validation(exc: InvalidEntry):
    from relay.sets import SesError

    return SesError("ValidationError", f"1 validation error detected: {exc}")


def _not_found(address: str):
    from relay.sets import SesError

    return SesError("NotFoundException", f"Email address {address} does not exist on your suppression list.")


def put(store: Store, address: str, reason: str, now: float | None = None) -> Suppression:
    """PutSuppressedDestination: add or refresh an entry by hand."""
    from relay.core.suppression import Suppression
    from relay.store import suppress

    try:
        entry = Suppression(check_address(address), check_reason(reason), iso_now(now))
    except InvalidEntry as exc:
        raise _validation(exc) from exc
    store.submit(lambda conn: suppress(conn, [entry])).result()
    return entry


def get(store: Store, address: str) -> list[Suppression]:
    """GetSuppressedDestination: an address's entries (one per reason), newest first; NotFoundException."""
    from relay.store import suppression_entries

    entries = store.tracking_read(suppression_entries, address.strip().lower())
    if not entries:
        raise _not_found(address)
    return sorted(entries, key=lambda e: e.last_update_time, reverse=True)


def remove(store: Store, address: str, reasons: tuple[str, ...] = ()) -> int:
    """DeleteSuppressedDestination (every reason) or only some reasons; NotFoundException when nothing was
    listed."""
    from relay.store import unsuppress

    try:
        reasons = tuple(check_reason(r) for r in reasons)
    except InvalidEntry as exc:
        raise _validation(exc) from exc
    removed = store.submit(lambda conn: unsuppress(conn, address, reasons)).result()
    if not removed:
        raise _not_found(address)
    return removed


def listing(store: Store, reasons: Iterable[str] = (), start: str | None = None, end: str | None = None,
            after: tuple[str, str] | None = None, limit: int | None = None) -> list[Suppression]:
    """ListSuppressedDestinations: entries by address, filtered by reason and last update time."""
    from relay.store import suppression_entries

    try:
        reasons = tuple(check_reason(r) for r in reasons)
    except InvalidEntry as exc:
        raise _validation(exc) from exc
    return store.tracking_read(suppression_entries, None, reasons, start, end, after, limit)


def add_many(store: Store, entries: list[Suppression]) -> None:
    from relay.store import suppress

    for start in range(0, len(entries), IMPORT_CHUNK):
        chunk = entries[start:start + IMPORT_CHUNK]
        store.submit(lambda conn, chunk=chunk: suppress(conn, chunk)).result()


def put_set_reasons(cfg: Config, store: Store, set_name: str, reasons: Iterable[str] | None) -> tuple | None:
    """PutConfigurationSetSuppressionOptions of a database set: the reasons that stop its sends (None: the
    account's [suppression] reasons again). The file's sets have `suppression_reasons` and are read-only."""
    from relay import sets
    from relay.core.resolve import ModelError, check_suppression_reasons
    from relay.store import put_set_suppression

    try:
        checked = None if reasons is None else check_suppression_reasons(reasons)
    except ModelError as exc:
        raise sets.SesError("ValidationError", f"1 validation error detected: {exc}") from exc

    def work(conn) -> None:
        sets.writable_set(cfg, conn, set_name)
        put_set_suppression(conn, set_name, checked)

    store.submit(work).result()
    return checked


# --- the CLI -----------------------------------------------------------------------------------------------

def _list_cmd(store: Store, args: argparse.Namespace) -> str | None:
    from relay.inspect import iso, since_time

    start = iso(since_time(args.since, datetime.now(UTC))) if args.since else None
    entries = listing(store, [args.reason] if args.reason else (), start)
    if args.json:
        return json.dumps([entry_json(e) for e in entries], indent=2)
    return table(entries) if entries else "(the suppression list is empty)"


def _import_cmd(store: Store, args: argparse.Namespace) -> int:
    with open(args.file, encoding="utf-8-sig", newline="") as f:  # Excel writes a BOM
        parsed = parse_csv(f.read(), iso_now())
    add_many(store, parsed.entries)
    for number, why in parsed.bad:
        print(f"{args.file}:{number}: skipped: {why}", file=sys.stderr)
    print(f"imported {len(parsed.entries)} entries, skipped {len(parsed.bad)} bad lines")
    return 1 if parsed.bad else 0


def _export_cmd(store: Store, args: argparse.Namespace) -> int:
    text = to_csv(listing(store))
    if args.file in (None, "-"):
        sys.stdout.write(text)
    else:
        with open(args.file, "w", encoding="utf-8", newline="") as f:
            f.write(text)
    return 0


def set_reasons(cfg: Config, store: Store, set_name: str) -> tuple[tuple[str, ...], str]:
    """The reasons a set applies and where they come from."""
    from relay import sets
    from relay.resolve import Resolver

    s = Resolver(cfg, store).model().sets.get(set_name)
    if s is None:
        raise sets.no_such_set(set_name)
    own = s.feedback.suppression_reasons
    if own is None:
        return cfg.feedback.suppression_reasons, "the account's [suppression] reasons"
    return own, f"configuration set {set_name}"


def _options_cmd(cfg: Config, store: Store, args: argparse.Namespace) -> str:
    if args.inherit or args.reasons is not None:
        put_set_reasons(cfg, store, args.set, None if args.inherit else [r for r in args.reasons.split(",") if r])
    reasons, source = set_reasons(cfg, store, args.set)
    return f"{args.set}: {', '.join(reasons) or '(none: the list does not apply)'}  [{source}]"


def suppression_command(args: argparse.Namespace) -> int:
    from relay.sets import SesError
    from relay.sets_cli import open_config_and_store

    cfg, store = open_config_and_store(args)
    try:
        cmd = args.suppression_command
        if cmd == "options":
            out = _options_cmd(cfg, store, args)
        elif cmd == "import":
            return _import_cmd(store, args)
        elif cmd == "export":
            return _export_cmd(store, args)
        elif cmd == "list":
            out = _list_cmd(store, args)
        elif cmd == "add":
            e = put(store, args.address, args.reason)
            out = f"added {e.email_address} ({e.reason})"
        else:
            n = remove(store, args.address, (args.reason,) if args.reason else ())
            out = f"removed {n} {'entry' if n == 1 else 'entries'} of {args.address.strip().lower()}"
    except SesError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(out)
    return 0


def add_parser(sub) -> None:
    """`relay suppression list|add|remove|import|export|options`."""
    reasons = ", ".join(SUPPRESSION_REASONS)
    p = sub.add_parser("suppression", help="the account suppression list: list, add, remove, import, export,"
                       " a set's options")
    s = p.add_subparsers(dest="suppression_command", required=True)
    c = s.add_parser("list", help="the listed addresses, by address")
    c.add_argument("--reason", help=f"only this reason ({reasons})")
    c.add_argument("--since", help="only entries updated since: 7d, 24h, 2w or an ISO date/time")
    c.add_argument("--json", action="store_true", help="JSON for scripts")
    c = s.add_parser("add", help="list an address (again: refreshes its time)")
    c.add_argument("address")
    c.add_argument("--reason", required=True, help=reasons)
    c = s.add_parser("remove", help="take an address off the list (every reason unless --reason)")
    c.add_argument("address")
    c.add_argument("--reason", help=reasons)
    c = s.add_parser("import", help="add the `email,reason` lines of a CSV file (SES's bulk import format)")
    c.add_argument("file")
    c = s.add_parser("export", help="the list as `email,reason` CSV (to stdout without FILE)")
    c.add_argument("file", nargs="?")
    c = s.add_parser("options", help="the reasons a set applies (SES's SuppressionOptions); set them for a"
                     " set made with the CLI or the API")
    c.add_argument("set", help="configuration set")
    g = c.add_mutually_exclusive_group()
    g.add_argument("--reasons", help=f"comma-separated ({reasons}); empty: none")
    g.add_argument("--inherit", action="store_true", help="follow the account's [suppression] reasons again")
    for c in s.choices.values():
        c.add_argument("--config", required=True)
