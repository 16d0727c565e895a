"""Sending through the SES API (v1 and v2) with boto3 and the aws CLI: relay as a subprocess, a real upstream, a
webhook receiver. Every API message takes the SMTP path: configuration set, tags, suppression list, tracking
(pixel, wrapped links), DKIM, durable before the MessageId, the same events; templates render as SES's guide
shows; a Rendering Failure reaches the set's webhook; bad input gets SES's error and queues nothing.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import dkim
import pytest
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from relay.core import dkim as relay_dkim

from .harness import Upstream, free_port, wait_port
from .test_api import TOPIC, ApiRelay, Env, _aws, _send, _signed, api_toml, code_of
from .test_destinations import Receiver, wait_until
from .test_templates import MY_TEMPLATE, PREFERENCES, PREFERENCES2_HTML

SENDER = "News <news@example.com>"
HTML = '<p>Hello</p><a href="https://shop.example.com/sale?a=1">Sale</a>'


@dataclass
class SendEnv(Env):
    dkim_record: bytes = b""

    def messages_count(self) -> int:
        with contextlib.closing(self.relay.db()) as conn:
            return conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0]

    def verify_dkim(self, data: bytes) -> bool:
        return dkim.verify(data, dnsfunc=lambda name, timeout=5: self.dkim_record)

    def hook_records(self, event_type: str) -> list[dict]:
        with self.hook.lock:
            bodies = [json.loads(body) for _, body, _, _, _ in self.hook.got]
        records = [json.loads(b["Message"]) if "Message" in b else b for b in bodies]
        return [r for r in records if r["eventType"] == event_type]


def dkim_key(folder: Path) -> tuple[str, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = folder / "example.com.s1.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    record = relay_dkim.key_record(relay_dkim.load_private_key(path.read_bytes())).encode()
    return f'[[dkim.keys]]\ndomain = "example.com"\nselector = "s1"\nprivate_key_file = "{path}"\n', record


@contextlib.contextmanager
def send_env(folder: Path, api_extra: str = ""):
    """relay with the API, a DKIM key for example.com, an upstream and a webhook (the SNS topic TOPIC)."""
    folder.mkdir(parents=True, exist_ok=True)
    upstream = Upstream().start()
    hook = Receiver().start()
    api_port = free_port()
    dkim_toml, record = dkim_key(folder)
    toml = api_toml(api_port, hook.port).replace('regions = ["us-east-1"]\n', f'regions = ["us-east-1"]\n{api_extra}')
    relay = ApiRelay(folder / "relay", upstream.port, extra=toml + dkim_toml,
                     tracking_extra="require_verified_domains = false")
    relay.start()
    try:
        wait_port(api_port, proc=relay.proc)
        yield SendEnv(relay, upstream, hook, api_port, record)
    finally:
        relay.stop()
        hook.stop()
        upstream.stop()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with send_env(tmp_path_factory.mktemp("send"), "max_message_size = 200000\n") as e:
        v2 = e.client("sesv2")
        v2.create_configuration_set(ConfigurationSetName="sends")  # OPEN, CLICK, ... at the webhook: tracked
        v2.create_configuration_set_event_destination(
            ConfigurationSetName="sends", EventDestinationName="hook",
            EventDestination={"Enabled": True, "SnsDestination": {"TopicArn": TOPIC},
                              "MatchingEventTypes": ["SEND", "DELIVERY", "OPEN", "CLICK", "RENDERING_FAILURE",
                                                     "BOUNCE"]})
        yield e


def wait_delivered(env: SendEnv, before: int, count: int = 1) -> list:
    return env.upstream.wait_for(before + count)[before:before + count]


def parsed(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)


def tracked(env: SendEnv, data: bytes) -> tuple[list[str], list[str]]:
    html = parsed(data).get_body(("html",)).get_content()
    port = env.relay.tracking_port
    return (re.findall(rf'href="(http://127\.0\.0\.1:{port}/c/[^"]+)"', html),
            re.findall(rf'src="(http://127\.0\.0\.1:{port}/o/[^"]+)"', html))


def events_of(env: SendEnv, message_id: str) -> list[dict]:
    return [json.loads(r[4]) for r in env.relay.events() if r[1] == message_id]


# --- sending ------------------------------------------------------------------------------------------------------

def test_v2_simple_send_is_tracked_signed_and_recorded(env):
    v2 = env.client("sesv2")
    before = len(env.upstream.messages)
    message_id = v2.send_email(
        FromEmailAddress=SENDER, Destination={"ToAddresses": ["ann@example.org"], "CcAddresses": ["bob@example.org"],
                                              "BccAddresses": ["carol@example.org"]},
        ReplyToAddresses=["help@example.com"], ConfigurationSetName="sends",
        EmailTags=[{"Name": "campaign", "Value": "spring"}],
        Content={"Simple": {"Subject": {"Data": "Spring sale: 20% off, ünïcode"},
                            "Body": {"Text": {"Data": "Hello\nhttps://shop.example.com/sale"}, "Html": {"Data": HTML}},
                            "Headers": [{"Name": "X-Campaign", "Value": "spring"}]}})["MessageId"]
    assert re.fullmatch(r"0100[0-9a-f]{12}-[0-9a-f-]{36}-000000", message_id)
    copies = {m.rcpt_tos[0]: m for m in wait_delivered(env, before, 3)}
    assert set(copies) == {"ann@example.org", "bob@example.org", "carol@example.org"}
    for rcpt, got in copies.items():
        assert got.mail_from == "news@example.com"
        assert env.verify_dkim(got.data), rcpt
        message = parsed(got.data)
        assert message["Subject"] == "Spring sale: 20% off, ünïcode" and message["Cc"] == "bob@example.org"
        assert message["Bcc"] is None and message["Reply-To"] == "help@example.com"
        assert message["X-Campaign"] == "spring" and message["Date"] and message["Message-ID"]
        assert b"X-SES" not in got.data
        links, pixels = tracked(env, got.data)
        assert len(links) == 1 and len(pixels) == 1, rcpt
        assert max(len(line) for line in got.data.split(b"\r\n")) <= 998
    wait_until(lambda: len([e for e in events_of(env, message_id) if e["eventType"] == "Delivery"]) == 3)
    send, = [e for e in events_of(env, message_id) if e["eventType"] == "Send"]
    mail = send["mail"]
    assert mail["destination"] == ["ann@example.org", "bob@example.org", "carol@example.org"]
    assert mail["source"] == "news@example.com" and mail["commonHeaders"]["messageId"] == message_id
    assert mail["commonHeaders"]["subject"] == "Spring sale: 20% off, ünïcode"
    assert mail["tags"]["ses:operation"] == ["SendEmail"] and mail["tags"]["campaign"] == ["spring"]
    assert mail["tags"]["ses:configuration-set"] == ["sends"]
    assert mail["tags"]["ses:caller-identity"] == ["AKIDRELAYTEST"]  # the access key, as SES names the IAM user
    wait_until(lambda: any(r["mail"]["messageId"] == message_id for r in env.hook_records("Send")),
               what="the Send at the webhook")


def test_v1_send_email_raw_email_and_a_raw_attachment(env):
    v1 = env.client("ses")
    before = len(env.upstream.messages)
    first = v1.send_email(Source=SENDER, Destination={"ToAddresses": ["ann@example.org"]},
                          Message={"Subject": {"Data": "v1 simple"}, "Body": {"Html": {"Data": HTML}}},
                          ConfigurationSetName="sends", Tags=[{"Name": "kind", "Value": "v1"}])["MessageId"]
    raw = (b"From: News <news@example.com>\r\nTo: dave@example.org\r\nSubject: v1 raw\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/mixed; boundary=b1\r\n\r\n--b1\r\nContent-Type: text/html\r\n\r\n"
           + HTML.encode() + b"\r\n--b1\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment;"
           b" filename=a.pdf\r\nContent-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n--b1--\r\n")
    second = v1.send_raw_email(RawMessage={"Data": raw}, ConfigurationSetName="sends")["MessageId"]
    third = v1.send_raw_email(Source="news@example.com", Destinations=["erin@example.org"], RawMessage={"Data": raw},
                              Tags=[{"Name": "kind", "Value": "raw"}])["MessageId"]
    copies = {m.rcpt_tos[0]: m for m in wait_delivered(env, before, 3)}
    assert set(copies) == {"ann@example.org", "dave@example.org", "erin@example.org"}
    assert parsed(copies["ann@example.org"].data)["Subject"] == "v1 simple"
    attached = [a.get_filename() for a in parsed(copies["dave@example.org"].data).iter_attachments()]
    assert attached == ["a.pdf"] and len(tracked(env, copies["dave@example.org"].data)[0]) == 1
    assert tracked(env, copies["erin@example.org"].data) == ([], [])  # no set: not instrumented (SES)
    assert all(env.verify_dkim(m.data) for m in copies.values())
    ops = {mid: events_of(env, mid)[0]["mail"]["tags"] for mid in (first, second, third)}
    assert ops[first]["ses:operation"] == ["SendEmail"] and ops[first]["kind"] == ["v1"]
    assert ops[second]["ses:operation"] == ["SendRawEmail"] and "kind" not in ops[second]
    assert ops[third]["kind"] == ["raw"] and "ses:configuration-set" not in ops[third]


def test_v2_raw_content_and_attachments(env):
    v2 = env.client("sesv2")
    before = len(env.upstream.messages)
    raw = b"From: news@example.com\r\nTo: ann@example.org\r\nSubject: v2 raw\r\n\r\nplain body\r\n"
    v2.send_email(Content={"Raw": {"Data": raw}})
    v2.send_email(FromEmailAddress="news@example.com", Destination={"ToAddresses": ["bob@example.org"]},
                  Content={"Simple": {"Subject": {"Data": "with files"}, "Body": {"Text": {"Data": "see attached"}},
                                      "Attachments": [{"FileName": "notes.txt", "RawContent": b"some notes\n",
                                                       "ContentType": "text/plain"},
                                                      {"FileName": "logo.png", "RawContent": b"\x89PNG\r\n",
                                                       "ContentDisposition": "INLINE", "ContentId": "logo"}]}})
    copies = {m.rcpt_tos[0]: m for m in wait_delivered(env, before, 2)}
    assert copies["ann@example.org"].data.endswith(b"\r\n\r\nplain body\r\n")
    files = {a.get_filename(): a.get_content() for a in parsed(copies["bob@example.org"].data).iter_attachments()}
    assert files == {"notes.txt": "some notes\n", "logo.png": b"\x89PNG\r\n"}


def test_a_suppressed_recipient_is_bounced_at_acceptance(env):
    v2 = env.client("sesv2")
    v2.put_suppressed_destination(EmailAddress="gone@example.org", Reason="BOUNCE")
    before = len(env.upstream.messages)
    message_id = v2.send_email(FromEmailAddress=SENDER, ConfigurationSetName="sends",
                               Destination={"ToAddresses": ["gone@example.org", "ann@example.org"]},
                               Content={"Simple": {"Subject": {"Data": "s"}, "Body": {"Text": {"Data": "t"}}}})[
        "MessageId"]
    assert [m.rcpt_tos for m in wait_delivered(env, before, 1)] == [["ann@example.org"]]
    bounce = next(e for e in events_of(env, message_id) if e["eventType"] == "Bounce")
    assert bounce["bounce"]["bounceSubType"] == "OnAccountSuppressionList"
    v2.delete_suppressed_destination(EmailAddress="gone@example.org")


# --- SES's errors; nothing queued ---------------------------------------------------------------------------------

def test_bad_input_gets_ses_errors_and_queues_nothing(env):
    v1, v2 = env.client("ses"), env.client("sesv2")
    before = env.messages_count()
    simple = {"Simple": {"Subject": {"Data": "s"}, "Body": {"Text": {"Data": "t"}}}}
    many = [f"r{i}@example.org" for i in range(51)]
    cases = [
        (lambda: v2.send_email(FromEmailAddress=SENDER, Destination={"ToAddresses": many}, Content=simple),
         "BadRequestException", "Recipient count exceeds 50."),
        (lambda: v1.send_email(Source=SENDER, Destination={"ToAddresses": many[:30], "BccAddresses": many[30:]},
                               Message={"Subject": {"Data": "s"}, "Body": {"Text": {"Data": "t"}}}),
         "InvalidParameterValue", "Recipient count exceeds 50."),
        (lambda: v2.send_email(FromEmailAddress=SENDER, Destination={"ToAddresses": ["nobody"]}, Content=simple),
         "BadRequestException", "Missing final '@domain'"),
        (lambda: v1.send_email(Source="news", Destination={"ToAddresses": ["a@example.org"]},
                               Message={"Subject": {"Data": "s"}, "Body": {"Text": {"Data": "t"}}}),
         "InvalidParameterValue", "Missing final '@domain'"),
        (lambda: v2.send_email(FromEmailAddress=SENDER, Destination={"ToAddresses": ["a@example.org"]},
                               ConfigurationSetName="no-such-set", Content=simple),
         "NotFoundException", "Configuration set <no-such-set> does not exist."),
        (lambda: v1.send_email(Source=SENDER, Destination={"ToAddresses": ["a@example.org"]},
                               ConfigurationSetName="no-such-set",
                               Message={"Subject": {"Data": "s"}, "Body": {"Text": {"Data": "t"}}}),
         "ConfigurationSetDoesNotExist", "Configuration set <no-such-set> does not exist."),
        (lambda: v2.send_email(FromEmailAddress=SENDER, Destination={"ToAddresses": ["a@example.org"]},
                               Content={"Simple": {"Subject": {"Data": "big"},
                                                   "Body": {"Text": {"Data": "x" * 300_000}}}}),
         "MessageRejected", "Message length is more than 200000 bytes long"),
        (lambda: v2.send_email(FromEmailAddress=SENDER, Destination={"ToAddresses": ["a@example.org"]},
                               EmailTags=[{"Name": "bad tag", "Value": "x"}], Content=simple),
         "MessageRejected", "Invalid message tag name 'bad tag'"),
        (lambda: v1.send_raw_email(RawMessage={"Data": b"Subject: no sender, no recipient\r\n\r\nx\r\n"}),
         "InvalidParameterValue", "Missing required header 'From'."),
        (lambda: v1.send_raw_email(RawMessage={"Data": b"From: a@example.com\r\nSubject: nobody\r\n\r\nx\r\n"}),
         "InvalidParameterValue", "Missing required header 'To'."),
        (lambda: v2.send_email(FromEmailAddress=SENDER, Destination={"ToAddresses": ["a@example.org"]},
                               Content={"Simple": {"Subject": {"Data": "s"}, "Body": {}}}),
         "BadRequestException", "Text part, an Html part, or both"),
        (lambda: v2.send_email(FromEmailAddress=SENDER, Destination={"ToAddresses": ["a@example.org"]},
                               Content={}), "BadRequestException", "exactly one of Simple, Raw or Template"),
    ]
    for call, code, text in cases:
        with pytest.raises(ClientError) as exc:
            call()
        assert code_of(exc) == code, exc.value.response
        assert text in exc.value.response["Error"]["Message"]
    # Missing fields (botocore checks required members itself; these come from hand-made requests) and base64.
    body = json.dumps({"Destination": {"ToAddresses": ["a@example.org"]}}).encode()
    status, data, headers = _send(_signed(env, "POST", "/v2/email/outbound-emails", body,
                                          {"Content-Type": "application/json"}))
    assert status == 400 and headers["x-amzn-ErrorType"] == "BadRequestException" and b"'content'" in data
    body = json.dumps({"Content": {"Raw": {"Data": "not base64!!"}}}).encode()
    status, data, headers = _send(_signed(env, "POST", "/v2/email/outbound-emails", body,
                                          {"Content-Type": "application/json"}))
    assert status == 400 and b"Invalid base64" in data
    form = b"Action=SendRawEmail&Version=2010-12-01&RawMessage.Data=%25%25%25"
    status, data, _ = _send(_signed(env, "POST", "/", form,
                                    {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}))
    assert status == 400 and b"<Code>InvalidParameterValue</Code>" in data and b"Invalid base64" in data
    form = b"Action=SendEmail&Version=2010-12-01&Destination.ToAddresses.member.1=a%40example.org"
    status, data, _ = _send(_signed(env, "POST", "/", form,
                                    {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}))
    assert status == 400 and b"<Code>ValidationError</Code>" in data and b"'source'" in data
    assert env.messages_count() == before


def test_a_raw_message_over_the_raw_limit_is_rejected(tmp_path):
    with send_env(tmp_path, "max_raw_message_size = 50000\n") as e:
        raw = b"From: news@example.com\r\nTo: a@example.org\r\nSubject: big\r\n\r\n" + b"x" * 60_000 + b"\r\n"
        with pytest.raises(ClientError) as exc:
            e.client("sesv2").send_email(Content={"Raw": {"Data": raw}})
        assert code_of(exc) == "MessageRejected"
        assert exc.value.response["Error"]["Message"].startswith("Message length is more than 50000 bytes long")
        assert e.messages_count() == 0
        e.client("sesv2").send_email(Content={"Raw": {"Data": raw[:40_000]}})
        assert e.messages_count() == 1


# --- templates ----------------------------------------------------------------------------------------------------

def rendered_parts(text: str) -> tuple[str, str | None, str | None]:
    """Subject, text and HTML of TestRenderTemplate's message, line ends as LF (XML makes CRLF LF in transit)."""
    message = email.message_from_string(text, policy=email.policy.default)
    plain, html = message.get_body(("plain",)), message.get_body(("html",))
    return (str(message["Subject"]), plain.get_content().replace("\r\n", "\n") if plain else None,
            html.get_content().replace("\r\n", "\n") if html else None)


