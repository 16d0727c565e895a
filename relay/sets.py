"""Managing configuration sets, tracking options, identities' default sets and event destinations.

The operations mirror SES's (CreateConfigurationSet, PutConfigurationSetTrackingOptions,
CreateConfigurationSetEventDestination, ...) and fail with SES's error codes and wording, so the CLI here and
the SES-compatible management API call the same functions. Each operation is one store work, so it runs in
one transaction: it either happens whole or not at all, and concurrent commands are serialised by SQLite.
Everything defined in the TOML file is read-only here (it is provisioned from the file at every start).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import replace

from relay.config import Config
from relay.core import resolve as core
from relay.core.domains import InvalidTrackingOptions, check_tracking_options
from relay.core.events import iso_ms
from relay.core.resolve import Destination, ModelError, TrackingOptions
from relay.resolve import Resolver, build_model, destination_settings
from relay.store import (
    Store,
    bump_configuration_version,
    configuration_read,
    delete_cursor,
    load_configuration,
    provision_cursor,
    put_set_suppression,
)
from relay.store.control import forget_set_control

LEVELS = ("account", "domain", "set")
HTTPS_REQUIRED = ("REQUIRE", "REQUIRE_OPEN_ONLY")


class SesError(Exception):
    """An SES error: `code` as SES names it (ConfigurationSetDoesNotExist, ...) and its message."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


def no_such_set(name: str) -> SesError:
    return SesError("ConfigurationSetDoesNotExist", f"Configuration set <{name}> does not exist.")


def _read_only(cfg: Config, what: str) -> SesError:
    return SesError("InvalidConfigurationSet", f"{what} is defined in {cfg.path} and is read-only here;"
                    " change the file and reload (SIGHUP) instead.")


def _validation(exc: ModelError) -> SesError:
    return SesError("ValidationError", f"1 validation error detected: {exc}")


