"""DKIM signing stage of delivery, key checks for `relay check`, and `relay dkim keygen|check`.

The shell around relay.core.dkim: it reads key files (once, at start), the clock and DNS, and logs.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from relay.config import HOST_RE, ConfigError, DkimKey, DkimSettings
from relay.core import dkim
from relay.core.headers import domain_of, from_address, split_header_block

log = logging.getLogger(__name__)


@dataclass
class SignResult:
    data: bytes  # to send: signature field(s) prepended, nothing else changed except removed broken signatures
    warnings: list[str] = field(default_factory=list)  # e.g. "no DKIM key for example.com: sent unsigned"


class Signer:
    """Signs every outgoing copy last, over the exact bytes that go on the wire."""

    def __init__(self, settings: DkimSettings, *, clock: Callable[[], float] = time.time):
        loaded, problems = _load_keys(settings)
        if problems:
            raise ConfigError(problems)
        self._keep_broken = settings.keep_broken_signatures
        self._clock = clock
        # Keys of identities made with the CLI or the API (relay.identities.IdentityKeys): domain -> keys
        self.identity_keys: Callable[[], dict[str, list[dkim.SigningKey]]] = dict
        self._by_domain: dict[str, list[dkim.SigningKey]] = {}
        for key in loaded:
            self._by_domain.setdefault(key.domain, []).append(key)
        if not loaded:
            log.info("no DKIM keys configured: mail is relayed without relay's own signature")

    @property
    def domains(self) -> frozenset[str]:
        return frozenset(self._by_domain)

    def sign(self, data: bytes, *, original: bytes, fallback_domain: str | None = None) -> SignResult:
        """`data`: the CRLF bytes to send (after instrumentation); `original`: the message before it."""
        warnings: list[str] = []
        if data != original and b"dkim-signature" in data[: _header_end(data)].lower() and not self._keep_broken:
            data = self._drop_broken(data, original)
        identity_keys = self.identity_keys()
        if not self._by_domain and not identity_keys:  # signing not configured: said once at start, not per copy
            return SignResult(data, warnings)
        domain = _from_domain(data)
        keys = self.keys_for(domain, identity_keys) or self.keys_for(fallback_domain, identity_keys)
        if not keys:
            tried = " or ".join(d for d in dict.fromkeys((domain, fallback_domain)) if d) or "a message without From"
            warnings.append(f"no DKIM key for {tried}: sent unsigned")
            log.warning("no DKIM key for %s: sent unsigned", tried)
            return SignResult(data, warnings)
        return SignResult(dkim.sign(data, keys, timestamp=int(self._clock())) + data, warnings)

    def keys_for(self, domain: str | None, identity_keys: dict | None = None) -> list[dkim.SigningKey]:
        """Keys for `domain`, else for its closest configured parent domain: d=example.com still aligns with
        From: news.example.com under DMARC's default relaxed alignment. The file's keys before an identity's."""
        labels = (_a_label(domain or "") or "").split(".")
        for i in range(len(labels) - 1):
            name = ".".join(labels[i:])
            keys = self._by_domain.get(name) or (identity_keys or {}).get(name)
            if keys:
                return keys
        return []

    def _drop_broken(self, data: bytes, original: bytes) -> bytes:
        broken = dkim.broken_signatures(data, original)
        for f in broken:
            tags = dkim.parse_tags(f.value)
            log.info("removed DKIM signature d=%s s=%s: the change broke it", tags.get("d"), tags.get("s"))
        return dkim.remove_fields(data, broken)


def _header_end(data: bytes) -> int:
    end = data.find(b"\r\n\r\n")
    return len(data) if end < 0 else end


def _from_domain(data: bytes) -> str | None:
    """The RFC5322.From domain (what DMARC aligns on), in A-label form."""
    address = from_address(split_header_block(data[: _header_end(data) + 2], email_package_end=False))
    if address is None:
        return None
    domain = domain_of(address)
    return _a_label(domain) or domain


# --- keys --------------------------------------------------------------------------------------------------

_SELECTOR = re.compile(r"^[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*$")


def _load_keys(settings: DkimSettings) -> tuple[list[dkim.SigningKey], list[str]]:
    loaded, problems = [], []
    for i, k in enumerate(settings.keys):
        domain = _a_label(k.domain)
        if domain is None:
            problems.append(f"dkim.keys[{i}].domain: {k.domain!r} is not a domain name")
        if not _SELECTOR.match(k.selector):
            problems.append(f"dkim.keys[{i}].selector: {k.selector!r} is not a selector (letters, digits, - _ .)")
        try:
            key = load_key_file(k)
        except ValueError as exc:
            problems.append(f"dkim.keys[{i}].private_key_file: {exc}")
            continue
        if domain and _SELECTOR.match(k.selector):
            loaded.append(dkim.SigningKey(domain, k.selector, k.algorithm, key))
    return loaded, problems