def test_templates_v1_and_v2_share_one_store(env):
    v1, v2 = env.client("ses"), env.client("sesv2")
    v1.create_template(Template={"TemplateName": "MyTemplate", "SubjectPart": MY_TEMPLATE.subject,
                                 "HtmlPart": MY_TEMPLATE.html, "TextPart": MY_TEMPLATE.text})
    got = v2.get_email_template(TemplateName="MyTemplate")
    assert got["TemplateContent"] == {"Subject": MY_TEMPLATE.subject, "Text": MY_TEMPLATE.text,
                                      "Html": MY_TEMPLATE.html}
    with pytest.raises(v2.exceptions.AlreadyExistsException):
        v2.create_email_template(TemplateName="MyTemplate", TemplateContent={"Subject": "x"})
    with pytest.raises(v1.exceptions.AlreadyExistsException):
        v1.create_template(Template={"TemplateName": "MyTemplate", "SubjectPart": "x"})
    v2.create_email_template(TemplateName="Preferences", TemplateContent={
        "Subject": PREFERENCES.subject, "Text": PREFERENCES.text, "Html": PREFERENCES.html})
    listed = v1.list_templates()["TemplatesMetadata"]
    assert {"MyTemplate", "Preferences"} <= {t["Name"] for t in listed}
    assert {t["TemplateName"] for t in v2.list_email_templates()["TemplatesMetadata"]} >= {"MyTemplate"}
    pages, token = [], None
    for _ in range(10):
        resp = v2.list_email_templates(PageSize=1, **({"NextToken": token} if token else {}))
        pages += [t["TemplateName"] for t in resp["TemplatesMetadata"]]
        token = resp.get("NextToken")
        if not token:
            break
    assert pages == sorted(pages) and {"MyTemplate", "Preferences"} <= set(pages)
    # SES's guide: MyTemplate with Alejandro's data renders as SES shows it
    out = v1.test_render_template(TemplateName="MyTemplate",
                                  TemplateData='{ "name":"Alejandro", "favoriteanimal": "alligator" }')
    assert rendered_parts(out["RenderedTemplate"]) == (
        "Greetings, Alejandro!", "Dear Alejandro,\nYour favorite animal is alligator.\n",
        "<h1>Hello Alejandro,</h1><p>Your favorite animal is alligator.</p>\n")
    out = v2.test_render_email_template(TemplateName="Preferences", TemplateData=json.dumps(
        {"meta": {"userId": "51806220607"}, "contact": {"firstName": "Anaya", "lastName": "Iyengar"},
         "subscription": [{"interest": "Sports"}, {"interest": "Travel"}, {"interest": "Cooking"}]}))
    subject, text, html = rendered_parts(out["RenderedTemplate"])
    assert subject == "Subscription Preferences for Anaya Iyengar" and "<li>Travel</li>" in html
    with pytest.raises(ClientError) as exc:
        v1.test_render_template(TemplateName="MyTemplate", TemplateData='{"name": "x"}')
    assert code_of(exc) == "MissingRenderingAttribute"
    assert exc.value.response["Error"]["Message"] == ("Attribute 'favoriteanimal' is not present in the rendering"
                                                      " data.")
    with pytest.raises(v2.exceptions.BadRequestException):
        v2.test_render_email_template(TemplateName="MyTemplate", TemplateData="not json")
    with pytest.raises(v1.exceptions.InvalidRenderingParameterException):
        v1.test_render_template(TemplateName="MyTemplate", TemplateData="[1]")
    with pytest.raises(v1.exceptions.TemplateDoesNotExistException):
        v1.get_template(TemplateName="Nope")
    with pytest.raises(v2.exceptions.NotFoundException):
        v2.get_email_template(TemplateName="Nope")
    with pytest.raises(v1.exceptions.InvalidTemplateException):
        v1.create_template(Template={"TemplateName": "Broken", "SubjectPart": "{{#if x}}unclosed"})
    with pytest.raises(v2.exceptions.BadRequestException):
        v2.create_email_template(TemplateName="bad name!", TemplateContent={"Subject": "x"})
    v2.update_email_template(TemplateName="Preferences", TemplateContent={"Subject": "Updated {{contact.firstName}}"})
    assert v1.get_template(TemplateName="Preferences")["Template"] == {"TemplateName": "Preferences",
                                                                       "SubjectPart": "Updated {{contact.firstName}}"}
    with pytest.raises(v1.exceptions.TemplateDoesNotExistException):
        v1.update_template(Template={"TemplateName": "Nope", "SubjectPart": "x"})
    v1.delete_template(TemplateName="Preferences")
    v1.delete_template(TemplateName="Preferences")  # v1: no error for a template that is not there
    with pytest.raises(v2.exceptions.NotFoundException):
        v2.delete_email_template(TemplateName="Preferences")


