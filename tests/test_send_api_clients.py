"""The clients applications use to send through SES, pointed at relay's endpoint: django-ses (v1 and v2),
django-anymail's Amazon SES backend (SendEmail with Raw content, and SendBulkEmail with a stored template) in a
Django project, and Nodemailer's SES transport with the AWS SDK for JavaScript v3. Every message arrives at a real
upstream with the pixel, the wrapped links and relay's DKIM signature, and the set's events record it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap

import pytest

from .test_api import KEY_ID, REGION, SECRET, TOPIC
from .test_destinations import wait_until
from .test_send_api import events_of, parsed, send_env, tracked, wait_delivered

django = pytest.importorskip("django", reason="the Django clients are in the test extra (pip install -e .[test])")
from django.conf import settings  # noqa: E402

HTML = '<p>Hello from Django</p><p><a href="https://shop.example.com/sale">Sale</a></p>'


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with send_env(tmp_path_factory.mktemp("clients")) as e:
        v2 = e.client("sesv2")
        v2.create_configuration_set(ConfigurationSetName="apps")
        v2.create_configuration_set_event_destination(
            ConfigurationSetName="apps", EventDestinationName="hook",
            EventDestination={"Enabled": True, "SnsDestination": {"TopicArn": TOPIC},
                              "MatchingEventTypes": ["SEND", "DELIVERY", "OPEN", "CLICK", "RENDERING_FAILURE"]})
        yield e


@pytest.fixture(scope="module")
def django_project(env):
    """A Django project's mail settings, as its settings.py would have them for SES."""
    if not settings.configured:
        settings.configure(EMAIL_BACKEND="django.core.mail.backends.locmem.EmailBackend",
                           DEFAULT_FROM_EMAIL="News <news@example.com>", AWS_SES_AUTO_THROTTLE=None,
                           ANYMAIL={})
        django.setup()
    return env


def assert_arrived_tracked_and_signed(env, before: int, rcpt: str, subject: str) -> bytes:
    copy, = wait_delivered(env, before, 1)
    assert copy.rcpt_tos == [rcpt]
    message = parsed(copy.data)
    assert message["Subject"] == subject
    links, pixels = tracked(env, copy.data)
    assert len(links) == 1 and len(pixels) == 1
    assert env.verify_dkim(copy.data)
    return copy.data


@pytest.mark.parametrize("use_ses_v2", [False, True], ids=["ses-v1", "ses-v2"])
def test_django_ses(django_project, use_ses_v2):
    from django.core.mail import EmailMultiAlternatives, get_connection

    env = django_project
    connection = get_connection("django_ses.SESBackend", aws_access_key=KEY_ID, aws_secret_key=SECRET,
                                aws_region_name=REGION, aws_region_endpoint=env.endpoint, use_ses_v2=use_ses_v2)
    message = EmailMultiAlternatives(f"django-ses {use_ses_v2}", "Hello from Django", to=["ann@example.org"],
                                     headers={"X-SES-CONFIGURATION-SET": "apps"}, connection=connection)
    message.attach_alternative(HTML, "text/html")
    before = len(env.upstream.messages)
    assert message.send() == 1
    assert_arrived_tracked_and_signed(env, before, "ann@example.org", f"django-ses {use_ses_v2}")
    message_id = message.extra_headers["message_id"]  # django-ses records SES's MessageId here
    wait_until(lambda: any(e["eventType"] == "Delivery" for e in events_of(env, message_id)))
    send, = [e for e in events_of(env, message_id) if e["eventType"] == "Send"]
    assert send["mail"]["tags"]["ses:configuration-set"] == ["apps"]


