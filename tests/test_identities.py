"""Sending identities with real parts: relay as a subprocess, its API through boto3 and the aws CLI, a DNS server
the test starts on 127.0.0.1 (tests/dnsstub.py) that relay's checks query with dnspython, SMTP into relay and an
aiosmtpd upstream. A domain is verified once its records are published, and failed again when they go; a key
made through the API signs the next message, which dkimpy and Mail::DKIM both pass; keys are sealed at rest;
require_verified_identity refuses the rest with SES's words."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import stat
from dataclasses import dataclass

import dkim as dkimpy
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from .dnsstub import StubDns
from .harness import Upstream, free_port, wait_port
from .test_api import ApiRelay, Env, _aws, api_toml
from .test_destinations import Receiver, wait_until
from .test_dkim_interop import HAVE_MAIL_DKIM, mail_dkim_verify
from .test_sending_control import send


@dataclass
class IdEnv(Env):
    dns: StubDns | None = None

    def publish(self, records: list[dict]) -> None:
        for r in records:
            self.dns.txt[r["Name"].lower()] = r["Value"]

    def withdraw(self, name: str) -> None:
        self.dns.txt.pop(name.lower(), None)

    def shown(self, identity: str) -> dict:
        out = self.relay_cli("identity", "show", identity)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)


def sending_toml(dns_port: int, require: bool = False) -> str:
    return f"""
[sending]
nameservers = ["127.0.0.1:{dns_port}"]
check_pending_interval = "0.3s"
check_verified_interval = "1s"
dns_timeout = "2s"
require_verified_identity = {str(require).lower()}

[identities."owner@file.example"]
default_configuration_set = "plain"
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    dns = StubDns()
    upstream = Upstream().start()
    hook = Receiver().start()
    api_port = free_port()
    relay = ApiRelay(tmp_path_factory.mktemp("identities"), upstream.port,
                     extra=api_toml(api_port, hook.port) + sending_toml(dns.port, require=True))
    relay.start()
    try:
        wait_port(api_port, proc=relay.proc)
        yield IdEnv(relay, upstream, hook, api_port, dns)
    finally:
        relay.stop()
        hook.stop()
        upstream.stop()
        dns.close()


def dkim_records(env: IdEnv, identity: str) -> list[dict]:
    return [r for r in env.shown(identity)["DnsRecords"] if "._domainkey." in r["Name"]]


def status(v2, identity: str) -> tuple[str, str]:
    got = v2.get_email_identity(EmailIdentity=identity)
    return got["VerificationStatus"], got["DkimAttributes"]["Status"]


def received(env: IdEnv, subject: str) -> bytes:
    wait_until(lambda: any(f"Subject: {subject}".encode() in m.data for m in env.upstream.messages),
               what=f"{subject} delivered")
    return next(m.data for m in env.upstream.messages if f"Subject: {subject}".encode() in m.data)


def dkimpy_passes(data: bytes, records: list[dict]) -> bool:
    table = {r["Name"].lower() + ".": r["Value"].encode() for r in records}
    return dkimpy.DKIM(data).verify(dnsfunc=lambda name, timeout=5: table.get(name.decode().lower()))


# --- v2 ----------------------------------------------------------------------------------------------------------

