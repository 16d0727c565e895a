"""Sending identities as plain data: what an address or a domain is, the DNS records a domain publishes, what the
records found in DNS say about it, and the encryption of DKIM private keys at rest. Pure: the shell
(relay/identities.py) does the DNS lookups, the clock and the store.

A domain is verified, as SES verifies one, by DNS: its DKIM record (`<selector>._domainkey.<domain>`, TXT, the
public half of the key relay signs with) or SES v1's verification token (`_amazonses.<domain>`, TXT). An address
is verified through its domain, or by the operator (`relay identity confirm`): relay sends no verification mail.
A pending identity whose records do not appear within SES's 72 hours is FAILED until verification is asked for
again.
"""

from __future__ import annotations

import base64
import re
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the key functions import cryptography when called: relay.config imports this module
    from relay.core.dkim import PrivateKey

EMAIL_ADDRESS, DOMAIN = "EMAIL_ADDRESS", "DOMAIN"
PENDING, SUCCESS, FAILED, TEMPORARY_FAILURE, NOT_STARTED = (
    "PENDING", "SUCCESS", "FAILED", "TEMPORARY_FAILURE", "NOT_STARTED")
V1_STATUS = {PENDING: "Pending", SUCCESS: "Success", FAILED: "Failed", TEMPORARY_FAILURE: "TemporaryFailure",
             NOT_STARTED: "NotStarted"}
GENERATED, EXTERNAL = "AWS_SES", "EXTERNAL"  # SigningAttributesOrigin: relay made the key / the owner gave it
RSA_2048, ED25519 = "RSA_2048_BIT", "ED25519"  # NextSigningKeyLength; ED25519 is relay's, beside SES's RSA ones
PENDING_FOR_MS = 72 * 3600 * 1000  # SES: records not found within 72 hours fail the verification
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
DOMAIN_RE = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})+$")
LOCAL_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}$")


class InvalidIdentity(ValueError):
    pass


def normalise(identity: str) -> tuple[str, str]:
    """(identity in lower case with an IDNA domain, kind); InvalidIdentity saying why it is neither."""
    text = identity.strip().rstrip(".")
    local, at, domain = text.rpartition("@")
    try:
        domain = domain.encode("idna").decode("ascii").lower()
    except UnicodeError as exc:
        raise InvalidIdentity(f"{identity!r} has no valid domain name") from exc
    if not DOMAIN_RE.match(domain):
        raise InvalidIdentity(f"{identity!r} is not an email address or a domain name")
    if not at:
        return domain, DOMAIN
    if not LOCAL_RE.match(local) or local.startswith(".") or local.endswith(".") or ".." in local:
        raise InvalidIdentity(f"{identity!r} is not an email address")
    return f"{local.lower()}@{domain}", EMAIL_ADDRESS


def domain_of(identity: str) -> str:
    return identity.rpartition("@")[2]


@dataclass(frozen=True)
class IdentityDef:
    """An identity of the database as a running relay uses it: verified or not, and its DKIM key (sealed)."""

    identity: str
    kind: str
    verified: bool
    dkim_signing: bool = False
    dkim_status: str = NOT_STARTED
    selector: str | None = None
    algorithm: str | None = None
    sealed_key: str | None = None

    @property
    def signs(self) -> bool:
        """Its key signs its mail: switched on, and published as DNS shows (SES signs once DKIM is verified)."""
        return self.dkim_signing and self.dkim_status == SUCCESS and bool(self.sealed_key and self.selector)


def is_verified(verified: frozenset[str], sender: str) -> bool:
    """Whether a sender identity may send: it, its domain or a parent domain of it is verified (SES lets a
    verified domain send from its subdomains)."""
    if sender in verified:
        return True
    labels = domain_of(sender).split(".")
    return any(".".join(labels[i:]) in verified for i in range(len(labels) - 1))


def unverified_reply(sender: str, region: str) -> tuple[str, str]:
    """(SMTP reply, API message) refusing mail from an identity that is not verified: SES's words."""
    text = f"Email address is not verified. The following identities failed the check in region {region}: {sender}"
    return f"554 Message rejected: {text}", text


# --- keys --------------------------------------------------------------------------------------------------------

def new_selector() -> str:
    """A selector of relay's own (SES's Easy DKIM tokens are random too): a new key never clashes with one
    published before, so rotating is publishing a new record, not replacing one."""
    return "relay" + secrets.token_hex(5)


def new_token() -> str:
    """SES v1's domain verification token (the TXT value of `_amazonses.<domain>`)."""
    return base64.b64encode(secrets.token_bytes(33)).decode("ascii")


def generate_key(length: str) -> tuple[PrivateKey, str]:
    """A new key and its DKIM algorithm: RSA-2048 (as `relay dkim keygen` and SES), or Ed25519 on request."""
    from relay.core import dkim

    if length == ED25519:
        return dkim.new_private_key("ed25519"), dkim.ED25519_SHA256
    return dkim.new_private_key("rsa"), dkim.RSA_SHA256


