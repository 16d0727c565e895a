"""DKIM re-signing: relay's signatures checked by dkimpy as the verifier, with keys on disk as relay
reads them and the public halves served to dkimpy through its dnsfunc hook (no real DNS)."""

from __future__ import annotations

import base64
import logging
import os
import re
import stat
from pathlib import Path

import dkim as dkimpy
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from dkim import canonicalization as dkimpy_canon
from hypothesis import given, settings
from hypothesis import strategies as st

from relay import cli
from relay.config import ConfigError, DkimKey, DkimSettings
from relay.core import dkim
from relay.core.headers import split_header_block, to_crlf
from relay.sign import Signer, check_keys

NOW = 1_763_800_000.0
MESSAGE = (
    b"From: Shop <news@example.com>\r\n"
    b"To: user@example.org\r\n"
    b"Subject: Weekly deals\r\n"
    b"Date: Sat, 22 Nov 2025 08:26:40 -0000\r\n"
    b"Message-ID: <1@example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"X-Mailer: app\r\n"
    b"\r\n"
    b"<p>Hello  there\t</p>\r\n<a href=\"https://example.com/x\">x</a>\r\n"
)


# --- keys and helpers --------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


@pytest.fixture(scope="session")
def rsa_key2() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


@pytest.fixture(scope="session")
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def write_key(path: Path, key, mode: int = 0o600) -> Path:
    path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    path.chmod(mode)
    return path


class Keys:
    """Key files in a temporary folder plus the DNS records a verifier would find for them."""

    def __init__(self, folder: Path):
        self.folder, self.keys, self.records = folder, [], {}

    def add(self, domain: str, selector: str, key, algorithm: str = "rsa-sha256") -> Keys:
        path = write_key(self.folder / f"{domain}.{selector}.pem", key)
        self.keys.append(DkimKey(domain, selector, path, algorithm))
        self.records[f"{selector}._domainkey.{domain}."] = dkim.key_record(key)
        return self

    def signer(self, keep_broken: bool = False) -> Signer:
        return Signer(DkimSettings(tuple(self.keys), keep_broken), clock=lambda: NOW)


def dnsfunc(records: dict[str, str]):
    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        record = records.get(name.decode())
        return record.encode() if record is not None else None

    return lookup


def verify(data: bytes, records: dict[str, str], idx: int = 0) -> bool:
    """dkimpy's verdict on the idx-th DKIM-Signature field (0 = the topmost, relay's own)."""
    try:
        return dkimpy.DKIM(data).verify(idx=idx, dnsfunc=dnsfunc(records))
    except dkimpy.ValidationError:  # dkimpy raises, rather than answers False, on a body hash mismatch
        return False


def signature_tags(data: bytes) -> list[dict[str, str]]:
    return [dkim.parse_tags(f.value) for f in split_header_block(data).fields if f.lname == "dkim-signature"]


def needs_nacl():
    pytest.importorskip("nacl", reason="dkimpy verifies ed25519-sha256 only with pynacl installed (pip install pynacl)")


# --- canonicalisation agrees with dkimpy's -----------------------------------------------------------------

_LINE = st.lists(st.sampled_from([b"a", b"b", b" ", b"\t", b"  ", b"\xc3\xa9", b"=", b"\r"]), max_size=8)
_BODY = st.lists(st.builds(b"".join, _LINE), max_size=8).map(lambda lines: b"".join(x + b"\r\n" for x in lines))


@settings(max_examples=300, deadline=None)
@given(_BODY)
def test_body_canonicalisation_matches_dkimpy(body):
    assert dkim.canonical_body(body, "relaxed") == dkimpy_canon.Relaxed.canonicalize_body(body)
    assert dkim.canonical_body(body, "simple") == dkimpy_canon.Simple.canonicalize_body(body)


# No bare CR here: dkimpy strips it at the ends of a value (bytes.strip()), RFC 6376 and relay only SP and HTAB.
_HEADER_TEXT = st.lists(st.sampled_from([b"a", b"b", b" ", b"\t", b"  ", b"\xc3\xa9", b"=", b":"]), max_size=8)


@settings(max_examples=200, deadline=None)
@given(st.builds(b"".join, _HEADER_TEXT), st.builds(b"".join, _HEADER_TEXT))
def test_header_canonicalisation_matches_dkimpy(first, second):
    raw = b"Subject:" + first + b"\r\n " + second + b"\r\n"
    (name, value), = dkimpy_canon.Relaxed.canonicalize_headers([[b"Subject", raw[len(b"Subject:"):]]])
    assert dkim.canonical_header(raw, "relaxed") == name + b":" + value


