"""The relay core end to end: smtplib → relay (a subprocess) → an aiosmtpd upstream, events in the store. Two
tests also run on PostgreSQL: a message's events and copy state, and the queue kept across a restart (the other
outcomes are the same store works, and tests/test_nodes.py delivers under load on PostgreSQL)."""

from __future__ import annotations

import base64
import json
import re
import signal
import smtplib
import socket
import ssl
import time

import pytest

from relay.config import hash_password

from .conftest import both_backends
from .harness import RelayProcess, Upstream, free_port

MULTIPART = (
    b"From: Sender <sender@example.com>\r\n"
    b"To: rcpt@example.org\r\n"
    b"Subject: Hello there\r\n"
    b"Message-ID: <app-1@example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/alternative; boundary="b1"\r\n'
    b"\r\n"
    b"--b1\r\nContent-Type: text/plain\r\n\r\nplain text\r\n"
    b"--b1\r\nContent-Type: text/html\r\n\r\n<p>html</p>\r\n--b1--\r\n"
)


@pytest.fixture
def upstream():
    u = Upstream().start()
    yield u
    u.stop()


@pytest.fixture
def relay(tmp_path, upstream, backend_url):
    r = RelayProcess(tmp_path / "relay", upstream.port, store_url=backend_url).start()
    yield r
    r.stop()


def submit(port: int, data: bytes, rcpts=("rcpt@example.org",), sender="sender@example.com",
           client: smtplib.SMTP | None = None) -> tuple[int, bytes]:
    """One SMTP transaction; returns the reply to DATA (or the first refusal)."""
    own = client is None
    client = client or smtplib.SMTP("127.0.0.1", port, timeout=30)
    try:
        client.ehlo("client.test")
        code, msg = client.mail(sender)
        if code != 250:
            return code, msg
        for r in rcpts:
            code, msg = client.rcpt(r)
            if code not in (250, 251):
                return code, msg
        return client.data(data)
    finally:
        if own:
            client.quit()


def relay_id(reply: bytes) -> str:
    m = re.match(rb"Ok (\S+)$", reply)
    assert m, reply
    return m.group(1).decode()


def strip_received(data: bytes) -> bytes:
    """The copy without relay's Received field, and without the Date relay adds to a message that has none."""
    assert data.startswith(b"Received: ")
    end = re.search(rb"\r\n(?![ \t])", data).end()  # the end of the folded field
    head, sep, body = data[end:].partition(b"\r\n\r\n")
    assert re.search(rb"(^|\r\n)Date: [^\r\n]+ \+0000(\r\n|$)", head), head  # RFC 5322's Date, added at acceptance
    head = re.sub(rb"(^|\r\n)Date: [^\r\n]+(?=\r\n|$)", b"", head)
    return head + sep + body


@both_backends
def test_message_arrives_intact_and_events_are_recorded(relay, upstream):
    code, reply = submit(relay.smtp_port, MULTIPART)
    assert code == 250
    mid = relay_id(reply)
    assert re.fullmatch(r"0100[0-9a-f]{12}-[0-9a-f-]{36}-000000", mid)
    got = upstream.wait_for(1)[0]
    assert got.rcpt_tos == ["rcpt@example.org"] and got.mail_from == "sender@example.com"
    assert strip_received(got.data) == MULTIPART
    assert f"id {mid}" in got.data.split(b"\r\n\r\n")[0].decode()

    send, = relay.wait_events("Send", 1)
    delivery, = relay.wait_events("Delivery", 1)
    assert send[1] == delivery[1] == mid and delivery[2] == "rcpt@example.org"
    record = json.loads(delivery[4])
    assert record["eventType"] == "Delivery"
    mail = record["mail"]
    assert mail["messageId"] == mid and mail["source"] == "sender@example.com"
    assert mail["destination"] == ["rcpt@example.org"]
    assert mail["commonHeaders"]["subject"] == "Hello there"
    assert mail["commonHeaders"]["messageId"] == "<app-1@example.com>"
    assert mail["commonHeaders"]["from"] == ["Sender <sender@example.com>"]
    assert {"name": "Subject", "value": "Hello there"} in mail["headers"]
    assert mail["tags"]["ses:source-ip"] == ["127.0.0.1"]
    assert record["delivery"]["recipients"] == ["rcpt@example.org"]
    assert record["delivery"]["smtpResponse"].startswith("250 2.0.0 Ok")
    assert record["delivery"]["reportingMTA"] == "relay.test"
    assert json.loads(send[4])["send"] == {}
    with relay.db() as conn:
        assert conn.execute("SELECT state FROM recipients WHERE message_id = ?", (mid,)).fetchall() == [("delivered",)]
        # the body is kept after delivery (retention.message_bodies, 2 days) for the console's view of it
        assert conn.execute("SELECT COUNT(*) FROM spool").fetchone() == (1,)


