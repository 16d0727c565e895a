"""Sending control with real parts: relay as a subprocess, its SMTP listener, an aiosmtpd upstream, and the
management API through boto3 and the aws CLI. A paused set or account refuses new mail with SES's wording and
records nothing as sent, while what it queued before still goes out; the switch reads back as it is; who paused
and why is kept. A set whose TlsPolicy is REQUIRE never goes out over a connection in clear."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import smtplib
import ssl

import pytest
from aiosmtpd.controller import Controller
from botocore.exceptions import ClientError

from .harness import Upstream, UpstreamHandler, free_port, wait_port
from .test_api import KEY_ID, ApiRelay, Env, _aws, api_toml
from .test_destinations import MESSAGE, Receiver, wait_until


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    upstream = Upstream().start()
    hook = Receiver().start()
    api_port = free_port()
    relay = ApiRelay(tmp_path_factory.mktemp("control"), upstream.port,
                     extra=api_toml(api_port, hook.port) + '\n[reputation]\ncheck_interval = "0.2s"\n')
    relay.start()
    try:
        wait_port(api_port, proc=relay.proc)
        yield Env(relay, upstream, hook, api_port)
    finally:
        relay.stop()
        hook.stop()
        upstream.stop()


def send(port: int, set_name: str | None, subject: str = "Hi", sender: str = "news@example.com",
         rcpts: tuple[str, ...] = ("rcpt@example.org",)) -> tuple[int, str]:
    """(code, reply) of one SMTP transaction with the set in X-SES-CONFIGURATION-SET; `sender` is the MAIL FROM
    and the From address."""
    head = f"X-SES-CONFIGURATION-SET: {set_name}\r\n".encode() if set_name else b""
    data = head + MESSAGE.replace(b"Subject: Hi", f"Subject: {subject}".encode()).replace(
        b"From: News <news@example.com>", f"From: News <{sender}>".encode())
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test")
        client.mail(sender)
        for rcpt in rcpts:
            client.rcpt(rcpt)
        code, reply = client.data(data)
    return code, reply.decode()


def accepted_id(reply: str) -> str:
    return re.match(r"Ok (\S+)$", reply).group(1)


def rows(env: Env, sql: str, params: tuple = ()) -> list[tuple]:
    with contextlib.closing(env.relay.db()) as conn:
        return conn.execute(sql, params).fetchall()


def code_of(exc: pytest.ExceptionInfo) -> str:
    return exc.value.response["Error"]["Code"]


# --- the two lies -------------------------------------------------------------------------------------------------

def test_a_set_created_with_sending_disabled_refuses_mail_and_says_so(env):
    v1, v2 = env.client("ses"), env.client("sesv2")
    v2.create_configuration_set(ConfigurationSetName="born-paused", SendingOptions={"SendingEnabled": False})
    code, reply = send(env.relay.smtp_port, "born-paused")
    assert code == 554 and reply.startswith("Message rejected: Sending paused for this configuration set."), reply
    assert rows(env, "SELECT COUNT(*) FROM messages WHERE configuration_set = 'born-paused'") == [(0,)]
    assert rows(env, "SELECT COUNT(*) FROM events WHERE configuration_set = 'born-paused'") == [(0,)]
    assert v2.get_configuration_set(ConfigurationSetName="born-paused")["SendingOptions"] == {"SendingEnabled": False}
    got = v1.describe_configuration_set(ConfigurationSetName="born-paused",
                                        ConfigurationSetAttributeNames=["reputationOptions"])
    assert got["ReputationOptions"]["SendingEnabled"] is False
    # A set created sending says so, and nothing of the options it was not given is invented.
    v2.create_configuration_set(ConfigurationSetName="born-sending")
    got = v2.get_configuration_set(ConfigurationSetName="born-sending")
    assert got["SendingOptions"] == {"SendingEnabled": True}
    assert "DeliveryOptions" not in got and "ReputationOptions" not in got
    got = v1.describe_configuration_set(ConfigurationSetName="born-sending",
                                        ConfigurationSetAttributeNames=["reputationOptions", "deliveryOptions"])
    assert got["ReputationOptions"] == {"SendingEnabled": True} and "DeliveryOptions" not in got


# --- pausing a set: SMTP refuses, the queue drains ------------------------------------------------------------------

def test_a_paused_set_refuses_new_mail_while_its_queued_mail_goes_out(env):
    v2 = env.client("sesv2")
    v2.create_configuration_set(ConfigurationSetName="pausable")
    env.upstream.handler.reply = "451 4.3.0 Try again later"  # the upstream defers: the copies stay queued
    try:
        ids = [accepted_id(r) for c, r in (send(env.relay.smtp_port, "pausable", f"queued {i}") for i in range(3))]
        wait_until(lambda: len({r[0] for r in rows(env, "SELECT DISTINCT message_id FROM events WHERE type ="
                                                   " 'DeliveryDelay' AND configuration_set = 'pausable'")}) == 3,
                   what="three copies deferred")
        v2.put_configuration_set_sending_options(ConfigurationSetName="pausable", SendingEnabled=False)
        code, reply = send(env.relay.smtp_port, "pausable", "refused")
        assert code == 554, reply
        assert "configuration set. Configuration set <pausable>: PutConfigurationSetSendingOptions" in reply
    finally:
        env.upstream.handler.reply = None
    wait_until(lambda: len(rows(env, "SELECT 1 FROM events WHERE type = 'Delivery' AND configuration_set ="
                                     " 'pausable'")) == 3, what="the queued copies delivered")
    assert {m[0] for m in rows(env, "SELECT id FROM messages WHERE configuration_set = 'pausable'")} == set(ids)
    assert not [m for m in env.upstream.messages if b"Subject: refused" in m.data]
    out = env.relay_cli("config-set", "resume", "pausable", "--reason", "the list was cleaned")
    assert out.returncode == 0 and "pausable: sending" in out.stdout, out.stderr
    code, reply = send(env.relay.smtp_port, "pausable", "after resume")
    assert code == 250, reply
    shown = json.loads(env.relay_cli("config-set", "show", "pausable").stdout)
    history = shown["Sending"]["History"]
    assert [(h["SendingEnabled"], h["Reason"]) for h in history] == [
        (True, "the list was cleaned"), (False, "PutConfigurationSetSendingOptions through the API")]
    assert history[1]["ChangedBy"] == f"api:{KEY_ID}" and history[0]["ChangedBy"].startswith("cli")
    assert shown["Sending"]["SendingEnabled"] is True and shown["Sending"]["LastFreshStart"]


def test_a_set_of_the_file_can_be_paused_and_resumed(env):
    v1 = env.client("ses")
    v1.update_configuration_set_sending_enabled(ConfigurationSetName="marketing", Enabled=False)
    code, reply = send(env.relay.smtp_port, "marketing")
    assert code == 554 and "Sending paused for this configuration set. Configuration set <marketing>:" in reply
    got = v1.describe_configuration_set(ConfigurationSetName="marketing",
                                        ConfigurationSetAttributeNames=["reputationOptions"])
    assert got["ReputationOptions"]["SendingEnabled"] is False
    v1.update_configuration_set_sending_enabled(ConfigurationSetName="marketing", Enabled=True)
    assert send(env.relay.smtp_port, "marketing")[0] == 250
    with pytest.raises(v1.exceptions.ConfigurationSetDoesNotExistException):
        v1.update_configuration_set_sending_enabled(ConfigurationSetName="nope", Enabled=False)
    with pytest.raises(env.client("sesv2").exceptions.NotFoundException):
        env.client("sesv2").put_configuration_set_sending_options(ConfigurationSetName="nope", SendingEnabled=True)


# --- pausing the account --------------------------------------------------------------------------------------------

def test_the_paused_account_refuses_every_message(env):
    v1, v2 = env.client("ses"), env.client("sesv2")
    assert v2.get_account()["SendingEnabled"] is True
    v2.put_account_sending_attributes(SendingEnabled=False)
    try:
        for set_name in ("plain", None):
            code, reply = send(env.relay.smtp_port, set_name)
            assert code == 554 and reply.startswith("Message rejected: Sending paused for this account."), reply
        assert v1.get_account_sending_enabled()["Enabled"] is False
        account = v2.get_account()
        assert account["SendingEnabled"] is False and account["ProductionAccessEnabled"] is True
        assert account["EnforcementStatus"] == "HEALTHY"
    finally:
        v1.update_account_sending_enabled(Enabled=True)
    assert send(env.relay.smtp_port, "plain")[0] == 250
    shown = json.loads(env.relay_cli("account", "show").stdout)
    assert shown["SendingEnabled"] is True
    assert [h["Reason"] for h in shown["History"][:2]] == [
        "UpdateAccountSendingEnabled through the API", "PutAccountSendingAttributes through the API"]
    out = env.relay_cli("account", "pause", "--reason", "maintenance")
    assert out.returncode == 0, out.stderr
    assert send(env.relay.smtp_port, "plain")[0] == 554
    env.relay_cli("account", "resume")
    assert send(env.relay.smtp_port, "plain")[0] == 250


# --- quota and statistics with no quota configured ---------------------------------------------------------------

def test_send_quota_and_statistics_without_a_quota(env):
    v1, v2 = env.client("ses"), env.client("sesv2")
    code, reply = send(env.relay.smtp_port, "plain", rcpts=("a@example.org", "b@example.org"))
    assert code == 250
    quota = v1.get_send_quota()
    assert quota["Max24HourSend"] == -1.0 and quota["MaxSendRate"] == -1.0  # SES's "no limit"
    wait_until(lambda: v1.get_send_quota()["SentLast24Hours"] >= 2, what="the two recipients counted")
    assert v2.get_account()["SendQuota"]["SentLast24Hours"] == v1.get_send_quota()["SentLast24Hours"]
    points = v1.get_send_statistics()["SendDataPoints"]
    assert points and all(p["Timestamp"].minute % 15 == 0 for p in points)
    assert sum(p["DeliveryAttempts"] for p in points) >= 2


# --- DeliveryOptions and ReputationOptions ----------------------------------------------------------------------

def test_delivery_and_reputation_options_read_back_as_set(env):
    v1, v2 = env.client("ses"), env.client("sesv2")
    v2.create_configuration_set(ConfigurationSetName="opts", DeliveryOptions={"TlsPolicy": "REQUIRE"},
                                ReputationOptions={"ReputationMetricsEnabled": True})
    raw: list[dict] = []
    v2.meta.events.register("after-call.sesv2.GetConfigurationSet",
                            lambda http_response, **_: raw.append(json.loads(http_response.content)))
    got = v2.get_configuration_set(ConfigurationSetName="opts")
    assert got["DeliveryOptions"] == {"TlsPolicy": "REQUIRE"}
    assert got["ReputationOptions"] == {"ReputationMetricsEnabled": True}
    # relay's own member, which SDKs leave out: the set's rates in its window and the guard's thresholds
    assert raw[0]["Reputation"]["BounceRate"] == 0.0 and raw[0]["Reputation"]["BounceRateThreshold"] == 0.05
    v2.put_configuration_set_delivery_options(ConfigurationSetName="opts", TlsPolicy="OPTIONAL",
                                              MaxDeliverySeconds=600)
    v2.put_configuration_set_reputation_options(ConfigurationSetName="opts", ReputationMetricsEnabled=False)
    got = v2.get_configuration_set(ConfigurationSetName="opts")
    assert got["DeliveryOptions"] == {"TlsPolicy": "OPTIONAL", "MaxDeliverySeconds": 600}
    assert got["ReputationOptions"] == {"ReputationMetricsEnabled": False}
    v1.put_configuration_set_delivery_options(ConfigurationSetName="opts", DeliveryOptions={"TlsPolicy": "Require"})
    v1.update_configuration_set_reputation_metrics_enabled(ConfigurationSetName="opts", Enabled=True)
    got = v1.describe_configuration_set(ConfigurationSetName="opts",
                                        ConfigurationSetAttributeNames=["deliveryOptions", "reputationOptions"])
    assert got["DeliveryOptions"] == {"TlsPolicy": "Require"}
    assert got["ReputationOptions"] == {"SendingEnabled": True, "ReputationMetricsEnabled": True}
    with pytest.raises(v2.exceptions.BadRequestException) as exc:
        v2.put_configuration_set_delivery_options(ConfigurationSetName="opts", SendingPoolName="dedicated")
    assert "no dedicated IP pools" in exc.value.response["Error"]["Message"]
    with pytest.raises(v1.exceptions.InvalidDeliveryOptionsException):
        v1.put_configuration_set_delivery_options(ConfigurationSetName="opts", DeliveryOptions={"TlsPolicy": "Sure"})
    with pytest.raises(v2.exceptions.NotFoundException):
        v2.put_configuration_set_delivery_options(ConfigurationSetName="nope", TlsPolicy="REQUIRE")
    with pytest.raises(ClientError) as exc:  # the file's sets are read-only
        v2.put_configuration_set_delivery_options(ConfigurationSetName="marketing", TlsPolicy="REQUIRE")
    assert code_of(exc) == "BadRequestException" and "read-only" in exc.value.response["Error"]["Message"]


def _starttls_upstream(tmp_path) -> tuple[Controller, UpstreamHandler, str]:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    ca_path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    handler = UpstreamHandler()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port(), tls_context=server_ctx)
    controller.start()
    return controller, handler, str(ca_path)


def test_tls_policy_require_never_sends_in_clear(tmp_path):
    plain = Upstream().start()
    controller, tls_handler, ca_path = _starttls_upstream(tmp_path)
    sets = ('[configuration_sets.strict]\ntls_policy = "REQUIRE"\n')
    relays = [ApiRelay(tmp_path / "clear", plain.port, extra=sets, upstream={"tls": "opportunistic"}),
              ApiRelay(tmp_path / "tls", controller.port, extra=sets,
                       upstream={"tls": "opportunistic", "ca_file": ca_path})]
    try:
        clear, tls = (r.start() for r in relays)
        assert send(clear.smtp_port, "strict", "strict")[0] == 250
        assert send(clear.smtp_port, "plain", "plain")[0] == 250
        delay = json.loads(clear.wait_events("DeliveryDelay", 1)[0][4])
        assert "4.7.10 TLS required" in delay["deliveryDelay"]["delayedRecipients"][0]["diagnosticCode"]
        plain.wait_for(1)
        assert [b"Subject: plain" in m.data for m in plain.messages] == [True]  # the strict copy waits
        assert send(tls.smtp_port, "strict", "strict over tls")[0] == 250
        tls.wait_events("Delivery", 1)
        assert [b"Subject: strict over tls" in m.data for m in tls_handler.messages] == [True]
    finally:
        for r in relays:
            r.stop()
        controller.stop()
        plain.stop()


# --- the aws CLI ------------------------------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("aws") is None, reason="the aws CLI is not installed (pip install awscli)")
def test_the_aws_cli_switches_and_reads_back(env):
    ok = lambda *args: json.loads(_aws(env, *args).stdout or "{}")  # noqa: E731
    assert _aws(env, "sesv2", "create-configuration-set", "--configuration-set-name", "cli-paused",
                "--sending-options", "SendingEnabled=false").returncode == 0
    assert ok("sesv2", "get-configuration-set", "--configuration-set-name", "cli-paused")["SendingOptions"] == {
        "SendingEnabled": False}
    assert _aws(env, "ses", "update-configuration-set-sending-enabled", "--configuration-set-name", "cli-paused",
                "--enabled").returncode == 0
    got = ok("ses", "describe-configuration-set", "--configuration-set-name", "cli-paused",
             "--configuration-set-attribute-names", "reputationOptions")
    assert got["ReputationOptions"]["SendingEnabled"] is True
    assert _aws(env, "sesv2", "put-configuration-set-sending-options", "--configuration-set-name", "cli-paused",
                "--no-sending-enabled").returncode == 0
    assert send(env.relay.smtp_port, "cli-paused")[0] == 554
    assert _aws(env, "sesv2", "put-configuration-set-delivery-options", "--configuration-set-name", "cli-paused",
                "--tls-policy", "REQUIRE").returncode == 0
    assert _aws(env, "sesv2", "put-configuration-set-reputation-options", "--configuration-set-name", "cli-paused",
                "--reputation-metrics-enabled").returncode == 0
    got = ok("sesv2", "get-configuration-set", "--configuration-set-name", "cli-paused")
    assert got["DeliveryOptions"] == {"TlsPolicy": "REQUIRE"}
    assert got["ReputationOptions"]["ReputationMetricsEnabled"] is True
    assert _aws(env, "ses", "update-configuration-set-reputation-metrics-enabled", "--configuration-set-name",
                "cli-paused", "--no-enabled").returncode == 0
    assert _aws(env, "ses", "put-configuration-set-delivery-options", "--configuration-set-name", "cli-paused",
                "--delivery-options", "TlsPolicy=Optional").returncode == 0
    assert ok("ses", "get-account-sending-enabled") == {"Enabled": True}
    assert _aws(env, "ses", "update-account-sending-enabled", "--no-enabled").returncode == 0
    assert ok("sesv2", "get-account")["SendingEnabled"] is False
    assert _aws(env, "sesv2", "put-account-sending-attributes", "--sending-enabled").returncode == 0
    assert ok("ses", "get-account-sending-enabled") == {"Enabled": True}
    assert ok("ses", "get-send-quota")["Max24HourSend"] == -1.0
    assert "SendDataPoints" in ok("ses", "get-send-statistics")
    out = _aws(env, "sesv2", "put-configuration-set-sending-options", "--configuration-set-name", "nope",
               "--sending-enabled")
    assert out.returncode != 0 and "NotFoundException" in out.stderr


# --- the sending API (when this relay has it) ----------------------------------------------------------------------

def _simple(v2, set_name: str | None) -> dict:
    extra = {"ConfigurationSetName": set_name} if set_name else {}
    return v2.send_email(FromEmailAddress="news@example.com", Destination={"ToAddresses": ["rcpt@example.org"]},
                         Content={"Simple": {"Subject": {"Data": "Hi"}, "Body": {"Text": {"Data": "hello"}}}},
                         **extra)


def test_the_sending_api_refuses_a_pause_with_ses_codes(env):
    v1, v2 = env.client("ses"), env.client("sesv2")
    try:
        _simple(v2, "plain")
    except ClientError as exc:
        if exc.response["Error"]["Code"] == "UnknownOperationException":
            pytest.skip("this relay has no SendEmail: the pause is refused over SMTP only")
        raise
    v2.create_configuration_set(ConfigurationSetName="api-paused", SendingOptions={"SendingEnabled": False})
    with pytest.raises(v2.exceptions.SendingPausedException):
        _simple(v2, "api-paused")
    with pytest.raises(v1.exceptions.ConfigurationSetSendingPausedException):
        v1.send_email(Source="news@example.com", Destination={"ToAddresses": ["rcpt@example.org"]},
                      Message={"Subject": {"Data": "Hi"}, "Body": {"Text": {"Data": "hello"}}},
                      ConfigurationSetName="api-paused")
    v2.put_account_sending_attributes(SendingEnabled=False)
    try:
        with pytest.raises(v2.exceptions.SendingPausedException):
            _simple(v2, "plain")
        with pytest.raises(v1.exceptions.AccountSendingPausedException):
            v1.send_email(Source="news@example.com", Destination={"ToAddresses": ["rcpt@example.org"]},
                          Message={"Subject": {"Data": "Hi"}, "Body": {"Text": {"Data": "hello"}}})
    finally:
        v2.put_account_sending_attributes(SendingEnabled=True)
