"""The SES-compatible management API with real clients: boto3 (`ses`, `sesv2`) and the `aws` CLI against relay
running as a subprocess, sharing its store with `relay config-set`. Ends with a click that travels from an
SMTP message through the tracking listener to a webhook configured as an SNS destination through the API.
"""

from __future__ import annotations

import email
import email.policy
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from unittest import mock

import boto3
import botocore.auth
import pytest
from botocore.awsrequest import AWSRequest
from botocore.config import Config as BotoConfig
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from .harness import ROOT, RelayProcess, Upstream, free_port, wait_port
from .test_destinations import MESSAGE, Receiver, submit, wait_until

KEY_ID, SECRET = "AKIDRELAYTEST", "relay-test-secret-0123456789"
REGION = "us-east-1"
TOPIC = "arn:aws:sns:us-east-1:123456789012:events"
BUS = "arn:aws:events:us-east-1:123456789012:event-bus/default"
HOOK_SECRET = "hook-secret"


@dataclass
class ApiRelay(RelayProcess):
    """RelayProcess with keys added to its [tracking] table (the harness writes that table itself)."""

    tracking_extra: str = ""

    def write_config(self) -> None:
        super().write_config()
        text = self.config_path.read_text().replace("[tracking]\n", f"[tracking]\n{self.tracking_extra}\n", 1)
        self.config_path.write_text(text)


def api_toml(api_port: int, hook_port: int) -> str:
    return f"""
[api]
listen = "127.0.0.1:{api_port}"
regions = ["{REGION}"]

[[api.access_keys]]
id = "{KEY_ID}"
secret = "{SECRET}"

[api.sns_topics."{TOPIC}"]
url = "http://127.0.0.1:{hook_port}/sns"
secret = "{HOOK_SECRET}"

[api.event_buses."{BUS}"]
url = "http://127.0.0.1:{hook_port}/bus"
"""


@dataclass
class Env:
    relay: ApiRelay
    upstream: Upstream
    hook: Receiver
    api_port: int

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def client(self, service: str, key: str = KEY_ID, secret: str = SECRET, region: str = REGION):
        return boto3.client(service, endpoint_url=self.endpoint, region_name=region, aws_access_key_id=key,
                            aws_secret_access_key=secret, config=BotoConfig(retries={"max_attempts": 1}))

    def relay_cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "relay.cli", *args, "--config", str(self.relay.config_path)],
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                              timeout=60)


@pytest.fixture(scope="module")
def env(tmp_path_factory, module_store_url):
    upstream = Upstream().start()
    hook = Receiver().start()
    api_port = free_port()
    relay = ApiRelay(tmp_path_factory.mktemp("api"), upstream.port, extra=api_toml(api_port, hook.port),
                     tracking_extra='require_verified_domains = false\nhttps_hosts = ["secure.example.com"]',
                     store_url=module_store_url)
    relay.start()
    try:
        wait_port(api_port, proc=relay.proc)
        yield Env(relay, upstream, hook, api_port)
    finally:
        relay.stop()
        hook.stop()
        upstream.stop()
    assert SECRET not in relay.log() and HOOK_SECRET not in relay.log()


def code_of(exc: pytest.ExceptionInfo) -> str:
    return exc.value.response["Error"]["Code"]


# --- SES v2 -----------------------------------------------------------------------------------------------------

def test_v2_configuration_sets(env):
    v2 = env.client("sesv2")
    v2.create_configuration_set(ConfigurationSetName="v2-life",
                                TrackingOptions={"CustomRedirectDomain": "track.example.com"},
                                VdmOptions={"DashboardOptions": {"EngagementMetrics": "ENABLED"}})
    got = v2.get_configuration_set(ConfigurationSetName="v2-life")
    assert got["ConfigurationSetName"] == "v2-life"
    assert got["TrackingOptions"] == {"CustomRedirectDomain": "track.example.com"}
    assert got["VdmOptions"] == {"DashboardOptions": {"EngagementMetrics": "ENABLED"}}
    assert "v2-life" in v2.list_configuration_sets()["ConfigurationSets"]
    with pytest.raises(v2.exceptions.AlreadyExistsException):
        v2.create_configuration_set(ConfigurationSetName="v2-life")
    with pytest.raises(v2.exceptions.BadRequestException):
        v2.create_configuration_set(ConfigurationSetName="bad name!")
    # A refused tracking domain refuses the whole creation.
    with pytest.raises(v2.exceptions.BadRequestException):
        v2.create_configuration_set(ConfigurationSetName="v2-half", TrackingOptions={"CustomRedirectDomain": "x"})
    with pytest.raises(v2.exceptions.NotFoundException):
        v2.get_configuration_set(ConfigurationSetName="v2-half")
    v2.delete_configuration_set(ConfigurationSetName="v2-life")
    with pytest.raises(v2.exceptions.NotFoundException) as exc:
        v2.get_configuration_set(ConfigurationSetName="v2-life")
    assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    assert exc.value.response["Error"]["Message"] == "Configuration set <v2-life> does not exist."
    with pytest.raises(v2.exceptions.NotFoundException):
        v2.delete_configuration_set(ConfigurationSetName="v2-life")