def test_templated_sends_and_rendering_failures_reach_the_webhook(env):
    v1, v2 = env.client("ses"), env.client("sesv2")
    with contextlib.suppress(ClientError):
        v2.create_email_template(TemplateName="Greeting", TemplateContent={
            "Subject": MY_TEMPLATE.subject, "Text": MY_TEMPLATE.text, "Html": MY_TEMPLATE.html + HTML})
    before = len(env.upstream.messages)
    good = v1.send_templated_email(Source=SENDER, Destination={"ToAddresses": ["ann@example.org"]},
                                   Template="Greeting", ConfigurationSetName="sends",
                                   TemplateData='{"name": "Ann", "favoriteanimal": "<cat> & dog"}')["MessageId"]
    copy, = wait_delivered(env, before, 1)
    message = parsed(copy.data)
    assert message["Subject"] == "Greetings, Ann!" and env.verify_dkim(copy.data)
    assert "<p>Your favorite animal is &lt;cat&gt; &amp; dog.</p>" in message.get_body(("html",)).get_content()
    assert "Your favorite animal is <cat> & dog." in message.get_body(("plain",)).get_content()
    assert len(tracked(env, copy.data)[0]) == 1
    assert events_of(env, good)[0]["mail"]["tags"]["ses:operation"] == ["SendTemplatedEmail"]
    # A missing attribute: accepted with a MessageId, not sent, SES's Rendering Failure at the webhook.
    failed = v2.send_email(FromEmailAddress=SENDER, Destination={"ToAddresses": ["bob.fail@example.org"]},
                           ConfigurationSetName="sends",
                           Content={"Template": {"TemplateName": "Greeting", "TemplateData": '{"name": "Bob"}'}})[
        "MessageId"]
    # Bulk: each destination rendered on its own; one failure stops nothing else.
    results = v2.send_bulk_email(
        FromEmailAddress=SENDER, ConfigurationSetName="sends",
        DefaultContent={"Template": {"TemplateName": "Greeting", "TemplateData": '{"favoriteanimal": "owl"}'}},
        BulkEmailEntries=[
            {"Destination": {"ToAddresses": ["carol@example.org"]},
             "ReplacementEmailContent": {"ReplacementTemplate": {"ReplacementTemplateData": '{"name": "Carol"}'}}},
            {"Destination": {"ToAddresses": ["dave.fail@example.org"]}},  # no name: a Rendering Failure
            {"Destination": {"ToAddresses": ["not-an-address"]}},
            {"Destination": {"ToAddresses": ["erin@example.org"]}, "ReplacementTags": [{"Name": "who",
                                                                                        "Value": "erin"}],
             "ReplacementEmailContent": {"ReplacementTemplate": {
                 "ReplacementTemplateData": '{"name": "Erin", "favoriteanimal": "eel"}'}}},
        ])["BulkEmailEntryResults"]
    assert [r["Status"] for r in results] == ["SUCCESS", "SUCCESS", "INVALID_PARAMETER", "SUCCESS"]
    assert "Missing final '@domain'" in results[2]["Error"]
    copies = {m.rcpt_tos[0]: parsed(m.data) for m in wait_delivered(env, before + 1, 2)}
    assert copies["carol@example.org"]["Subject"] == "Greetings, Carol!"
    assert "Your favorite animal is eel." in copies["erin@example.org"].get_body(("plain",)).get_content()
    v1_results = v1.send_bulk_templated_email(
        Source=SENDER, Template="Greeting", ConfigurationSetName="sends", DefaultTemplateData='{"name": "friend"}',
        Destinations=[{"Destination": {"ToAddresses": ["fred@example.org"]},
                       "ReplacementTemplateData": '{"favoriteanimal": "fox"}'},
                      {"Destination": {"ToAddresses": ["gina.fail@example.org"]}}])["Status"]
    assert [r["Status"] for r in v1_results] == ["Success", "Success"]
    assert parsed(wait_delivered(env, before + 3, 1)[0].data)["Subject"] == "Greetings, friend!"
    failures = {results[1]["MessageId"]: "dave.fail@example.org", failed: "bob.fail@example.org",
                v1_results[1]["MessageId"]: "gina.fail@example.org"}
    wait_until(lambda: {r["mail"]["messageId"] for r in env.hook_records("Rendering Failure")} >= set(failures),
               what="three Rendering Failures at the webhook")
    for record in env.hook_records("Rendering Failure"):
        if record["mail"]["messageId"] in failures:
            assert record["failure"]["templateName"] == "Greeting"
            assert record["failure"]["errorMessage"] in ("Attribute 'name' is not present in the rendering data.",
                                                         "Attribute 'favoriteanimal' is not present in the"
                                                         " rendering data.")
            assert record["mail"]["destination"] == [failures[record["mail"]["messageId"]]]
            assert record["mail"]["tags"]["ses:configuration-set"] == ["sends"]
            assert "headers" not in record["mail"]  # SES's record: nothing was written
    assert not any(set(m.rcpt_tos) & set(failures.values()) for m in env.upstream.messages)
    # A template that does not exist: the send is refused, and the set learns of it as a Rendering Failure too.
    with pytest.raises(v1.exceptions.TemplateDoesNotExistException):
        v1.send_templated_email(Source=SENDER, Destination={"ToAddresses": ["hal@example.org"]}, Template="Gone",
                                ConfigurationSetName="sends", TemplateData="{}")
    wait_until(lambda: any(r["failure"]["errorMessage"] == "Template Gone does not exist."
                           for r in env.hook_records("Rendering Failure")), what="the missing template's failure")


