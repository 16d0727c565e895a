"""Sending identities made with the CLI or the API: create, read, list, delete; their DKIM keys (made by relay or
brought by the owner), kept sealed in the store; their DNS checks, at creation and then periodically; and the
keys the signer uses, on every node, from the next message on.

The operations fail with SES's codes (relay.sets.SesError), so `relay identity` and the API share them. The
file's identities ([identities] and the domains of [[dkim.keys]]) are the operator's: listed and readable, and
verified by definition, but read-only here.

Private keys: generated or decoded here, sealed at once with AES-256-GCM under the first key of
[sending] dkim_keys_file (0600, shared by every node), and unsealed only by the signer and to show the DNS
record. They are never in an API answer, a log line or a repr.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import replace

from relay.config import Config, SendingSettings, load_or_create_keyring
from relay.core import identities as core
from relay.core.events import iso_ms, ms_from_iso
from relay.core.identities import DOMAIN, EMAIL_ADDRESS, IdentityDef, InvalidIdentity
from relay.resolve import Resolver
from relay.sets import SesError, set_identity_default
from relay.store import Store
from relay.store.identities import IdentityRow, delete_identity, identity_row, identity_rows, put_identity, record_check

log = logging.getLogger("relay.identities")
JOB = "identity checks"
CHECK_TICK_S = 5.0  # how often the checker looks for identities due (each is due per its interval)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _run(store: Store, work):
    return store.submit(work).result()


def not_found(identity: str) -> SesError:
    return SesError("NotFoundException", f"Email identity {identity} does not exist.")


def normalised(identity: str) -> tuple[str, str]:
    try:
        return core.normalise(identity)
    except InvalidIdentity as exc:
        raise SesError("BadRequestException", str(exc)) from exc


def file_identities(cfg: Config) -> dict[str, str]:
    """The file's identities -> where they are defined."""
    out = {k.domain.lower(): "[[dkim.keys]]" for k in cfg.dkim.keys}
    out.update({i: "[identities]" for i in cfg.identities})
    return out


def _read_only(cfg: Config, identity: str) -> SesError:
    return SesError("BadRequestException", f"Identity {identity} is defined in {cfg.path} and is read-only here;"
                    " change the file and reload (SIGHUP) instead.")


# --- sealing -----------------------------------------------------------------------------------------------------

def sealing_keys(settings: SendingSettings) -> tuple[str, bytes, dict[str, bytes]]:
    """(kid, secret) that seals, and every kid -> secret that unseals; the file is made on first use."""
    ring = load_or_create_keyring(settings.dkim_keys_file, "relay DKIM sealing keys")
    return ring.signing.kid, ring.signing.secret, {k.kid: k.secret for k in ring.keys}


def sealed_key(cfg: Config, key, identity: str, selector: str) -> str:
    kid, secret, _ = sealing_keys(cfg.sending)
    return core.seal(core.pem_of(key), kid, secret, identity, selector)


def unsealed(cfg: Config, row: IdentityRow):
    """The private key of an identity row, or None."""
    if not row.dkim_key or not row.dkim_selector:
        return None
    from relay.core import dkim

    _, _, secrets = sealing_keys(cfg.sending)
    return dkim.load_private_key(core.unseal(row.dkim_key, secrets, row.identity, row.dkim_selector))


# --- operations ------------------------------------------------------------------------------------------------------

def new_key(cfg: Config, identity: str, selector: str | None, private_key: str | None, length: str | None
            ) -> dict:
    """The DKIM columns of a key relay makes (`length`: RSA_2048_BIT or ED25519) or the owner gives (SES's
    DomainSigningSelector and DomainSigningPrivateKey)."""
    if length not in (None, core.RSA_2048, core.ED25519):
        raise SesError("BadRequestException", f"NextSigningKeyLength {length}: relay makes RSA_2048_BIT (the"
                       " default) or ED25519 keys; DKIM keys of fewer than 2048 bits are refused")
    if private_key:
        if not selector:
            raise SesError("BadRequestException", "DomainSigningSelector is required with DomainSigningPrivateKey.")
        try:
            key, algorithm = core.key_from_owner(private_key)
        except InvalidIdentity as exc:
            raise SesError("BadRequestException", str(exc)) from exc
        origin = core.EXTERNAL
    else:
        key, algorithm = core.generate_key(length or core.RSA_2048)
        origin = core.GENERATED
    selector = selector or core.new_selector()
    if not core.DOMAIN_RE.match(f"{selector.lower()}.x.example"):
        raise SesError("BadRequestException", f"DomainSigningSelector {selector!r} is not a DNS label.")
    return {"dkim_origin": origin, "dkim_selector": selector, "dkim_algorithm": algorithm,
            "dkim_key": sealed_key(cfg, key, identity, selector), "dkim_key_created_at": iso_ms(_now_ms()),
            "dkim_status": core.PENDING}


