"""Signed, stateless tracking tokens for the open pixel and wrapped links.

A token carries everything the tracking listener needs to answer without a database: the relay message id,
the recipient, and for a click the exact destination URL and its link tags. It is signed with HMAC-SHA256
(truncated to 128 bits) under a key named by a short key id, so keys can rotate: the newest key signs, every
configured key verifies, and links signed by a retired key keep working for as long as that key is listed.

Layout (before base64url, no padding):
    version:1 kind:1 kid_len:1 kid issued:4 msgid mlen:1|24 recipient:u16+utf8 [index:u16 url:u16+utf8 tags:u16+utf8]
    mac:16
The SES-format message id (`0100018c...-uuid-000000`) packs into 24 bytes; any other id is stored as text.
Tokens never expire by themselves; `issued` (Unix seconds) lets a listener enforce a maximum age if the
operator configures one.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import re
import struct
from dataclasses import dataclass, field
from typing import Any

VERSION = 1
KIND_OPEN = 0x4F  # "O"
KIND_CLICK = 0x43  # "C"
KIND_UNSUBSCRIBE = 0x55  # "U": the one-click unsubscribe URL (List-Unsubscribe)
MAC_BYTES = 16
KID_RE = re.compile(r"^[A-Za-z0-9_-]{1,16}$")
_SES_ID_RE = re.compile(
    r"^([0-9a-f]{16})-([0-9a-f]{8})-([0-9a-f]{4})-([0-9a-f]{4})-([0-9a-f]{4})-([0-9a-f]{12})-000000$"
)
_PACKED_ID = 0xFF  # msgid length marker meaning "24 packed bytes of an SES-format id"


@dataclass(frozen=True)
class SigningKey:
    kid: str
    secret: bytes

    def __post_init__(self) -> None:
        if not KID_RE.match(self.kid):
            raise ValueError(f"tracking key id {self.kid!r} must match {KID_RE.pattern}")
        if len(self.secret) < 16:
            raise ValueError(f"tracking key {self.kid!r} is too short: at least 16 bytes of secret")


@dataclass(frozen=True)
class Keyring:
    """The first key signs; every key verifies."""

    keys: tuple[SigningKey, ...]
    _by_kid: dict[str, bytes] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.keys:
            raise ValueError("a keyring needs at least one key")
        object.__setattr__(self, "_by_kid", {k.kid: k.secret for k in self.keys})

    @property
    def signing(self) -> SigningKey:
        return self.keys[0]

    def secret(self, kid: str) -> bytes | None:
        return self._by_kid.get(kid)


@dataclass(frozen=True)
class OpenClaims:
    message_id: str
    recipient: str
    issued: int


@dataclass(frozen=True)
class ClickClaims:
    message_id: str
    recipient: str
    issued: int
    link_index: int
    url: str
    tags: dict[str, list[str]]


@dataclass(frozen=True)
class UnsubscribeClaims:
    message_id: str
    recipient: str
    issued: int


def pack_message_id(message_id: str) -> bytes:
    m = _SES_ID_RE.match(message_id)
    if m:
        return bytes([_PACKED_ID]) + binascii.unhexlify("".join(m.groups()))
    raw = message_id.encode("utf-8")
    if len(raw) >= _PACKED_ID:
        raise ValueError("message id too long for a token")
    return bytes([len(raw)]) + raw


def _unpack_message_id(data: bytes, pos: int) -> tuple[str, int]:
    n = data[pos]
    pos += 1
    if n == _PACKED_ID:
        h = data[pos : pos + 24].hex()
        if len(h) != 48:
            raise ValueError("short message id")
        return f"{h[:16]}-{h[16:24]}-{h[24:28]}-{h[28:32]}-{h[32:36]}-{h[36:48]}-000000", pos + 24
    return data[pos : pos + n].decode("utf-8"), pos + n


_U16 = struct.Struct(">H").pack


def _u16_text(text: str) -> bytes:
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) > 0xFFFF:
        raise ValueError("field too long for a token")
    return _U16(len(raw)) + raw


def _read_u16_text(data: bytes, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from(">H", data, pos)
    pos += 2
    chunk = data[pos : pos + n]
    if len(chunk) != n:
        raise ValueError("truncated field")
    return chunk.decode("utf-8", "surrogatepass"), pos + n


def format_tags(tags: dict[str, list[str]]) -> str:
    return ";".join(f"{k}:{v}" for k, values in tags.items() for v in values)


def parse_tags(text: str) -> dict[str, list[str]]:
    tags: dict[str, list[str]] = {}
    for item in text.split(";"):
        if item:
            key, _, value = item.partition(":")
            tags.setdefault(key, []).append(value)
    return tags


_URLSAFE = bytes.maketrans(b"+/", b"-_")
try:  # OpenSSL's HMAC object itself: copying it is cheaper than copying hmac.HMAC, its Python wrapper
    from _hashlib import hmac_new as _openssl_hmac
except ImportError:  # pragma: no cover - CPython built without OpenSSL
    _openssl_hmac = None


def _keyed_hmac(secret: bytes, data: bytes) -> Any:  # an _hashlib.HMAC or an hmac.HMAC: copy, update, digest
    if _openssl_hmac is not None:
        return _openssl_hmac(secret, data, "sha256")
    return hmac.new(secret, data, "sha256")


def _b64(data: bytes) -> bytes:
    """base64url without padding, as ASCII bytes."""
    return binascii.b2a_base64(data, newline=False).translate(_URLSAFE, b"=")


_STANDARD = bytes.maketrans(b"-_", b"+/")


def canonical_unb64(token: str) -> bytes | None:
    """The bytes of a base64url token written in its one canonical spelling (as `_b64` writes it: URL-safe
    alphabet, no padding, spare bits zero), else None. A lenient decoder accepts other spellings of the same
    bytes (padding, the `+/` alphabet, characters it skips, non-zero spare bits), and each of them would verify
    and count as the genuine token."""
    try:  # strict: a character outside the alphabet or misplaced padding is an error, never skipped
        raw = token.encode("ascii")
        data = binascii.a2b_base64(raw.translate(_STANDARD) + b"=" * (-len(raw) % 4), strict_mode=True)
    except (binascii.Error, ValueError):  # UnicodeEncodeError is a ValueError
        return None
    return data if _b64(data) == raw else None  # padding, `+/` and non-zero spare bits do not re-encode alike


def token_prefix(keyring: Keyring, kind: int, message_id: str, recipient: str, issued: int) -> bytes:
    """The part of a token shared by every link of one recipient's copy (build it once per copy)."""
    kid = keyring.signing.kid.encode("ascii")
    return (
        bytes([VERSION, kind, len(kid)])
        + kid
        + struct.pack(">I", issued & 0xFFFFFFFF)
        + pack_message_id(message_id)
        + _u16_text(recipient)
    )