def test_inline_template_and_the_guides_if_else(env):
    v2 = env.client("sesv2")
    before = len(env.upstream.messages)
    v2.send_email(FromEmailAddress=SENDER, Destination={"ToAddresses": ["shirley@example.org"]},
                  Content={"Template": {"TemplateContent": {"Subject": PREFERENCES.subject, "Html": PREFERENCES2_HTML},
                                        "TemplateData": json.dumps({"meta": {"userId": "1981624758263"},
                                                                    "contact": {"firstName": "Shirley",
                                                                                "lastName": "Rodriguez"}})}})
    html = parsed(wait_delivered(env, before, 1)[0].data).get_body(("html",)).get_content()
    assert "<p>Dear Shirley,</p><p>Please update your subscription preferences" in html


# --- the aws CLI --------------------------------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("aws") is None, reason="the aws CLI is not installed (pip install awscli)")
def test_the_aws_cli_sends_and_manages_templates(env, tmp_path):
    template = tmp_path / "mytemplate.json"  # the guide's file, as `aws ses create-template --cli-input-json` takes
    template.write_text(json.dumps({"Template": {"TemplateName": "CliTemplate", "SubjectPart": MY_TEMPLATE.subject,
                                                 "HtmlPart": MY_TEMPLATE.html, "TextPart": MY_TEMPLATE.text}}))
    out = _aws(env, "ses", "create-template", "--cli-input-json", f"file://{template}")
    assert out.returncode == 0, out.stderr
    out = _aws(env, "ses", "test-render-template", "--template-name", "CliTemplate", "--template-data",
               '{ "name":"Alejandro", "favoriteanimal": "alligator" }')
    assert out.returncode == 0, out.stderr
    assert rendered_parts(json.loads(out.stdout)["RenderedTemplate"])[0] == "Greetings, Alejandro!"
    before = len(env.upstream.messages)
    out = _aws(env, "ses", "send-templated-email", "--source", SENDER, "--destination",
               "ToAddresses=ann@example.org", "--template", "CliTemplate", "--configuration-set-name", "sends",
               "--template-data", '{ "name":"Ann", "favoriteanimal": "ant" }')
    assert out.returncode == 0, out.stderr
    assert re.fullmatch(r"0100\S+-000000", json.loads(out.stdout)["MessageId"])
    out = _aws(env, "sesv2", "send-email", "--from-email-address", "news@example.com", "--destination",
               "ToAddresses=bob@example.org", "--content",
               json.dumps({"Simple": {"Subject": {"Data": "from the cli"}, "Body": {"Html": {"Data": HTML}}}}),
               "--configuration-set-name", "sends")
    assert out.returncode == 0, out.stderr
    copies = {m.rcpt_tos[0]: m for m in wait_delivered(env, before, 2)}
    assert parsed(copies["ann@example.org"].data)["Subject"] == "Greetings, Ann!"
    assert parsed(copies["bob@example.org"].data)["Subject"] == "from the cli"
    assert len(tracked(env, copies["bob@example.org"].data)[0]) == 1
    out = _aws(env, "sesv2", "list-email-templates")
    assert "CliTemplate" in {t["TemplateName"] for t in json.loads(out.stdout)["TemplatesMetadata"]}
    out = _aws(env, "ses", "send-email", "--from", SENDER, "--destination", "ToAddresses=" + ",".join(
        f"r{i}@example.org" for i in range(51)), "--message", "Subject={Data=s},Body={Text={Data=t}}")
    assert out.returncode != 0 and "Recipient count exceeds 50." in out.stderr