def test_a_domain_is_verified_by_its_published_record_and_fails_when_it_goes(env):
    v2 = env.client("sesv2")
    created = v2.create_email_identity(EmailIdentity="News.Example")
    assert created["IdentityType"] == "DOMAIN" and created["VerifiedForSendingStatus"] is False
    dkim = created["DkimAttributes"]
    assert dkim["Status"] == "PENDING" and dkim["SigningEnabled"] is True
    assert dkim["SigningAttributesOrigin"] == "AWS_SES" and len(dkim["Tokens"]) == 1
    records = dkim_records(env, "news.example")
    assert records == [{"Name": f"{dkim['Tokens'][0]}._domainkey.news.example", "Type": "TXT",
                        "Value": records[0]["Value"]}] and records[0]["Value"].startswith("v=DKIM1; k=rsa; p=")
    assert status(v2, "news.example") == ("PENDING", "PENDING")
    env.publish(records)
    wait_until(lambda: status(v2, "news.example") == ("SUCCESS", "SUCCESS"), what="verified")
    got = v2.get_email_identity(EmailIdentity="news.example")
    assert got["VerifiedForSendingStatus"] is True
    assert got["DkimAttributes"]["CurrentSigningKeyLength"] == "RSA_2048_BIT"
    assert got["VerificationInfo"]["LastSuccessTimestamp"]
    listed = {i["IdentityName"]: i for i in v2.list_email_identities()["EmailIdentities"]}
    assert listed["news.example"] == {"IdentityType": "DOMAIN", "IdentityName": "news.example",
                                      "SendingEnabled": True, "VerificationStatus": "SUCCESS"}
    assert listed["owner@file.example"]["VerificationStatus"] == "SUCCESS"  # the file's: vouched for
    with pytest.raises(v2.exceptions.AlreadyExistsException):
        v2.create_email_identity(EmailIdentity="news.example")
    with pytest.raises(v2.exceptions.BadRequestException):
        v2.create_email_identity(EmailIdentity="not a domain")
    with pytest.raises(v2.exceptions.BadRequestException):
        v2.delete_email_identity(EmailIdentity="owner@file.example")  # the file's are read-only
    env.withdraw(records[0]["Name"])  # the record is taken down: the recheck notices
    wait_until(lambda: status(v2, "news.example") == ("FAILED", "FAILED"), what="failed again")
    v2.delete_email_identity(EmailIdentity="news.example")
    with pytest.raises(v2.exceptions.NotFoundException):
        v2.get_email_identity(EmailIdentity="news.example")


def test_a_key_made_through_the_api_signs_the_next_message_and_both_verifiers_pass_it(env, tmp_path):
    v2 = env.client("sesv2")
    v2.create_email_identity(EmailIdentity="signed.example", ConfigurationSetName="plain")
    records = dkim_records(env, "signed.example")
    assert send(env.relay.smtp_port, None, "before", sender="app@signed.example")[0] == 554  # not verified yet
    env.publish(records)
    wait_until(lambda: status(v2, "signed.example") == ("SUCCESS", "SUCCESS"), what="verified")
    assert v2.get_email_identity(EmailIdentity="signed.example")["ConfigurationSetName"] == "plain"
    code, reply = send(env.relay.smtp_port, None, "signed", sender="app@signed.example")
    assert code == 250, reply
    data = received(env, "signed")
    assert b"d=signed.example" in data and dkimpy_passes(data, records)
    if HAVE_MAIL_DKIM:
        table = {r["Name"]: r["Value"] for r in records}
        (verdict,) = mail_dkim_verify({"signed": data}, table, tmp_path / "perl").values()
        assert verdict["result"] == "pass", verdict
    # Signing off: the next message goes out unsigned.
    v2.put_email_identity_dkim_attributes(EmailIdentity="signed.example", SigningEnabled=False)
    wait_until(lambda: v2.get_email_identity(EmailIdentity="signed.example")["DkimAttributes"]["SigningEnabled"]
               is False)
    assert send(env.relay.smtp_port, None, "unsigned", sender="app@signed.example")[0] == 250
    assert b"DKIM-Signature" not in received(env, "unsigned")


