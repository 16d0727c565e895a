"""One spelling per token: padding, `..`, `!!`, the `+/` alphabet or other spare bits never verify."""

from __future__ import annotations

import base64
import string
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.core import challenge, tokens
from relay.core.tokens import Keyring, SigningKey
from relay.tracking import GIF

from .harness import RelayProcess, Upstream
from .test_tracking_helpers import header, request
from .test_tracking_pressure import delivered_urls

MID = "0100018c1a2b3c4d-05e008de-024e-4226-841e-98f0e0d61bb1-000000"
RING = Keyring((SigningKey("k1", b"a" * 32), SigningKey("old", b"b" * 32)))
URLSAFE = string.ascii_letters + string.digits + "-_"
B64 = string.ascii_letters + string.digits + "+/"


def _tokens() -> list[str]:
    out = [tokens.sign_open(RING, MID, "r@example.org", 1700000000),
           tokens.sign_unsubscribe(RING, MID, "r@example.org", 1700000000)]
    out += [tokens.sign_click(RING, MID, f"r{i}@example.org", 1700000000 + i, i, f"https://example.com/{'p' * i}")
            for i in range(12)]
    return out


GENUINE = _tokens()


def _standard_alphabet(token: str) -> str:
    return token.translate(str.maketrans("-_", "+/"))


def _other_spare_bits(token: str) -> str:
    """The same bytes with non-zero spare bits in the last character (a lenient decoder ignores them)."""
    spare = {0: 0, 2: 4, 3: 2}[len(token) % 4]  # 2 or 3 characters in the last group: 4 or 2 unused bits
    last = URLSAFE.index(token[-1])
    return token[:-1] + URLSAFE[last | ((1 << spare) - 1)]


SPELLINGS = {
    "padding '='": lambda t: t + "=",
    "padding '=='": lambda t: t + "==",
    "appended '..'": lambda t: t + "..",
    "inserted '!!'": lambda t: t[:20] + "!!" + t[20:],
    "+/ alphabet": _standard_alphabet,
    "spare bits": _other_spare_bits,
    "inner whitespace": lambda t: t[:30] + "\n" + t[30:],
}


def test_every_sample_token_can_be_respelled():
    """The examples below mean something: each spelling changes some sample token, and the `+/` spelling too."""
    assert {len(t) % 4 for t in GENUINE} == {0, 2, 3}  # no spare bits, four of them, two of them
    assert any(_other_spare_bits(t) != t for t in GENUINE)
    assert any(_standard_alphabet(t) != t for t in GENUINE)


@pytest.mark.parametrize("spelling", SPELLINGS, ids=list(SPELLINGS))
def test_other_spellings_of_a_genuine_token_do_not_verify(spelling):
    mangle = SPELLINGS[spelling]
    for token in GENUINE:
        assert tokens.verify(RING, token) is not None
        other = mangle(token)
        if other != token:
            assert tokens.verify(RING, other) is None, (spelling, other)


@given(st.binary(max_size=200))
def test_canonical_spelling_round_trips(data):
    token = base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")
    assert tokens.canonical_unb64(token) == data


@given(st.text(alphabet=URLSAFE + "+/=.! %\n\t\u00e9", max_size=80))
def test_a_decoded_spelling_is_the_canonical_one(text):
    """Whatever a string is, it decodes only if it is exactly the canonical spelling of what it decodes to."""
    data = tokens.canonical_unb64(text)
    if data is not None:
        assert base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii") == text


_mutation = st.one_of(
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.sampled_from(list(B64 + "-_=.!~%* \t\r\n\0\u00e9"))),
    st.tuples(st.just("delete"), st.integers(0, 10_000), st.just("")),
    st.tuples(st.just("replace"), st.integers(0, 10_000), st.sampled_from(list(B64 + "-_=.!"))),
    st.tuples(st.just("append"), st.just(0), st.sampled_from(["=", "==", "===", "..", "!!", "%3D", "A", "AA"])),
    st.tuples(st.just("alphabet"), st.just(0), st.just("")),
)


def _mutate(token: str, mutation: tuple[str, int, str]) -> str:
    kind, at, char = mutation
    at = at % (len(token) + 1)
    if kind == "insert":
        return token[:at] + char + token[at:]
    if kind == "delete":
        return token[:at] + token[at + 1:]
    if kind == "replace":
        return token[:at] + char + token[at + 1:]
    if kind == "append":
        return token + char
    return _standard_alphabet(token)


@settings(max_examples=400)
@given(st.sampled_from(GENUINE), st.lists(_mutation, min_size=1, max_size=3))
def test_every_mutation_is_rejected_or_is_the_token_itself(token, mutations):
    other = token
    for mutation in mutations:
        other = _mutate(other, mutation)
    claims = tokens.verify(RING, other)
    assert claims is None or other == token


def test_challenge_has_one_spelling_too():
    now = int(time.time())
    path = challenge.make_challenge(RING, now, nonce=b"\xfb\xff" * 8)  # the nonce spells "-" and "_"
    assert "-" in path and "_" in path
    assert challenge.challenge_answer(RING, path, now) is not None
    for other in (path + "=", path + "==", path + "..", path[:5] + "!!" + path[5:], _standard_alphabet(path)):
        assert challenge.challenge_answer(RING, other, now) is None, other


# --- the real relay: a respelled token in a delivered message's URLs ------------------------------------------

def test_respelled_tokens_in_real_urls_neither_redirect_nor_count(tmp_path):
    upstream = Upstream().start()
    relay = RelayProcess(tmp_path / "r", upstream.port).start()
    try:
        pixel_path, click_paths = delivered_urls(relay, upstream, links=12)
        pixel, clicks = pixel_path[len("/o/"):], [path[len("/c/"):] for path in click_paths]
        exercised = set()
        for name, mangle in SPELLINGS.items():
            if name == "inner whitespace":  # not a request target an HTTP client sends
                continue
            for token in [pixel, *clicks]:
                other = mangle(token)
                if other == token:
                    continue
                exercised.add(name)
                if token == pixel:  # README: a pixel always answers the GIF
                    status, headers, body = request(relay.tracking_port, "GET", "/o/" + other)
                    assert (status, body) == (200, GIF), (name, other)
                    continue
                status, headers, _ = request(relay.tracking_port, "GET", "/c/" + other)
                assert status == 404 and header(headers, "Location") is None, (name, other, status)
        assert exercised == set(SPELLINGS) - {"inner whitespace"}
        # the genuine ones, last: once they are stored, every hit before them has been handled
        assert request(relay.tracking_port, "GET", "/o/" + pixel)[0] == 200
        status, headers, _ = request(relay.tracking_port, "GET", "/c/" + clicks[3])
        assert status == 302 and header(headers, "Location") == "https://shop.example.com/item/3"
        relay.wait_events("Open", 1)
        relay.wait_events("Click", 1)
        time.sleep(0.5)
        assert len(relay.events("Open")) == 1 and len(relay.events("Click")) == 1
    finally:
        relay.stop()
        upstream.stop()
