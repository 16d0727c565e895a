"""Reports coming back end to end: relay (a subprocess) sends with a VERP envelope sender through an
aiosmtpd upstream; DSNs, ARF reports and other mail then arrive at relay's own SMTP listener from a client that
neither authenticates nor is trusted, and become events (or, for anything else, stored reports without one).
The module runs twice: once with relay on SQLite, once on PostgreSQL."""

from __future__ import annotations

import contextlib
import json
import smtplib
import socket
import time
from email.utils import make_msgid

import pytest

from relay import store as store_module
from relay.config import hash_password
from relay.config import load as load_config
from relay.core import events as ev
from relay.core.tokens import sign_address, verify_address

from .harness import ROOT, RelayProcess, Upstream, dict_rows
from .test_events import keys

BOUNCE_DOMAIN = "bounces.test"
COMPLAINTS = "fbl@reports.test"
USERS = f'[[smtp.users]]\nusername = "app"\npassword_hash = "{hash_password("s3cret")}"'
# 127.0.0.1 is not trusted here: only authenticated clients may send mail onwards, so every report below
# really arrives "from anyone".
SMTP_EXTRA = f"trusted_networks = []\n{USERS}"
EXTRA = f'\n[bounces]\ndomain = "{BOUNCE_DOMAIN}"\ncomplaints_addresses = ["{COMPLAINTS}"]\n'
DIAGNOSTIC = "smtp; 550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown in virtual mailbox table"


@pytest.fixture(scope="module")
def upstream():
    u = Upstream().start()
    yield u
    u.stop()


@pytest.fixture(scope="module")
def relay(tmp_path_factory, upstream, module_store_url):
    r = RelayProcess(tmp_path_factory.mktemp("inbound") / "relay", upstream.port, extra=EXTRA,
                     smtp_extra=SMTP_EXTRA, store_url=module_store_url).start()
    yield r
    r.stop()


# --- helpers ---------------------------------------------------------------------------------------------------

def message(rcpts: list[str], message_id: str, subject: str = "Weekly news") -> bytes:
    return (f"From: News <news@example.com>\r\nTo: {', '.join(rcpts)}\r\nSubject: {subject}\r\n"
            f"Message-ID: {message_id}\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\nHello\r\n").encode()


def send(relay: RelayProcess, upstream: Upstream, rcpts: list[str]) -> tuple[str, str, list[str]]:
    """Send as the authenticated application: (relay's message id, Message-ID header, VERP senders seen
    upstream, in the order of `rcpts`)."""
    header = make_msgid(domain="example.com")
    before = len(upstream.messages)
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=30) as c:
        c.login("app", "s3cret")
        c.sendmail("news@example.com", rcpts, message(rcpts, header))
    got = upstream.wait_for(before + len(rcpts))[before:]
    senders = {m.rcpt_tos[0]: m.mail_from for m in got}
    verp = [senders[r] for r in rcpts]
    claims = verify_address_of(relay, verp[0])
    return claims.message_id, header, verp


def verify_address_of(relay: RelayProcess, address: str):
    claims = verify_address(load_config(str(relay.config_path)).keyring(), address)
    assert claims is not None, address
    return claims


def report(relay: RelayProcess, rcpt: str, data: bytes, sender: str = "") -> tuple[int, bytes]:
    """One transaction from an unauthenticated, untrusted client (a remote MTA): the first refusal or the
    reply to DATA."""
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=30) as c:
        c.ehlo("mx.example.org")
        code, reply = c.mail(sender)
        assert code == 250, reply
        code, reply = c.rcpt(rcpt)
        if code != 250:
            return code, reply
        return c.data(data)


def stored_reports(relay: RelayProcess) -> list[dict]:
    with contextlib.closing(relay.db()) as conn:
        return dict_rows(conn.execute("SELECT * FROM inbound_reports ORDER BY id"))


def events_of(relay: RelayProcess, message_id: str, event_type: str, count: int = 1) -> list[tuple]:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        rows = [r for r in relay.events(event_type) if r[1] == message_id]
        if len(rows) >= count:
            return rows
        time.sleep(0.05)
    raise AssertionError(f"no {event_type} event for {message_id}\n{relay.log()[-2000:]}")