def create(cfg: Config, store: Store, identity: str, *, selector: str | None = None, private_key: str | None = None,
           length: str | None = None, set_name: str | None = None, token: bool = False, exists_ok: bool = False
           ) -> IdentityRow:
    """A new identity (a domain gets a DKIM key), checked in DNS at once; AlreadyExistsException unless
    `exists_ok` (SES v1's Verify* calls return the existing one)."""
    identity, kind = normalised(identity)
    if identity in file_identities(cfg):
        raise SesError("AlreadyExistsException", f"Email identity {identity} already exists (defined in {cfg.path}).")
    existing = store.read(identity_row, identity)
    if existing is not None:
        if not exists_ok:
            raise SesError("AlreadyExistsException", f"Email identity {identity} already exists.")
        return existing
    row = IdentityRow(identity, kind, iso_ms(_now_ms()), verification_token=core.new_token() if token else None,
                      dkim_signing=kind == DOMAIN)
    if kind == DOMAIN:
        row = replace(row, **new_key(cfg, identity, selector, private_key, length))
    elif private_key or selector:
        raise SesError("BadRequestException", "DKIM signing attributes are for a domain identity, not an address.")

    def work(conn) -> None:
        if identity_row(conn, identity) is not None:
            raise SesError("AlreadyExistsException", f"Email identity {identity} already exists.")
        put_identity(conn, row)

    _run(store, work)
    if set_name:
        try:
            set_identity_default(cfg, store, identity, set_name)
        except SesError:
            _run(store, lambda conn: delete_identity(conn, identity))  # SES creates it whole or not at all
            raise
    check_now(cfg, store, identity)
    return store.read(identity_row, identity)


def row_of(cfg: Config, store: Store, identity: str) -> IdentityRow:
    identity, _ = normalised(identity)
    row = store.read(identity_row, identity)
    if row is None:
        raise not_found(identity)
    return row


def _writable(cfg: Config, store: Store, identity: str) -> IdentityRow:
    identity, _ = normalised(identity)
    if identity in file_identities(cfg):
        raise _read_only(cfg, identity)
    return row_of(cfg, store, identity)


def _update(store: Store, identity: str, **changes) -> IdentityRow:
    def work(conn) -> IdentityRow:
        row = identity_row(conn, identity)
        if row is None:
            raise not_found(identity)
        row = replace(row, **changes)
        put_identity(conn, row)
        return row

    return _run(store, work)


def delete(cfg: Config, store: Store, identity: str, missing_ok: bool = False) -> None:
    identity, _ = normalised(identity)
    if identity in file_identities(cfg):
        raise _read_only(cfg, identity)
    if not _run(store, lambda conn: delete_identity(conn, identity)) and not missing_ok:
        raise not_found(identity)


def set_dkim_signing(cfg: Config, store: Store, identity: str, enabled: bool) -> None:
    row = _writable(cfg, store, identity)
    if row.kind != DOMAIN and enabled:
        raise SesError("BadRequestException", f"{identity} is an address: DKIM signs with its domain's key.")
    _update(store, row.identity, dkim_signing=enabled)


def set_signing_key(cfg: Config, store: Store, identity: str, origin: str, selector: str | None,
                    private_key: str | None, length: str | None) -> IdentityRow:
    """PutEmailIdentityDkimSigningAttributes: a new key, made by relay (AWS_SES) or given (EXTERNAL). The new
    key signs once its record is found in DNS (a new selector: the old record may stay meanwhile)."""
    row = _writable(cfg, store, identity)
    if row.kind != DOMAIN:
        raise SesError("BadRequestException", f"{identity} is an address: DKIM keys belong to domains.")
    if origin == core.EXTERNAL and not private_key:
        raise SesError("BadRequestException", "SigningAttributes with DomainSigningPrivateKey are required for"
                       " SigningAttributesOrigin EXTERNAL.")
    if origin != core.EXTERNAL:
        private_key = None
    _update(store, row.identity, **new_key(cfg, row.identity, selector, private_key, length))
    check_now(cfg, store, row.identity)
    return store.read(identity_row, row.identity)