def test_django_anymail_raw_and_bulk_template(django_project):
    from anymail.message import AnymailMessage
    from django.core.mail import get_connection

    env = django_project
    client_params = {"endpoint_url": env.endpoint, "region_name": REGION, "aws_access_key_id": KEY_ID,
                     "aws_secret_access_key": SECRET}
    connection = get_connection("anymail.backends.amazon_ses.EmailBackend", client_params=client_params,
                                configuration_set_name="apps")
    message = AnymailMessage("anymail raw", "Hello from Django", to=["bob@example.org"], connection=connection,
                             tags=["spring"], metadata={"order": "42"})
    message.attach_alternative(HTML, "text/html")
    before = len(env.upstream.messages)
    assert message.send() == 1
    assert_arrived_tracked_and_signed(env, before, "bob@example.org", "anymail raw")
    status = message.anymail_status
    assert status.status == {"queued"} and status.message_id.startswith("0100")
    send, = [e for e in events_of(env, status.message_id) if e["eventType"] == "Send"]
    assert send["mail"]["tags"]["ses:operation"] == ["SendEmail"]
    # A stored template, per-recipient merge data (SendBulkEmail): one message each, each rendered on its own.
    env.client("sesv2").create_email_template(TemplateName="AnymailGreeting", TemplateContent={
        "Subject": "Hi {{name}}", "Html": "<p>Hi {{name}}</p>" + HTML, "Text": "Hi {{name}}"})
    bulk = AnymailMessage(to=["carol@example.org", "dave@example.org"], connection=connection)
    bulk.template_id = "AnymailGreeting"
    bulk.merge_data = {"carol@example.org": {"name": "Carol"}, "dave@example.org": {"name": "Dave"}}
    before = len(env.upstream.messages)
    bulk.send()
    copies = {m.rcpt_tos[0]: parsed(m.data) for m in wait_delivered(env, before, 2)}
    assert {r: m["Subject"] for r, m in copies.items()} == {"carol@example.org": "Hi Carol",
                                                           "dave@example.org": "Hi Dave"}
    assert {r.status for r in bulk.anymail_status.recipients.values()} == {"queued"}


NODE_SCRIPT = textwrap.dedent("""
    const nodemailer = require("nodemailer");
    const { SESv2Client, SendEmailCommand } = require("@aws-sdk/client-sesv2");
    const sesClient = new SESv2Client({
        endpoint: process.env.ENDPOINT, region: process.env.REGION,
        credentials: { accessKeyId: process.env.KEY_ID, secretAccessKey: process.env.SECRET },
    });
    const transporter = nodemailer.createTransport({ SES: { sesClient, SendEmailCommand } });
    transporter.sendMail({
        from: "News <news@example.com>", to: "erin@example.org", subject: "from nodemailer",
        text: "Hello from Node", html: process.env.HTML,
        ses: { ConfigurationSetName: "apps", EmailTags: [{ Name: "via", Value: "nodemailer" }] },
    }).then(info => console.log(JSON.stringify(info)), err => { console.error(err); process.exit(1); });
""")


@pytest.fixture(scope="module")
def node_modules(tmp_path_factory):
    """Nodemailer and the AWS SDK v3, installed from npm into a temporary folder (never the repository)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are needed for the Nodemailer test")
    folder = tmp_path_factory.mktemp("node")
    try:
        out = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent", "nodemailer",
                              "@aws-sdk/client-sesv2"], cwd=folder, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.skip("npm install took over 240 s (registry unreachable?)")
    if out.returncode != 0:
        pytest.skip(f"npm install failed (registry unreachable?): {out.stderr.strip()[-300:]}")
    return folder


def test_nodemailer_ses_transport(env, node_modules):
    script = node_modules / "send.js"
    script.write_text(NODE_SCRIPT)
    before = len(env.upstream.messages)
    out = subprocess.run(["node", str(script)], cwd=node_modules, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "ENDPOINT": env.endpoint, "REGION": REGION, "KEY_ID": KEY_ID,
                              "SECRET": SECRET, "HTML": HTML})
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert_arrived_tracked_and_signed(env, before, "erin@example.org", "from nodemailer")
    message_id = info["messageId"].strip("<>").split("@")[0]
    assert message_id == info["response"]
    send, = [e for e in events_of(env, message_id) if e["eventType"] == "Send"]
    assert send["mail"]["tags"]["via"] == ["nodemailer"] and send["mail"]["tags"]["ses:configuration-set"] == ["apps"]