def suppressed(relay: RelayProcess, address: str) -> list[tuple]:
    with contextlib.closing(relay.db()) as conn:
        return conn.execute("SELECT reason, message_id, feedback_id FROM suppressed_destinations"
                            " WHERE email_address = ?", (address.lower(),)).fetchall()


def reference(name: str) -> dict:
    """SES's example event (../shared/reference, beside the repository or the worktrees' directory)."""
    for base in (ROOT.parent, ROOT.parent.parent):
        path = base / "shared" / "reference" / "ses-events" / f"{name}.json"
        if path.exists():
            return json.loads(path.read_text())
    pytest.skip(f"SES reference examples not found beside {ROOT}")


def types(obj, prefix=""):
    """Key path -> JSON type of every value (lists by their first element)."""
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out[prefix + k] = type(v).__name__
            out.update(types(v, prefix + k + "."))
    elif isinstance(obj, list) and obj:
        out.update(types(obj[0], prefix))
    return out


def assert_ses_shape(record: dict, name: str, absent: tuple[str, ...] = ()) -> None:
    """`record` has every key of SES's example (but `absent`, fields the report did not give), with the same
    JSON types."""
    ref = reference(name)
    missing = keys(ref[name]) - keys(record[name]) - set(absent)
    assert not missing, missing
    assert keys(ref["mail"]) - {"mail.sourceArn"} <= keys(record["mail"]) | {"mail.sourceArn"}
    assert set(ref) == set(record)
    ours, theirs = types(record), types(ref)
    assert {k: ours[k] for k in theirs if k in ours} == {k: v for k, v in theirs.items() if k in ours}


def dsn(verp: str, final: str, *, status: str = "5.1.1", action: str = "failed", diagnostic: str | None = None,
        original_recipient: str | None = None, report_type: str = "delivery-status") -> bytes:
    """An RFC 3464 report as Postfix writes one (including its Auto-Submitted field)."""
    diagnostic = diagnostic or DIAGNOSTIC.format(rcpt=final)
    orig = f"Original-Recipient: rfc822;{original_recipient}\r\n" if original_recipient else ""
    return (
        f"Return-Path: <>\r\nFrom: MAILER-DAEMON@mx.example.org (Mail Delivery System)\r\nTo: {verp}\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\nAuto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type={report_type}; boundary="B0UND"\r\n\r\n'
        "--B0UND\r\nContent-Type: text/plain\r\n\r\nI'm sorry to have to inform you that your message could not\r\n"
        "be delivered to one or more recipients.\r\n\r\n"
        "--B0UND\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.example.org\r\nX-Postfix-Queue-ID: 4Z0abc\r\n"
        "Arrival-Date: Mon, 23 Nov 2026 02:00:00 +0000\r\n\r\n"
        f"Final-Recipient: rfc822; {final}\r\n{orig}Action: {action}\r\nStatus: {status}\r\n"
        f"Remote-MTA: dns; mail.example.org\r\nDiagnostic-Code: {diagnostic}\r\n\r\n"
        "--B0UND\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"Return-Path: <{verp}>\r\nFrom: News <news@example.com>\r\nSubject: Weekly news\r\n\r\n"
        "--B0UND--\r\n"
    ).encode()


def arf(to: str, original: bytes, rcpt: str | None = None, feedback_type: str = "abuse") -> bytes:
    rcpt_line = f"Original-Rcpt-To: <{rcpt}>\r\n" if rcpt else ""
    return (
        f"From: <feedbackloop@isp.example>\r\nTo: <{to}>\r\nSubject: Abuse report\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=feedback-report; boundary="ARF"\r\n\r\n'
        "--ARF\r\nContent-Type: text/plain\r\n\r\nThis is an email abuse report.\r\n\r\n"
        "--ARF\r\nContent-Type: message/feedback-report\r\n\r\n"
        f"Feedback-Type: {feedback_type}\r\nUser-Agent: ExampleFBL/2.1\r\nVersion: 1\r\n{rcpt_line}"
        "Arrival-Date: Mon, 23 Nov 2026 01:30:00 +0000\r\nReporting-MTA: dns; fbl.isp.example\r\n\r\n"
        "--ARF\r\nContent-Type: message/rfc822\r\nContent-Disposition: inline\r\n\r\n"
    ).encode() + original + b"\r\n--ARF--\r\n"


