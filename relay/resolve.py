"""The resolver: which configuration set a message uses and its tracking settings (the shell around
relay/core/resolve.py).

It merges the sets, levels and identities of the TOML file (read-only) with those created through the CLI
(SQLite). The merged model is cached; `configuration_version.counter` tells whether anything changed (in this
process or in a `relay config-set ...` run beside it), so a change takes effect for the next message without a
restart. The SMTP path checks that counter inside the transaction that queues the message (Pipeline.accept);
other callers read it on every `model()`. Where the file and the database both define a set, a domain's
options or an identity, the file wins (and `relay check` reports the conflict).
"""

from __future__ import annotations

import json
import logging
import sqlite3
from dataclasses import replace

from relay.config import Config
from relay.core import resolve as core
from relay.core.control import ACCOUNT, ENABLED, SendingState, SetOptions
from relay.core.identities import SUCCESS, IdentityDef
from relay.core.resolve import (
    Destination,
    FeedbackOptions,
    Level,
    Model,
    Resolution,
    SetDef,
    TrackingOptions,
)
from relay.store import (
    Store,
    StoredConfiguration,
    configuration_read,
    configuration_version,
    load_configuration,
)

log = logging.getLogger("relay.resolve")
DB = "database"


def options_from_row(row: tuple) -> TrackingOptions:
    _, _, open_, click, domain, policy, pixel = row
    return TrackingOptions(None if open_ is None else bool(open_), None if click is None else bool(click),
                           domain, policy, pixel)


def destination_from_row(row: tuple) -> Destination:
    _, name, enabled, types, kind, settings = row
    return Destination(name=name, enabled=bool(enabled), event_types=tuple(json.loads(types)), kind=kind,
                       **json.loads(settings))


def destination_settings(d: Destination) -> str:
    """A destination's target and retry settings as stored in event_destinations.settings."""
    keys = ("url", "secret", "sns_envelope", "topic_arn", "path", "timeout", "retry_initial", "retry_max",
            "max_refusals")
    return json.dumps({k: getattr(d, k) for k in keys}, separators=(",", ":"))


def build_model(cfg: Config, stored: StoredConfiguration) -> tuple[Model, list[str]]:
    """The merged model and the conflicts between the file and the database."""
    conflicts: list[str] = []
    sets: dict[str, SetDef] = {}
    db_tracking = {(r[0], r[1]): options_from_row(r) for r in stored.tracking}
    db_dests: dict[str, list[Destination]] = {}
    for row in stored.destinations:
        db_dests.setdefault(row[0], []).append(destination_from_row(row))
    db_reasons = dict(stored.suppression)
    for name in stored.sets:
        opts = db_tracking.get(("set", name))
        feedback = FeedbackOptions(suppression_reasons=db_reasons.get(name))  # None: the account's reasons
        sets[name] = SetDef(name, DB, opts or TrackingOptions(), tuple(db_dests.get(name, ())), opts is not None,
                            feedback)
    for name, cs in cfg.configuration_sets.items():
        if name in sets:
            conflicts.append(f"configuration set {name} is defined in both {cfg.path} and the database;"
                             " the file's definition is used (delete it with `relay config-set delete`)")
        opts = cs.tracking_options()
        sets[name] = SetDef(name, "config", opts, cs.destinations, not opts.empty, cs.feedback, options=cs.delivery)
    domains: dict[str, Level] = {}
    for (level, scope), opts in db_tracking.items():
        if level == "domain":
            domains[scope] = Level(f"sending domain {scope} (database)", opts)
    for name, opts in cfg.domains.items():
        if name in domains:
            conflicts.append(f"tracking options of sending domain {name} are defined in both {cfg.path} and the"
                             " database; the file's are used")
        domains[name] = Level(f"sending domain {name} (config file)", opts)
    identities = {identity: (set_name, DB) for identity, set_name in stored.identities}
    for identity, set_name in cfg.identities.items():
        if identity in identities and identities[identity][0] != set_name:
            conflicts.append(f"default configuration set of identity {identity} is defined in both {cfg.path} and"
                             " the database; the file's is used")
        identities[identity] = (set_name, "config file")
    account_opts = db_tracking.get(("account", ""))
    account = Level("account (database)", account_opts) if account_opts else None
    t = cfg.tracking
    base = Level("[tracking] (config file)", TrackingOptions(
        custom_redirect_domain=t.default_host, https_policy=t.https_policy, pixel_position=t.pixel_position))
    hosts = core.all_tracking_hosts(t.default_host, sets, domains, account)
    states = sending_states(stored)
    sets = with_sending_control(sets, states, stored)
    own = sending_identities(stored)
    return Model(sets, domains, identities, account, base, hosts, cfg.feedback, states.get(ACCOUNT, ENABLED),
                 own, verified_identities(cfg, own)), conflicts