def seal(keyring: Keyring, body: bytes) -> str:
    mac = _keyed_hmac(keyring.signing.secret, body).digest()[:MAC_BYTES]
    return _b64(body + mac).decode("ascii")


def seal_all(keyring: Keyring, prefix: bytes, suffixes: list[bytes]) -> list[bytes]:
    """`[seal(keyring, prefix + suffix) for suffix in suffixes]`, as ASCII bytes, for suffixes sharing one prefix
    (every link of one recipient's copy): HMAC (RFC 2104) spelled out over two SHA-256 states, the inner one
    after key and prefix computed once and copied per suffix (copying a hash state is cheaper than copying an HMAC
    object), and the tokens made URL-safe together (b2a_base64 ends each with a newline to split them apart)."""
    inner, outer = _hmac_pads(keyring.signing.secret)
    inner = inner.copy()
    inner.update(prefix)
    encoded = []
    for suffix in suffixes:
        mac = inner.copy()
        mac.update(suffix)
        final = outer.copy()
        final.update(mac.digest())
        encoded.append(binascii.b2a_base64(prefix + suffix + final.digest()[:MAC_BYTES]))
    return b"".join(encoded).translate(_URLSAFE, b"=").split(b"\n")[:-1]


_SHA256_BLOCK = 64


@functools.lru_cache(maxsize=16)
def _hmac_pads(secret: bytes) -> tuple[Any, Any]:
    """SHA-256 states after HMAC's inner and outer padded keys."""
    key = hashlib.sha256(secret).digest() if len(secret) > _SHA256_BLOCK else secret
    key = key.ljust(_SHA256_BLOCK, b"\0")
    return (hashlib.sha256(bytes(b ^ 0x36 for b in key)), hashlib.sha256(bytes(b ^ 0x5C for b in key)))


def click_suffix(link_index: int, url: str, tags: dict[str, list[str]] | str) -> bytes:
    """The per-link part of a click token; `tags` may be pre-formatted with `format_tags`."""
    if not tags:  # the usual link (no tags: an empty text)
        return _U16(link_index) + _u16_text(url) + b"\0\0"
    return _U16(link_index) + _u16_text(url) + _u16_text(tags if isinstance(tags, str) else format_tags(tags))


def sign_open(keyring: Keyring, message_id: str, recipient: str, issued: int) -> str:
    return seal(keyring, token_prefix(keyring, KIND_OPEN, message_id, recipient, issued))


def sign_unsubscribe(keyring: Keyring, message_id: str, recipient: str, issued: int) -> str:
    return seal(keyring, token_prefix(keyring, KIND_UNSUBSCRIBE, message_id, recipient, issued))


def sign_click(
    keyring: Keyring,
    message_id: str,
    recipient: str,
    issued: int,
    link_index: int,
    url: str,
    tags: dict[str, list[str]] | None = None,
) -> str:
    prefix = token_prefix(keyring, KIND_CLICK, message_id, recipient, issued)
    return seal(keyring, prefix + click_suffix(link_index, url, tags or {}))


_verify_macs: dict[bytes, Any] = {}  # secret -> HMAC state after the key (a few keys per process)