def _db_set_exists(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM configuration_sets WHERE name = ?", (name,)).fetchone() is not None


def writable_set(cfg: Config, conn: sqlite3.Connection, name: str) -> None:
    if name in cfg.configuration_sets:
        raise _read_only(cfg, f"Configuration set <{name}>")
    if not _db_set_exists(conn, name):
        raise no_such_set(name)


def _run(store: Store, work):
    """One operation, one transaction (the store rolls the work back when it raises)."""
    return store.submit(work).result()


# --- configuration sets ------------------------------------------------------------------------------------

def list_sets(cfg: Config, store: Store) -> list[dict]:
    model = Resolver(cfg, store).model()
    return [{"Name": s.name, "Source": s.source} for s in sorted(model.sets.values(), key=lambda s: s.name)]


def describe_set(cfg: Config, store: Store, name: str) -> dict:
    model = Resolver(cfg, store).model()
    s = model.sets.get(name)
    if s is None:
        raise no_such_set(name)
    data: dict = {"ConfigurationSet": {"Name": s.name}, "Source": s.source,
                  "EventDestinations": [d.public_json() for d in s.destinations]}
    if s.has_tracking:
        data["TrackingOptions"] = s.tracking.to_json()
    data["DefaultOf"] = sorted(i for i, (n, _) in model.identities.items() if n == name)
    return data


def create_set(cfg: Config, store: Store, name: str, also: Callable[[sqlite3.Connection], None] | None = None
               ) -> None:
    """`also(conn)`: more of the new set's configuration, written in the same transaction (a set created paused
    never sends, not even for a moment)."""
    try:
        core.check_set_name(name)
    except ModelError as exc:
        raise SesError("InvalidConfigurationSet", str(exc)) from exc
    if name in cfg.configuration_sets:
        raise SesError("ConfigurationSetAlreadyExists", f"Configuration set <{name}> already exists"
                       f" (defined in {cfg.path}).")

    def work(conn: sqlite3.Connection) -> None:
        if _db_set_exists(conn, name):
            raise SesError("ConfigurationSetAlreadyExists", f"Configuration set <{name}> already exists.")
        count = conn.execute("SELECT COUNT(*) FROM configuration_sets").fetchone()[0]
        if count + len(cfg.configuration_sets) >= core.MAX_SETS:
            raise SesError("LimitExceeded", f"Maximum number of configuration sets ({core.MAX_SETS}) reached.")
        conn.execute("INSERT INTO configuration_sets (name, created_at) VALUES (?, ?)",
                     (name, iso_ms(int(time.time() * 1000))))
        if also is not None:
            also(conn)
        bump_configuration_version(conn)

    _run(store, work)


def delete_set(cfg: Config, store: Store, name: str) -> None:
    """The set, its tracking options, destinations and cursors. Identities whose default it was keep naming
    it: their mail is refused until they get another default (SES)."""

    def work(conn: sqlite3.Connection) -> None:
        writable_set(cfg, conn, name)
        conn.execute("DELETE FROM configuration_sets WHERE name = ?", (name,))
        conn.execute("DELETE FROM tracking_options WHERE level = 'set' AND scope = ?", (name,))
        conn.execute("DELETE FROM event_destinations WHERE configuration_set = ?", (name,))
        delete_cursor(conn, name)
        put_set_suppression(conn, name, None)  # its SuppressionOptions go with it
        forget_set_control(conn, name)  # its sending switch and delivery options
        bump_configuration_version(conn)

    _run(store, work)


def set_identity_default(cfg: Config, store: Store, identity: str, set_name: str | None) -> None:
    """PutEmailIdentityConfigurationSetAttributes: an address's or a domain's default set (None: remove)."""
    identity = identity.strip().lower()
    if not identity or " " in identity:
        raise SesError("ValidationError", f"1 validation error detected: EmailIdentity: {identity!r} is not an"
                       " email address or a domain")
    if identity in cfg.identities:
        raise _read_only(cfg, f"The default configuration set of identity {identity}")

    def work(conn: sqlite3.Connection) -> None:
        if set_name is None:
            conn.execute("DELETE FROM identity_sets WHERE identity = ?", (identity,))
        else:
            if set_name not in cfg.configuration_sets and not _db_set_exists(conn, set_name):
                raise no_such_set(set_name)
            conn.execute("DELETE FROM identity_sets WHERE identity = ?", (identity,))
            conn.execute("INSERT INTO identity_sets (identity, configuration_set) VALUES (?, ?)",
                         (identity, set_name))
        bump_configuration_version(conn)

    _run(store, work)


# --- tracking options --------------------------------------------------------------------------------------

def _scope_label(level: str, scope: str) -> str:
    return {"account": "The account", "domain": f"Sending domain {scope}",
            "set": f"Configuration set <{scope}>"}[level]


def _check_writable_level(cfg: Config, conn: sqlite3.Connection, level: str, scope: str) -> None:
    if level == "set":
        writable_set(cfg, conn, scope)
    elif level == "domain" and scope in cfg.domains:
        raise _read_only(cfg, f"Tracking options of sending domain {scope}")


def _validated_domain(cfg: Config, store: Store, domain: str) -> str:
    """tracking-domain rules (relay/core/domains.py), and `relay tracking-domain verify` when required."""
    required = cfg.tracking.require_verified_domains
    verified = {r[0] for r in store.query("SELECT domain FROM tracking_domains")} if required else set()
    try:
        return check_tracking_options(domain, verified, required)
    except InvalidTrackingOptions as exc:
        raise SesError("InvalidTrackingOptions", exc.message) from exc


def put_tracking(cfg: Config, store: Store, level: str, scope: str, options: TrackingOptions,
                 cleared: frozenset[str] = frozenset(), mode: str = "put") -> TrackingOptions:
    """Create (`mode="create"`: TrackingOptionsAlreadyExists when present), update (`"update"`:
    TrackingOptionsDoesNotExist when absent) or put (either) the options of one level; values given replace,
    `cleared` fields go back to inheriting. Returns the level's options as stored."""
    scope = scope.lower() if level == "domain" else scope
    if options.empty and not cleared:
        raise SesError("InvalidTrackingOptions", "At least one field of TrackingOptions must contain a value.")
    try:
        core.check_options(options)
    except ModelError as exc:
        raise SesError("InvalidTrackingOptions", str(exc)) from exc
    if options.custom_redirect_domain:
        options = replace(options, custom_redirect_domain=_validated_domain(cfg, store, options.custom_redirect_domain))

    def work(conn: sqlite3.Connection) -> TrackingOptions:
        _check_writable_level(cfg, conn, level, scope)
        row = conn.execute("SELECT * FROM tracking_options WHERE level = ? AND scope = ?", (level, scope)).fetchone()
        if row is not None and mode == "create":
            raise SesError("TrackingOptionsAlreadyExists",
                           f"{_scope_label(level, scope)} already has tracking options.")
        if row is None and mode == "update":
            raise SesError("TrackingOptionsDoesNotExist",
                           f"There are no tracking options for {_scope_label(level, scope).lower()}.")
        from relay.resolve import options_from_row

        merged = (options_from_row(row) if row else TrackingOptions()).merged(options, cleared)
        _check_https(cfg, merged, f"{_scope_label(level, scope)}")
        conn.execute("DELETE FROM tracking_options WHERE level = ? AND scope = ?", (level, scope))
        if not merged.empty:
            conn.execute(
                "INSERT INTO tracking_options (level, scope, open_tracking, click_tracking, custom_redirect_domain,"
                " https_policy, pixel_position) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (level, scope, _int(merged.open_tracking), _int(merged.click_tracking), merged.custom_redirect_domain,
                 merged.https_policy, merged.pixel_position))
        bump_configuration_version(conn)
        return merged

    return _run(store, work)