def ensure_token(cfg: Config, store: Store, domain: str) -> IdentityRow:
    """SES v1 VerifyDomainIdentity: the domain (created when new) with a verification token; a FAILED domain
    is pending again (SES starts a new 72 hours)."""
    row = create(cfg, store, domain, token=True, exists_ok=True)
    if row.kind != DOMAIN:
        raise SesError("InvalidParameterValue", f"{domain} is not a domain.")
    changes: dict = {}
    if not row.verification_token:
        changes["verification_token"] = core.new_token()
    if row.verification_status == core.FAILED:
        changes.update(verification_status=core.PENDING, created_at=iso_ms(_now_ms()))
    if changes:
        row = _update(store, row.identity, **changes)
        check_now(cfg, store, row.identity)
    return store.read(identity_row, row.identity)


def ensure_dkim(cfg: Config, store: Store, domain: str) -> IdentityRow:
    """SES v1 VerifyDomainDkim: the domain (created when new) with a DKIM key."""
    row = create(cfg, store, domain, exists_ok=True)
    if row.kind != DOMAIN:
        raise SesError("InvalidParameterValue", f"{domain} is not a domain.")
    if not row.dkim_key:
        row = set_signing_key(cfg, store, row.identity, core.GENERATED, None, None, None)
    return row


def confirm_address(cfg: Config, store: Store, address: str) -> IdentityRow:
    """`relay identity confirm`: the operator vouches for an address (relay sends no verification mail)."""
    identity, kind = normalised(address)
    if kind != EMAIL_ADDRESS:
        raise SesError("BadRequestException", f"{identity} is a domain: it is verified by its DNS records.")
    row = create(cfg, store, identity, exists_ok=True)
    now = iso_ms(_now_ms())
    return _update(store, row.identity, verification_status=core.SUCCESS, verified_at=now, checked_at=now,
                   check_detail="confirmed by the operator")


def listing(cfg: Config, store: Store) -> list[dict]:
    """Every identity, of the file and the database: name, type, verification status, source."""
    own = {r.identity: r for r in store.read(identity_rows)}
    verified = verified_identities(cfg, store)
    out = [{"IdentityName": i, "IdentityType": kind_of(i), "VerificationStatus": core.SUCCESS, "Source": "config"}
           for i in file_identities(cfg) if i not in own]
    out += [{"IdentityName": r.identity, "IdentityType": r.kind, "VerificationStatus": status_of(verified, r),
             "Source": "database"} for r in own.values()]
    return sorted(out, key=lambda d: d["IdentityName"])


def kind_of(identity: str) -> str:
    return EMAIL_ADDRESS if "@" in identity else DOMAIN


def verified_identities(cfg: Config, store: Store) -> frozenset[str]:
    """Every verified identity, as the pipeline judges senders by them (relay.resolve)."""
    return Resolver(cfg, store).model().verified_identities


def status_of(verified: frozenset[str], row: IdentityRow) -> str:
    """An address is verified when it is, or when its domain (or a parent of it) is, as SES has it."""
    if row.kind == DOMAIN or row.verification_status == core.SUCCESS:
        return row.verification_status
    return core.SUCCESS if core.is_verified(verified, row.identity) else row.verification_status


def dns_records(cfg: Config, row: IdentityRow) -> list[core.Record]:
    if row.kind != DOMAIN:
        return []
    return core.records(row.identity, row.dkim_selector, unsealed(cfg, row), row.verification_token)


# --- DNS checks -----------------------------------------------------------------------------------------------------

def lookup_txt(name: str, settings: SendingSettings) -> core.Found:
    import dns.exception
    import dns.resolver

    resolver = dns.resolver.Resolver(configure=not settings.nameservers)
    if settings.nameservers:
        resolver.nameservers = [host for host, _ in settings.nameservers]
        resolver.port = settings.nameservers[0][1]
    try:
        answer = resolver.resolve(name, "TXT", lifetime=settings.dns_timeout)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return core.Found()
    except dns.exception.DNSException as exc:  # timeout, SERVFAIL, no nameservers: a temporary failure
        return core.Found(error=f"{type(exc).__name__}: {exc}")
    return core.Found(tuple(b"".join(r.strings).decode("ascii", "replace") for r in answer))