def key_from_owner(text: str) -> tuple[PrivateKey, str]:
    """SES's DomainSigningPrivateKey (base64 of the DER key, PKCS#8 or PKCS#1) or a PEM key; InvalidIdentity
    saying why it cannot sign."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    from relay.core import dkim

    text = text.strip()
    try:
        if text.startswith("-----BEGIN"):
            key = dkim.load_private_key(text.encode("ascii", "replace"))
        else:
            key = serialization.load_der_private_key(base64.b64decode(text, validate=True), password=None)
    except (ValueError, TypeError) as exc:
        raise InvalidIdentity(f"DomainSigningPrivateKey is not an unencrypted private key in base64 DER or PEM"
                              f" ({exc})") from exc
    if not isinstance(key, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
        raise InvalidIdentity(f"DomainSigningPrivateKey: a {type(key).__name__}; DKIM signs with RSA or Ed25519")
    algorithm = dkim.ED25519_SHA256 if isinstance(key, ed25519.Ed25519PrivateKey) else dkim.RSA_SHA256
    problem = dkim.key_problem(key, algorithm)
    if problem:
        raise InvalidIdentity(f"DomainSigningPrivateKey: {problem}")
    return key, algorithm


def key_length(key: PrivateKey) -> str:
    return f"RSA_{key.key_size}_BIT" if hasattr(key, "key_size") else ED25519


def pem_of(key: PrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


# Keys at rest: AES-256-GCM under a key of the key file (`kid secret-hex` lines, the first encrypts, any
# decrypts), bound to their identity and selector, so a row copied onto another identity does not decrypt.

def seal(pem: bytes, kid: str, secret: bytes, identity: str, selector: str) -> str:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = secrets.token_bytes(12)
    sealed = AESGCM(secret).encrypt(nonce, pem, f"{identity}\n{selector}".encode())
    return f"aesgcm:{kid}:{base64.b64encode(nonce + sealed).decode('ascii')}"


def unseal(text: str, secrets_by_kid: dict[str, bytes], identity: str, selector: str) -> bytes:
    """The PEM of a sealed key; InvalidIdentity when no key of the file opens it."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    scheme, kid, data = (text.split(":", 2) + ["", ""])[:3]
    secret = secrets_by_kid.get(kid)
    if scheme != "aesgcm" or secret is None:
        raise InvalidIdentity(f"the DKIM key of {identity} is sealed with key {kid!r}, not in the key file")
    raw = base64.b64decode(data)
    try:
        return AESGCM(secret).decrypt(raw[:12], raw[12:], f"{identity}\n{selector}".encode())
    except InvalidTag as exc:
        raise InvalidIdentity(f"the DKIM key of {identity} does not open with key {kid!r}") from exc


# --- DNS --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Record:
    name: str
    type: str
    value: str

    def json(self) -> dict:
        return {"Name": self.name, "Type": self.type, "Value": self.value}


def dkim_name(domain: str, selector: str) -> str:
    return f"{selector}._domainkey.{domain}"


def token_name(domain: str) -> str:
    return f"_amazonses.{domain}"


def records(domain: str, selector: str | None, key: PrivateKey | None, token: str | None) -> list[Record]:
    """The TXT records a domain publishes for relay: its DKIM key, and SES v1's token when it asked for one."""
    from relay.core import dkim

    out = []
    if selector and key is not None:
        out.append(Record(dkim_name(domain, selector), "TXT", dkim.key_record(key)))
    if token:
        out.append(Record(token_name(domain), "TXT", token))
    return out


@dataclass(frozen=True)
class Found:
    """What a lookup of one name gave: its TXT strings (joined per record), or the lookup's failure."""

    texts: tuple[str, ...] = ()
    error: str | None = None  # a timeout or SERVFAIL: try again later, do not fail the identity for it


@dataclass(frozen=True)
class Verdict:
    verification: str
    dkim: str
    detail: str


@dataclass(frozen=True)
class Before:
    """What an identity was before this check."""

    identity_age_ms: int  # since it was created (or verification was asked for again)
    key_age_ms: int  # since its current key was made or given
    verified: bool  # its verification status was SUCCESS
    dkim_verified: bool  # its current key's record was found (a new key starts unverified)


def judge(key: PrivateKey | None, token: str | None, dkim_found: Found | None, token_found: Found | None,
          before: Before) -> Verdict:
    """A domain's verification and DKIM status from what DNS gave.

    - A record that vanished fails (SES rechecks, and stops signing); a new key's record not found yet is pending
      for 72 hours, and a verified domain stays verified meanwhile (the old key's record is still there).
    - A lookup that failed (timeout, SERVFAIL) changes nothing that was verified: a DNS hiccup must not stop mail.
    """
    dkim_status, why = _dkim_status(key, dkim_found, before)
    token_ok = bool(token and token_found and token in token_found.texts)
    errors = [f.error for f in (dkim_found, token_found) if f is not None and f.error]
    if dkim_status == SUCCESS or token_ok:
        via = "its DKIM record" if dkim_status == SUCCESS else "its _amazonses token"
        return Verdict(SUCCESS, dkim_status, f"verified by {via}" + ("" if dkim_status == SUCCESS else f"; {why}"))
    if errors:
        return Verdict(SUCCESS if before.verified else TEMPORARY_FAILURE, dkim_status,
                       f"DNS lookup failed: {errors[0]}")
    if before.verified and dkim_status == PENDING:
        return Verdict(SUCCESS, PENDING, why)
    status = PENDING if before.identity_age_ms < PENDING_FOR_MS and not before.verified else FAILED
    return Verdict(status, dkim_status, why)


def _dkim_status(key: PrivateKey | None, found: Found | None, before: Before) -> tuple[str, str]:
    from relay.core import dkim

    if key is None or found is None:
        return NOT_STARTED, "no DKIM key"
    if found.error:
        return (SUCCESS if before.dkim_verified else TEMPORARY_FAILURE), found.error
    published = [t for t in found.texts if "p=" in t]
    if not published:
        if before.dkim_verified:
            return FAILED, "the DKIM record is gone"
        if before.key_age_ms >= PENDING_FOR_MS:
            return FAILED, "no DKIM record published within 72 hours"
        return PENDING, "no DKIM record published yet"
    reasons = [dkim.record_mismatch(t, key) for t in published]
    if None in reasons:
        return SUCCESS, "the DKIM record publishes the key"
    return FAILED, f"the DKIM record does not match the key: {'; '.join(r for r in reasons if r)}"