def test_relaxed_canonicalisation_edge_cases():
    assert dkim.canonical_body(b"", "relaxed") == b""
    assert dkim.canonical_body(b"\r\n\r\n", "relaxed") == b""
    assert dkim.canonical_body(b"", "simple") == b"\r\n"
    assert dkim.canonical_body(b"a \t b \r\n\r\n \r\n", "relaxed") == b"a b\r\n"
    assert dkim.canonical_body(b"a" + b" " * 37 + b"b\r\n", "relaxed") == b"a b\r\n"
    # The SMTP client ends the data with CRLF, so a body without one is hashed as if it had it.
    assert dkim.canonical_body(b"abc ", "relaxed") == b"abc\r\n"
    assert dkim.canonical_header(b"SUBJECT \t: a \r\n\t b  \r\n", "relaxed") == b"subject:a b\r\n"


# --- signing ----------------------------------------------------------------------------------------------

def test_rsa_signature_verifies_and_only_prepends(tmp_path, rsa_key):
    k = Keys(tmp_path).add("example.com", "relay1", rsa_key)
    result = k.signer().sign(MESSAGE, original=MESSAGE)
    assert result.warnings == []
    assert result.data.endswith(MESSAGE)  # nothing after our field changed: relay prepends, never re-serialises
    assert result.data.startswith(b"DKIM-Signature: ")
    assert verify(result.data, k.records)
    (tags,) = signature_tags(result.data)
    assert tags["a"] == "rsa-sha256" and tags["c"] == "relaxed/relaxed"
    assert tags["d"] == "example.com" and tags["s"] == "relay1" and tags["t"] == str(int(NOW))


def test_signed_header_list(tmp_path, rsa_key):
    msg = (b"X-SES-CONFIGURATION-SET: marketing\r\nFrom: a@example.com\r\nReceived: x\r\nTo: b@example.org\r\n"
           b"To: c@example.org\r\nCc: d@example.org\r\nReply-To: r@example.com\r\nFeedback-ID: 1:2:3\r\n"
           b"List-Unsubscribe: <https://example.com/u>\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
           b"Content-Transfer-Encoding: 7bit\r\nX-Other: 1\r\n\r\nbody\r\n")
    k = Keys(tmp_path).add("example.com", "s", rsa_key)
    out = k.signer().sign(msg, original=msg).data
    (tags,) = signature_tags(out)
    assert tags["h"].split(":") == [
        "from", "from", "to", "to", "cc", "content-transfer-encoding", "reply-to", "list-unsubscribe",
        "list-unsubscribe", "list-unsubscribe-post", "list-unsubscribe-post", "feedback-id"]
    assert verify(out, k.records)


def test_malformed_header_lines_keep_their_field_out_of_h(tmp_path, rsa_key):
    # No blank line after the header block: verifiers disagree about "This is a multi-part..." (a continuation of
    # Content-Type for relay, a field of its own or the body for others), so Content-Type is left unsigned.
    msg = MESSAGE.replace(b"charset=utf-8\r\n", b"charset=utf-8\r\nThis is a multi-part message\r\n")
    k = Keys(tmp_path).add("example.com", "s", rsa_key)
    out = k.signer().sign(msg, original=msg).data
    assert "content-type" not in signature_tags(out)[0]["h"].split(":")
    assert dkim.verify_field(out, 0, k.records["s._domainkey.example.com."]) is None


def test_from_is_oversigned_so_a_second_from_breaks_it(tmp_path, rsa_key):
    k = Keys(tmp_path).add("example.com", "s", rsa_key)
    out = k.signer().sign(MESSAGE, original=MESSAGE).data
    header, sep, body = out.partition(b"\r\n\r\n")
    assert verify(out, k.records)
    assert not verify(header + b"\r\nFrom: attacker@evil.example" + sep + body, k.records)
    assert not verify(out.replace(b"Weekly deals", b"Weekly deal$"), k.records)


def test_signature_field_is_folded_to_78_columns(tmp_path, rsa_key):
    many = b"".join(b"To: user%d@example.org\r\n" % i for i in range(30))
    msg = many + MESSAGE
    out = Keys(tmp_path).add("example.com", "s", rsa_key).signer().sign(msg, original=msg).data
    field = out[: out.index(b"\r\nTo: user0")]
    assert all(len(line) <= 78 for line in field.split(b"\r\n"))
    assert re.search(rb"\r\n b=", field)