# --- sending with VERP -----------------------------------------------------------------------------------------

def test_copies_go_out_with_a_verp_sender_per_recipient(relay, upstream):
    message_id, _, verp = send(relay, upstream, ["ann@example.org", "bob@example.net"])
    for position, address in enumerate(verp):
        local, _, domain = address.partition("@")
        assert domain == BOUNCE_DOMAIN and local.startswith("bounce+") and len(local) == 62 <= 64
        claims = verify_address_of(relay, address)
        assert (claims.kind, claims.message_id, claims.position) == ("bounce", message_id, position)
    assert verp[0] != verp[1]


def test_a_null_sender_stays_null(relay, upstream):
    """A bounce relayed onwards keeps MAIL FROM:<> (RFC 5321 6.1): a report about it would loop."""
    before = len(upstream.messages)
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=30) as c:
        c.login("app", "s3cret")
        c.sendmail("", ["sam@example.org"], message(["sam@example.org"], "<null@example.com>"))
    assert upstream.wait_for(before + 1)[before].mail_from == "<>"


# --- bounces ---------------------------------------------------------------------------------------------------

def test_dsn_to_the_verp_address_is_a_permanent_bounce_and_suppresses(relay, upstream):
    message_id, _, verp = send(relay, upstream, ["carol@example.org"])
    code, reply = report(relay, verp[0], dsn(verp[0], "carol@example.org"))
    assert code == 250, reply
    (row,) = events_of(relay, message_id, "Bounce")
    _, _, recipient, _, record_json = row
    record = json.loads(record_json)
    assert recipient == "carol@example.org"
    assert_ses_shape(record, "bounce")
    bounce = record["bounce"]
    assert (bounce["bounceType"], bounce["bounceSubType"]) == ("Permanent", "NoEmail")  # 5.1.1 user unknown
    assert bounce["reportingMTA"] == "dns; mx.example.org"
    assert bounce["bouncedRecipients"] == [{
        "emailAddress": "carol@example.org", "action": "failed", "status": "5.1.1",
        "diagnosticCode": DIAGNOSTIC.format(rcpt="carol@example.org")}]
    assert ev.SES_ID_FORMAT.match(bounce["feedbackId"])
    assert record["mail"]["messageId"] == message_id and record["mail"]["destination"] == ["carol@example.org"]
    reason, sup_message, sup_feedback = suppressed(relay, "carol@example.org")[0]
    assert (reason, sup_message, sup_feedback) == ("BOUNCE", message_id, bounce["feedbackId"])
    stored = [r for r in stored_reports(relay) if r["message_id"] == message_id]
    assert stored and stored[0]["kind"] == "bounce" and stored[0]["recipient"] == "carol@example.org"
    assert stored[0]["mail_from"] == "" and stored[0]["rcpt"] == verp[0] and stored[0]["raw"].startswith(b"Return")


def test_forwarded_recipient_bounce_names_the_address_relay_sent_to(relay, upstream):
    """The VERP token says which copy bounced: SES reports the address it sent to, not the forward target."""
    message_id, _, verp = send(relay, upstream, ["dan@example.org", "eve@example.org"])
    data = dsn(verp[1], "eve.smith@forward.example", status="4.2.2", action="failed",
               diagnostic="smtp; 452 4.2.2 Mailbox full", original_recipient="eve@example.org")
    assert report(relay, verp[1], data)[0] == 250
    (row,) = events_of(relay, message_id, "Bounce")
    bounce = json.loads(row[4])["bounce"]
    assert row[2] == "eve@example.org"
    assert bounce["bouncedRecipients"][0]["emailAddress"] == "eve@example.org"
    assert bounce["bounceType"] == "Transient"
    assert suppressed(relay, "eve@example.org") == []  # only permanent bounces suppress


