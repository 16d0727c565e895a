import base64
import hmac

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


def test_token_bytes_are_pinned():
    """The token format never changes: links already delivered must keep verifying (and speed work keeps it)."""
    ring = Keyring((K1,))
    assert tokens.sign_click(ring, MID, "rcpt@example.org", 1700000000, 7, "https://example.com/a?b=1&c=d#frag",
                             {"k": ["v"]}) == (
        "AUMCazFlU_EA_wEAAYwaKzxNBeAI3gJOQiaEHpjw4NYbsQAQcmNwdEBleGFtcGxlLm9yZwAHACJodHRwczovL2V4YW1wbGUuY29tL2E_Yj0x"
        "JmM9ZCNmcmFnAANrOnY4uwdls39VY_xOzB_RFAoC")
    assert tokens.sign_click(ring, MID, "rcpt@example.org", 1700000000, 0, "https://example.com/") == (
        "AUMCazFlU_EA_wEAAYwaKzxNBeAI3gJOQiaEHpjw4NYbsQAQcmNwdEBleGFtcGxlLm9yZwAAABRodHRwczovL2V4YW1wbGUuY29tLwAAv13D"
        "4WRkhwifxK2mlck6Jw")
    assert tokens.sign_open(ring, "local-id-1", "ü@example.org", 5) == (
        "AU8CazEAAAAFCmxvY2FsLWlkLTEADsO8QGV4YW1wbGUub3JnKMD5SZnZNvIPH0D4tGMR1g")


def test_seal_all_seals_each_suffix_like_seal():
    ring = Keyring((K2, K1))
    prefix = tokens.token_prefix(ring, tokens.KIND_CLICK, MID, "r@x", 9)
    suffixes = [tokens.click_suffix(i, f"https://example.com/{'p' * i}", {"a": ["b"]} if i % 2 else {})
                for i in range(70)]
    sealed = tokens.seal_all(ring, prefix, suffixes)
    assert [t.decode("ascii") for t in sealed] == [tokens.seal(ring, prefix + s) for s in suffixes]
    assert tokens.verify(ring, sealed[3].decode("ascii")).url == "https://example.com/ppp"


@pytest.mark.parametrize("secret", [b"s" * 16, b"k" * 32, bytes(range(64)), bytes(range(65)), b"\xff" * 200])
def test_seal_all_is_hmac_sha256_for_any_key_length(secret):
    """seal_all spells HMAC out over SHA-256 states; it must equal the library's HMAC (keys longer than the block
    are hashed first) and verify."""
    ring = tokens.Keyring((tokens.SigningKey("k1", secret),))
    prefix = tokens.token_prefix(ring, tokens.KIND_CLICK, MID, "r@example.org", 7)
    suffixes = [tokens.click_suffix(i, f"https://x.example/{i}", {}) for i in range(3)]
    for suffix, token in zip(suffixes, tokens.seal_all(ring, prefix, suffixes), strict=True):
        body = base64.urlsafe_b64decode(token + b"=" * (-len(token) % 4))
        assert body[-tokens.MAC_BYTES:] == hmac.new(secret, prefix + suffix, "sha256").digest()[:tokens.MAC_BYTES]
        assert tokens.verify(ring, token.decode()) is not None