def test_without_kept_bodies_the_body_goes_at_the_last_copy(tmp_path, upstream):
    r = RelayProcess(tmp_path / "relay", upstream.port, extra='[retention]\nmessage_bodies = "0s"\n').start()
    try:
        code, reply = submit(r.smtp_port, MULTIPART)
        assert code == 250
        r.wait_events("Delivery", 1)
        with r.db() as conn:
            assert conn.execute("SELECT COUNT(*) FROM spool").fetchone() == (0,)
    finally:
        r.stop()


def test_ses_headers_removed_from_mail_but_kept_in_events(relay, upstream):
    data = b"X-SES-CONFIGURATION-SET: plain\r\nX-SES-MESSAGE-TAGS: campaign=spring, team=ops\r\n" + MULTIPART
    code, reply = submit(relay.smtp_port, data)
    assert code == 250
    got = upstream.wait_for(1)[0]
    assert b"X-SES" not in got.data and strip_received(got.data) == MULTIPART
    record = json.loads(relay.wait_events("Delivery", 1)[0][4])
    assert record["mail"]["headers"][0] == {"name": "X-SES-CONFIGURATION-SET", "value": "plain"}
    tags = record["mail"]["tags"]
    assert tags["campaign"] == ["spring"] and tags["team"] == ["ops"]
    assert tags["ses:configuration-set"] == ["plain"]


def test_each_recipient_gets_its_own_copy_with_identical_headers(relay, upstream):
    rcpts = ["a@example.org", "b@example.org", "c@example.net"]
    code, _ = submit(relay.smtp_port, MULTIPART, rcpts=rcpts)
    assert code == 250
    got = upstream.wait_for(3)
    assert sorted(r for m in got for r in m.rcpt_tos) == rcpts
    assert all(len(m.rcpt_tos) == 1 for m in got)
    assert len({m.data.split(b"\r\n\r\n")[0] for m in got}) == 1
    deliveries = relay.wait_events("Delivery", 3)
    assert sorted(d[2] for d in deliveries) == rcpts
    send, = relay.events("Send")  # one per message, listing every recipient (SES's)
    assert json.loads(send[4])["mail"]["destination"] == rcpts


def test_unknown_configuration_set_and_bad_tags_are_refused(relay, upstream):
    code, reply = submit(relay.smtp_port, b"X-SES-CONFIGURATION-SET: nosuchset\r\n" + MULTIPART)
    assert (code, reply) == (554, b"Configuration Set does not exist: Configuration set <nosuchset> does not exist.")
    code, reply = submit(relay.smtp_port, b"X-SES-CONFIGURATION-SET: plain\r\nX-SES-MESSAGE-TAGS: ok=1, bad=x.y\r\n"
                         + MULTIPART)
    assert code == 554 and b"'bad'" in reply and b"x.y" in reply
    reject, = relay.wait_events("Reject", 1)  # the set is known: the refusal is that set's Reject event
    record = json.loads(reject[4])
    assert reject[3] == "plain" and "x.y" in record["reject"]["reason"]
    assert record["mail"]["commonHeaders"]["subject"] == "Hello there"
    time.sleep(0.3)
    assert upstream.messages == []
    assert relay.events("Send") == []


def test_odd_but_valid_input_is_accepted_and_delivered(relay, upstream):
    # No header at all, then 8-bit data sent without BODY=8BITMIME.
    assert submit(relay.smtp_port, b"\r\njust a body\r\n")[0] == 250
    eight_bit = "Subject: caf\u00e9\r\n\r\nd\u00e9j\u00e0 vu\r\n".encode()
    assert submit(relay.smtp_port, eight_bit)[0] == 250
    got = upstream.wait_for(2)
    bodies = sorted(m.data for m in got)
    assert any(b.endswith(b"\r\n\r\njust a body\r\n") and b"Message-ID: <" in b for b in bodies)
    relayed = next(m for m in got if b"caf\xc3\xa9" in m.data)
    assert relayed.data.endswith(b"\r\n\r\nd\xc3\xa9j\xc3\xa0 vu\r\n")
    assert b"\r\nSubject: caf\xc3\xa9\r\n" in relayed.data
    assert "BODY=8BITMIME" in relayed.mail_options  # relayed as 8-bit to an upstream that offers it