def _int(v: bool | None) -> int | None:
    return None if v is None else int(v)


def _check_https(cfg: Config, o: TrackingOptions, where: str) -> None:
    """An https policy promises that https://host answers; refuse it where nothing serves TLS (as the file)."""
    host = o.custom_redirect_domain or cfg.tracking.default_host
    if o.https_policy in HTTPS_REQUIRED and not cfg.https_available(host):
        raise SesError("InvalidTrackingOptions", f"{where}: HttpsPolicy {o.https_policy} needs https://{host} to"
                       " reach the tracking listener: list it in tracking.https_hosts or serve a certificate for it.")


def delete_tracking(cfg: Config, store: Store, level: str, scope: str) -> None:
    scope = scope.lower() if level == "domain" else scope

    def work(conn: sqlite3.Connection) -> None:
        _check_writable_level(cfg, conn, level, scope)
        cur = conn.execute("DELETE FROM tracking_options WHERE level = ? AND scope = ?", (level, scope))
        if cur.rowcount == 0:
            raise SesError("TrackingOptionsDoesNotExist",
                           f"There are no tracking options for {_scope_label(level, scope).lower()}.")
        bump_configuration_version(conn)

    _run(store, work)


def show_tracking(cfg: Config, store: Store, sender: str, set_name: str | None) -> core.Resolution:
    """Effective settings of a message from `sender` (with X-SES-CONFIGURATION-SET `set_name`, if given)."""
    resolver = Resolver(cfg, store)
    try:
        return resolver.resolve(set_name, sender.strip().lower())
    except core.UnknownSet as exc:
        raise no_such_set(exc.name) from exc


# --- event destinations ------------------------------------------------------------------------------------

def _checked(d: Destination) -> Destination:
    try:
        return core.check_destination(replace(d, event_types=core.event_types(d.event_types)))
    except ModelError as exc:
        raise _validation(exc) from exc


def _insert_destination(conn: sqlite3.Connection, set_name: str, d: Destination) -> None:
    conn.execute("INSERT INTO event_destinations (configuration_set, name, enabled, event_types, kind, settings)"
                 " VALUES (?, ?, ?, ?, ?, ?)", (set_name, d.name, int(d.enabled), json.dumps(list(d.event_types)),
                                               d.kind, destination_settings(d)))