def test_list_pagination_v1_and_v2(env):
    v2, v1 = env.client("sesv2"), env.client("ses")
    for i in range(5):
        v2.create_configuration_set(ConfigurationSetName=f"page-{i}")
    everything = v2.list_configuration_sets()["ConfigurationSets"]
    pages, token = [], None
    for _ in range(50):  # bounded
        kw = {"NextToken": token} if token else {}
        resp = v2.list_configuration_sets(PageSize=2, **kw)
        pages.append(resp["ConfigurationSets"])
        token = resp.get("NextToken")
        if not token:
            break
    assert all(len(p) <= 2 for p in pages) and sum(pages, []) == everything
    assert {f"page-{i}" for i in range(5)} <= set(everything)
    v1_pages = [[m["Name"] for m in p["ConfigurationSets"]]
                for p in v1.get_paginator("list_configuration_sets").paginate(PaginationConfig={"PageSize": 2})]
    assert v1_pages == pages
    with pytest.raises(v2.exceptions.BadRequestException):
        v2.list_configuration_sets(NextToken="%%%not-a-token")
    with pytest.raises(v2.exceptions.BadRequestException):
        v2.list_configuration_sets(PageSize=0)
    for i in range(5):
        v1.delete_configuration_set(ConfigurationSetName=f"page-{i}")


def test_v2_tracking_options(env):
    v2 = env.client("sesv2")
    v2.create_configuration_set(ConfigurationSetName="v2-track")
    v2.put_configuration_set_tracking_options(ConfigurationSetName="v2-track",
                                              CustomRedirectDomain="secure.example.com", HttpsPolicy="REQUIRE")
    got = v2.get_configuration_set(ConfigurationSetName="v2-track")["TrackingOptions"]
    assert got == {"CustomRedirectDomain": "secure.example.com", "HttpsPolicy": "REQUIRE"}
    # REQUIRE needs https to reach the tracking listener; this domain has none.
    with pytest.raises(v2.exceptions.BadRequestException) as exc:
        v2.put_configuration_set_tracking_options(ConfigurationSetName="v2-track",
                                                  CustomRedirectDomain="plain.example.com", HttpsPolicy="REQUIRE")
    assert "HttpsPolicy REQUIRE" in exc.value.response["Error"]["Message"]
    # A tracking domain that fails validation (a label with an underscore, a bare IP).
    for bad in ("bad_label.example.com", "10.0.0.1", "-x.example.com"):
        with pytest.raises(v2.exceptions.BadRequestException) as exc:
            v2.put_configuration_set_tracking_options(ConfigurationSetName="v2-track", CustomRedirectDomain=bad)
        assert "Invalid tracking options" in exc.value.response["Error"]["Message"]
    # Enums are checked by the server (botocore sends any string).
    with pytest.raises(v2.exceptions.BadRequestException) as exc:
        v2.put_configuration_set_tracking_options(ConfigurationSetName="v2-track", HttpsPolicy="SOMETIMES")
    assert "enum value set: [REQUIRE, REQUIRE_OPEN_ONLY, OPTIONAL]" in exc.value.response["Error"]["Message"]
    assert v2.get_configuration_set(ConfigurationSetName="v2-track")["TrackingOptions"]["HttpsPolicy"] == "REQUIRE"
    v2.put_configuration_set_tracking_options(ConfigurationSetName="v2-track")  # {}: back to the defaults
    assert "TrackingOptions" not in v2.get_configuration_set(ConfigurationSetName="v2-track")
    with pytest.raises(v2.exceptions.NotFoundException):
        v2.put_configuration_set_tracking_options(ConfigurationSetName="nope", CustomRedirectDomain="t.example.com")
    v2.delete_configuration_set(ConfigurationSetName="v2-track")