def test_bare_lf_message_is_accepted_as_crlf(relay, upstream):
    lines = [b"Subject: bare", b"From: a@example.com", b""] + [b"line %d" % i for i in range(300)]
    body = b"\n".join(lines) + b"\r\n"  # bare LF inside; the end of data is still CRLF.CRLF
    with socket.create_connection(("127.0.0.1", relay.smtp_port)) as s:
        f = s.makefile("rb")
        f.readline()
        for cmd in (b"HELO x\r\n", b"MAIL FROM:<a@example.com>\r\n", b"RCPT TO:<b@example.org>\r\n", b"DATA\r\n"):
            s.sendall(cmd)
            f.readline()
        s.sendall(body + b".\r\n")
        s.settimeout(30)
        reply = f.readline()
        s.sendall(b"QUIT\r\n")
    assert reply.startswith(b"250 Ok "), reply
    got = upstream.wait_for(1)[0]
    assert strip_received(got.data).replace(b"Message-ID: <" + reply.split()[2] + b"@relay.test>\r\n", b"") == \
        re.sub(rb"(?<!\r)\n", b"\r\n", body)


def test_oversized_message_is_refused(tmp_path, upstream):
    r = RelayProcess(tmp_path / "r", upstream.port, smtp_extra="max_message_size = 2000").start()
    try:
        with smtplib.SMTP("127.0.0.1", r.smtp_port) as c:
            c.ehlo("x")
            assert c.has_extn("size") and int(c.esmtp_features["size"]) == 2000
            for ext in ("8bitmime", "smtputf8", "pipelining"):
                assert c.has_extn(ext), ext
            code, reply = submit(r.smtp_port, MULTIPART + b"x" * 3000 + b"\r\n", client=c)
        assert code == 552
    finally:
        r.stop()
    assert upstream.messages == []


def test_not_an_open_relay(tmp_path, upstream):
    r = RelayProcess(tmp_path / "r", upstream.port, smtp_extra="trusted_networks = []").start()
    try:
        code, reply = submit(r.smtp_port, MULTIPART)
        assert code == 530 and b"Authentication required" in reply
    finally:
        r.stop()


def test_auth_refused_before_starttls_outside_plaintext_networks(tmp_path, upstream):
    users = f'[[smtp.users]]\nusername = "app"\npassword_hash = "{hash_password("s3cret")}"'
    r = RelayProcess(tmp_path / "r", upstream.port,
                     smtp_extra=f"trusted_networks = []\nplaintext_auth_networks = []\n{users}").start()
    try:
        with smtplib.SMTP("127.0.0.1", r.smtp_port) as c:
            c.ehlo("x")
            assert not c.has_extn("auth")
            code, reply = c.docmd("AUTH", "PLAIN AGFwcABzM2NyZXQ=")
            assert code == 538
    finally:
        r.stop()


def test_starttls_and_auth_with_generated_certificates(tmp_path, upstream):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("relay.test", "127.0.0.1")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    users = f'[[smtp.users]]\nusername = "app"\npassword_hash = "{hash_password("s3cret")}"'
    extra = (f'trusted_networks = []\nplaintext_auth_networks = []\ntls_certificate = "{cert_path}"\n'
             f'tls_key = "{key_path}"\n{users}')
    r = RelayProcess(tmp_path / "r", upstream.port, smtp_extra=extra).start()
    try:
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        with smtplib.SMTP("127.0.0.1", r.smtp_port) as c:
            c.ehlo("x")
            assert c.has_extn("starttls") and not c.has_extn("auth")
            c.starttls(context=ctx)
            c.ehlo("x")
            assert "PLAIN" in c.esmtp_features["auth"] and "LOGIN" in c.esmtp_features["auth"]
            with pytest.raises(smtplib.SMTPAuthenticationError):
                c.login("app", "wrong")
            c.login("app", "s3cret")
            code, reply = submit(r.smtp_port, MULTIPART, client=c)
        assert code == 250
        got = upstream.wait_for(1)[0]
        assert b"with ESMTPSA id" in got.data
        record = json.loads(r.wait_events("Delivery", 1)[0][4])
        assert record["mail"]["tags"]["ses:caller-identity"] == ["app"]
        assert "s3cret" not in r.log()
    finally:
        r.stop()