@pytest.mark.parametrize("name, recipient, status", [
    ("flanker/bounce__office365.eml", "noname@example.com", "5.1.10"),  # Exchange Online's DSN
    ("postal/resource__postfix-bounce.msg.eml", "bob@nutty.tk", "5.1.1"),  # Postfix without a DSN part
    ("flanker/bounce__zed.eml", "asdfasdfasdfasdfasdfasdfewrqertrtyrthsfgdfgadfqeadvxzvz@gmail.com", "5.1.1"),
])
def test_corpus_bounces_to_the_verp_address(relay, upstream, corpus, name, recipient, status):
    path = corpus / "eml" / name
    if not path.exists():
        pytest.skip(f"{path} not in the corpus")
    message_id, _, verp = send(relay, upstream, [recipient])
    assert report(relay, verp[0], path.read_bytes())[0] == 250
    (row,) = events_of(relay, message_id, "Bounce")
    bounce = json.loads(row[4])["bounce"]
    assert bounce["bounceType"] == "Permanent" and row[2] == recipient
    assert bounce["bouncedRecipients"][0]["emailAddress"] == recipient
    assert bounce["bouncedRecipients"][0]["status"] == status
    assert suppressed(relay, recipient)[0][0] == "BOUNCE"


def test_dsn_without_verp_naming_several_recipients_is_one_bounce_each(relay, upstream, corpus):
    """A DSN reaching a complaints address is matched by the returned Message-ID; each failed recipient of
    the message gets its own Bounce (relay delivers, and records, each recipient as its own copy)."""
    path = corpus / "eml" / "rubymail" / "multipart_report_emails__multi_address_bounce1.eml"
    if not path.exists():
        pytest.skip(f"{path} not in the corpus")
    failed = ["bbbbvhvbbvkjbhfbvbvjhb@gmail.com", "bscdbcjhasbcjhbdscbhbsdhcbj@gmail.com"]
    message_id, header, _ = send(relay, upstream, [*failed, "fine@example.org"])
    data = path.read_bytes().replace(b"<118707422.15521266992174819.JavaMail.root@lvmail01>", header.encode())
    assert report(relay, COMPLAINTS, data)[0] == 250
    rows = events_of(relay, message_id, "Bounce", count=2)
    assert sorted(r[2] for r in rows) == failed  # the report's other recipients were not in this message
    assert all(len(json.loads(r[4])["bounce"]["bouncedRecipients"]) == 1 for r in rows)


def test_delay_notice_and_auto_reply_record_no_event_but_are_kept(relay, upstream):
    message_id, _, verp = send(relay, upstream, ["fay@example.org"])
    delay = dsn(verp[0], "fay@example.org", status="4.4.1", action="delayed",
                diagnostic="smtp; 421 4.4.1 try again later")
    auto = (f"From: fay@example.org\r\nTo: {verp[0]}\r\nSubject: Out of Office: Weekly news\r\n"
            "Auto-Submitted: auto-replied\r\nContent-Type: text/plain\r\n\r\nI am away until Monday.\r\n").encode()
    for data in (delay, auto):
        assert report(relay, verp[0], data, sender="fay@example.org")[0] == 250
    kinds = [r["kind"] for r in stored_reports(relay) if r["rcpt"] == verp[0]]
    assert kinds == ["delay", "autoreply"]
    time.sleep(0.3)
    assert [r for r in relay.events() if r[1] == message_id and r[0] not in ("Send", "Delivery")] == []


# --- complaints ------------------------------------------------------------------------------------------------

def complaint_of(relay: RelayProcess, message_id: str) -> tuple[str, dict]:
    (row,) = events_of(relay, message_id, "Complaint")
    return row[2], json.loads(row[4])


def test_arf_to_the_complaints_address_matched_through_the_returned_headers(relay, upstream):
    message_id, header, verp = send(relay, upstream, ["gil@example.org", "hal@example.org"])
    # The ISP returns the message as it received it, relay's VERP Return-Path on top.
    original = f"Return-Path: <{verp[1]}>\r\n".encode() + message(["gil@example.org", "hal@example.org"], header)
    assert report(relay, COMPLAINTS, arf(COMPLAINTS, original), sender="fbl@isp.example")[0] == 250
    recipient, record = complaint_of(relay, message_id)
    assert recipient == "hal@example.org"
    assert_ses_shape(record, "complaint")
    complaint = record["complaint"]
    assert complaint["complainedRecipients"] == [{"emailAddress": "hal@example.org"}]
    assert complaint["complaintFeedbackType"] == "abuse" and complaint["userAgent"] == "ExampleFBL/2.1"
    assert complaint["arrivalDate"] == "2026-11-23T01:30:00.000Z"
    assert suppressed(relay, "hal@example.org")[0][0] == "COMPLAINT"
    assert suppressed(relay, "gil@example.org") == []