def test_v2_event_destinations(env):
    v2 = env.client("sesv2")
    v2.create_configuration_set(ConfigurationSetName="v2-dest")
    v2.create_configuration_set_event_destination(
        ConfigurationSetName="v2-dest", EventDestinationName="sns",
        EventDestination={"Enabled": True, "MatchingEventTypes": ["SEND", "CLICK"],
                          "SnsDestination": {"TopicArn": TOPIC}})
    v2.create_configuration_set_event_destination(
        ConfigurationSetName="v2-dest", EventDestinationName="bus",
        EventDestination={"MatchingEventTypes": ["DELIVERY_DELAY"], "EventBridgeDestination": {"EventBusArn": BUS}})
    got = v2.get_configuration_set_event_destinations(ConfigurationSetName="v2-dest")["EventDestinations"]
    assert {d["Name"]: d for d in got} == {
        "sns": {"Name": "sns", "Enabled": True, "MatchingEventTypes": ["SEND", "CLICK"],
                "SnsDestination": {"TopicArn": TOPIC}},
        "bus": {"Name": "bus", "Enabled": False, "MatchingEventTypes": ["DELIVERY_DELAY"],
                "EventBridgeDestination": {"EventBusArn": BUS}}}
    # The destination is a webhook, as the CLI would have made it.
    shown = json.loads(env.relay_cli("config-set", "show", "v2-dest").stdout)
    sns = next(d for d in shown["EventDestinations"] if d["Name"] == "sns")
    assert sns["Type"] == "webhook" and sns["Url"].endswith("/sns") and sns["Signed"] and sns["TopicArn"] == TOPIC
    with pytest.raises(v2.exceptions.AlreadyExistsException):
        v2.create_configuration_set_event_destination(
            ConfigurationSetName="v2-dest", EventDestinationName="sns",
            EventDestination={"MatchingEventTypes": ["SEND"], "SnsDestination": {"TopicArn": TOPIC}})
    refused = [{"MatchingEventTypes": ["SEND"], "SnsDestination": {"TopicArn": TOPIC + "-unmapped"}},
               {"MatchingEventTypes": ["SEND"], "KinesisFirehoseDestination": {
                   "IamRoleArn": "arn:aws:iam::123456789012:role/r",
                   "DeliveryStreamArn": "arn:aws:firehose:us-east-1:123456789012:deliverystream/s"}},
               {"MatchingEventTypes": ["BOGUS"], "SnsDestination": {"TopicArn": TOPIC}},
               {"MatchingEventTypes": ["SEND"]}]
    for definition in refused:
        with pytest.raises(v2.exceptions.BadRequestException):
            v2.create_configuration_set_event_destination(ConfigurationSetName="v2-dest", EventDestinationName="x",
                                                          EventDestination=definition)
    with pytest.raises(v2.exceptions.BadRequestException):
        v2.create_configuration_set_event_destination(
            ConfigurationSetName="v2-dest", EventDestinationName="bad name",
            EventDestination={"MatchingEventTypes": ["SEND"], "SnsDestination": {"TopicArn": TOPIC}})
    with pytest.raises(v2.exceptions.NotFoundException):
        v2.create_configuration_set_event_destination(
            ConfigurationSetName="nope", EventDestinationName="x",
            EventDestination={"MatchingEventTypes": ["SEND"], "SnsDestination": {"TopicArn": TOPIC}})
    # Update: members left out keep their value (the ARN among them).
    v2.update_configuration_set_event_destination(ConfigurationSetName="v2-dest", EventDestinationName="sns",
                                                  EventDestination={"Enabled": False, "MatchingEventTypes": ["BOUNCE"]})
    got = v2.get_configuration_set_event_destinations(ConfigurationSetName="v2-dest")["EventDestinations"]
    assert next(d for d in got if d["Name"] == "sns") == {
        "Name": "sns", "Enabled": False, "MatchingEventTypes": ["BOUNCE"], "SnsDestination": {"TopicArn": TOPIC}}
    with pytest.raises(v2.exceptions.NotFoundException):
        v2.update_configuration_set_event_destination(ConfigurationSetName="v2-dest", EventDestinationName="nope",
                                                      EventDestination={"Enabled": True})
    v2.delete_configuration_set_event_destination(ConfigurationSetName="v2-dest", EventDestinationName="bus")
    with pytest.raises(v2.exceptions.NotFoundException):
        v2.delete_configuration_set_event_destination(ConfigurationSetName="v2-dest", EventDestinationName="bus")
    with pytest.raises(v2.exceptions.NotFoundException):
        v2.get_configuration_set_event_destinations(ConfigurationSetName="nope")
    v2.delete_configuration_set(ConfigurationSetName="v2-dest")