def check_now(cfg: Config, store: Store, identity: str, now_ms: int | None = None) -> bool:
    """Look an identity's records up and record what they say; True when its status changed. An address is
    verified through its domain (judged from the model) or by the operator: nothing to look up."""
    row = store.read(identity_row, identity)
    if row is None or row.kind != DOMAIN:
        return False
    now_ms = _now_ms() if now_ms is None else now_ms
    key = unsealed(cfg, row)
    dkim_found = lookup_txt(core.dkim_name(row.identity, row.dkim_selector), cfg.sending) if key else None
    token_found = lookup_txt(core.token_name(row.identity), cfg.sending) if row.verification_token else None
    key_made = ms_from_iso(row.dkim_key_created_at) if row.dkim_key_created_at else now_ms
    before = core.Before(now_ms - ms_from_iso(row.created_at), now_ms - key_made,
                         row.verification_status == core.SUCCESS, row.dkim_status == core.SUCCESS)
    verdict = core.judge(key, row.verification_token, dkim_found, token_found, before)
    changed = _run(store, lambda conn: record_check(conn, row.identity, iso_ms(now_ms), verdict.verification,
                                                    verdict.dkim, verdict.detail))
    if changed:
        log.info("identity %s: verification %s, DKIM %s (%s)", row.identity, verdict.verification, verdict.dkim,
                 verdict.detail)
    return changed


def due(rows: list[IdentityRow], settings: SendingSettings, now_ms: int) -> list[str]:
    """Domains whose next check is due: pending ones every check_pending_interval, verified ones every
    check_verified_interval; FAILED ones wait for verification to be asked for again (as SES)."""
    out = []
    for r in rows:
        given_up = r.verification_status == core.FAILED and r.dkim_status in (core.FAILED, core.NOT_STARTED)
        if r.kind != DOMAIN or given_up:
            continue
        settled = r.verification_status == core.SUCCESS and r.dkim_status in (core.SUCCESS, core.NOT_STARTED)
        interval = settings.check_verified_interval if settled else settings.check_pending_interval
        if r.checked_at is None or now_ms - ms_from_iso(r.checked_at) >= interval * 1000:
            out.append(r.identity)
    return out


class Checker:
    """Checks the identities that are due, on the node that leads the job."""

    def __init__(self, config: Callable[[], Config], store: Store):
        self.config, self.store = config, store
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run(), name="relay-identity-checks")

    def _pass(self) -> None:
        cfg = self.config()
        now_ms = _now_ms()
        for identity in due(self.store.read(identity_rows), cfg.sending, now_ms):
            check_now(cfg, self.store, identity, now_ms)

    async def _run(self) -> None:
        while True:
            try:
                if await asyncio.to_thread(self.store.try_lead, JOB):
                    await asyncio.to_thread(self._pass)
            except Exception as exc:  # a store or DNS hiccup: the next pass tries again
                log.error("identity checks: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(min(CHECK_TICK_S, self.config().sending.check_pending_interval))

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            await asyncio.to_thread(self.store.resign, JOB)


# --- signing ------------------------------------------------------------------------------------------------------

class IdentityKeys:
    """The signer's keys of the database's identities (relay.sign.Signer.identity_keys): domain -> keys, from
    the configuration model every node reloads when configuration_version moves; unsealed once per key."""

    def __init__(self, config: Callable[[], Config], resolver: Resolver):
        self.config, self.resolver = config, resolver
        self._model = None
        self._keys: dict = {}
        self._cache: dict[str, object] = {}  # digest of the sealed key -> its dkim.SigningKey

    def __call__(self) -> dict:
        model = self.resolver.model(check=False)
        if model is not self._model:
            self._keys = self._build(model.sending_identities)
            self._model = model
        return self._keys

    def _build(self, identities: dict[str, IdentityDef]) -> dict:
        from relay.core import dkim

        out: dict = {}
        for d in identities.values():
            if not d.signs:
                continue
            digest = hashlib.sha256(d.sealed_key.encode()).hexdigest()
            if digest not in self._cache:
                try:
                    _, _, secrets = sealing_keys(self.config().sending)
                    key = dkim.load_private_key(core.unseal(d.sealed_key, secrets, d.identity, d.selector))
                except (InvalidIdentity, ValueError, OSError) as exc:
                    log.error("identity %s: its DKIM key cannot be used: %s", d.identity, exc)
                    continue
                self._cache[digest] = dkim.SigningKey(d.identity, d.selector, d.algorithm, key)
            out.setdefault(d.identity, []).append(self._cache[digest])
        return out