def sending_identities(stored: StoredConfiguration) -> dict[str, IdentityDef]:
    return {r.identity: IdentityDef(r.identity, r.kind, r.verification_status == SUCCESS, r.dkim_signing,
                                    r.dkim_status, r.dkim_selector, r.dkim_algorithm, r.dkim_key)
            for r in stored.sending_identities}


def verified_identities(cfg: Config, own: dict[str, IdentityDef]) -> frozenset[str]:
    """Who may send under require_verified_identity: the database's verified identities, and the file's."""
    return frozenset([i for i, d in own.items() if d.verified] + list(cfg.identities)
                     + [k.domain.lower() for k in cfg.dkim.keys])


def sending_states(stored: StoredConfiguration) -> dict[str, SendingState]:
    """scope ('' = the account, else a set) -> its sending switch, who set it and why."""
    return {scope: SendingState(bool(enabled), reason, by, at, fresh) for scope, enabled, reason, by, at, fresh
            in stored.sending}


def with_sending_control(sets: dict[str, SetDef], states: dict[str, SendingState],
                         stored: StoredConfiguration) -> dict[str, SetDef]:
    """Each set with its switch (a set of the file may be paused too: pausing is operation, not definition) and
    the delivery and reputation options the CLI or the API gave it (sets of the database only)."""
    options = {name: SetOptions(tls, seconds, None if metrics is None else bool(metrics))
               for name, tls, seconds, metrics in stored.set_options}
    return {name: replace(s, sending=states.get(name, ENABLED),
                          options=options.get(name, SetOptions()) if s.source == DB else s.options)
            for name, s in sets.items()}


class Resolver:
    """Per message: the configuration set and its tracking settings, from the cached merged model."""

    def __init__(self, config: Config, store: Store):
        self.config = config
        self.store = store
        self._model: Model | None = None
        self._key: tuple | None = None  # (config object id, database version) the model was built from
        self._cache: dict[tuple, Resolution] = {}
        self.conflicts: list[str] = []

    @property
    def version(self) -> int | None:
        """The database configuration version the cached model was built from (None before the first)."""
        return self._key[1] if self._key else None

    def model(self, check: bool = True) -> Model:
        """The merged model, rebuilt when the file (reload) or the database (counter) changed. `check=False`
        skips reading the counter while the file is unchanged: the caller verifies `version` itself, inside the
        transaction that depends on it (Pipeline.accept), instead of paying a read per message."""
        if not check and self._model is not None and self._key[0] == id(self.config):
            return self._model
        try:
            version = configuration_read(self.store, configuration_version)
        except Exception as exc:  # a locked, broken or unreachable database: keep serving the last known model
            if self._model is not None and (self.store.unavailable(exc) or isinstance(exc, sqlite3.Error)):
                log.warning("configuration version unreadable, using the cached model: %s", exc)
                return self._model
            raise
        key = (id(self.config), version)
        if key != self._key or self._model is None:
            stored = configuration_read(self.store, load_configuration)
            model, conflicts = build_model(self.config, stored)
            for c in conflicts:
                if c not in self.conflicts:
                    log.warning("%s", c)
            self._model, self.conflicts, self._cache = model, conflicts, {}
            self._key = (id(self.config), stored.version)
            self._built_from = self.config  # held, so no later Config can reuse its id
        return self._model

    def resolve(self, header_set: str | None, identity: str, check: bool = True) -> Resolution:
        """The set and settings for a message; raises core.UnknownSet. `check`: as for `model`."""
        model = self.model(check)
        choice = core.choose_set(model, header_set, identity)
        domain = core.domain_of(identity)
        key = (choice.name, domain, choice.reason)
        hit = self._cache.get(key)
        if hit is None:
            hit = core.resolve(model, choice.name, identity, self.config.https_available, choice.reason)
            if len(self._cache) > 10000:  # many sending domains: bound the memory
                self._cache.clear()
            self._cache[key] = hit
        return hit

    def resolve_or_refuse(self, header_set: str | None, identity: str, check: bool = True) -> Resolution:
        """As `resolve`, with SES's SMTP refusal for a set that does not exist."""
        from relay.pipeline import Refusal

        try:
            return self.resolve(header_set, identity, check)
        except core.UnknownSet as exc:
            raise Refusal(f"554 Configuration Set does not exist: Configuration set <{exc.name}> does not exist."
                          ) from exc
