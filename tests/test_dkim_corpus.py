"""DKIM across the corpus of real mail (../shared/corpus/eml): every message, accepted as relay accepts it (line
ends to CRLF, X-SES-* removed), instrumented, then signed, must verify, with dkimpy and with Mail::DKIM.

Instrumentation is relay.instrument's when that module is present, else a stand-in that changes the body the way
a pixel does; either way the message differs from the original, so the broken-signature logic runs too.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import dkim as dkimpy
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from relay.config import DkimKey, DkimSettings
from relay.core import dkim
from relay.core.headers import split_header_block
from relay.core.intake import intake
from relay.sign import Signer

from .test_dkim_interop import HAVE_MAIL_DKIM, mail_dkim_verify

DOMAIN = "relay.test"
try:  # dkimpy verifies ed25519-sha256 only with pynacl
    import nacl.signing  # noqa: F401

    HAVE_NACL = True
except ImportError:
    HAVE_NACL = False


@dataclass
class Case:
    name: str
    original: bytes  # as queued (after intake)
    changed: bytes  # after instrumentation
    signed: bytes  # relay's output for the changed copy
    kept: bytes  # relay's output when nothing changed


def _instrumenter():
    """relay's own instrumentation when available: (raw, index) -> changed bytes."""
    if importlib.util.find_spec("relay.instrument") is None:
        return _stand_in
    from relay.core.settings import TrackingSettings
    from relay.core.tokens import Keyring, SigningKey
    from relay.instrument import Instrumenter

    inst = Instrumenter(Keyring((SigningKey("k1", b"0123456789abcdef0123456789abcdef"),)))
    settings = TrackingSettings(open_tracking=True, click_tracking=True, host="t.relay.test",
                                tracking_hosts=frozenset({"t.relay.test"}))

    def instrument(raw: bytes, index: int) -> bytes:
        out = inst.copy(f"m{index}", raw, settings, "rcpt@example.org", 1_763_800_000).data
        return out if out != raw else _stand_in(raw, index)

    return instrument


def _stand_in(raw: bytes, index: int) -> bytes:
    pixel = b'<img src="https://t.relay.test/I0/x" width="1" height="1">'
    if b"</body>" in raw:
        return raw.replace(b"</body>", pixel + b"</body>", 1)
    return raw + pixel + b"\r\n"


def _key_file(folder: Path, name: str, key) -> Path:
    path = folder / name
    path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def signed_corpus(corpus: Path, tmp_path_factory) -> tuple[list[Case], dict[str, str]]:
    folder = tmp_path_factory.mktemp("corpus-keys")
    rsa_key, ed_key = rsa.generate_private_key(65537, 2048), ed25519.Ed25519PrivateKey.generate()
    keys = (DkimKey(DOMAIN, "r1", _key_file(folder, "r1.pem", rsa_key)),
            DkimKey(DOMAIN, "e1", _key_file(folder, "e1.pem", ed_key), "ed25519-sha256"))
    signer = Signer(DkimSettings(keys), clock=lambda: 1_763_800_000)
    records = {f"r1._domainkey.{DOMAIN}.": dkim.key_record(rsa_key),
               f"e1._domainkey.{DOMAIN}.": dkim.key_record(ed_key)}
    instrument = _instrumenter()
    cases = []
    for i, path in enumerate(sorted(p for p in (corpus / "eml").rglob("*") if p.is_file())):
        original = intake(path.read_bytes(), f"bounce@{DOMAIN}", f"m{i}", DOMAIN).raw  # bare LF → CRLF here
        changed = instrument(original, i)
        # The From domain of corpus mail is someone else's: relay signs with the configuration set's fallback.
        signed = signer.sign(changed, original=original, fallback_domain=DOMAIN)
        kept = signer.sign(original, original=original, fallback_domain=DOMAIN)
        assert not signed.warnings and not kept.warnings, path
        cases.append(Case(str(path.relative_to(corpus / "eml")), original, changed, signed.data, kept.data))
    assert len(cases) > 100
    return cases, records


def _dkimpy_verdicts(data: bytes, records: dict[str, str]) -> list[bool]:
    lookup = lambda name, timeout=5: records[name.decode()].encode()  # noqa: E731
    d = dkimpy.DKIM(data)
    return [d.verify(idx=i, dnsfunc=lookup) for i in range(2 if HAVE_NACL else 1)]


def test_every_signed_corpus_message_verifies_with_dkimpy(signed_corpus):
    cases, records = signed_corpus
    failed, unparsable = [], []
    for case in cases:
        try:
            verdicts = _dkimpy_verdicts(case.signed, records) + _dkimpy_verdicts(case.kept, records)
        except dkimpy.MessageFormatError:
            # dkimpy refuses some malformed header blocks outright (a line without a colon): not our doing, as it
            # refuses the message before signing too. Those are checked with relay's verifier and Mail::DKIM.
            with pytest.raises(dkimpy.MessageFormatError):
                dkimpy.rfc822_parse(case.original)
            unparsable.append(case.name)
            continue
        if not all(verdicts):
            failed.append((case.name, verdicts))
    assert failed == []
    assert len(unparsable) < len(cases) // 20, unparsable


def test_every_signed_corpus_message_verifies_with_relays_verifier(signed_corpus):
    """The verifier that reproduces RFC 8463's vectors; covers Ed25519 without pynacl and dkimpy's rejects."""
    cases, records = signed_corpus
    rsa_record, ed_record = records[f"r1._domainkey.{DOMAIN}."], records[f"e1._domainkey.{DOMAIN}."]
    failed = [(c.name, why) for c in cases for data in (c.signed, c.kept)
              for why in (dkim.verify_field(data, 0, rsa_record), dkim.verify_field(data, 1, ed_record)) if why]
    assert failed == []


@pytest.mark.skipif(not HAVE_MAIL_DKIM, reason="perl with Mail::DKIM not installed (apt-get install libmail-dkim-perl)")
def test_every_signed_corpus_message_verifies_with_mail_dkim(signed_corpus, tmp_path):
    cases, records = signed_corpus
    verdicts = mail_dkim_verify({c.name: c.signed for c in cases}, records, tmp_path)
    failed = [(name, v["signatures"][:1]) for name, v in verdicts.items()
              if not v["signatures"] or v["signatures"][0]["result"] != "pass"]
    assert len(verdicts) == len(cases)
    assert failed == []


def test_bytes_after_our_signatures_are_the_input(signed_corpus):
    cases, _ = signed_corpus
    for case in cases:
        assert case.kept.endswith(case.original), case.name  # unchanged: every existing field kept
        body = case.changed.partition(b"\r\n\r\n")[2]
        assert case.signed.endswith(body), case.name  # changed: only header fields ever removed


def test_corpus_signatures_broken_by_the_change_are_removed(signed_corpus):
    cases, _ = signed_corpus
    carrying = [c for c in cases if _app_signatures(c.original)]
    assert carrying, "the corpus has messages with DKIM-Signature fields"
    for case in carrying:
        broken = dkim.broken_signatures(case.changed, case.original)
        remaining = _app_signatures(case.signed)
        assert len(remaining) == len(_app_signatures(case.changed)) - len(broken), case.name
        assert not set(f.raw for f in broken) & set(remaining), case.name
        assert _app_signatures(case.kept) == _app_signatures(case.original), case.name


def _app_signatures(data: bytes) -> list[bytes]:
    fields = [f for f in split_header_block(data).fields if f.lname == "dkim-signature"]
    return [f.raw for f in fields if f"d={DOMAIN};".encode() not in f.raw]