def test_ed25519_signature_verifies(tmp_path, ed_key):
    needs_nacl()
    k = Keys(tmp_path).add("example.com", "ed", ed_key, "ed25519-sha256")
    out = k.signer().sign(MESSAGE, original=MESSAGE).data
    assert signature_tags(out)[0]["a"] == "ed25519-sha256"
    assert verify(out, k.records)


def test_dual_signing_both_verify(tmp_path, rsa_key, ed_key):
    needs_nacl()
    k = Keys(tmp_path).add("example.com", "rsa1", rsa_key).add("example.com", "ed1", ed_key, "ed25519-sha256")
    out = k.signer().sign(MESSAGE, original=MESSAGE).data
    assert [t["a"] for t in signature_tags(out)] == ["rsa-sha256", "ed25519-sha256"]
    assert verify(out, k.records, 0) and verify(out, k.records, 1)


def test_simple_canonicalisation_verifies(rsa_key):
    key = dkim.SigningKey("example.com", "s", "rsa-sha256", rsa_key)
    for c in (("simple", "simple"), ("relaxed", "simple"), ("simple", "relaxed")):
        out = dkim.sign(MESSAGE, [key], timestamp=int(NOW), canonicalization=c) + MESSAGE
        assert verify(out, {"s._domainkey.example.com.": dkim.key_record(rsa_key)}), c


def test_key_rotation_by_selector(tmp_path, rsa_key, rsa_key2):
    old = Keys(tmp_path).add("example.com", "2025", rsa_key)
    new = Keys(tmp_path).add("example.com", "2026", rsa_key2)
    signed_old = old.signer().sign(MESSAGE, original=MESSAGE).data
    signed_new = new.signer().sign(MESSAGE, original=MESSAGE).data
    assert signature_tags(signed_new)[0]["s"] == "2026"
    both = {**old.records, **new.records}  # during rotation both records are published
    assert verify(signed_old, both) and verify(signed_new, both)
    assert not verify(signed_new, {"2026._domainkey.example.com.": old.records["2025._domainkey.example.com."]})


# --- which domain signs ------------------------------------------------------------------------------------

def test_missing_key_sends_unsigned_with_warning_and_log(tmp_path, rsa_key, caplog):
    signer = Keys(tmp_path).add("other.example", "s", rsa_key).signer()
    with caplog.at_level(logging.WARNING, logger="relay.sign"):
        result = signer.sign(MESSAGE, original=MESSAGE)
    assert result.data == MESSAGE
    assert result.warnings == ["no DKIM key for example.com: sent unsigned"]
    assert "no DKIM key for example.com" in caplog.text


def test_no_keys_at_all_is_fine(tmp_path):
    result = Signer(DkimSettings()).sign(MESSAGE, original=MESSAGE, fallback_domain="x.example")
    assert result.data == MESSAGE
    assert result.warnings == []  # signing not configured: said once at start, not recorded per copy


def test_fallback_domain_when_from_domain_has_no_key(tmp_path, rsa_key):
    k = Keys(tmp_path).add("esp.example", "s", rsa_key)
    out = k.signer().sign(MESSAGE, original=MESSAGE, fallback_domain="esp.example").data
    assert signature_tags(out)[0]["d"] == "esp.example"
    assert verify(out, k.records)


def test_from_domain_wins_and_parent_domain_aligns(tmp_path, rsa_key, rsa_key2):
    k = Keys(tmp_path).add("example.com", "s", rsa_key).add("esp.example", "s", rsa_key2)
    sub = MESSAGE.replace(b"news@example.com", b"news@News.Example.COM")
    out = k.signer().sign(sub, original=sub, fallback_domain="esp.example").data
    assert [t["d"] for t in signature_tags(out)] == ["example.com"]  # relaxed DMARC alignment
    assert verify(out, k.records)


# --- message shapes -----------------------------------------------------------------------------------------

def test_bare_lf_input_converted_then_signed(tmp_path, rsa_key):
    k = Keys(tmp_path).add("example.com", "s", rsa_key)
    wire = to_crlf(MESSAGE.replace(b"\r\n", b"\n"))
    assert wire == MESSAGE
    assert verify(k.signer().sign(wire, original=wire).data, k.records)