def _show(env: Env, sender: str, set_name: str | None = None) -> dict:
    args = ["tracking", "show", "--sender", sender, "--json"] + (["--config-set", set_name] if set_name else [])
    out = env.relay_cli(*args)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_v2_identity_default_and_engagement_switches(env):
    v2 = env.client("sesv2")
    v2.create_configuration_set(ConfigurationSetName="v2-vdm")
    v2.put_email_identity_configuration_set_attributes(EmailIdentity="news@vdm.example", ConfigurationSetName="v2-vdm")
    assert _show(env, "news@vdm.example")["ConfigurationSet"] == "v2-vdm"
    with pytest.raises(v2.exceptions.NotFoundException):
        v2.put_email_identity_configuration_set_attributes(EmailIdentity="vdm.example", ConfigurationSetName="nope")
    # Engagement metrics are relay's open and click switches, at set level ...
    v2.put_configuration_set_vdm_options(ConfigurationSetName="v2-vdm",
                                         VdmOptions={"DashboardOptions": {"EngagementMetrics": "DISABLED"}})
    settings = _show(env, "news@vdm.example")["Settings"]
    assert settings["open_tracking"] is False and settings["click_tracking"] is False
    assert v2.get_configuration_set(ConfigurationSetName="v2-vdm")["VdmOptions"] == {
        "DashboardOptions": {"EngagementMetrics": "DISABLED"}}
    with pytest.raises(v2.exceptions.BadRequestException):
        v2.put_configuration_set_vdm_options(ConfigurationSetName="v2-vdm",
                                             VdmOptions={"DashboardOptions": {"EngagementMetrics": "MAYBE"}})
    v2.put_configuration_set_vdm_options(ConfigurationSetName="v2-vdm")  # no options: inherit again
    assert "VdmOptions" not in v2.get_configuration_set(ConfigurationSetName="v2-vdm")
    # ... and at account level, which a set without its own switches follows.
    try:
        v2.put_account_vdm_attributes(VdmAttributes={"VdmEnabled": "ENABLED",
                                                     "DashboardAttributes": {"EngagementMetrics": "ENABLED"}})
        shown = _show(env, "news@vdm.example")
        assert shown["Settings"]["open_tracking"] is True
        assert shown["Provenance"]["open_tracking"] == "account (database)"
        v2.put_account_vdm_attributes(VdmAttributes={"VdmEnabled": "DISABLED"})
        assert _show(env, "news@vdm.example")["Settings"]["click_tracking"] is False
        with pytest.raises(v2.exceptions.BadRequestException):
            v2.put_account_vdm_attributes(VdmAttributes={"VdmEnabled": "SOMETIMES"})
    finally:
        env.relay_cli("tracking", "delete", "--account")
    v2.put_email_identity_configuration_set_attributes(EmailIdentity="news@vdm.example")  # no set: removed
    assert _show(env, "news@vdm.example")["ConfigurationSet"] is None
    v2.delete_configuration_set(ConfigurationSetName="v2-vdm")


# --- SES v1 -----------------------------------------------------------------------------------------------------

def test_v1_configuration_sets_and_tracking_options(env):
    v1 = env.client("ses")
    v1.create_configuration_set(ConfigurationSet={"Name": "v1-life"})
    with pytest.raises(v1.exceptions.ConfigurationSetAlreadyExistsException):
        v1.create_configuration_set(ConfigurationSet={"Name": "v1-life"})
    with pytest.raises(v1.exceptions.InvalidConfigurationSetException):
        v1.create_configuration_set(ConfigurationSet={"Name": "no spaces allowed"})
    assert {"Name": "v1-life"} in v1.list_configuration_sets()["ConfigurationSets"]
    v1.create_configuration_set_tracking_options(ConfigurationSetName="v1-life",
                                                 TrackingOptions={"CustomRedirectDomain": "track.example.com"})
    with pytest.raises(v1.exceptions.TrackingOptionsAlreadyExistsException) as exc:
        v1.create_configuration_set_tracking_options(ConfigurationSetName="v1-life",
                                                     TrackingOptions={"CustomRedirectDomain": "t2.example.com"})
    assert code_of(exc) == "TrackingOptionsAlreadyExistsException"
    with pytest.raises(v1.exceptions.InvalidTrackingOptionsException):
        v1.update_configuration_set_tracking_options(ConfigurationSetName="v1-life",
                                                     TrackingOptions={"CustomRedirectDomain": "no_underscores.example"})
    v1.update_configuration_set_tracking_options(ConfigurationSetName="v1-life",
                                                 TrackingOptions={"CustomRedirectDomain": "t2.example.com"})
    got = v1.describe_configuration_set(ConfigurationSetName="v1-life",
                                        ConfigurationSetAttributeNames=["trackingOptions", "eventDestinations"])
    assert got["ConfigurationSet"] == {"Name": "v1-life"} and got["EventDestinations"] == []
    assert got["TrackingOptions"] == {"CustomRedirectDomain": "t2.example.com"}
    assert "TrackingOptions" not in v1.describe_configuration_set(ConfigurationSetName="v1-life")
    v1.delete_configuration_set_tracking_options(ConfigurationSetName="v1-life")
    for call in (lambda: v1.delete_configuration_set_tracking_options(ConfigurationSetName="v1-life"),
                 lambda: v1.update_configuration_set_tracking_options(
                     ConfigurationSetName="v1-life", TrackingOptions={"CustomRedirectDomain": "t.example.com"})):
        with pytest.raises(v1.exceptions.TrackingOptionsDoesNotExistException) as exc:
            call()
        assert code_of(exc) == "TrackingOptionsDoesNotExistException"
    with pytest.raises(ClientError) as exc:
        v1.describe_configuration_set(ConfigurationSetName="v1-life", ConfigurationSetAttributeNames=["colour"])
    assert code_of(exc) == "ValidationError" and "enum value set" in exc.value.response["Error"]["Message"]
    v1.delete_configuration_set(ConfigurationSetName="v1-life")
    for call in (lambda: v1.describe_configuration_set(ConfigurationSetName="v1-life"),
                 lambda: v1.delete_configuration_set(ConfigurationSetName="v1-life"),
                 lambda: v1.create_configuration_set_tracking_options(
                     ConfigurationSetName="v1-life", TrackingOptions={"CustomRedirectDomain": "t.example.com"})):
        with pytest.raises(v1.exceptions.ConfigurationSetDoesNotExistException) as exc:
            call()
        assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
        assert exc.value.response["Error"]["Type"] == "Sender"