def test_failed_auth_is_rate_limited_per_address(tmp_path, upstream):
    users = f'[[smtp.users]]\nusername = "app"\npassword_hash = "{hash_password("s3cret")}"'
    r = RelayProcess(tmp_path / "r", upstream.port, smtp_extra=f"auth_fail_limit = 3\n{users}").start()
    try:
        with smtplib.SMTP("127.0.0.1", r.smtp_port) as c:
            c.ehlo("x")
            wrong, right = base64.b64encode(b"\0app\0wrong").decode(), base64.b64encode(b"\0app\0s3cret").decode()
            codes = [c.docmd("AUTH", f"PLAIN {wrong}")[0] for _ in range(4)]
            assert codes == [535, 535, 535, 454]
            assert c.docmd("AUTH", f"PLAIN {right}")[0] == 454  # even the right password waits for the window
    finally:
        r.stop()


def test_upstream_down_then_back_delays_then_delivers(tmp_path):
    port = free_port()
    r = RelayProcess(tmp_path / "r", port).start()
    up = Upstream(port)
    try:
        mids = [relay_id(submit(r.smtp_port, MULTIPART)[1]) for _ in range(3)]
        delays = r.wait_events("DeliveryDelay", 3)
        record = json.loads(delays[0][4])
        assert record["deliveryDelay"]["delayType"] == "TransientCommunicationFailure"
        assert record["deliveryDelay"]["delayedRecipients"][0]["emailAddress"] == "rcpt@example.org"
        assert record["deliveryDelay"]["delayedRecipients"][0]["status"].startswith("4.")
        up.start()
        up.wait_for(3)
        deliveries = r.wait_events("Delivery", 3)
        assert sorted(d[1] for d in deliveries) == sorted(mids)
    finally:
        r.stop()
        up.stop()


def test_upstream_permanent_failure_bounces_without_retry(relay, upstream):
    upstream.handler.reply = "550 5.1.1 <rcpt@example.org>: Recipient address rejected: User unknown"
    mid = relay_id(submit(relay.smtp_port, MULTIPART)[1])
    bounce, = relay.wait_events("Bounce", 1)
    record = json.loads(bounce[4])["bounce"]
    assert record["bounceType"] == "Permanent" and record["bounceSubType"] == "NoEmail"
    rcpt = record["bouncedRecipients"][0]
    assert rcpt["emailAddress"] == "rcpt@example.org" and rcpt["status"] == "5.1.1"
    assert "User unknown" in rcpt["diagnosticCode"]
    time.sleep(1.5)  # several retry intervals: a permanent failure is never retried
    with relay.db() as conn:
        assert conn.execute("SELECT state, attempts FROM recipients WHERE message_id = ?", (mid,)).fetchall() == \
            [("bounced", 1)]
    assert relay.events("DeliveryDelay") == []


def test_temporary_failure_beyond_max_age_bounces_transient(tmp_path, upstream):
    upstream.handler.reply = "452 4.2.2 Mailbox full"
    r = RelayProcess(tmp_path / "r", upstream.port, delivery={"max_age": "1s"}).start()
    try:
        submit(r.smtp_port, MULTIPART)
        record = json.loads(r.wait_events("Bounce", 1)[0][4])["bounce"]
        assert (record["bounceType"], record["bounceSubType"]) == ("Transient", "MailboxFull")
        delay = json.loads(r.events("DeliveryDelay")[0][4])["deliveryDelay"]
        assert delay["delayType"] == "MailboxFull"
    finally:
        r.stop()


@both_backends
def test_sigterm_keeps_the_queue_and_a_restart_resumes_it(tmp_path, backend_url):
    port = free_port()
    r = RelayProcess(tmp_path / "r", port, delivery={"retry_initial": "30s"}, store_url=backend_url).start()
    mids = [relay_id(submit(r.smtp_port, MULTIPART)[1]) for _ in range(5)]
    r.wait_events("DeliveryDelay", 5)
    assert r.stop(signal.SIGTERM) == 0
    up = Upstream(port).start()
    try:
        r.start()
        got = up.wait_for(5, timeout=60)
        ids = {re.search(rb"id (\S+)", m.data).group(1).decode() for m in got}
        assert ids == set(mids)
    finally:
        r.stop()
        up.stop()


def test_sighup_reloads_configuration_sets(relay, upstream):
    code, _ = submit(relay.smtp_port, b"X-SES-CONFIGURATION-SET: later\r\n" + MULTIPART)
    assert code == 554
    relay.extra = "[configuration_sets.later]\nopen_tracking = false\n"
    relay.write_config()
    relay.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "configuration reloaded" not in relay.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    code, _ = submit(relay.smtp_port, b"X-SES-CONFIGURATION-SET: later\r\n" + MULTIPART)
    assert code == 250