# --- relay template -----------------------------------------------------------------------------------------------

def test_the_template_command_shares_the_apis_store(env, tmp_path):
    html = tmp_path / "greeting.html"
    html.write_text(MY_TEMPLATE.html, encoding="utf-8")
    out = env.relay_cli("template", "create", "FromCli", "--subject", MY_TEMPLATE.subject, "--text", MY_TEMPLATE.text,
                        "--html-file", str(html))
    assert out.returncode == 0, out.stderr
    assert env.client("sesv2").get_email_template(TemplateName="FromCli")["TemplateContent"]["Html"] == MY_TEMPLATE.html
    alejandro = '{"name": "Alejandro", "favoriteanimal": "alligator"}'
    out = env.relay_cli("template", "render", "FromCli", "--data", alejandro, "--part", "subject")
    assert out.returncode == 0 and out.stdout == "Greetings, Alejandro!\n"
    out = env.relay_cli("template", "render", "FromCli", "--data", alejandro)
    assert rendered_parts(out.stdout)[2] == "<h1>Hello Alejandro,</h1><p>Your favorite animal is alligator.</p>\n"
    out = env.relay_cli("template", "render", "FromCli", "--data", '{"name": "Alejandro"}')
    assert out.returncode == 1 and out.stderr == ("error: MissingRenderingAttribute: Attribute 'favoriteanimal' is not"
                                                  " present in the rendering data.\n")
    env.client("ses").create_template(Template={"TemplateName": "FromApi", "SubjectPart": "Hi {{name}}"})
    listed = env.relay_cli("template", "list").stdout.splitlines()
    assert {"FromCli", "FromApi"} <= {line.split("\t")[0] for line in listed}
    shown = json.loads(env.relay_cli("template", "show", "FromApi").stdout)
    assert shown["SubjectPart"] == "Hi {{name}}" and shown["HtmlPart"] is None
    assert env.relay_cli("template", "create", "FromApi", "--subject", "x").returncode == 1
    assert env.relay_cli("template", "update", "FromApi", "--subject", "Hello {{name}}").returncode == 0
    assert env.client("ses").get_template(TemplateName="FromApi")["Template"]["SubjectPart"] == "Hello {{name}}"
    bad = env.relay_cli("template", "create", "Broken", "--html", "{{#each x}}unclosed")
    assert bad.returncode == 1 and "InvalidTemplate" in bad.stderr
    for name in ("FromCli", "FromApi"):
        assert env.relay_cli("template", "delete", name).returncode == 0
    assert "TemplateDoesNotExist" in env.relay_cli("template", "show", "FromCli").stderr