def test_v1_event_destinations(env):
    v1 = env.client("ses")
    v1.create_configuration_set(ConfigurationSet={"Name": "v1-dest"})
    sns = {"Name": "sns", "Enabled": True, "MatchingEventTypes": ["send", "click"],
           "SNSDestination": {"TopicARN": TOPIC}}
    v1.create_configuration_set_event_destination(ConfigurationSetName="v1-dest", EventDestination=sns)
    got = v1.describe_configuration_set(ConfigurationSetName="v1-dest",
                                        ConfigurationSetAttributeNames=["eventDestinations"])
    assert got["EventDestinations"] == [sns]
    with pytest.raises(v1.exceptions.EventDestinationAlreadyExistsException):
        v1.create_configuration_set_event_destination(ConfigurationSetName="v1-dest", EventDestination=sns)
    cases = [
        ({**sns, "Name": "x", "SNSDestination": {"TopicARN": TOPIC + "-unmapped"}},
         v1.exceptions.InvalidSNSDestinationException),
        ({"Name": "x", "MatchingEventTypes": ["send"], "KinesisFirehoseDestination": {
            "IAMRoleARN": "arn:aws:iam::123456789012:role/r",
            "DeliveryStreamARN": "arn:aws:firehose:us-east-1:123456789012:deliverystream/s"}},
         v1.exceptions.InvalidFirehoseDestinationException),
        ({"Name": "x", "MatchingEventTypes": ["open"], "CloudWatchDestination": {"DimensionConfigurations": [
            {"DimensionName": "c", "DimensionValueSource": "messageTag", "DefaultDimensionValue": "none"}]}},
         v1.exceptions.InvalidCloudWatchDestinationException),
    ]
    for definition, error in cases:
        with pytest.raises(error):
            v1.create_configuration_set_event_destination(ConfigurationSetName="v1-dest", EventDestination=definition)
    with pytest.raises(ClientError) as exc:
        v1.create_configuration_set_event_destination(
            ConfigurationSetName="v1-dest", EventDestination={**sns, "Name": "x", "MatchingEventTypes": ["bogus"]})
    assert code_of(exc) == "ValidationError"
    with pytest.raises(v1.exceptions.EventDestinationDoesNotExistException):
        v1.update_configuration_set_event_destination(ConfigurationSetName="v1-dest",
                                                      EventDestination={**sns, "Name": "nope"})
    v1.update_configuration_set_event_destination(
        ConfigurationSetName="v1-dest", EventDestination={**sns, "Enabled": False, "MatchingEventTypes": ["delivery"]})
    got = v1.describe_configuration_set(ConfigurationSetName="v1-dest",
                                        ConfigurationSetAttributeNames=["eventDestinations"])["EventDestinations"]
    assert got == [{**sns, "Enabled": False, "MatchingEventTypes": ["delivery"]}]
    v1.delete_configuration_set_event_destination(ConfigurationSetName="v1-dest", EventDestinationName="sns")
    with pytest.raises(v1.exceptions.EventDestinationDoesNotExistException):
        v1.delete_configuration_set_event_destination(ConfigurationSetName="v1-dest", EventDestinationName="sns")
    with pytest.raises(v1.exceptions.ConfigurationSetDoesNotExistException):
        v1.create_configuration_set_event_destination(ConfigurationSetName="nope", EventDestination=sns)
    v1.delete_configuration_set(ConfigurationSetName="v1-dest")