def test_arf_without_return_path_matched_by_message_id_and_rcpt(relay, upstream):
    message_id, header, _ = send(relay, upstream, ["ida@example.org", "jon@example.org"])
    original = message(["ida@example.org", "jon@example.org"], header)
    assert report(relay, COMPLAINTS, arf(COMPLAINTS, original, rcpt="jon@example.org"))[0] == 250
    recipient, record = complaint_of(relay, message_id)
    assert recipient == "jon@example.org"
    assert record["complaint"]["complainedRecipients"] == [{"emailAddress": "jon@example.org"}]


def test_arf_to_the_verp_address_is_a_complaint(relay, upstream):
    message_id, header, verp = send(relay, upstream, ["kim@example.org"])
    assert report(relay, verp[0], arf(verp[0], message(["kim@example.org"], header)))[0] == 250
    recipient, record = complaint_of(relay, message_id)
    assert recipient == "kim@example.org" and record["complaint"]["complaintFeedbackType"] == "abuse"


@pytest.mark.parametrize("name, recipients, rewrite", [
    # its returned message has an empty line after Received, which ends the header block before its
    # Message-ID: ours goes on top of the returned header instead
    ("postalmime/fixtures__arf.eml", ["user@example.com"],
     [(b"Message-ID: 8787KJKJ3K4J3K4J3K4J3.mail@example.net\n", b""),
      (b"From: <somespammer@example.net>\nReceived", b"From: <somespammer@example.net>\nMessage-ID: {mid}\nReceived")]),
    ("flanker/complaints__yahoo.eml", ["user@yahoo.com"],
     [(b"<20120711015015.4A8BE2E088E@www.example.com>", b"{mid}")]),
    # AOL redacts the address: every recipient of the message on aol.com is listed, as SES does
    ("flanker/complaints__aol.eml", ["someone@aol.com", "other@example.org"],
     [(b"<20101117174130.28884.55421@luna>", b"{mid}")]),
])
def test_corpus_feedback_reports(relay, upstream, corpus, name, recipients, rewrite):
    path = corpus / "eml" / name
    if not path.exists():
        pytest.skip(f"{path} not in the corpus")
    message_id, header, _ = send(relay, upstream, recipients)
    data = path.read_bytes()
    for old, new in rewrite:  # in memory only: the report is now about our message
        assert old in data
        data = data.replace(old, new.replace(b"{mid}", header.encode()))
    assert report(relay, COMPLAINTS, data, sender="fbl@isp.example")[0] == 250
    recipient, record = complaint_of(relay, message_id)
    # AOL's and Yahoo's reports carry Received-Date, not ARF's Arrival-Date
    assert_ses_shape(record, "complaint", absent=("arrivalDate",))
    assert record["complaint"]["complainedRecipients"] == [{"emailAddress": recipients[0]}]
    assert record["complaint"]["complaintFeedbackType"] == "abuse"


# --- unsubscribe by mail -------------------------------------------------------------------------------------

def test_mail_to_the_unsubscribe_address_is_a_subscription_event(relay, upstream):
    message_id, _, _ = send(relay, upstream, ["lee@example.org", "max@example.org"])
    keyring = load_config(str(relay.config_path)).keyring()
    address = sign_address(keyring, "unsub", message_id, 1, BOUNCE_DOMAIN)
    body = f"From: max@example.org\r\nTo: {address}\r\nSubject: unsubscribe\r\n\r\n".encode()
    assert report(relay, address, body, sender="max@example.org")[0] == 250
    (row,) = events_of(relay, message_id, "Subscription")
    assert row[2] == "max@example.org"
    assert suppressed(relay, "max@example.org")[0][0] == "UNSUBSCRIBE"


# --- policy and bad input ------------------------------------------------------------------------------------

def test_still_not_an_open_relay(relay):
    code, reply = report(relay, "victim@example.net", message(["victim@example.net"], "<x@example.com>"),
                         sender="spammer@example.com")
    assert code == 530 and b"Authentication required" in reply


