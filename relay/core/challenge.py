"""Proof that a tracking domain reaches relay's listener: a one-time challenge path and its answer (pure).

`relay tracking-domain verify` (relay/tracking_domain.py) fetches `http(s)://DOMAIN/.well-known/relay-tracking/
<challenge>`; any listener holding the tracking keys answers it, so the proof holds behind a proxy or CDN and
across nodes. The challenge expires after CHALLENGE_TTL seconds.
"""

from __future__ import annotations

import base64
import hmac
import secrets
import struct

from relay.core.tokens import Keyring, canonical_unb64

CHALLENGE_PATH = "/.well-known/relay-tracking/"
CHALLENGE_TTL = 300


def make_challenge(keyring: Keyring, now: int, nonce: bytes | None = None) -> str:
    """A one-time path token: nonce, expiry, MAC under the signing key (any node with the keys can answer)."""
    body = (nonce or secrets.token_bytes(16)) + struct.pack(">I", (now + CHALLENGE_TTL) & 0xFFFFFFFF)
    mac = hmac.digest(keyring.signing.secret, b"relay-challenge:" + body, "sha256")[:16]
    return base64.urlsafe_b64encode(body + mac).rstrip(b"=").decode("ascii")


def challenge_answer(keyring: Keyring, token: str, now: int) -> str | None:
    """What the listener answers for a genuine, unexpired challenge (None otherwise)."""
    raw = canonical_unb64(token)  # one spelling per challenge, as for tracking tokens
    if raw is None or len(raw) != 36:
        return None
    body, mac = raw[:20], raw[20:]
    (expires,) = struct.unpack(">I", body[16:])
    if expires < now:
        return None
    for key in keyring.keys:
        if hmac.compare_digest(hmac.digest(key.secret, b"relay-challenge:" + body, "sha256")[:16], mac):
            return hmac.digest(key.secret, b"relay-answer:" + raw, "sha256")[:16].hex()
    return None