def test_v2_made_described_by_v1_and_the_reverse(env):
    v1, v2 = env.client("ses"), env.client("sesv2")
    v2.create_configuration_set(ConfigurationSetName="from-v2",
                                TrackingOptions={"CustomRedirectDomain": "track.example.com",
                                                 "HttpsPolicy": "OPTIONAL"})
    v2.create_configuration_set_event_destination(
        ConfigurationSetName="from-v2", EventDestinationName="d",
        EventDestination={"Enabled": True, "MatchingEventTypes": ["OPEN", "DELIVERY_DELAY", "RENDERING_FAILURE"],
                          "SnsDestination": {"TopicArn": TOPIC}})
    got = v1.describe_configuration_set(ConfigurationSetName="from-v2",
                                        ConfigurationSetAttributeNames=["eventDestinations", "trackingOptions"])
    assert got["TrackingOptions"] == {"CustomRedirectDomain": "track.example.com"}
    assert got["EventDestinations"] == [{"Name": "d", "Enabled": True,
                                         "MatchingEventTypes": ["open", "deliveryDelay", "renderingFailure"],
                                         "SNSDestination": {"TopicARN": TOPIC}}]
    # v2 has its own tracking options: v1 sees them as existing.
    with pytest.raises(v1.exceptions.TrackingOptionsAlreadyExistsException):
        v1.create_configuration_set_tracking_options(ConfigurationSetName="from-v2",
                                                     TrackingOptions={"CustomRedirectDomain": "t.example.com"})
    v1.create_configuration_set(ConfigurationSet={"Name": "from-v1"})
    v1.create_configuration_set_tracking_options(ConfigurationSetName="from-v1",
                                                 TrackingOptions={"CustomRedirectDomain": "t1.example.com"})
    v1.create_configuration_set_event_destination(
        ConfigurationSetName="from-v1", EventDestination={"Name": "d", "Enabled": True,
                                                          "MatchingEventTypes": ["bounce", "renderingFailure"],
                                                          "SNSDestination": {"TopicARN": TOPIC}})
    assert v2.get_configuration_set(ConfigurationSetName="from-v1")["TrackingOptions"] == {
        "CustomRedirectDomain": "t1.example.com"}
    assert v2.get_configuration_set_event_destinations(ConfigurationSetName="from-v1")["EventDestinations"] == [
        {"Name": "d", "Enabled": True, "MatchingEventTypes": ["BOUNCE", "RENDERING_FAILURE"],
         "SnsDestination": {"TopicArn": TOPIC}}]
    v2.delete_configuration_set(ConfigurationSetName="from-v1")
    v1.delete_configuration_set(ConfigurationSetName="from-v2")


def test_one_store_with_the_cli_and_toml_sets_are_read_only(env):
    v1, v2 = env.client("ses"), env.client("sesv2")
    v2.create_configuration_set(ConfigurationSetName="api-made")
    listed = env.relay_cli("config-set", "list").stdout
    assert "api-made\tdatabase" in listed and "marketing\tconfig" in listed
    assert env.relay_cli("config-set", "create", "cli-made").returncode == 0
    assert "cli-made" in v2.list_configuration_sets()["ConfigurationSets"]
    assert v1.describe_configuration_set(ConfigurationSetName="cli-made")["ConfigurationSet"] == {"Name": "cli-made"}
    # TOML-provisioned sets are shown, never changed here.
    assert v2.get_configuration_set(ConfigurationSetName="marketing")["VdmOptions"] == {
        "DashboardOptions": {"EngagementMetrics": "ENABLED"}}
    with pytest.raises(v2.exceptions.BadRequestException) as exc:
        v2.delete_configuration_set(ConfigurationSetName="marketing")
    assert "read-only" in exc.value.response["Error"]["Message"]
    with pytest.raises(v1.exceptions.InvalidConfigurationSetException):
        v1.create_configuration_set_tracking_options(ConfigurationSetName="marketing",
                                                     TrackingOptions={"CustomRedirectDomain": "t.example.com"})
    with pytest.raises(v2.exceptions.AlreadyExistsException):
        v2.create_configuration_set(ConfigurationSetName="marketing")
    v1.delete_configuration_set(ConfigurationSetName="cli-made")
    assert env.relay_cli("config-set", "delete", "api-made").returncode == 0
    with pytest.raises(v2.exceptions.NotFoundException):
        v2.get_configuration_set(ConfigurationSetName="api-made")


# --- authentication ---------------------------------------------------------------------------------------------

def _signed(env: Env, method: str, path: str, body: bytes, headers: dict, secret: str = SECRET,
            when: datetime | None = None) -> AWSRequest:
    request = AWSRequest(method=method, url=env.endpoint + path, data=body, headers=headers)
    signer = botocore.auth.SigV4Auth(Credentials(KEY_ID, secret), "ses", REGION)
    if when is None:
        signer.add_auth(request)
    else:
        with mock.patch("botocore.auth.get_current_datetime", return_value=when.replace(tzinfo=None)):
            signer.add_auth(request)
    return request


def _send(request: AWSRequest, body: bytes | None = None) -> tuple[int, bytes, dict]:
    prepared = request.prepare()
    headers = dict(prepared.headers)
    data = prepared.body if body is None else body
    raw = urllib.request.Request(prepared.url, data=data, method=prepared.method, headers=headers)
    try:
        with urllib.request.urlopen(raw, timeout=10) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


V1_FORM = {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}