def test_forged_or_unknown_addresses_on_the_bounce_domain_are_unknown_mailboxes(relay, upstream):
    _, _, verp = send(relay, upstream, ["ned@example.org"])
    local, _, domain = verp[0].partition("@")
    flipped = local[:20] + ("a" if local[20] != "a" else "b") + local[21:]  # inside the MAC-covered bytes
    for address in (f"{flipped}@{domain}", f"postmaster-x@{domain}", f"bounce+{'a' * 55}@{domain}"):
        code, reply = report(relay, address, b"Subject: x\r\n\r\nx\r\n")
        assert code == 550 and b"5.1.1" in reply and b"unavailable" in reply, (address, reply)


def test_postmaster_of_the_bounce_domain_is_accepted_and_kept(relay):
    code, reply = report(relay, f"PostMaster@{BOUNCE_DOMAIN}", b"Subject: your server\r\n\r\nhello\r\n",
                         sender="admin@example.net")
    assert code == 250, reply
    kept = stored_reports(relay)[-1]
    assert kept["rcpt"].lower() == f"postmaster@{BOUNCE_DOMAIN}" and kept["message_id"] is None
    assert kept["outcome"].startswith("unknown")


def test_reports_and_outgoing_mail_are_separate_transactions(relay, upstream):
    _, _, verp = send(relay, upstream, ["oli@example.org"])
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=30) as c:
        c.login("app", "s3cret")
        assert c.mail("news@example.com")[0] == 250
        assert c.rcpt(verp[0])[0] == 250
        code, reply = c.rcpt("someone@example.net")
        assert code == 452 and b"separate" in reply
        c.rset()
        assert c.mail("news@example.com")[0] == 250
        assert c.rcpt("someone@example.net")[0] == 250
        code, reply = c.rcpt(COMPLAINTS)
        assert code == 452


def test_bad_reports_are_kept_without_events_and_the_listener_goes_on(relay, upstream):
    message_id, _, verp = send(relay, upstream, ["pat@example.org"])
    full = dsn(verp[0], "pat@example.org")
    truncated = full[:full.index(b"Final-Recipient")]
    wrong_type = dsn(verp[0], "pat@example.org", report_type="disposition-notification").replace(
        b"message/delivery-status", b"message/disposition-notification")
    garbage = bytes(range(256)) * 40 + b"\r\n\r\n\xff\xfe" * 100
    before = len(stored_reports(relay))
    for data in (truncated, wrong_type, garbage, b""):
        assert report(relay, verp[0], data)[0] == 250
    rows = stored_reports(relay)[before:]
    assert len(rows) == 4 and all("no event" in r["outcome"] for r in rows), rows
    # (smtplib ends the data with CRLF when it does not)
    assert [r["size"] for r in rows] == [len(truncated), len(wrong_type), len(garbage) + 2, 2]
    time.sleep(0.3)
    assert [r for r in relay.events() if r[1] == message_id and r[0] not in ("Send", "Delivery")] == []
    send(relay, upstream, ["pat2@example.org"])  # relay still takes mail


def test_a_large_report_is_parsed_from_its_start_and_stored_whole(relay, upstream):
    """The status part comes first; a 3 MB returned original (cut short, too) costs no parsing time."""
    message_id, _, verp = send(relay, upstream, ["pia@example.org"])
    original = b"Content-Type: message/rfc822\r\n\r\nSubject: big\r\n\r\n" + b"x" * 76 * 40000
    huge = dsn(verp[0], "pia@example.org").replace(b"--B0UND--", b"--B0UND\r\n" + original)
    assert report(relay, verp[0], huge)[0] == 250
    (row,) = events_of(relay, message_id, "Bounce")
    assert json.loads(row[4])["bounce"]["bounceType"] == "Permanent"
    assert next(r for r in stored_reports(relay) if r["message_id"] == message_id)["size"] == len(huge)


def test_report_for_a_purged_message_is_kept_without_event(relay, upstream):
    message_id, _, verp = send(relay, upstream, ["quin@example.org"])
    with contextlib.closing(relay.db()) as conn, conn:  # what retention does, in its order (foreign keys)
        for table, column in (("recipients", "message_id"), ("spool", "message_id"), ("messages", "id")):
            conn.execute(f"DELETE FROM {table} WHERE {column} = ?", (message_id,))
    assert report(relay, verp[0], dsn(verp[0], "quin@example.org"))[0] == 250
    row = next(r for r in stored_reports(relay) if r["rcpt"] == verp[0])
    assert "purged" in row["outcome"] and row["message_id"] is None
    assert [r for r in relay.events("Bounce") if r[1] == message_id] == []


