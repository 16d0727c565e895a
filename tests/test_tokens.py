import pytest

from relay.core import tokens
from relay.core.tokens import ClickClaims, Keyring, OpenClaims, SigningKey

MID = "0100018c1a2b3c4d-05e008de-024e-4226-841e-98f0e0d61bb1-000000"
K1 = SigningKey("k1", b"a" * 32)
K2 = SigningKey("k2", b"b" * 32)


def test_click_round_trip_keeps_exact_url_and_tags():
    ring = Keyring((K1,))
    url = "https://example.com/a?b=1&c=d#frag"
    token = tokens.sign_click(ring, MID, "rcpt@example.org", 1700000000, 7, url, {"k": ["v"]})
    assert tokens.verify(ring, token) == ClickClaims(MID, "rcpt@example.org", 1700000000, 7, url, {"k": ["v"]})


def test_open_round_trip_and_non_ses_message_id():
    ring = Keyring((K1,))
    token = tokens.sign_open(ring, "local-id-1", "ü@example.org", 5)
    assert tokens.verify(ring, token) == OpenClaims("local-id-1", "ü@example.org", 5)


def test_rotation_old_key_still_verifies_new_key_signs():
    old = tokens.sign_open(Keyring((K1,)), MID, "r@x", 1)
    rotated = Keyring((K2, K1))
    assert tokens.verify(rotated, old) is not None
    assert tokens.verify(Keyring((K1,)), tokens.sign_open(rotated, MID, "r@x", 1)) is None


@pytest.mark.parametrize("mangle", [
    lambda t: t[:-1],
    lambda t: t[:10],
    lambda t: t[:20] + ("A" if t[20] != "A" else "B") + t[21:],
    lambda t: "",
    lambda t: "!!!",
    lambda t: t + "AAAA",
])
def test_altered_tokens_do_not_verify(mangle):
    ring = Keyring((K1,))
    token = tokens.sign_click(ring, MID, "r@x", 1, 0, "https://example.com/")
    assert tokens.verify(ring, mangle(token)) is None


def test_other_key_with_same_kid_does_not_verify():
    token = tokens.sign_click(Keyring((K1,)), MID, "r@x", 1, 0, "https://example.com/")
    assert tokens.verify(Keyring((SigningKey("k1", b"c" * 32),)), token) is None


def test_token_is_url_safe_and_short():
    token = tokens.sign_click(Keyring((K1,)), MID, "someone@example.org", 1, 3, "https://www.example.com/p?q=1")
    assert all(c.isalnum() or c in "-_" for c in token)
    assert len(token) <= 150  # SES wraps the same link in about 160 characters