def test_credentials_signatures_and_dates_are_checked(env):
    for service in ("ses", "sesv2"):
        with pytest.raises(ClientError) as exc:
            env.client(service, secret="wrong-secret-0123456789").list_configuration_sets()
        assert code_of(exc) == "SignatureDoesNotMatch"
        assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
        with pytest.raises(ClientError) as exc:
            env.client(service, key="AKIDUNKNOWN").list_configuration_sets()
        assert code_of(exc) == {"ses": "InvalidClientTokenId", "sesv2": "UnrecognizedClientException"}[service]
        with pytest.raises(ClientError) as exc:
            env.client(service, region="eu-west-1").list_configuration_sets()
        assert code_of(exc) == "SignatureDoesNotMatch" and "region" in exc.value.response["Error"]["Message"]
    # Good requests pass through this path too.
    body = b"Action=CreateConfigurationSet&Version=2010-12-01&ConfigurationSet.Name=signed-set"
    status, data, _ = _send(_signed(env, "POST", "/", body, V1_FORM))
    assert status == 200 and b"<CreateConfigurationSetResult/>" in data
    # A tampered body (one byte) is refused, and nothing happens.
    body = b"Action=CreateConfigurationSet&Version=2010-12-01&ConfigurationSet.Name=tampered1"
    status, data, _ = _send(_signed(env, "POST", "/", body, V1_FORM), body.replace(b"tampered1", b"tampered2"))
    assert status == 403 and b"<Code>SignatureDoesNotMatch</Code>" in data
    status, data, headers = _send(_signed(env, "PUT", "/v2/email/configuration-sets/signed-set/tracking-options",
                                          b'{"CustomRedirectDomain": "a.example.com"}',
                                          {"Content-Type": "application/json"}),
                                  b'{"CustomRedirectDomain": "b.example.com"}')
    assert status == 403 and headers["x-amzn-ErrorType"] == "SignatureDoesNotMatch"
    # An expired date (20 minutes old), correctly signed.
    old = datetime.now(UTC) - timedelta(minutes=20)
    status, data, _ = _send(_signed(env, "GET", "/v2/email/configuration-sets", b"", {}, when=old))
    assert status == 403 and b"Signature expired" in data
    # Unsigned requests never succeed.
    for path, data_, headers in (("/", b"Action=ListConfigurationSets&Version=2010-12-01", V1_FORM),
                                 ("/v2/email/configuration-sets", None, {})):
        req = urllib.request.Request(env.endpoint + path, data=data_, headers=headers)
        with pytest.raises(urllib.error.HTTPError) as http:
            urllib.request.urlopen(req, timeout=10)
        err_type = http.value.headers.get("x-amzn-ErrorType") or ""
        assert http.value.code == 403
        body = http.value.read()
        assert b"<Code>MissingAuthenticationToken</Code>" in body or err_type == "MissingAuthenticationToken"
    # Session tokens: relay issues none.
    session = boto3.session.Session(aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET,
                                    aws_session_token="FQoGZXIvYXdzEXAMPLETOKEN", region_name=REGION)
    with pytest.raises(ClientError) as exc:
        session.client("ses", endpoint_url=env.endpoint).list_configuration_sets()
    assert code_of(exc) == "InvalidClientTokenId"
    env.client("sesv2").delete_configuration_set(ConfigurationSetName="signed-set")
    names = env.client("sesv2").list_configuration_sets()["ConfigurationSets"]
    assert "tampered1" not in names and "tampered2" not in names


# --- the aws CLI ------------------------------------------------------------------------------------------------

def _aws(env: Env, *args: str) -> subprocess.CompletedProcess:
    cli_env = {"PATH": os.environ.get("PATH", ""), "HOME": str(env.relay.workdir), "AWS_ACCESS_KEY_ID": KEY_ID,
               "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_CONFIG_FILE": "/dev/null",
               "AWS_SHARED_CREDENTIALS_FILE": "/dev/null", "AWS_DEFAULT_REGION": REGION, "AWS_MAX_ATTEMPTS": "1"}
    return subprocess.run(["aws", *args, "--endpoint-url", env.endpoint, "--output", "json"], capture_output=True,
                          text=True, env=cli_env, timeout=60)