def test_the_same_report_twice_records_two_events(relay, upstream):
    """SES publishes each notification it receives; relay records each report."""
    message_id, _, verp = send(relay, upstream, ["ray@example.org"])
    data = dsn(verp[0], "ray@example.org")
    assert report(relay, verp[0], data)[0] == 250
    assert report(relay, verp[0], data)[0] == 250
    rows = events_of(relay, message_id, "Bounce", count=2)
    assert len({json.loads(r[4])["bounce"]["feedbackId"] for r in rows}) == 2
    assert len(suppressed(relay, "ray@example.org")) == 1


def test_a_client_that_half_closes_after_pipelining_quit_still_gets_its_reply(relay, upstream):
    """Exim sends the end of the message, QUIT, and shuts its sending side at once: the report is stored
    and answered (not cancelled, which would make the MTA send it again and again)."""
    message_id, _, verp = send(relay, upstream, ["uma@example.org"])
    with socket.create_connection(("127.0.0.1", relay.smtp_port), timeout=30) as sock:
        replies = sock.makefile("rb")
        assert replies.readline().startswith(b"220")
        sock.sendall(b"EHLO mx.example.org\r\n")
        while replies.readline()[3:4] != b" ":
            pass
        sock.sendall(f"MAIL FROM:<>\r\nRCPT TO:<{verp[0]}>\r\nDATA\r\n".encode())
        assert [replies.readline()[:3] for _ in range(3)] == [b"250", b"250", b"354"]
        sock.sendall(dsn(verp[0], "uma@example.org") + b".\r\nQUIT\r\n")
        sock.shutdown(socket.SHUT_WR)
        assert replies.readline().startswith(b"250 2.0.0 Ok report")
        assert replies.readline().startswith(b"221")
        assert replies.readline() == b""  # closed, nothing more
    events_of(relay, message_id, "Bounce")


def test_retention_and_forget_remove_stored_reports(store_target):
    store = store_module.open_store(store_target)
    try:
        def row(when: str, recipient: str | None) -> store_module.InboundReportRow:
            return store_module.InboundReportRow(when, "192.0.2.1", "", "fbl@reports.test", b"raw", "complaint",
                                                 "test", None, recipient)
        for when, recipient in (("2026-01-01T00:00:00.000Z", "old@example.org"),
                                ("2026-06-01T00:00:00.000Z", "new@example.org"),
                                ("2026-06-02T00:00:00.000Z", "other@example.org")):
            report_row = row(when, recipient)
            store.submit(lambda conn, r=report_row: store_module.record_report(conn, r, [], [])).result()
        purge = store_module.purge_inbound_reports_chunk
        assert store.submit(lambda conn: purge(conn, "2026-03-01T00:00:00.000Z", 100)).result() == (1, False)
        forget = store_module.forget_inbound_reports
        assert store.submit(lambda conn: forget(conn, ("new@example.org",))).result() == 1
        left = store.tracking_read(store_module.inbound_reports)
        assert [r["recipient"] for r in left] == ["other@example.org"]
    finally:
        store.close()


def test_one_report_transaction_to_two_verp_addresses_stores_one_row_each(relay, upstream):
    """Each envelope recipient is matched on its own, and the rows are stored together (one 250 for both).
    The token names the copy: a DSN arriving at a copy's VERP address is about that copy, as with a
    forwarded recipient whose DSN names the forwarding target."""
    first, _, verp_a = send(relay, upstream, ["vic@example.org"])
    second, _, verp_b = send(relay, upstream, ["wes@example.org"])
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=30) as c:
        assert c.sendmail("", [verp_a[0], verp_b[0]], dsn(verp_a[0], "vic@example.org")) == {}
    assert events_of(relay, first, "Bounce")[0][2] == "vic@example.org"
    assert events_of(relay, second, "Bounce")[0][2] == "wes@example.org"
    rows = {r["rcpt"]: r for r in stored_reports(relay) if r["rcpt"] in (verp_a[0], verp_b[0])}
    assert {r["message_id"] for r in rows.values()} == {first, second}
    assert rows[verp_a[0]]["raw"] == rows[verp_b[0]]["raw"]
