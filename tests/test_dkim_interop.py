"""DKIM interop: relay's signatures checked by an independent implementation (Debian's Mail::DKIM, Perl), and
`relay dkim check` against a tiny DNS server on 127.0.0.1. Mail::DKIM gets public keys from a stub put in place
of its DNS query function, so nothing touches real DNS; tests skip with the reason when Perl or the module is
missing (`apt-get install libmail-dkim-perl`, plus `libcryptx-perl` for ed25519-sha256)."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path

import dkim as dkimpy
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from relay import cli
from relay.config import DkimKey, DkimSettings
from relay.core import dkim
from relay.core.headers import to_crlf
from relay.sign import Signer

from .dnsstub import StubDns

NOW = 1_763_800_000.0
MESSAGE = (
    b"From: =?utf-8?q?Caf=C3=A9?= <news@example.com>\r\n"
    b"To: Someone <someone@example.org>,\r\n\tother@example.org\r\n"
    b"Subject: Hello\r\n  folded   subject\r\n"
    b"Date: Sat, 22 Nov 2025 08:26:40 -0000\r\n"
    b"Message-ID: <2@example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    + "Grüße  aus\tKöln   \r\n\r\n\r\n".encode()
)

# Reads `name<TAB>record` lines, then verifies each message file, printing one JSON line per message.
PERL_VERIFIER = r"""
use strict;
use warnings;
use JSON::PP;
use Mail::DKIM::Verifier;
use Net::DNS;