# The aws CLI's own wire forms, on SQLite only: the store works it asks for are the ones the boto3 tests run on
# both backends, and each aws call costs a second of CPU.
@pytest.mark.parametrize("module_store_url", ["sqlite"], indirect=True)
@pytest.mark.skipif(shutil.which("aws") is None, reason="the aws CLI is not installed (pip install awscli)")
def test_the_aws_cli(env):
    out = _aws(env, "sesv2", "create-configuration-set", "--configuration-set-name", "cli-set",
               "--tracking-options", "CustomRedirectDomain=track.example.com,HttpsPolicy=OPTIONAL")
    assert out.returncode == 0, out.stderr
    out = _aws(env, "sesv2", "create-configuration-set-event-destination", "--configuration-set-name", "cli-set",
               "--event-destination-name", "sns", "--event-destination",
               json.dumps({"Enabled": True, "MatchingEventTypes": ["OPEN", "CLICK"],
                           "SnsDestination": {"TopicArn": TOPIC}}))
    assert out.returncode == 0, out.stderr
    out = _aws(env, "sesv2", "get-configuration-set-event-destinations", "--configuration-set-name", "cli-set")
    assert json.loads(out.stdout)["EventDestinations"][0]["SnsDestination"] == {"TopicArn": TOPIC}
    out = _aws(env, "ses", "describe-configuration-set", "--configuration-set-name", "cli-set",
               "--configuration-set-attribute-names", "eventDestinations", "trackingOptions")
    got = json.loads(out.stdout)
    assert got["TrackingOptions"] == {"CustomRedirectDomain": "track.example.com"}
    assert got["EventDestinations"][0]["MatchingEventTypes"] == ["open", "click"]
    out = _aws(env, "ses", "create-configuration-set-tracking-options", "--configuration-set-name", "cli-set",
               "--tracking-options", "CustomRedirectDomain=t2.example.com")
    assert out.returncode != 0 and "TrackingOptionsAlreadyExistsException" in out.stderr
    out = _aws(env, "ses", "list-configuration-sets", "--page-size", "1")
    assert {"Name": "cli-set"} in json.loads(out.stdout)["ConfigurationSets"]
    out = _aws(env, "sesv2", "delete-configuration-set", "--configuration-set-name", "cli-set")
    assert out.returncode == 0, out.stderr
    out = _aws(env, "sesv2", "get-configuration-set", "--configuration-set-name", "cli-set")
    assert out.returncode != 0 and "NotFoundException" in out.stderr


# --- end to end -------------------------------------------------------------------------------------------------

class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def test_click_reaches_the_sns_mapped_webhook(env):
    v2 = env.client("sesv2")
    v2.create_configuration_set(ConfigurationSetName="e2e")
    # An enabled destination matching CLICK turns click tracking on (SES).
    v2.create_configuration_set_event_destination(
        ConfigurationSetName="e2e", EventDestinationName="clicks",
        EventDestination={"Enabled": True, "MatchingEventTypes": ["CLICK"], "SnsDestination": {"TopicArn": TOPIC}})
    seen = len(env.upstream.messages)
    message_id = submit(env.relay.smtp_port, MESSAGE, "e2e")
    delivered = env.upstream.wait_for(seen + 1)[-1].data
    html = email.message_from_bytes(delivered, policy=email.policy.default).get_body(("html",)).get_content()
    link = re.search(rf'href="(http://127\.0\.0\.1:{env.relay.tracking_port}/c/[^"]+)"', html).group(1)
    opener = urllib.request.build_opener(_NoRedirect)
    with pytest.raises(urllib.error.HTTPError) as exc:
        opener.open(link, timeout=10)
    assert exc.value.code == 302 and exc.value.headers["Location"] == "https://example.com/x"

    def clicks() -> list[dict]:
        with env.hook.lock:
            got = [(json.loads(body), headers) for _, body, headers, status, _ in env.hook.got]
        return [(n, h) for n, h in got if json.loads(n["Message"])["eventType"] == "Click"]

    wait_until(lambda: clicks(), timeout=20, what="the Click event at the webhook")
    notification, headers = clicks()[0]
    record = json.loads(notification["Message"])
    assert notification["Type"] == "Notification" and notification["TopicArn"] == TOPIC
    assert record["mail"]["messageId"] == message_id and record["click"]["link"] == "https://example.com/x"
    assert "X-Relay-Signature" in headers
    v2.delete_configuration_set(ConfigurationSetName="e2e")


def test_list_configuration_sets_in_both_wire_forms(env):
    """botocore up to 1.43 lists with GET and a query string; 1.44 with POST and a JSON body (and a filter)."""
    v2 = env.client("sesv2")
    v2.create_configuration_set(ConfigurationSetName="wire-form-alpha")
    status, body, _ = _send(_signed(env, "GET", "/v2/email/configuration-sets?PageSize=1000", b"", {}))
    assert status == 200 and "wire-form-alpha" in json.loads(body)["ConfigurationSets"]
    payload = json.dumps({"PageSize": 1000, "Filter": {"CONFIGURATION_SET_NAME_CONTAINS": "wire-form"}}).encode()
    status, body, _ = _send(_signed(env, "POST", "/v2/email/list-configuration-sets", payload,
                                    {"Content-Type": "application/json"}))
    assert status == 200 and json.loads(body)["ConfigurationSets"] == ["wire-form-alpha"]
    v2.delete_configuration_set(ConfigurationSetName="wire-form-alpha")