@pytest.mark.parametrize("body", [
    b"",  # header block and blank line only
    b"\r\n\r\n\r\n",
    "Grüße, café — ½ €\r\n".encode() + b"\xe9t\xe9 latin-1 \xff\r\n",  # 8-bit
    b"no final line end",
    b"trailing blanks   \r\n\t\r\n\r\n",
    b"x" * 998 + b"\r\n",
])
def test_body_shapes(tmp_path, rsa_key, body):
    k = Keys(tmp_path).add("example.com", "s", rsa_key)
    msg = MESSAGE.split(b"\r\n\r\n")[0] + b"\r\n\r\n" + body
    out = k.signer().sign(msg, original=msg).data
    # What the receiver gets: the SMTP client ends the data with a line end when it lacks one.
    assert verify(out if out.endswith(b"\r\n") else out + b"\r\n", k.records)


def test_header_only_message(tmp_path, rsa_key):
    k = Keys(tmp_path).add("example.com", "s", rsa_key)
    msg = MESSAGE.split(b"\r\n\r\n")[0] + b"\r\n"
    assert verify(k.signer().sign(msg, original=msg).data, k.records)


def test_folded_and_8bit_headers(tmp_path, rsa_key):
    k = Keys(tmp_path).add("example.com", "s", rsa_key)
    msg = MESSAGE.replace(
        b"Subject: Weekly deals\r\n",
        b"Subject:   Weekly\r\n\t  deals =?utf-8?q?=E2=80=94?=\r\n  and more  \r\n",
    ).replace(b"To: user@example.org", "To: Zoë <zoe@example.org>,\r\n  other@example.org".encode())
    assert verify(k.signer().sign(msg, original=msg).data, k.records)


def test_huge_body(tmp_path, ed_key, rsa_key):
    k = Keys(tmp_path).add("example.com", "s", rsa_key)
    line = b"<td style=\"padding:  0\">  lorem \t ipsum   dolor sit amet</td>   \r\n"
    msg = MESSAGE + line * (8 * 1024 * 1024 // len(line))  # 8 MB
    assert verify(k.signer().sign(msg, original=msg).data, k.records)


# --- the application's own signatures ----------------------------------------------------------------------

@pytest.fixture
def app_signed(rsa_key2) -> tuple[bytes, dict[str, str]]:
    """MESSAGE as the application sent it: signed by its own key (dkimpy signs, relaxed/simple by default)."""
    sig = dkimpy.sign(MESSAGE, b"app", b"example.com", _traditional_pem(rsa_key2),
                      include_headers=[b"from", b"to", b"subject", b"date"])
    return sig + MESSAGE, {"app._domainkey.example.com.": dkim.key_record(rsa_key2)}


def _traditional_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())


def test_unchanged_message_keeps_existing_signature(tmp_path, rsa_key, app_signed):
    original, app_records = app_signed
    k = Keys(tmp_path).add("example.com", "relay1", rsa_key)
    out = k.signer().sign(original, original=original).data
    assert out.endswith(original)
    records = {**k.records, **app_records}
    assert [t["s"] for t in signature_tags(out)] == ["relay1", "app"]
    assert verify(out, records, 0) and verify(out, records, 1)


def test_changed_body_removes_the_broken_signature(tmp_path, rsa_key, app_signed):
    original, app_records = app_signed
    changed = original.replace(b"https://example.com/x", b"https://track.example.com/CL0/abc")
    k = Keys(tmp_path).add("example.com", "relay1", rsa_key)
    out = k.signer().sign(changed, original=original).data
    assert [t["s"] for t in signature_tags(out)] == ["relay1"]
    assert verify(out, k.records)
    assert out.endswith(changed.partition(b"\r\n\r\n")[2])
    assert dkim.broken_signatures(changed, original)  # and the core agrees on why


def test_changed_signed_header_removes_it_unsigned_header_keeps_it(tmp_path, rsa_key, app_signed):
    original, app_records = app_signed
    records = {**app_records}
    k = Keys(tmp_path).add("example.com", "relay1", rsa_key)
    records.update(k.records)
    subject = original.replace(b"Weekly deals", b"Weekly  deals!")
    assert [t["s"] for t in signature_tags(k.signer().sign(subject, original=original).data)] == ["relay1"]
    # X-Mailer is not in the app's h=, and relaxed/simple: changing it leaves the app's signature valid.
    mailer = original.replace(b"X-Mailer: app", b"X-Mailer: relay")
    out = k.signer().sign(mailer, original=original).data
    assert [t["s"] for t in signature_tags(out)] == ["relay1", "app"]
    assert verify(out, records, 1)