my ($records_file, @messages) = @ARGV;
my %txt;
open my $rf, '<', $records_file or die "$records_file: $!";
while (my $line = <$rf>) {
    chomp $line;
    my ($name, $value) = split /\t/, $line, 2;
    $txt{lc $name} = $value;
}
{
    no warnings 'redefine';
    *Mail::DKIM::DNS::query = sub {
        my ($name, $type) = @_;
        my $value = $txt{lc $name};
        if (!defined $value) { $@ = 'NXDOMAIN'; return; }
        $@ = 'NOERROR';
        return Net::DNS::RR->new(name => $name, type => 'TXT', txtdata => [ $value =~ /(.{1,255})/gs ]);
    };
}
for my $path (@messages) {
    open my $fh, '<:raw', $path or die "$path: $!";
    my $data = do { local $/; <$fh> };
    close $fh;
    my $v = Mail::DKIM::Verifier->new();
    $v->PRINT($data);
    $v->CLOSE;
    my @sigs = map { {
        domain => $_->domain, selector => $_->selector, algorithm => $_->algorithm,
        result => $_->result, detail => ($_->result_detail // ''),
    } } $v->signatures;
    print encode_json({ path => $path, result => $v->result, signatures => \@sigs }), "\n";
}
"""


def _perl_module(name: str) -> bool:
    perl = shutil.which("perl")
    return bool(perl) and subprocess.run([perl, f"-M{name}", "-e", "1"], capture_output=True).returncode == 0


HAVE_MAIL_DKIM = _perl_module("Mail::DKIM::Verifier") and _perl_module("JSON::PP")
# Mail::DKIM gained ed25519-sha256 verification after 1.20230212 (Debian 12's); it also needs CryptX.
HAVE_ED25519 = HAVE_MAIL_DKIM and _perl_module("Mail::DKIM::Algorithm::ed25519_sha256")
needs_mail_dkim = pytest.mark.skipif(
    not HAVE_MAIL_DKIM, reason="perl with Mail::DKIM not installed (apt-get install libmail-dkim-perl)")


def mail_dkim_verify(messages: dict[str, bytes], records: dict[str, str], folder: Path) -> dict[str, dict]:
    """Mail::DKIM's verdicts, one Perl run for all messages: {name: {"result": ..., "signatures": [...]}}."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "verify.pl"
    script.write_text(PERL_VERIFIER)
    records_file = folder / "records.tsv"
    records_file.write_text("".join(f"{name.rstrip('.')}\t{value}\n" for name, value in records.items()))
    paths = {}
    for i, (name, data) in enumerate(messages.items()):
        paths[str(folder / f"{i}.eml")] = name
        (folder / f"{i}.eml").write_bytes(data)
    proc = subprocess.run(["perl", str(script), str(records_file), *paths], capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    lines = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    return {paths[r["path"]]: r for r in lines}


# --- keys ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keys() -> dict[str, object]:
    return {"rsa": rsa.generate_private_key(65537, 2048), "rsa2": rsa.generate_private_key(65537, 2048),
            "ed": ed25519.Ed25519PrivateKey.generate()}


def write_key(path: Path, key) -> Path:
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    path.chmod(0o600)
    return path


def signer_for(folder: Path, entries: list[tuple[str, str, object, str]], **kw) -> tuple[Signer, dict[str, str]]:
    dkim_keys, records = [], {}
    for domain, selector, key, algorithm in entries:
        dkim_keys.append(DkimKey(domain, selector, write_key(folder / f"{domain}.{selector}.pem", key), algorithm))
        records[f"{selector}._domainkey.{domain}."] = dkim.key_record(key)
    return Signer(DkimSettings(tuple(dkim_keys), **kw), clock=lambda: NOW), records


# --- Mail::DKIM ---------------------------------------------------------------------------------------------

@needs_mail_dkim
def test_mail_dkim_verifies_rsa_signatures_on_many_shapes(tmp_path, keys):
    signer, records = signer_for(tmp_path, [("example.com", "relay1", keys["rsa"], "rsa-sha256")])
    head = MESSAGE.split(b"\r\n\r\n")[0]
    shapes = {
        "plain": MESSAGE,
        "bare-lf": to_crlf(MESSAGE.replace(b"\r\n", b"\n")),
        "empty-body": head + b"\r\n\r\n",
        "header-only": head + b"\r\n",
        "8bit-latin1": head + b"\r\n\r\n\xe9t\xe9 \xff\xfe\r\n",
        "huge": head + b"\r\n\r\n" + b"<td>  x\t y  </td>  \r\n" * 200_000,
        "many-to": b"".join(b"To: u%d@example.org\r\n" % i for i in range(40)) + MESSAGE,
    }
    signed = {name: signer.sign(data, original=data).data for name, data in shapes.items()}
    verdicts = mail_dkim_verify(signed, records, tmp_path / "perl")
    for name in shapes:
        assert verdicts[name]["result"] == "pass", (name, verdicts[name])


@needs_mail_dkim
def test_mail_dkim_verifies_dual_signatures(tmp_path, keys):
    signer, records = signer_for(tmp_path, [("example.com", "r", keys["rsa"], "rsa-sha256"),
                                            ("example.com", "e", keys["ed"], "ed25519-sha256")])
    out = signer.sign(MESSAGE, original=MESSAGE).data
    (verdict,) = mail_dkim_verify({"dual": out}, records, tmp_path / "perl").values()
    results = [(s["algorithm"], s["result"]) for s in verdict["signatures"]]
    assert results[0] == ("rsa-sha256", "pass")
    # An Ed25519-unaware verifier must not fail the message: RFC 8463 section 6 dual signing.
    assert verdict["result"] == "pass"
    if HAVE_ED25519:
        assert results[1] == ("ed25519-sha256", "pass")
    else:  # checked below against the RFC 8463 vector instead
        assert results[1][0] == "ed25519-sha256"
        assert dkim.verify_field(out, 1, records["e._domainkey.example.com."]) is None


@needs_mail_dkim
def test_mail_dkim_simple_canonicalisation(tmp_path, keys):
    key = dkim.SigningKey("example.com", "s", "rsa-sha256", keys["rsa"])
    records = {"s._domainkey.example.com.": dkim.key_record(keys["rsa"])}
    signed = {"/".join(c): dkim.sign(MESSAGE, [key], timestamp=int(NOW), canonicalization=c) + MESSAGE
              for c in (("simple", "simple"), ("relaxed", "simple"), ("simple", "relaxed"))}
    for name, verdict in mail_dkim_verify(signed, records, tmp_path / "perl").items():
        assert verdict["result"] == "pass", (name, verdict)


@needs_mail_dkim
def test_mail_dkim_agrees_on_kept_and_removed_app_signatures(tmp_path, keys):
    from cryptography.hazmat.primitives import serialization

    app_pem = keys["rsa2"].private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())
    original = dkimpy.sign(MESSAGE, b"app", b"example.com", app_pem) + MESSAGE
    signer, records = signer_for(tmp_path, [("example.com", "relay1", keys["rsa"], "rsa-sha256")])
    records["app._domainkey.example.com."] = dkim.key_record(keys["rsa2"])
    changed = original.replace("Grüße".encode(), b"Hallo")
    out = {
        "unchanged": signer.sign(original, original=original).data,
        "changed": signer.sign(changed, original=original).data,
    }
    verdicts = mail_dkim_verify(out, records, tmp_path / "perl")
    assert [(s["selector"], s["result"]) for s in verdicts["unchanged"]["signatures"]] == [
        ("relay1", "pass"), ("app", "pass")]
    assert [(s["selector"], s["result"]) for s in verdicts["changed"]["signatures"]] == [("relay1", "pass")]


# --- RFC 8463 Appendix A: signatures made by someone else ------------------------------------------------------
# Mail::DKIM 1.20230212 (Debian 12) cannot verify ed25519-sha256, so for Ed25519 the independent party is the RFC:
# relay's verifier must accept the RFC's signed message, and relay's key encoding must give the RFC's record.

RFC8463_SEED = "nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A="
RFC8463_RECORDS = {
    "brisbane": "v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=",
    "test": "v=DKIM1; k=rsa; p=MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDkHlOQoBTzWRiGs5V6NpP3idY6Wk08a5qhdR6wy5bdOKb2jLQi"
            "Y/J16JYi0Qvx/byYzCNb3W91y3FutACDfzwQ/BC/e/8uBsCR+yz1Lxj+PL6lHvqMKrM3rG4hstT5QjvHO9PzoxZyVYLzBfO2EeC3Ip3G"
            "+2kryOTIKT+l/K4w3QIDAQAB",
}
RFC8463_MESSAGE = "\r\n".join([
    "DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed;",
    " d=football.example.com; i=@football.example.com;",
    " q=dns/txt; s=brisbane; t=1528637909; h=from : to :",
    " subject : date : message-id : from : subject : date;",
    " bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;",
    " b=/gCrinpcQOoIfuHNQIbq4pgh9kyIK3AQUdt9OdqQehSwhEIug4D11Bus",
    " Fa3bT3FY5OsU7ZbnKELq+eXdp1Q1Dw==",
    "DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;",
    " d=football.example.com; i=@football.example.com;",
    " q=dns/txt; s=test; t=1528637909; h=from : to : subject :",
    " date : message-id : from : subject : date;",
    " bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;",
    " b=F45dVWDfMbQDGHJFlXUNB2HKfbCeLRyhDXgFpEL8GwpsRe0IeIixNTe3",
    " DhCVlUrSjV4BwcVcOF6+FF3Zo9Rpo1tFOeS9mPYQTnGdaSGsgeefOsk2Jz",
    " dA+L10TeYt9BgDfQNZtKdN1WO//KgIqXP7OdEFE4LjFYNcUxZQ4FADY+8=",
    "From: Joe SixPack <joe@football.example.com>",
    "To: Suzie Q <suzie@shopping.example.net>",
    "Subject: Is dinner ready?",
    "Date: Fri, 11 Jul 2003 21:00:37 -0700 (PDT)",
    "Message-ID: <20030712040037.46341.5F8J@football.example.com>",
    "",
    "Hi.",
    "",
    "We lost the game.  Are you hungry yet?",
    "",
    "Joe.",
    "",
]).encode()


def test_rfc8463_vector_verifies_with_relays_verifier():
    assert dkim.verify_field(RFC8463_MESSAGE, 0, RFC8463_RECORDS["brisbane"]) is None
    assert dkim.verify_field(RFC8463_MESSAGE, 1, RFC8463_RECORDS["test"]) is None
    tampered = RFC8463_MESSAGE.replace(b"Is dinner ready?", b"Is dinner ready!")
    assert dkim.verify_field(tampered, 0, RFC8463_RECORDS["brisbane"]) == "signature does not verify"
    assert dkim.verify_field(tampered.replace(b"Joe.", b"Jim."), 1, RFC8463_RECORDS["test"]) == "body hash mismatch"


def test_rfc8463_key_encoding_and_relays_ed25519_output():
    key = ed25519.Ed25519PrivateKey.from_private_bytes(base64.b64decode(RFC8463_SEED))
    assert dkim.key_record(key) == RFC8463_RECORDS["brisbane"]
    unsigned = RFC8463_MESSAGE[RFC8463_MESSAGE.index(b"From: "):]
    ours = dkim.sign(unsigned, [dkim.SigningKey("football.example.com", "brisbane", "ed25519-sha256", key)],
                     timestamp=1528637909) + unsigned
    assert dkim.verify_field(ours, 0, RFC8463_RECORDS["brisbane"]) is None
    bh = dkim.parse_tags(ours.split(b"\r\nFrom: ")[0].decode())["bh"]
    assert bh == "2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8="


# --- relay dkim check against a DNS server on 127.0.0.1 -----------------------------------------------------


def _config(tmp_path: Path, keys) -> Path:
    rsa_file = write_key(tmp_path / "rsa.pem", keys["rsa"])
    ed_file = write_key(tmp_path / "ed.pem", keys["ed"])
    cfg = tmp_path / "relay.toml"
    cfg.write_text(
        "[dkim]\n"
        f'[[dkim.keys]]\ndomain = "example.com"\nselector = "r1"\nprivate_key_file = "{rsa_file}"\n'
        f'[[dkim.keys]]\ndomain = "example.com"\nselector = "e1"\nprivate_key_file = "{ed_file}"\n'
        'algorithm = "ed25519-sha256"\n'
    )
    return cfg


def test_dkim_check_reports_match(tmp_path, keys, capsys):
    cfg = _config(tmp_path, keys)
    server = StubDns(txt={"r1._domainkey.example.com": dkim.key_record(keys["rsa"]),
                      "e1._domainkey.example.com": dkim.key_record(keys["ed"])})
    try:
        code = cli.main(["dkim", "check", "--config", str(cfg), "--domain", "example.com",
                         "--nameserver", "127.0.0.1", "--port", str(server.port)])
    finally:
        server.close()
    out = capsys.readouterr().out
    assert code == 0, out
    assert "r1._domainkey.example.com (rsa-sha256): match" in out
    assert "e1._domainkey.example.com (ed25519-sha256): match" in out


def test_dkim_check_reports_mismatch_and_missing_record(tmp_path, keys, capsys):
    cfg = _config(tmp_path, keys)
    server = StubDns(txt={"r1._domainkey.example.com": dkim.key_record(keys["rsa2"])})  # e1 not published
    try:
        code = cli.main(["dkim", "check", "--config", str(cfg), "--domain", "example.com",
                         "--nameserver", "127.0.0.1", "--port", str(server.port)])
        only_r1 = cli.main(["dkim", "check", "--config", str(cfg), "--domain", "example.com", "--selector", "r1",
                            "--nameserver", "127.0.0.1", "--port", str(server.port)])
    finally:
        server.close()
    out = capsys.readouterr().out
    assert code == 1 and only_r1 == 1
    assert "r1._domainkey.example.com (rsa-sha256): MISMATCH: the published key is not the configured key" in out
    assert f"publish: {dkim.key_record(keys['rsa'])}" in out
    assert "e1._domainkey.example.com (ed25519-sha256): MISMATCH: no DKIM record published" in out
    assert out.count("e1._domainkey") == 1  # --selector r1 checked r1 only


def test_dkim_check_unknown_domain(tmp_path, keys, capsys):
    cfg = _config(tmp_path, keys)
    assert cli.main(["dkim", "check", "--config", str(cfg), "--domain", "other.example"]) == 1
    assert "no DKIM key configured for other.example" in capsys.readouterr().err