def verify(keyring: Keyring, token: str) -> OpenClaims | ClickClaims | UnsubscribeClaims | None:
    """The claims of a genuine token, or None for anything forged, altered, truncated or unknown."""
    data = canonical_unb64(token)
    if data is None or len(data) < 3 + MAC_BYTES + 6 or data[0] != VERSION:
        return None
    body, mac = data[:-MAC_BYTES], data[-MAC_BYTES:]
    kid_len = body[2]
    try:
        kid = body[3 : 3 + kid_len].decode("ascii")
    except UnicodeDecodeError:
        return None
    secret = keyring.secret(kid)
    if secret is None:
        return None
    # Copying the state after the key is cheaper than keying HMAC again for every hit (ipad/opad blocks).
    keyed = _verify_macs.get(secret)
    if keyed is None:
        if len(_verify_macs) >= 64:
            _verify_macs.clear()
        keyed = _verify_macs[secret] = _keyed_hmac(secret, b"")
    state = keyed.copy()
    state.update(body)
    if not hmac.compare_digest(state.digest()[:MAC_BYTES], mac):
        return None
    try:
        return _decode_body(body, 3 + kid_len)
    except (ValueError, struct.error, IndexError, UnicodeDecodeError):
        return None


def _decode_body(body: bytes, pos: int) -> OpenClaims | ClickClaims | UnsubscribeClaims | None:
    kind = body[1]
    (issued,) = struct.unpack_from(">I", body, pos)
    message_id, pos = _unpack_message_id(body, pos + 4)
    recipient, pos = _read_u16_text(body, pos)
    if kind in (KIND_OPEN, KIND_UNSUBSCRIBE):
        if pos != len(body):
            return None
        return (OpenClaims if kind == KIND_OPEN else UnsubscribeClaims)(message_id, recipient, issued)
    if kind != KIND_CLICK:
        return None
    (index,) = struct.unpack_from(">H", body, pos)
    url, pos = _read_u16_text(body, pos + 2)
    tag_text, pos = _read_u16_text(body, pos)
    if pos != len(body):
        return None
    return ClickClaims(message_id, recipient, issued, index, url, parse_tags(tag_text))


# --- addresses: VERP return paths and the mailto unsubscribe -------------------------------------------------
# An address's local part holds at most 64 octets (RFC 5321 4.5.3.1.1) and some MTAs change its case, so
# these tokens are short and case-insensitive: base32 of the packed message id (24 bytes), the recipient's
# position in the message's recipient list (2 bytes) and a 64-bit MAC bound to the address kind. They carry
# no key id: every key of the keyring is tried (a keyring holds a handful of keys).
# `bounce+<55 chars>@domain` is 62 octets.
ADDRESS_KINDS = ("bounce", "unsub")
ADDRESS_MAC_BYTES = 8
_ADDRESS_RE = re.compile(r"^(bounce|unsub)\+([a-z2-7]{55})@(.+)$", re.IGNORECASE)


@dataclass(frozen=True)
class AddressClaims:
    kind: str  # bounce | unsub
    message_id: str
    position: int  # index of the recipient in the message's recipient list (mail.destination)


def _address_mac(secret: bytes, kind: str, body: bytes) -> bytes:
    return hmac.digest(secret, b"relay-address:" + kind.encode("ascii") + b":" + body, "sha256")[:ADDRESS_MAC_BYTES]


def sign_address(keyring: Keyring, kind: str, message_id: str, position: int, domain: str) -> str:
    """`bounce+<token>@domain` or `unsub+<token>@domain` for one recipient of a message (SES-format id only)."""
    if kind not in ADDRESS_KINDS:
        raise ValueError(f"address kind {kind!r}")
    m = _SES_ID_RE.match(message_id)
    if not m or not 0 <= position <= 0xFFFF:
        raise ValueError("address tokens need an SES-format message id and a recipient position < 65536")
    body = binascii.unhexlify("".join(m.groups())) + struct.pack(">H", position)
    token = base64.b32encode(body + _address_mac(keyring.signing.secret, kind, body)).decode("ascii")
    return f"{kind}+{token.rstrip('=').lower()}@{domain}"


def verify_address(keyring: Keyring, address: str) -> AddressClaims | None:
    """The claims of a genuine `bounce+...`/`unsub+...` address (any domain, any case), else None."""
    m = _ADDRESS_RE.match(address.strip().strip("<>"))
    if not m:
        return None
    kind, token = m.group(1).lower(), m.group(2).upper()
    try:
        data = base64.b32decode(token + "=" * (-len(token) % 8))
    except (binascii.Error, ValueError):
        return None
    if base64.b32encode(data).decode("ascii").rstrip("=") != token:  # the last character's spare bits are zero
        return None
    body, mac = data[:-ADDRESS_MAC_BYTES], data[-ADDRESS_MAC_BYTES:]
    if len(body) != 26 or not any(hmac.compare_digest(_address_mac(k.secret, kind, body), mac) for k in keyring.keys):
        return None
    h = body[:24].hex()
    message_id = f"{h[:16]}-{h[16:24]}-{h[24:28]}-{h[28:32]}-{h[32:36]}-{h[36:48]}-000000"
    (position,) = struct.unpack(">H", body[24:])
    return AddressClaims(kind, message_id, position)
