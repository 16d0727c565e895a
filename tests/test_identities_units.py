"""Identities' pure parts (relay/core/identities.py): names, keys brought by owners, sealing at rest, and what
DNS answers say about a domain."""

from __future__ import annotations

import base64
import secrets

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from relay.core import dkim
from relay.core import identities as core
from relay.core.identities import Before, Found

HOUR_MS = 3600 * 1000


def test_names():
    assert core.normalise("News.Example.") == ("news.example", core.DOMAIN)
    assert core.normalise("Ops@Bücher.Example") == ("ops@xn--bcher-kva.example", core.EMAIL_ADDRESS)
    for bad in ("localhost", "a b.example", "@x.example", "a..b@x.example", "x@", ""):
        with pytest.raises(core.InvalidIdentity):
            core.normalise(bad)


def test_verified_parents_cover_subdomains_and_addresses():
    verified = frozenset({"example.com", "solo@other.example"})
    assert core.is_verified(verified, "news@mail.example.com") and core.is_verified(verified, "example.com")
    assert core.is_verified(verified, "solo@other.example")
    assert not core.is_verified(verified, "else@other.example") and not core.is_verified(verified, "x@com")


@pytest.mark.parametrize("encoding, form", [
    (serialization.Encoding.DER, serialization.PrivateFormat.PKCS8),
    (serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL),
    (serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8),
])
def test_keys_brought_by_owners(encoding, form):
    key = rsa.generate_private_key(65537, 2048)
    raw = key.private_bytes(encoding, form, serialization.NoEncryption())
    text = base64.b64encode(raw).decode() if encoding == serialization.Encoding.DER else raw.decode()
    loaded, algorithm = core.key_from_owner(text)
    assert algorithm == dkim.RSA_SHA256 and dkim.key_record(loaded) == dkim.key_record(key)


def test_weak_or_broken_keys_are_refused():
    weak = rsa.generate_private_key(65537, 1024).private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    with pytest.raises(core.InvalidIdentity, match="1024 bits"):
        core.key_from_owner(base64.b64encode(weak).decode())
    with pytest.raises(core.InvalidIdentity):
        core.key_from_owner("not base64 at all!")


def test_sealed_keys_open_only_for_their_identity_and_selector():
    key, _ = core.generate_key(core.ED25519)
    secret = secrets.token_bytes(32)
    sealed = core.seal(core.pem_of(key), "k1", secret, "a.example", "s1")
    assert b"PRIVATE KEY" not in sealed.encode() and sealed.startswith("aesgcm:k1:")
    assert core.unseal(sealed, {"k1": secret}, "a.example", "s1") == core.pem_of(key)
    for identity, selector, keys in (("b.example", "s1", {"k1": secret}), ("a.example", "s2", {"k1": secret}),
                                     ("a.example", "s1", {"k2": secret}),
                                     ("a.example", "s1", {"k1": secrets.token_bytes(32)})):
        with pytest.raises(core.InvalidIdentity):
            core.unseal(sealed, keys, identity, selector)


KEY = rsa.generate_private_key(65537, 2048)
RECORD = dkim.key_record(KEY)
NEW = Before(identity_age_ms=HOUR_MS, key_age_ms=HOUR_MS, verified=False, dkim_verified=False)
VERIFIED = Before(identity_age_ms=100 * HOUR_MS, key_age_ms=100 * HOUR_MS, verified=True, dkim_verified=True)


@pytest.mark.parametrize("dkim_found, token_found, before, expected", [
    (Found((RECORD,)), None, NEW, ("SUCCESS", "SUCCESS")),
    (Found(), None, NEW, ("PENDING", "PENDING")),
    (Found(), None, Before(73 * HOUR_MS, 73 * HOUR_MS, False, False), ("FAILED", "FAILED")),  # SES's 72 hours
    (Found(("v=DKIM1; k=rsa; p=" + "A" * 40,)), None, NEW, ("PENDING", "FAILED")),  # a record of another key
    (Found(), Found(("tok",)), NEW, ("SUCCESS", "PENDING")),  # v1's token verifies the domain
    (Found(), None, VERIFIED, ("FAILED", "FAILED")),  # the record is gone
    (Found(error="Timeout"), None, VERIFIED, ("SUCCESS", "SUCCESS")),  # a DNS hiccup stops nothing
    (Found(error="Timeout"), None, NEW, ("TEMPORARY_FAILURE", "TEMPORARY_FAILURE")),
    (Found(), None, Before(100 * HOUR_MS, HOUR_MS, True, False), ("SUCCESS", "PENDING")),  # a new key, waiting
])
def test_what_dns_says_about_a_domain(dkim_found, token_found, before, expected):
    verdict = core.judge(KEY, "tok", dkim_found, token_found, before)
    assert (verdict.verification, verdict.dkim) == expected, verdict.detail