def test_bring_your_own_key_and_ed25519(env, tmp_path):
    v2 = env.client("sesv2")
    own = rsa.generate_private_key(65537, 2048)
    der = own.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    v2.create_email_identity(EmailIdentity="byo.example", DkimSigningAttributes={
        "DomainSigningSelector": "mine", "DomainSigningPrivateKey": base64.b64encode(der).decode()})
    records = dkim_records(env, "byo.example")
    assert records[0]["Name"] == "mine._domainkey.byo.example"
    env.publish(records)
    wait_until(lambda: status(v2, "byo.example") == ("SUCCESS", "SUCCESS"), what="verified")
    got = v2.get_email_identity(EmailIdentity="byo.example")["DkimAttributes"]
    assert got["SigningAttributesOrigin"] == "EXTERNAL" and got["Tokens"] == ["mine"]
    assert send(env.relay.smtp_port, None, "byo", sender="app@byo.example")[0] == 250
    assert dkimpy_passes(received(env, "byo"), records)
    # a new key made by relay, Ed25519 on request: a new selector, signing once its record is found
    answer = v2.put_email_identity_dkim_signing_attributes(
        EmailIdentity="byo.example", SigningAttributesOrigin="AWS_SES",
        SigningAttributes={"NextSigningKeyLength": "ED25519"})
    assert answer["DkimStatus"] == "PENDING" and answer["DkimTokens"] != ["mine"]
    records = dkim_records(env, "byo.example")
    assert "k=ed25519" in records[0]["Value"]
    env.publish(records)
    wait_until(lambda: status(v2, "byo.example")[1] == "SUCCESS", what="the new key verified")
    assert send(env.relay.smtp_port, None, "ed25519", sender="app@byo.example")[0] == 250
    data = received(env, "ed25519")
    assert b"a=ed25519-sha256" in data
    with pytest.raises(v2.exceptions.BadRequestException):
        v2.put_email_identity_dkim_signing_attributes(EmailIdentity="byo.example", SigningAttributesOrigin="EXTERNAL")
    with pytest.raises(v2.exceptions.BadRequestException):
        v2.create_email_identity(EmailIdentity="weak.example",
                                 DkimSigningAttributes={"NextSigningKeyLength": "RSA_1024_BIT"})
    with pytest.raises(v2.exceptions.NotFoundException):
        v2.put_email_identity_dkim_attributes(EmailIdentity="nope.example", SigningEnabled=True)


def test_keys_are_sealed_at_rest_and_never_shown(env):
    v2 = env.client("sesv2")
    v2.create_email_identity(EmailIdentity="sealed.example")
    with contextlib.closing(env.relay.db()) as conn:
        (sealed,) = conn.execute("SELECT dkim_key FROM email_identities WHERE identity = 'sealed.example'").fetchone()
    assert sealed.startswith("aesgcm:") and "PRIVATE KEY" not in sealed
    keys_file = env.relay.workdir / "data" / "dkim-sealing-keys"
    assert stat.S_IMODE(os.stat(keys_file).st_mode) == 0o600
    shown = json.dumps(env.shown("sealed.example"))
    raw = json.dumps(v2.get_email_identity(EmailIdentity="sealed.example"), default=str)
    assert "PRIVATE" not in shown + raw + env.relay.log() and sealed.split(":")[2][:40] not in env.relay.log()


def test_address_identities_and_require_verified_identity(env):
    v2 = env.client("sesv2")
    code, reply = send(env.relay.smtp_port, None, "stranger", sender="someone@nowhere.example")
    assert code == 554
    assert reply == ("Message rejected: Email address is not verified. The following identities failed the check"
                     " in region local: someone@nowhere.example")
    assert send(env.relay.smtp_port, None, "file", sender="owner@file.example")[0] == 250  # the file's identity
    v2.create_email_identity(EmailIdentity="someone@nowhere.example")
    got = v2.get_email_identity(EmailIdentity="someone@nowhere.example")
    assert got["IdentityType"] == "EMAIL_ADDRESS" and got["VerificationStatus"] == "PENDING"
    out = env.relay_cli("identity", "confirm", "someone@nowhere.example")
    assert out.returncode == 0, out.stderr
    assert v2.get_email_identity(EmailIdentity="someone@nowhere.example")["VerifiedForSendingStatus"] is True
    assert send(env.relay.smtp_port, None, "confirmed", sender="someone@nowhere.example")[0] == 250


# --- v1 ----------------------------------------------------------------------------------------------------------