def _a_label(domain: str) -> str | None:
    """The ASCII (IDNA) form d= needs, lowercased; None when it is not a domain name."""
    try:
        ascii_domain = domain.strip().rstrip(".").encode("idna").decode("ascii").lower()
    except UnicodeError:
        return None
    ok = HOST_RE.match(ascii_domain) and "." in ascii_domain and ":" not in ascii_domain
    return ascii_domain if ok else None


def load_key_file(k: DkimKey) -> dkim.PrivateKey:
    """The private key of `k`, checked; ValueError naming the file and why it cannot be used."""
    path = k.private_key_file
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise ValueError(f"{path}: unreadable: not a regular file")
            if mode & stat.S_IROTH:
                raise ValueError(f"{path}: world-readable (mode {stat.S_IMODE(mode):04o}); run chmod 600 {path}")
            pem = f.read()
    except OSError as exc:
        raise ValueError(f"{path}: unreadable: {exc.strerror or exc}") from exc
    try:
        key = dkim.load_private_key(pem)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    problem = dkim.key_problem(key, k.algorithm)
    if problem:
        raise ValueError(f"{path}: {problem}")
    return key


def check_keys(settings: DkimSettings) -> list[str]:
    """Problems with the configured DKIM keys, for `relay check` (empty when all can sign)."""
    return _load_keys(settings)[1]


# --- relay dkim keygen | check -----------------------------------------------------------------------------

def dkim_command(args: argparse.Namespace) -> int:
    if args.dkim_command == "keygen":
        return _keygen(args)
    return _check(args)


def write_private_key(out: Path, key: dkim.PrivateKey) -> None:
    """The key as PEM at `out`, mode 0600 whatever the umask; never over an existing file (FileExistsError):
    a key in use replaced by a new one breaks every signature until DNS catches up."""
    from cryptography.hazmat.primitives import serialization

    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(pem)


def _keygen(args: argparse.Namespace) -> int:
    if args.algorithm == "rsa" and args.bits < dkim.MIN_RSA_BITS:
        print(f"error: --bits {args.bits}: DKIM RSA keys need {dkim.MIN_RSA_BITS} bits or more", file=sys.stderr)
        return 2
    domain = args.domain.lower().rstrip(".")
    out = Path(args.out or f"{domain}.{args.selector}.pem")
    key = dkim.new_private_key(args.algorithm, args.bits)
    try:
        write_private_key(out, key)
    except OSError as exc:
        print(f"error: {out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(dkim.zone_file_line(f"{args.selector}._domainkey.{domain}", dkim.key_record(key)))
    algorithm = "rsa-sha256" if args.algorithm == "rsa" else "ed25519-sha256"
    print(
        f"wrote {out} (mode 0600). Publish the TXT record above (in a DNS provider's web form: name "
        f"{args.selector}._domainkey, value {dkim.key_record(key)}), then add to the configuration:\n"
        f'[[dkim.keys]]\ndomain = "{domain}"\nselector = "{args.selector}"\n'
        f'private_key_file = "{out.resolve()}"\nalgorithm = "{algorithm}"',
        file=sys.stderr,
    )
    return 0


def _check(args: argparse.Namespace) -> int:
    from relay import config as config_module

    cfg = config_module.load(args.config)
    domain = args.domain.lower().rstrip(".")
    keys = [k for k in cfg.dkim.keys if k.domain == domain and args.selector in (None, k.selector)]
    if not keys:
        print(f"error: no DKIM key configured for {domain}" + (f" selector {args.selector}" if args.selector else ""),
              file=sys.stderr)
        return 1
    ok = True
    for k in keys:
        name = f"{k.selector}._domainkey.{k.domain}"
        verdict = _check_one(k, name, args.nameserver, args.port)
        ok = ok and verdict == "match"
        print(f"{name} ({k.algorithm}): {verdict}")
    return 0 if ok else 1


def _check_one(k: DkimKey, name: str, nameserver: str | None, port: int) -> str:
    try:
        key = load_key_file(k)
    except ValueError as exc:
        return f"cannot read the configured key: {exc}"
    try:
        records = _txt_records(name, nameserver, port)
    except Exception as exc:  # dnspython raises many kinds; all mean "could not look it up"
        return f"lookup failed: {type(exc).__name__}: {exc}"
    dkim_records = [r for r in records if "p=" in r]
    if not dkim_records:
        return f"MISMATCH: no DKIM record published; publish: {dkim.key_record(key)}"
    reasons = [dkim.record_mismatch(r, key) for r in dkim_records]
    if None in reasons:
        return "match"
    return f"MISMATCH: {'; '.join(r for r in reasons if r)}; publish: {dkim.key_record(key)}"


def _txt_records(name: str, nameserver: str | None, port: int) -> list[str]:
    import dns.resolver

    resolver = dns.resolver.Resolver(configure=nameserver is None)
    if nameserver:
        resolver.nameservers = [nameserver]
    resolver.port = port
    try:
        answer = resolver.resolve(name, "TXT", lifetime=5.0)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    return [b"".join(r.strings).decode("ascii", "replace") for r in answer]