def test_the_limits_follow_the_configuration(tmp_path):
    extra = ("max_recipients = 3\nmax_templates = 2\nmax_template_size = 200\nmax_bulk_destinations = 2\n")
    with send_env(tmp_path, extra) as e:
        v1, v2 = e.client("ses"), e.client("sesv2")
        simple = {"Simple": {"Subject": {"Data": "s"}, "Body": {"Text": {"Data": "t"}}}}
        four = [f"r{i}@example.org" for i in range(4)]
        with pytest.raises(ClientError) as exc:
            v2.send_email(FromEmailAddress=SENDER, Destination={"ToAddresses": four}, Content=simple)
        assert exc.value.response["Error"]["Message"] == "Recipient count exceeds 3."
        v2.send_email(FromEmailAddress=SENDER, Destination={"ToAddresses": four[:3]}, Content=simple)
        with pytest.raises(v2.exceptions.BadRequestException) as exc:
            v2.create_email_template(TemplateName="Big", TemplateContent={"Html": "x" * 201})
        assert "the limit is 200 bytes" in exc.value.response["Error"]["Message"]
        v2.create_email_template(TemplateName="One", TemplateContent={"Subject": "Hi {{name}}"})
        v1.create_template(Template={"TemplateName": "Two", "SubjectPart": "Hi"})
        with pytest.raises(v2.exceptions.LimitExceededException):
            v2.create_email_template(TemplateName="Three", TemplateContent={"Subject": "Hi"})
        entries = [{"Destination": {"ToAddresses": [f"b{i}@example.org"]}} for i in range(3)]
        default = {"Template": {"TemplateName": "One", "TemplateData": '{"name": "x"}'}}
        with pytest.raises(v2.exceptions.BadRequestException) as exc:
            v2.send_bulk_email(FromEmailAddress=SENDER, DefaultContent=default, BulkEmailEntries=entries)
        assert exc.value.response["Error"]["Message"] == "Destination count exceeds 2."
        results = v2.send_bulk_email(FromEmailAddress=SENDER, DefaultContent=default,
                                     BulkEmailEntries=entries[:2])["BulkEmailEntryResults"]
        assert [r["Status"] for r in results] == ["SUCCESS", "SUCCESS"]
        assert e.messages_count() == 3


def test_templates_move_with_relay_store_migrate(tmp_path):
    from relay.store import open_store
    from relay.store.templates import get_template, insert_template

    from .conftest import postgres_database
    from .test_store_migrate import relay_cli

    path = tmp_path / "relay.sqlite3"
    store = open_store(path)
    row = ("Greeting", MY_TEMPLATE.subject, MY_TEMPLATE.text, MY_TEMPLATE.html, "2026-12-01T00:00:00.000Z")
    try:
        assert store.submit(lambda conn: insert_template(conn, row, 10)).result() == "created"
    finally:
        store.close()
    with postgres_database() as url:
        done = relay_cli("store", "migrate", "--from", str(path), "--to", url)
        assert done.returncode == 0, done.stderr
        target = open_store(url)
        try:
            assert target.read(get_template, "Greeting") == row
        finally:
            target.close()