def test_v1_identity_operations(env):
    v1 = env.client("ses")
    token = v1.verify_domain_identity(Domain="v1.example")["VerificationToken"]
    attrs = v1.get_identity_verification_attributes(Identities=["v1.example"])["VerificationAttributes"]
    assert attrs == {"v1.example": {"VerificationStatus": "Pending", "VerificationToken": token}}
    env.publish([{"Name": "_amazonses.v1.example", "Value": token}])
    wait_until(lambda: v1.get_identity_verification_attributes(Identities=["v1.example"])["VerificationAttributes"]
               ["v1.example"]["VerificationStatus"] == "Success", what="verified by its token")
    v1.verify_email_identity(EmailAddress="ops@v1.example")
    attrs = v1.get_identity_verification_attributes(Identities=["ops@v1.example", "unknown.example"])
    assert attrs["VerificationAttributes"] == {"ops@v1.example": {"VerificationStatus": "Success"}}  # its domain
    assert {"v1.example", "ops@v1.example"} <= set(v1.list_identities()["Identities"])
    assert "ops@v1.example" not in v1.list_identities(IdentityType="Domain")["Identities"]
    tokens = v1.verify_domain_dkim(Domain="v1.example")["DkimTokens"]
    dkim = v1.get_identity_dkim_attributes(Identities=["v1.example"])["DkimAttributes"]["v1.example"]
    assert dkim["DkimTokens"] == tokens and dkim["DkimEnabled"] is True and dkim["DkimVerificationStatus"] in (
        "Pending", "Success")
    v1.set_identity_dkim_enabled(Identity="v1.example", DkimEnabled=False)
    dkim = v1.get_identity_dkim_attributes(Identities=["v1.example"])["DkimAttributes"]["v1.example"]
    assert dkim["DkimEnabled"] is False
    v1.delete_identity(Identity="ops@v1.example")
    v1.delete_identity(Identity="ops@v1.example")  # SES answers success for what is not there
    assert "ops@v1.example" not in v1.list_identities()["Identities"]
    page = v1.list_identities(MaxItems=1)
    assert len(page["Identities"]) == 1 and page["NextToken"]
    assert v1.list_identities(MaxItems=1, NextToken=page["NextToken"])["Identities"] != page["Identities"]


# --- the aws CLI ------------------------------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("aws") is None, reason="the aws CLI is not installed (pip install awscli)")
def test_the_aws_cli_identities(env):
    out = _aws(env, "sesv2", "create-email-identity", "--email-identity", "cli.example")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["DkimAttributes"]["Status"] == "PENDING"
    env.publish(dkim_records(env, "cli.example"))
    wait_until(lambda: json.loads(_aws(env, "sesv2", "get-email-identity", "--email-identity", "cli.example").stdout)
               ["VerificationStatus"] == "SUCCESS", what="verified")
    out = _aws(env, "sesv2", "list-email-identities")
    assert "cli.example" in [i["IdentityName"] for i in json.loads(out.stdout)["EmailIdentities"]]
    assert _aws(env, "sesv2", "put-email-identity-dkim-attributes", "--email-identity", "cli.example",
                "--no-signing-enabled").returncode == 0
    out = _aws(env, "sesv2", "put-email-identity-dkim-signing-attributes", "--email-identity", "cli.example",
               "--signing-attributes-origin", "AWS_SES")
    assert out.returncode == 0 and json.loads(out.stdout)["DkimStatus"] == "PENDING", out.stderr
    out = _aws(env, "sesv2", "put-email-identity-mail-from-attributes", "--email-identity", "cli.example",
               "--mail-from-domain", "bounce.cli.example")
    assert out.returncode != 0 and "BadRequestException" in out.stderr
    out = _aws(env, "ses", "verify-domain-identity", "--domain", "cli2.example")
    assert json.loads(out.stdout)["VerificationToken"]
    assert _aws(env, "ses", "verify-email-identity", "--email-address", "a@cli2.example").returncode == 0
    out = _aws(env, "ses", "get-identity-verification-attributes", "--identities", "cli2.example", "a@cli2.example")
    assert set(json.loads(out.stdout)["VerificationAttributes"]) == {"cli2.example", "a@cli2.example"}
    out = _aws(env, "ses", "verify-domain-dkim", "--domain", "cli2.example")
    assert len(json.loads(out.stdout)["DkimTokens"]) == 1
    out = _aws(env, "ses", "get-identity-dkim-attributes", "--identities", "cli2.example")
    assert json.loads(out.stdout)["DkimAttributes"]["cli2.example"]["DkimEnabled"] is True
    assert "cli2.example" in json.loads(_aws(env, "ses", "list-identities").stdout)["Identities"]
    assert _aws(env, "ses", "delete-identity", "--identity", "cli2.example").returncode == 0
    assert _aws(env, "sesv2", "delete-email-identity", "--email-identity", "cli.example").returncode == 0
    out = _aws(env, "sesv2", "get-email-identity", "--email-identity", "cli.example")
    assert out.returncode != 0 and "NotFoundException" in out.stderr