def test_keep_broken_signatures(tmp_path, rsa_key, app_signed):
    original, app_records = app_signed
    changed = original.replace(b"Hello", b"Hallo")
    k = Keys(tmp_path).add("example.com", "relay1", rsa_key)
    out = k.signer(keep_broken=True).sign(changed, original=original).data
    assert out.endswith(changed)
    assert [t["s"] for t in signature_tags(out)] == ["relay1", "app"]
    assert verify(out, k.records) and not verify(out, app_records, 1)


def test_signature_with_body_length_survives_an_appended_pixel(rsa_key2):
    sig = dkimpy.sign(MESSAGE, b"app", b"example.com", _traditional_pem(rsa_key2), length=True)
    original = sig + MESSAGE
    changed = original + b"<img src=\"https://t.example/o\">\r\n"
    assert dkim.broken_signatures(changed, original) == []
    assert verify(changed, {"app._domainkey.example.com.": dkim.key_record(rsa_key2)})
    assert len(dkim.broken_signatures(changed.replace(b"Hello", b"Hallo"), original)) == 1


def test_remove_fields_keeps_every_other_byte():
    msg = b"A: 1\r\nDKIM-Signature: x\r\n y\r\nB: 2\r\nDKIM-Signature: x\r\n y\r\n\r\nbody"
    block = split_header_block(msg)
    assert dkim.remove_fields(msg, [block.fields[1]]) == b"A: 1\r\nB: 2\r\nDKIM-Signature: x\r\n y\r\n\r\nbody"


# --- key files -----------------------------------------------------------------------------------------------

def test_world_readable_key_refused_naming_the_file(tmp_path, rsa_key):
    path = write_key(tmp_path / "k.pem", rsa_key, 0o644)
    settings = DkimSettings((DkimKey("example.com", "s", path),))
    with pytest.raises(ConfigError) as exc:
        Signer(settings)
    assert str(path) in str(exc.value) and "world-readable" in str(exc.value)
    assert check_keys(settings) == exc.value.problems
    path.chmod(0o640)  # group-readable (a relay group) is fine
    Signer(settings)


def test_unreadable_key_refused_naming_the_file(tmp_path, rsa_key):
    missing = DkimSettings((DkimKey("example.com", "s", tmp_path / "missing.pem"),))
    with pytest.raises(ConfigError, match=r"missing\.pem: unreadable: No such file"):
        Signer(missing)
    folder = tmp_path / "dir.pem"
    folder.mkdir(mode=0o700)
    with pytest.raises(ConfigError, match=r"dir\.pem: unreadable"):
        Signer(DkimSettings((DkimKey("example.com", "s", folder),)))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file, so mode 000 cannot make a key unreadable")
def test_key_without_read_permission(tmp_path, rsa_key):
    path = write_key(tmp_path / "k.pem", rsa_key, 0o000)
    with pytest.raises(ConfigError, match=r"k\.pem: unreadable: Permission denied"):
        Signer(DkimSettings((DkimKey("example.com", "s", path),)))


def test_bad_key_files(tmp_path, rsa_key, ed_key):
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"not a key\n")
    garbage.chmod(0o600)
    small = write_key(tmp_path / "small.pem", rsa.generate_private_key(65537, 1024))
    ecdsa = write_key(tmp_path / "ec.pem", ec.generate_private_key(ec.SECP256R1()))
    rsa_path = write_key(tmp_path / "rsa.pem", rsa_key)
    ed_path = write_key(tmp_path / "ed.pem", ed_key)
    problems = check_keys(DkimSettings((
        DkimKey("example.com", "a", garbage), DkimKey("example.com", "b", small),
        DkimKey("example.com", "c", ecdsa), DkimKey("example.com", "d", rsa_path, "ed25519-sha256"),
        DkimKey("example.com", "e", ed_path, "rsa-sha256"), DkimKey("example.com", "f", rsa_path),
    )))
    assert problems[2].startswith(f"dkim.keys[2].private_key_file: {ecdsa}: not an RSA or Ed25519 key")
    problems[2] = "ecdsa"
    assert problems == [
        f"dkim.keys[0].private_key_file: {garbage}: not a PEM private key",
        f"dkim.keys[1].private_key_file: {small}: an RSA key of 1024 bits; DKIM keys need 2048 or more",
        "ecdsa",
        f"dkim.keys[3].private_key_file: {rsa_path}: an RSA key, but algorithm is ed25519-sha256",
        f"dkim.keys[4].private_key_file: {ed_path}: an Ed25519 key, but algorithm is rsa-sha256",
    ]


