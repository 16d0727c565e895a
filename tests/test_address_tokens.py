"""VERP and mailto-unsubscribe address tokens, and the one-click unsubscribe URL token (relay/core/tokens.py)."""

from __future__ import annotations

import pytest

from relay.core import tokens as t

MID = "0100018c0f1e2d3c-12345678-1234-4234-8234-123456789abc-000000"
OLD = t.SigningKey("old", b"o" * 32)
NEW = t.SigningKey("new", b"n" * 32)
KEYRING = t.Keyring((NEW, OLD))


def test_round_trip_fits_a_local_part_and_ignores_case():
    address = t.sign_address(KEYRING, "bounce", MID, 7, "bounces.example.com")
    local, _, domain = address.partition("@")
    assert local.startswith("bounce+") and len(local) <= 64 and domain == "bounces.example.com"
    expected = t.AddressClaims("bounce", MID, 7)
    assert t.verify_address(KEYRING, address) == expected
    assert t.verify_address(KEYRING, f"<{address.upper()}>") == expected  # some MTAs change the case


def test_the_kind_is_signed():
    address = t.sign_address(KEYRING, "unsub", MID, 0, "b.example")
    assert t.verify_address(KEYRING, address).kind == "unsub"
    assert t.verify_address(KEYRING, address.replace("unsub+", "bounce+")) is None


def test_every_altered_character_is_refused():
    address = t.sign_address(KEYRING, "bounce", MID, 1, "b.example")
    local, _, domain = address.partition("@")
    start = len("bounce+")
    for i in range(start, len(local)):
        for c in "abcdefghijklmnopqrstuvwxyz234567":
            if c != local[i]:
                forged = local[:i] + c + local[i + 1:] + "@" + domain
                assert t.verify_address(KEYRING, forged) is None, forged


def test_rotated_keys_still_verify_and_unknown_keys_do_not():
    signed_by_old = t.sign_address(t.Keyring((OLD,)), "bounce", MID, 2, "b.example")
    assert t.verify_address(KEYRING, signed_by_old) == t.AddressClaims("bounce", MID, 2)
    assert t.verify_address(t.Keyring((t.SigningKey("other", b"x" * 32),)), signed_by_old) is None


@pytest.mark.parametrize("address", ["", "bounce+@b.example", "bounce+abc@b.example", "someone@b.example",
                                     "bounce+" + "a" * 55 + "@b.example", "bounce+" + "1" * 55 + "@b.example"])
def test_malformed_addresses_are_refused(address):
    assert t.verify_address(KEYRING, address) is None


def test_only_relay_ids_and_small_positions_are_signed():
    with pytest.raises(ValueError):
        t.sign_address(KEYRING, "bounce", "not-an-ses-id", 0, "b.example")
    with pytest.raises(ValueError):
        t.sign_address(KEYRING, "bounce", MID, 70000, "b.example")
    with pytest.raises(ValueError):
        t.sign_address(KEYRING, "other", MID, 0, "b.example")


def test_unsubscribe_url_token_is_its_own_kind():
    token = t.sign_unsubscribe(KEYRING, MID, "reader@example.org", 1700000000)
    assert t.verify(KEYRING, token) == t.UnsubscribeClaims(MID, "reader@example.org", 1700000000)
    open_token = t.sign_open(KEYRING, MID, "reader@example.org", 1700000000)
    assert isinstance(t.verify(KEYRING, open_token), t.OpenClaims)
    assert t.verify(KEYRING, token[:-2] + ("AA" if token[-2:] != "AA" else "BB")) is None