def _destination(conn: sqlite3.Connection, set_name: str, name: str) -> Destination:
    from relay.resolve import destination_from_row

    row = conn.execute("SELECT configuration_set, name, enabled, event_types, kind, settings FROM event_destinations"
                       " WHERE configuration_set = ? AND name = ?", (set_name, name)).fetchone()
    if row is None:
        raise SesError("EventDestinationDoesNotExist",
                       f"Event destination <{name}> does not exist in configuration set <{set_name}>.")
    return destination_from_row(row)


def add_destination(cfg: Config, store: Store, set_name: str, d: Destination) -> None:
    d = _checked(d)

    def work(conn: sqlite3.Connection) -> None:
        writable_set(cfg, conn, set_name)
        if conn.execute("SELECT 1 FROM event_destinations WHERE configuration_set = ? AND name = ?",
                        (set_name, d.name)).fetchone():
            raise SesError("EventDestinationAlreadyExists",
                           f"Event destination <{d.name}> already exists in configuration set <{set_name}>.")
        count = conn.execute("SELECT COUNT(*) FROM event_destinations WHERE configuration_set = ?",
                             (set_name,)).fetchone()[0]
        if count >= core.MAX_DESTINATIONS:
            raise SesError("LimitExceeded", f"Configuration set <{set_name}> already has {count} event destinations;"
                           f" the limit is {core.MAX_DESTINATIONS}.")
        _insert_destination(conn, set_name, d)
        delete_cursor(conn, set_name, d.name)  # a new destination starts from the newest event
        provision_cursor(conn, set_name, d.name, d.enabled)
        bump_configuration_version(conn)

    _run(store, work)


def update_destination(cfg: Config, store: Store, set_name: str, name: str, changes: dict) -> Destination:
    """Replace the given fields (as Destination attributes); enabling starts from the newest event."""

    def work(conn: sqlite3.Connection) -> Destination:
        writable_set(cfg, conn, set_name)
        d = _checked(replace(_destination(conn, set_name, name), **changes))
        conn.execute("DELETE FROM event_destinations WHERE configuration_set = ? AND name = ?", (set_name, name))
        _insert_destination(conn, set_name, d)
        provision_cursor(conn, set_name, name, d.enabled)
        bump_configuration_version(conn)
        return d

    return _run(store, work)


def delete_destination(cfg: Config, store: Store, set_name: str, name: str) -> None:
    def work(conn: sqlite3.Connection) -> None:
        writable_set(cfg, conn, set_name)
        _destination(conn, set_name, name)
        conn.execute("DELETE FROM event_destinations WHERE configuration_set = ? AND name = ?", (set_name, name))
        delete_cursor(conn, set_name, name)
        bump_configuration_version(conn)

    _run(store, work)


# --- relay check -------------------------------------------------------------------------------------------

def check_database(cfg: Config, store: Store) -> tuple[list[str], list[str]]:
    """(problems, warnings) of the SQLite-held configuration and its conflicts with the file."""
    stored = configuration_read(store, load_configuration)
    model, conflicts = build_model(cfg, stored)
    problems: list[str] = []
    for identity, (set_name, where) in sorted(model.identities.items()):
        if set_name not in model.sets:
            problems.append(f"identity {identity} ({where}): default configuration set <{set_name}> does not exist;"
                            " its mail is refused (554) until it names an existing set")
    for (level, scope, *_), row in ((r[:2], r) for r in stored.tracking):
        from relay.resolve import options_from_row

        options = options_from_row(row)
        where = f"tracking options of {_scope_label(level, scope).lower()} (database)"
        if options.custom_redirect_domain:
            try:
                _validated_domain(cfg, store, options.custom_redirect_domain)
            except SesError as exc:
                problems.append(f"{where}: {exc.message}")
        try:
            _check_https(cfg, options, where)
        except SesError as exc:
            problems.append(exc.message)
    for s in model.sets.values():
        if len(s.destinations) > core.MAX_DESTINATIONS:
            problems.append(f"configuration set <{s.name}>: more than {core.MAX_DESTINATIONS} event destinations")
    return problems, conflicts