def test_domain_and_selector_checked_idn_domain_signs_as_a_label(tmp_path, rsa_key):
    path = write_key(tmp_path / "k.pem", rsa_key)
    problems = check_keys(DkimSettings((DkimKey("not a domain", "s", path), DkimKey("example.com", "s;x", path))))
    assert problems == ["dkim.keys[0].domain: 'not a domain' is not a domain name",
                        "dkim.keys[1].selector: 's;x' is not a selector (letters, digits, - _ .)"]
    signer = Signer(DkimSettings((DkimKey("bücher.example", "s", path),)), clock=lambda: NOW)
    msg = MESSAGE.replace(b"news@example.com", "news@Bücher.example".encode())
    out = signer.sign(msg, original=msg).data
    assert signature_tags(out)[0]["d"] == "xn--bcher-kva.example"
    assert verify(out, {"s._domainkey.xn--bcher-kva.example.": dkim.key_record(rsa_key)})


def test_relay_check_reports_key_problems(tmp_path, rsa_key, capsys):
    path = write_key(tmp_path / "k.pem", rsa_key, 0o644)
    cfg = tmp_path / "relay.toml"
    cfg.write_text(f'[dkim]\n[[dkim.keys]]\ndomain = "example.com"\nselector = "s"\nprivate_key_file = "{path}"\n')
    assert cli.main(["check", "--config", str(cfg)]) == 1
    assert f"{path}: world-readable" in capsys.readouterr().err
    path.chmod(0o600)
    assert cli.main(["check", "--config", str(cfg)]) == 0


# --- relay dkim keygen -----------------------------------------------------------------------------------------

def _record_from_zone_line(line: str) -> tuple[str, str]:
    name = line.split()[0]
    return name, "".join(re.findall(r'"([^"]*)"', line))


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_keygen_writes_0600_and_prints_a_record_dkimpy_accepts(tmp_path, capsys, algorithm):
    if algorithm == "ed25519":
        needs_nacl()
    out = tmp_path / "k.pem"
    assert cli.main(["dkim", "keygen", "--domain", "Example.com", "--selector", "s1", "--algorithm", algorithm,
                     "--out", str(out)]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    printed = capsys.readouterr()
    name, record = _record_from_zone_line(printed.out.strip())
    assert name == "s1._domainkey.example.com."
    assert all(len(s) <= 255 for s in re.findall(r'"([^"]*)"', printed.out))
    assert "[[dkim.keys]]" in printed.err
    algo = "rsa-sha256" if algorithm == "rsa" else "ed25519-sha256"
    signer = Signer(DkimSettings((DkimKey("example.com", "s1", out, algo),)))
    assert verify(signer.sign(MESSAGE, original=MESSAGE).data, {name: record})
    # never overwrites an existing key
    assert cli.main(["dkim", "keygen", "--domain", "example.com", "--selector", "s1", "--out", str(out)]) == 1


def test_keygen_refuses_small_rsa(tmp_path, capsys):
    out = tmp_path / "k.pem"
    assert cli.main(["dkim", "keygen", "--domain", "example.com", "--selector", "s", "--bits", "1024",
                     "--out", str(out)]) == 2
    assert not out.exists()
    assert "2048" in capsys.readouterr().err


def test_record_mismatch_reasons(rsa_key, rsa_key2, ed_key):
    assert dkim.record_mismatch(dkim.key_record(rsa_key), rsa_key) is None
    assert dkim.record_mismatch(dkim.key_record(rsa_key2), rsa_key) == "the published key is not the configured key"
    assert "k=ed25519" in dkim.record_mismatch(dkim.key_record(ed_key), rsa_key)
    assert "revoked" in dkim.record_mismatch("v=DKIM1; k=rsa; p=", rsa_key)
    pkcs1 = rsa_key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    assert dkim.record_mismatch("v=DKIM1; p=" + base64.b64encode(pkcs1).decode(), rsa_key) is None
