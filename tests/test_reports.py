"""Incoming reports (core/reports.py): DSNs, ARF complaints, non-standard bounces, auto-replies, robustness.

Corpus files are read in place from ../shared/corpus (the tests using them skip when it is absent); the
generated messages below are written here, each shaped like what the named MTA sends.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from relay.core import tokens
from relay.core.reports import Report, ReportRecipient, classify, original_header, parse_report
from relay.core.tokens import Keyring, SigningKey

RING = Keyring((SigningKey("kr", b"r" * 32),))
MID = "0100018c1a2b3c4d-05e008de-024e-4226-841e-98f0e0d61bb1-000000"
VERP = tokens.sign_address(RING, "bounce", MID, 2, "bounces.example.com")


def ms(year: int, month: int, day: int, hour: int, minute: int, second: int, offset_hours: int) -> int:
    zone = timezone(timedelta(hours=offset_hours))
    return int(datetime(year, month, day, hour, minute, second, tzinfo=zone).timestamp() * 1000)


def crlf(text: str) -> bytes:
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode()


def only(report: Report) -> ReportRecipient:
    assert len(report.recipients) == 1, report
    return report.recipients[0]


# ---------------------------------------------------------------------------------------------------- corpus

GMAIL_NO_SUCH = ("smtp; 550-5.1.1 The email account that you tried to reach does not exist. Please try 550-5.1.1 "
                 "double-checking the recipient's email address for typos or 550-5.1.1 unnecessary spaces. Learn "
                 "more at 550 5.1.1 http://mail.google.com/support/bin/answer.py?answer=6596 ")

# path -> expected report fields; "recipients" lists (email, action, status, bounceType, bounceSubType)
CORPUS_REPORTS: dict[str, dict] = {
    "eml/cpython/msg_16.txt.eml": dict(  # Sun Internet Mail Server: Status with a comment, no Diagnostic-Code
        kind="bounce", reporting_mta="dns; cougar.noc.ucla.edu", arrival_ms=None,
        message_id="<002001c144a6$8752e060$56104586@oxy.edu>",
        recipients=[("jangel1@cougar.noc.ucla.edu", "failed", "5.0.0", "Transient", "MailboxFull")],
    ),
    "eml/flanker/bounce__delayed.eml": dict(  # sendmail gave up after 5 days on a 4.x.x: Transient General
        kind="bounce", reporting_mta="dns; cs.example.com", arrival_ms=None, message_id=None,
        recipients=[("foo@example.com", "failed", "4.0.0", "Transient", "General")],
        diagnostic="smtp; 426 connection timed out",
    ),
    "eml/flanker/bounce__office365.eml": dict(
        kind="bounce", reporting_mta="dns;DB5PR06MB1800.eurprd06.prod.outlook.com",
        arrival_ms=ms(2017, 10, 13, 11, 10, 16, 0), message_id="<20171013111011.20866.254C2F3A4D7AA526@ninomail.com>",
        recipients=[("noname@example.com", "failed", "5.1.10", "Permanent", "NoEmail")],
        diagnostic="smtp;550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient noname@example.com not found by SMTP "
                   "address lookup",
    ),
    "eml/flanker/bounce__zed.eml": dict(  # Postfix
        kind="bounce", reporting_mta="dns; mail.example.com", arrival_ms=ms(2009, 7, 7, 22, 47, 35, -7),
        message_id="<20090708054735.GC7578@example.com>",
        recipients=[("asdfasdfasdfasdfasdfasdfewrqertrtyrthsfgdfgadfqeadvxzvz@gmail.com", "failed", "5.1.1",
                     "Permanent", "NoEmail")],
        diagnostic=GMAIL_NO_SUCH + "17si20661415yxe.22", remote_mta="dns; gmail-smtp-in.l.google.com",
    ),
    "eml/mailparser/fixtures__delivery-status.eml": dict(  # SES's own suppression-list DSN: Action before address
        kind="bounce", reporting_mta="dns; amazonses.com", arrival_ms=None, message_id="<xxxxx@email.amazonses.com>",
        recipients=[("xxxx@xxxx.com", "failed", "5.1.1", "Permanent", "NoEmail")],
    ),
    "eml/mimekit/messages__bounce.txt.eml": dict(  # Postfix, recipient fields re-encoded in base64 by Proofpoint
        kind="bounce", reporting_mta="dns; hmail.jitbit.com", arrival_ms=ms(2022, 1, 26, 4, 6, 46, -5),
        message_id="<44565655.JitbitHelpdesk.13439.691a0afc-a0a0-457c-8208-f20b7c4a4cb1@jitbit.com>",
        recipients=[("netec.test@netecgc.com", "failed", "5.1.1", "Permanent", "NoEmail")],
        diagnostic="smtp; 550 5.1.1 <netec.test@netecgc.com>: Recipient address rejected: User unknown",
    ),
    "eml/mimekit/messages__delivery-status.txt.eml": dict(  # no Status field; the diagnostic says who is unknown
        kind="bounce", reporting_mta="dns; mm1", arrival_ms=ms(1996, 7, 29, 2, 12, 50, -7),
        message_id="<31FC7EB4.41C6@netscape.com>",
        recipients=[("newsletter-request@imusic.com", "failed", None, "Permanent", "NoEmail")],
        diagnostic="X-LOCAL; 500 (err.nosuchuser)",
    ),
    "eml/mimekit/messages__delivery-status-no-blank-line.txt.eml": dict(
        kind="bounce", reporting_mta="dns; mm1", arrival_ms=ms(1996, 7, 29, 2, 12, 50, -7),
        message_id="<31FC7EB4.41C6@netscape.com>",
        recipients=[("newsletter-request@imusic.com", "failed", None, "Permanent", "NoEmail")],
    ),
    "eml/mimekit/messages__delivery-status2.txt.eml": dict(  # Exim DSN: no Diagnostic-Code, "Unknown user" in text
        kind="bounce", reporting_mta="dns; smtp-out.dis-hosting.net", arrival_ms=None, message_id=None,
        recipients=[("source@domain.com", "failed", "5.0.0", "Permanent", "NoEmail")],
    ),
    "eml/postalmime/fixtures__bounce.eml": dict(  # Fastmail's Postfix: 5.0.0 whose text says the user is unknown
        kind="bounce", reporting_mta="dns; mailout.nyi.internal", arrival_ms=ms(2022, 10, 10, 1, 37, 21, -4),
        message_id="<e85f1c9b-9b51-4028-8ec0-0a657155028e@app.fastmail.com>",
        recipients=[("htfgvhyufthdgcvhgjyfthgc@ethereal.email", "failed", "5.0.0", "Permanent", "NoEmail")],
        diagnostic="smtp; 550 No such user here", remote_mta="dns; mx.ethereal.email",
    ),
    "eml/rubymail/mime_emails__raw_email_with_mimepart_without_content_type.eml": dict(  # sendmail warning
        kind="delay", reporting_mta="dns; antivirus.uqam.ca", arrival_ms=ms(2006, 10, 19, 1, 23, 47, -4),
        message_id="<89d7557c0610181510r6fa5ebd8n66a7deec71ade118@mail.gmail.com>",
        recipients=[("larose.julie@courrier.uqam.ca", "delayed", "4.5.0", "Transient", "General")],
    ),
    "eml/rubymail/multipart_report_emails__multi_address_bounce1.eml": dict(  # Postfix, five recipients
        kind="bounce", reporting_mta="dns; lvmail01.LL.com", arrival_ms=ms(2010, 2, 23, 22, 16, 15, -8),
        message_id="<118707422.15521266992174819.JavaMail.root@lvmail01>",
        recipients=[(f"{local}@gmail.com", "failed", "5.1.1", "Permanent", "NoEmail") for local in (
            "bbbbvhvbbvkjbhfbvbvjhb", "bscdbcjhasbcjhbdscbhbsdhcbj", "egyfefsdvsfvvhjsd", "kfhejkfbsjkjsbhds",
            "qfvhgsvhgsduiohncdhcvhsdfvsfygusd")],
    ),
    "eml/rubymail/multipart_report_emails__multipart_report_multiple_status.eml": dict(  # InterMail, 2 status parts
        kind="bounce", reporting_mta="dns; schemailmta04.ci.com", arrival_ms=ms(2010, 6, 29, 10, 42, 37, -5),
        message_id="<4c2a146147ac8_61ff157c4ec1652df@s.h.c.mail>",
        recipients=[("u@ci.com", "failed", "5.3.0", "Permanent", "General")],
    ),
    "eml/spamscope/mails__mail_malformed_2.eml": dict(  # MailSite, message/rfc822-headers
        kind="bounce", reporting_mta="dns; apus.netpar.com.br", arrival_ms=ms(2016, 8, 22, 6, 23, 36, -3),
        message_id="<004801d1fc84$01c934ac$b247f0b7$@infospacemail.com>",
        recipients=[("abh@netpar.com.br", "failed", "4.2.2", "Transient", "MailboxFull")],
    ),
    # Bounces without a usable DSN part
    "eml/postal/resource__postfix-bounce.msg.eml": dict(  # Postfix text, DSN part lost when forwarded by Outlook
        kind="bounce", reporting_mta=None, arrival_ms=None, message_id=None, subject="testing message",
        recipients=[("bob@nutty.tk", "failed", "5.1.1", "Permanent", "NoEmail")],
        diagnostic="host mail.nutty.tk[185.22.208.135] said: 550 5.1.1 <bob@nutty.tk>: Recipient address "
                   "rejected: User unknown in virtual mailbox table (in reply to RCPT TO command)",
    ),
    "eml/mime4j/mimetools-testmsgs__badbound.msg.eml": dict(  # Netscape Mail Server, broken MIME boundary
        kind="bounce", reporting_mta=None, arrival_ms=None, message_id=None,
        recipients=[("pnet@uscom.com", "failed", None, "Undetermined", "Undetermined")],
    ),
    "eml/cpython/msg_42.txt.eml": dict(  # "Mail Delivery Subsystem" returning a message, no recipient named
        kind="bounce", reporting_mta=None, arrival_ms=None, message_id=None, recipients=[],
    ),
    # Complaints
    "eml/flanker/complaints__aol.eml": dict(  # AOL SComp: fields after a stray Content-Type, Received-Date
        kind="complaint", feedback_type="abuse", user_agent="AOL SComp", arrival_ms=ms(2010, 11, 17, 12, 41, 30, -5),
        original_mail_from=None, original_rcpt_to=(), message_id="<20101117174130.28884.55421@luna>",
        recipients=[],
    ),
    "eml/flanker/complaints__yahoo.eml": dict(  # Yahoo! Mail feedback loop
        kind="complaint", feedback_type="abuse", user_agent="Yahoo!-Mail-Feedback/1.0",
        arrival_ms=ms(2012, 7, 10, 18, 50, 18, -7), original_mail_from="bounce+705f77.d4a-user=yahoo.com@example.com",
        original_rcpt_to=("user@yahoo.com",), message_id="<20120711015015.4A8BE2E088E@www.example.com>",
        recipients=[("user@yahoo.com", None, None, None, None)],
    ),
    "eml/postalmime/fixtures__arf.eml": dict(  # RFC 5965's own example (its Message-ID sits in the body)
        kind="complaint", feedback_type="abuse", user_agent="SomeGenerator/1.0", reporting_mta="dns; mail.example.com",
        arrival_ms=ms(2005, 3, 8, 14, 0, 0, -4), original_mail_from="somespammer@example.net",
        original_rcpt_to=("user@example.com",), message_id=None,
        recipients=[("user@example.com", None, None, None, None)],
    ),
    # Neither bounces nor complaints
    "eml/flanker/messages__disposition-notification.eml": dict(kind="unknown", reason="disposition notification"),
    "eml/mimekit/messages__disposition-notification.txt.eml": dict(kind="unknown", reason="disposition notification"),
    "eml/cpython/msg_05.txt.eml": dict(kind="unknown", reason="delivery-status report without a status part"),
    "eml/phpmimemailparser/mails__failure.eml": dict(  # truncated Office 365 NDR: text part only
        kind="unknown", reason="delivery-status report without a status part"),
}


@pytest.mark.parametrize("name", sorted(CORPUS_REPORTS))
def test_corpus_report(corpus: Path, name: str):
    expected = CORPUS_REPORTS[name]
    report = parse_report((corpus / name).read_bytes())
    assert report.kind == expected["kind"], report.reason
    if "reason" in expected:
        assert report.reason == expected["reason"]
    for field in ("reporting_mta", "arrival_ms", "feedback_type", "user_agent", "original_mail_from",
                  "original_rcpt_to"):
        if field in expected:
            assert getattr(report, field) == expected[field], field
    if "message_id" in expected:
        assert original_header(report, "Message-ID") == expected["message_id"]
    if "subject" in expected:
        assert original_header(report, "subject") == expected["subject"]
    if "recipients" in expected:
        got = [(r.email, r.action, r.status, r.bounce_type, r.bounce_sub_type) for r in report.recipients]
        assert got == expected["recipients"]
    if "diagnostic" in expected:
        assert only(report).diagnostic_code == expected["diagnostic"]
    if "remote_mta" in expected:
        assert only(report).remote_mta == expected["remote_mta"]


def test_corpus_nothing_else_is_a_report(corpus: Path):
    """Every other corpus message (newsletters, MIME torture tests...) is "unknown": no false bounces."""
    for path in sorted((corpus / "eml").rglob("*.eml")):
        name = str(path.relative_to(corpus))
        if name not in CORPUS_REPORTS:
            report = parse_report(path.read_bytes())
            assert report.kind == "unknown", (name, report.reason)


def test_corpus_truncated_never_raises(corpus: Path):
    """Every corpus message, whole and cut at several points, gives a Report (never an exception)."""
    count = 0
    for path in sorted((corpus / "eml").rglob("*.eml")):
        raw = path.read_bytes()
        cuts = {len(raw), 0, 1, 64, 512, len(raw) // 7, len(raw) // 3, len(raw) // 2, len(raw) * 5 // 6, len(raw) - 1}
        for cut in sorted(c for c in cuts if 0 <= c <= len(raw)):
            assert isinstance(parse_report(raw[:cut]), Report)
            count += 1
    assert count > 1000


def test_corpus_reports_truncated_keep_their_kind_or_fall_back(corpus: Path):
    """A DSN cut after its status part is still that bounce; cut earlier it is never a complaint or delivery."""
    raw = (corpus / "eml/flanker/bounce__zed.eml").read_bytes()
    cut = raw.index(b"Content-Description: Undelivered Message")
    report = parse_report(raw[:cut])
    assert report.kind == "bounce" and only(report).status == "5.1.1"
    for cut in range(0, len(raw), 97):
        assert parse_report(raw[:cut]).kind in ("bounce", "unknown")


# ---------------------------------------------------------------------------------------------------- generated

POSTFIX_DSN = f"""\
Return-Path: <>
Delivered-To: {VERP}
Date: Mon, 23 Nov 2026 01:02:03 +0000 (UTC)
From: MAILER-DAEMON@mx.example.net (Mail Delivery System)
Subject: Undelivered Mail Returned to Sender
To: {VERP}
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
\tboundary="8A1B2C3D4E.1763859723/mx.example.net"
Message-Id: <20261123010203.8A1B2C3D4E@mx.example.net>

This is a MIME-encapsulated message.

--8A1B2C3D4E.1763859723/mx.example.net
Content-Description: Notification
Content-Type: text/plain; charset=us-ascii

This is the mail system at host mx.example.net.

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients. It's attached below.

<nobody@example.org>: host mx.example.org[192.0.2.10] said: 550 5.1.1
    <nobody@example.org>: Recipient address rejected: User unknown in local
    recipient table (in reply to RCPT TO command)

<full@example.org>: host mx.example.org[192.0.2.10] said: 552 5.2.2
    <full@example.org>: Mailbox full (in reply to RCPT TO command)

--8A1B2C3D4E.1763859723/mx.example.net
Content-Description: Delivery report
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.net
X-Postfix-Queue-ID: 8A1B2C3D4E
X-Postfix-Sender: rfc822; {VERP}
Arrival-Date: Mon, 23 Nov 2026 01:02:01 +0000 (UTC)

Final-Recipient: rfc822; nobody@example.org
Original-Recipient: rfc822;nobody@example.org
Action: failed
Status: 5.1.1
Remote-MTA: dns; mx.example.org
Diagnostic-Code: smtp; 550 5.1.1 <nobody@example.org>: Recipient address
    rejected: User unknown in local recipient table

Final-Recipient: rfc822; full@example.org
Original-Recipient: rfc822;full@example.org
Action: failed
Status: 5.2.2
Remote-MTA: dns; mx.example.org
Diagnostic-Code: smtp; 552 5.2.2 <full@example.org>: Mailbox full

Final-Recipient: rfc822; ok@example.org
Action: delivered
Status: 2.0.0
Remote-MTA: dns; mx.example.org

--8A1B2C3D4E.1763859723/mx.example.net
Content-Description: Undelivered Message Headers
Content-Type: text/rfc822-headers

Return-Path: <{VERP}>
Received: from relay.example.com (relay.example.com [192.0.2.1])
\tby mx.example.net (Postfix) with ESMTPS id 8A1B2C3D4E
\tfor <nobody@example.org>; Mon, 23 Nov 2026 01:02:01 +0000 (UTC)
From: News <news@example.com>
To: nobody@example.org
Subject: Our November news
Message-ID: <{MID}@email.example.com>
X-SES-Message-ID: {MID}

--8A1B2C3D4E.1763859723/mx.example.net--
"""


def test_postfix_dsn():
    report = parse_report(crlf(POSTFIX_DSN))
    assert report.kind == "bounce"
    assert report.reason == "RFC 3464 delivery status (2 failed, 1 delivered)"
    assert report.reporting_mta == "dns; mx.example.net"
    assert report.arrival_ms == ms(2026, 11, 23, 1, 2, 1, 0)
    nobody, full = report.recipients
    assert nobody == ReportRecipient(
        email="nobody@example.org", action="failed", status="5.1.1",
        diagnostic_code="smtp; 550 5.1.1 <nobody@example.org>: Recipient address rejected: User unknown in local "
                        "recipient table",
        original_recipient="nobody@example.org", remote_mta="dns; mx.example.org",
        bounce_type="Permanent", bounce_sub_type="NoEmail",
    )
    assert (full.email, full.status, full.bounce_type, full.bounce_sub_type) == \
        ("full@example.org", "5.2.2", "Transient", "MailboxFull")
    assert original_header(report, "message-id") == f"<{MID}@email.example.com>"
    assert original_header(report, "X-SES-MESSAGE-ID") == MID
    assert original_header(report, "Received").endswith("for <nobody@example.org>; Mon, 23 Nov 2026 01:02:01 +0000 "
                                                        "(UTC)")
    assert report.addresses_mentioned[0] == VERP
    assert tokens.verify_address(RING, report.addresses_mentioned[0]) == tokens.AddressClaims("bounce", MID, 2)


def test_dsn_lf_only_and_crlf_mixed_parse_alike():
    lf = parse_report(POSTFIX_DSN.encode())
    mixed = parse_report(crlf(POSTFIX_DSN).replace(b"Action: failed\r\n", b"Action: failed\n"))
    assert lf == mixed == parse_report(crlf(POSTFIX_DSN))


def test_dsn_recipient_blocks_without_blank_lines():
    no_blanks = POSTFIX_DSN.replace("recipient table\n\nFinal-Recipient", "recipient table\nFinal-Recipient")
    no_blanks = no_blanks.replace("Mailbox full\n\nFinal-Recipient", "Mailbox full\nFinal-Recipient")
    assert no_blanks != POSTFIX_DSN
    assert parse_report(crlf(no_blanks)) == parse_report(crlf(POSTFIX_DSN))


def test_dsn_also_auto_submitted_and_x_autoreply_is_still_a_bounce():
    raw = POSTFIX_DSN.replace("Auto-Submitted: auto-replied\n", "Auto-Submitted: auto-replied\nX-Autoreply: yes\n"
                                                                "Precedence: auto_reply\n")
    report = parse_report(crlf(raw))
    assert report.kind == "bounce" and len(report.recipients) == 2


EXIM_DSN = f"""\
Return-path: <>
Envelope-to: {VERP}
Received: from Debian-exim by mail.example.net with local (Exim 4.96)
\tid 1vN0aB-000ABC-1x
\tfor {VERP}; Mon, 23 Nov 2026 02:00:00 +0100
X-Failed-Recipients: gone@example.org
Auto-Submitted: auto-replied
From: Mail Delivery System <Mailer-Daemon@mail.example.net>
To: {VERP}
References: <{MID}@email.example.com>
Content-Type: multipart/report; report-type=delivery-status; boundary=1763859600-eximdsn-1804289383
MIME-Version: 1.0
Subject: Mail delivery failed: returning message to sender
Message-Id: <E1vN0aB-000ABC-1x@mail.example.net>
Date: Mon, 23 Nov 2026 02:00:00 +0100

--1763859600-eximdsn-1804289383
Content-type: text/plain; charset=us-ascii

This message was created automatically by mail delivery software.

A message that you sent could not be delivered to one or more of its
recipients. This is a permanent error. The following address(es) failed:

  gone@example.org
    host mx.example.org [192.0.2.20]
    SMTP error from remote mail server after RCPT TO:<gone@example.org>:
    550 5.1.1 <gone@example.org>: No such user

--1763859600-eximdsn-1804289383
Content-type: message/delivery-status

Reporting-MTA: dns; mail.example.net

Action: failed
Final-Recipient: rfc822;gone@example.org
Status: 5.0.0
Remote-MTA: dns; mx.example.org
Diagnostic-Code: smtp; 550 5.1.1 <gone@example.org>: No such user

--1763859600-eximdsn-1804289383
Content-type: message/rfc822

Return-path: <{VERP}>
Message-ID: <{MID}@email.example.com>
From: news@example.com
To: gone@example.org
Subject: hello

hello
--1763859600-eximdsn-1804289383--
"""


def test_exim_dsn_field_order_and_enhanced_code_in_diagnostic():
    report = parse_report(crlf(EXIM_DSN))
    assert report.kind == "bounce"
    assert report.reporting_mta == "dns; mail.example.net"
    assert only(report) == ReportRecipient(
        email="gone@example.org", action="failed", status="5.0.0",
        diagnostic_code="smtp; 550 5.1.1 <gone@example.org>: No such user", remote_mta="dns; mx.example.org",
        bounce_type="Permanent", bounce_sub_type="NoEmail",
    )
    assert original_header(report, "Message-ID") == f"<{MID}@email.example.com>"
    assert VERP in report.addresses_mentioned


def test_dsn_without_diagnostic_is_classified_by_the_notification_text():
    raw = EXIM_DSN.replace("Diagnostic-Code: smtp; 550 5.1.1 <gone@example.org>: No such user\n", "")
    recipient = only(parse_report(crlf(raw)))
    assert (recipient.status, recipient.diagnostic_code) == ("5.0.0", None)
    assert (recipient.bounce_type, recipient.bounce_sub_type) == ("Permanent", "NoEmail")
    unrelated = raw.replace("  gone@example.org\n    host", "  other@example.org\n    host")
    assert only(parse_report(crlf(unrelated))).bounce_sub_type == "General"


def test_exim_text_bounce_without_dsn_part():
    head, _, rest = EXIM_DSN.partition("--1763859600-eximdsn-1804289383\nContent-type: text/plain; charset=us-ascii\n")
    text = rest.split("--1763859600-eximdsn-1804289383")[0]
    raw = head.replace("Content-Type: multipart/report; report-type=delivery-status; "
                       "boundary=1763859600-eximdsn-1804289383", "Content-Type: text/plain; charset=us-ascii")
    report = parse_report(crlf(raw.split("\n\n")[0] + "\n" + text))
    assert report.kind == "bounce" and report.reason == "non-standard bounce (Exim text; no DSN part)"
    recipient = only(report)
    assert (recipient.email, recipient.action, recipient.status) == ("gone@example.org", "failed", "5.1.1")
    assert recipient.diagnostic_code == ("host mx.example.org [192.0.2.20] SMTP error from remote mail server after "
                                         "RCPT TO:<gone@example.org>: 550 5.1.1 <gone@example.org>: No such user")
    assert (recipient.bounce_type, recipient.bounce_sub_type) == ("Permanent", "NoEmail")


QMAIL = f"""\
Return-Path: <>
Date: 23 Nov 2026 01:00:00 -0000
From: MAILER-DAEMON@mail.example.net
To: {VERP}
Subject: failure notice

Hi. This is the qmail-send program at mail.example.net.
I'm afraid I wasn't able to deliver your message to the following addresses.
This is a permanent error; I've given up. Sorry it didn't work out.

<big@example.org>:
192.0.2.30 does not like recipient.
Remote host said: 552 5.3.4 Message size exceeds fixed maximum message size
Giving up on 192.0.2.30.

--- Below this line is a copy of the message.

Return-Path: <{VERP}>
Received: (qmail 1234 invoked from network); 23 Nov 2026 00:59:59 -0000
Received: from relay.example.com (HELO relay.example.com) (192.0.2.1)
  by mail.example.net with SMTP; 23 Nov 2026 00:59:59 -0000
Message-ID: <{MID}@email.example.com>
From: news@example.com
To: big@example.org
Subject: a large attachment

body
"""


OFFICE365 = f"""\
From: Microsoft Outlook <postmaster@contoso.onmicrosoft.com>
To: {VERP}
Date: Mon, 23 Nov 2026 01:00:00 +0000
Subject: Undeliverable: Our November news
X-MS-Exchange-Message-Is-Ndr:
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/alternative; boundary="alt"

--alt
Content-Type: text/plain; charset="us-ascii"

Your message to user@contoso.com couldn't be delivered.
user wasn't found at contoso.com.

Remote Server returned '550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient user@contoso.com not found by SMTP \
address lookup'

--alt
Content-Type: text/html; charset="us-ascii"

<p>Your message to user@contoso.com couldn't be delivered.</p>
--alt--
"""


def test_office365_html_only_ndr():
    html = OFFICE365.split("--alt\nContent-Type: text/plain")[0] + \
        "--alt\nContent-Type: text/html\n\n<p>Your message to <b>user@contoso.com</b> couldn't be delivered.</p>" \
        "<p>Remote Server returned '550 5.7.1 Message rejected as spam by Content Filtering'</p>\n--alt--\n"
    report = parse_report(crlf(html.replace("<b>", "").replace("</b>", "")))
    recipient = only(report)
    assert (recipient.email, recipient.status, recipient.bounce_type, recipient.bounce_sub_type) == \
        ("user@contoso.com", "5.7.1", "Transient", "ContentRejected")


GMAIL = f"""\
From: Mail Delivery Subsystem <mailer-daemon@googlemail.com>
To: {VERP}
Subject: Delivery Status Notification (Failure)
Content-Type: text/plain; charset=ISO-8859-1

Delivery to the following recipient failed permanently:

     someone@example.org

Technical details of permanent failure:
Google tried to deliver your message, but it was rejected by the server for the recipient domain example.org.

The error that the other server returned was:
550 5.2.1 The email account that you tried to reach is disabled.
"""


def test_qmail_text_bounce_quotes_the_original_headers():
    report = parse_report(crlf(QMAIL))
    assert original_header(report, "Message-ID") == f"<{MID}@email.example.com>"
    received = [value for name, value in report.original_headers if name == "Received"]
    assert received == ["(qmail 1234 invoked from network); 23 Nov 2026 00:59:59 -0000",
                        "from relay.example.com (HELO relay.example.com) (192.0.2.1) by mail.example.net with SMTP; "
                        "23 Nov 2026 00:59:59 -0000"]
    assert report.addresses_mentioned[0] == VERP


# name -> (message, pattern that finds its recipient, the recipient expected)
TEXT_BOUNCES = {
    "qmail": (QMAIL, "Postfix/qmail", ReportRecipient(
        email="big@example.org", action="failed", status="5.3.4",
        diagnostic_code="192.0.2.30 does not like recipient. Remote host said: 552 5.3.4 Message size exceeds fixed "
                        "maximum message size Giving up on 192.0.2.30.",
        bounce_type="Transient", bounce_sub_type="MessageTooLarge")),
    "office365": (OFFICE365, "Office 365", ReportRecipient(
        email="user@contoso.com", action="failed", status="5.1.10",
        diagnostic_code="550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient user@contoso.com not found by SMTP "
                        "address lookup",
        bounce_type="Permanent", bounce_sub_type="NoEmail")),
    "gmail": (GMAIL, "Gmail", ReportRecipient(
        email="someone@example.org", action="failed", status="5.2.1",
        diagnostic_code="550 5.2.1 The email account that you tried to reach is disabled.",
        bounce_type="Permanent", bounce_sub_type="General")),
}


@pytest.mark.parametrize("name", TEXT_BOUNCES)
def test_text_bounces(name: str):
    raw, writer, expected = TEXT_BOUNCES[name]
    report = parse_report(crlf(raw))
    assert (report.kind, report.reason) == ("bounce", f"non-standard bounce ({writer} text; no DSN part)")
    assert report.recipients == (expected,)


def test_sendmail_text_bounce_and_delay_warning():
    body = ("The original message was received at Mon, 23 Nov 2026 01:00:00 GMT\n\n"
            "   ----- The following addresses had permanent fatal errors -----\n<who@example.org>\n"
            "    (reason: 550 5.1.1 <who@example.org>... User unknown)\n\n"
            "   ----- Transcript of session follows -----\n")
    raw = f"From: Mail Delivery Subsystem <MAILER-DAEMON@example.net>\nSubject: Returned mail: see transcript for " \
          f"details\nTo: {VERP}\n\n{body}"
    report = parse_report(crlf(raw))
    assert [(r.email, r.status, r.bounce_sub_type) for r in report.recipients] == \
        [("who@example.org", "5.1.1", "NoEmail")]
    delayed = parse_report(crlf(raw.replace("Returned mail: see transcript for details",
                                            "Warning: could not send message for past 4 hours")))
    assert delayed.kind == "delay" and only(delayed).action == "delayed"


def test_clear_bounce_without_recipient_is_undetermined_bounce():
    raw = f"From: MAILER-DAEMON@example.net\nTo: {VERP}\nSubject: Undelivered Mail Returned to Sender\n\n" \
          "Your message could not be delivered.\n"
    report = parse_report(crlf(raw))
    assert (report.kind, report.recipients) == ("bounce", ())
    assert report.addresses_mentioned == (VERP,)
    assert classify(None, None, "failed") == ("Undetermined", "Undetermined")


ARF = f"""\
From: Abuse Desk <fbl@isp.example>
To: {VERP}
Subject: FW: Our November news
Date: Mon, 23 Nov 2026 03:00:00 +0000
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report; boundary="arf"

--arf
Content-Type: text/plain; charset="US-ASCII"

This is an email abuse report for an email message received from IP 192.0.2.1.

--arf
Content-Type: message/feedback-report

Feedback-Type: abuse
User-Agent: ExampleFBL/2.1
Version: 1
Original-Mail-From: <{VERP}>
Original-Rcpt-To: <Reader@Example.ORG>
Original-Rcpt-To: <second@example.org>
Arrival-Date: Mon, 23 Nov 2026 02:30:00 +0000
Source-IP: 192.0.2.1
Reported-Domain: example.com

--arf
Content-Type: text/rfc822-headers

Return-Path: <{VERP}>
From: News <news@example.com>
To: reader@example.org
Subject: Our November news
Message-ID: <{MID}@email.example.com>
X-SES-Message-ID: {MID}
--arf--
"""


def test_arf_abuse_report_with_rfc822_headers():
    report = parse_report(crlf(ARF))
    assert report.kind == "complaint" and report.reason == "ARF feedback report (abuse)"
    assert (report.feedback_type, report.user_agent) == ("abuse", "ExampleFBL/2.1")
    assert report.arrival_ms == ms(2026, 11, 23, 2, 30, 0, 0)
    assert report.original_mail_from == VERP
    assert report.original_rcpt_to == ("reader@example.org", "second@example.org")
    assert [r.email for r in report.recipients] == ["reader@example.org", "second@example.org"]
    assert original_header(report, "x-ses-message-id") == MID
    assert original_header(report, "Subject") == "Our November news"
    assert tokens.verify_address(RING, report.addresses_mentioned[0]) is not None


def test_forwarded_abuse_report_without_arf_fields_is_a_complaint():
    """Feedback loops that forward the message with the AOL/Yahoo wording but no message/feedback-report part."""
    raw = ARF.replace("report-type=feedback-report; ", "")
    raw = raw.split("--arf\nContent-Type: message/feedback-report")[0] + \
        f"--arf\nContent-Type: message/rfc822\n\nMessage-ID: <{MID}@email.example.com>\nTo: reader@example.org\n\n" \
        "hi\n--arf--\n"
    report = parse_report(crlf(raw.replace("multipart/report", "multipart/mixed")))
    assert (report.kind, report.feedback_type) == ("complaint", "abuse")
    assert report.reason == "non-standard feedback loop (abuse report text with the original attached)"
    assert original_header(report, "message-id") == f"<{MID}@email.example.com>"
    assert parse_report(crlf(raw.replace("email abuse report", "newsletter"))).kind == "unknown"


@pytest.mark.parametrize("written, mapped", [
    ("abuse", "abuse"), ("Fraud", "fraud"), ("virus", "virus"), ("not-spam", "not-spam"),
    ("auth-failure", "auth-failure"), ("other", "other"), ("opt-out", "other"), ("", "other"),
])
def test_arf_feedback_types_map_to_ses_values(written: str, mapped: str):
    report = parse_report(crlf(ARF.replace("Feedback-Type: abuse", f"Feedback-Type: {written}")))
    assert (report.kind, report.feedback_type) == ("complaint", mapped)


def test_arf_without_feedback_part_is_unknown():
    raw = ARF.split("--arf\nContent-Type: message/feedback-report")[0] + "--arf--\n"
    report = parse_report(crlf(raw))
    assert (report.kind, report.reason) == ("unknown", "feedback-report without a feedback-report part")


def test_arf_truncated_after_feedback_part_is_still_a_complaint():
    raw = crlf(ARF)
    report = parse_report(raw[: raw.index(b"Content-Type: text/rfc822-headers")])
    assert report.kind == "complaint" and report.original_headers == ()
    assert report.original_rcpt_to == ("reader@example.org", "second@example.org")


VACATION = """\
From: Alice <alice@example.org>
To: {to}
Subject: {subject}
Date: Mon, 23 Nov 2026 04:00:00 +0000
{headers}Content-Type: text/plain; charset=utf-8

{body}
"""


def vacation(subject: str = "Re: Our November news", headers: str = "", body: str = "Thanks for your mail.") -> bytes:
    return crlf(VACATION.format(to=VERP, subject=subject, headers=headers, body=body))


@pytest.mark.parametrize("raw, reason", [
    (vacation(headers="X-Autoreply: yes\nAuto-Submitted: auto-replied\n",
              body="I am on vacation until December 1st."), "auto-reply header x-autoreply"),
    (vacation(headers="X-Autorespond: yes\n"), "auto-reply header x-autorespond"),
    (vacation(headers="Precedence: auto_reply\n"), "Precedence: auto_reply"),
    (vacation(headers="Auto-Submitted: auto-replied\n"), "Auto-Submitted: auto-replied"),
    (vacation(subject="Automatic reply: Our November news",
              headers="Auto-Submitted: auto-generated\nX-Auto-Response-Suppress: All\n"),
     "auto-reply subject (automatic reply)"),
    (vacation(subject="Out of Office: Our November news"), "auto-reply subject (out of office)"),
    (vacation(subject="Auto: Our November news"), "auto-reply subject (auto:)"),
    (vacation(subject="Abwesenheitsnotiz: Our November news"), "auto-reply subject (abwesenheitsnotiz)"),
    (vacation(subject="=?utf-8?q?R=C3=A9ponse_automatique_=3A_Our_November_news?="),
     "auto-reply subject (réponse automatique)"),
    (vacation(body="Hello,\nI am out of the office until Monday with limited access to email."),
     "vacation text (out of the office)"),
])
def test_auto_replies_are_not_bounces(raw: bytes, reason: str):
    report = parse_report(raw)
    assert (report.kind, report.reason) == ("autoreply", reason)
    assert report.recipients == ()


def test_bounce_of_an_out_of_office_is_a_bounce():
    raw = OFFICE365.replace("Subject: Undeliverable: Our November news", "Subject: Undeliverable: Out of Office: hi")
    assert parse_report(crlf(raw)).kind == "bounce"


def test_auto_generated_notification_without_vacation_hint_is_unknown():
    report = parse_report(vacation(headers="Auto-Submitted: auto-generated\n", body="Your ticket #42 was updated."))
    assert report.kind == "unknown"


def test_delivered_and_relayed_dsn():
    raw = POSTFIX_DSN.replace("Action: failed\nStatus: 5.1.1", "Action: relayed\nStatus: 2.0.0")
    raw = raw.replace("Action: failed\nStatus: 5.2.2", "Action: delivered\nStatus: 2.0.0")
    report = parse_report(crlf(raw))
    assert report.kind == "delivered"
    assert [(r.email, r.action, r.bounce_type) for r in report.recipients] == [
        ("nobody@example.org", "relayed", None), ("full@example.org", "delivered", None),
        ("ok@example.org", "delivered", None)]


def test_delayed_dsn():
    raw = POSTFIX_DSN.replace("Action: failed\nStatus: 5.1.1", "Action: delayed\nStatus: 4.4.1")
    raw = raw.replace("Action: failed\nStatus: 5.2.2", "Action: delivered\nStatus: 2.0.0")
    report = parse_report(crlf(raw))
    assert report.kind == "delay"
    assert [(r.email, r.status, r.bounce_type) for r in report.recipients] == [
        ("nobody@example.org", "4.4.1", "Transient")]


def test_global_delivery_status_rfc6533():
    raw = f"""\
From: Mail Delivery System <MAILER-DAEMON@mx.example.net>
To: {VERP}
Subject: Undelivered Mail Returned to Sender
MIME-Version: 1.0
Content-Type: multipart/report; report-type=global-delivery-status; boundary="g"

--g
Content-Type: text/plain; charset=utf-8

Delivery failed.

--g
Content-Type: message/global-delivery-status

Reporting-MTA: dns; mx.example.net

Final-Recipient: utf-8; jörg@bücher.example
Action: failed
Status: 5.1.1
Diagnostic-Code: smtp; 550 5.1.1 jörg unknown

--g--
"""
    report = parse_report(raw.replace("\n", "\r\n").encode("utf-8"))
    assert report.kind == "bounce" and report.reporting_mta == "dns; mx.example.net"
    assert (only(report).email, only(report).diagnostic_code) == ("jörg@bücher.example", "smtp; 550 5.1.1 jörg unknown")


def test_disposition_notification_is_unknown():
    raw = f"""\
From: reader@example.org
To: {VERP}
Subject: Read: Our November news
MIME-Version: 1.0
Content-Type: multipart/report; report-type=disposition-notification; boundary="m"

--m
Content-Type: text/plain

Your message was displayed.

--m
Content-Type: message/disposition-notification

Reporting-UA: reader.example.org; Mailer 1.0
Final-Recipient: rfc822;reader@example.org
Disposition: manual-action/MDN-sent-manually; displayed

--m--
"""
    assert parse_report(crlf(raw)).kind == "unknown"
    assert parse_report(crlf(raw)).reason == "disposition notification"


# ---------------------------------------------------------------------------------------------------- classify


@pytest.mark.parametrize("status, diagnostic, action, expected", [
    ("5.1.1", "smtp; 550 5.1.1 user unknown", "failed", ("Permanent", "NoEmail")),
    ("5.1.10", "smtp; 550 5.1.10 RESOLVER.ADR.RecipientNotFound", "failed", ("Permanent", "NoEmail")),
    ("5.1.0", "smtp; 550 5.1.0 Address rejected: no such user", "failed", ("Permanent", "NoEmail")),
    ("5.0.0", "smtp; 550 Requested action not taken: mailbox unavailable", "failed", ("Permanent", "NoEmail")),
    ("5.1.2", "smtp; 550 5.1.2 bad destination system", "failed", ("Permanent", "General")),
    ("5.7.1", "smtp; 550 5.7.1 Relaying denied", "failed", ("Permanent", "General")),
    ("5.7.1", "smtp; 554 5.7.1 Message rejected as spam", "failed", ("Transient", "ContentRejected")),
    ("5.7.1", "smtp; 550 5.7.1 Rejected by content policy", "failed", ("Transient", "ContentRejected")),
    ("5.6.0", "smtp; 554 5.6.0 Message content rejected", "failed", ("Transient", "ContentRejected")),
    ("5.7.1", "smtp; 552 5.7.1 Attachment type not allowed", "failed", ("Transient", "AttachmentRejected")),
    ("5.2.2", "smtp; 552 5.2.2 Mailbox full", "failed", ("Transient", "MailboxFull")),
    ("4.2.2", "smtp; 452 4.2.2 Over quota", "failed", ("Transient", "MailboxFull")),
    ("5.0.0", "smtp; 550 user is over quota", "failed", ("Transient", "MailboxFull")),
    ("5.3.4", "smtp; 552 5.3.4 Message too big", "failed", ("Transient", "MessageTooLarge")),
    ("5.2.3", "smtp; 552 5.2.3 Message exceeds size limit", "failed", ("Transient", "MessageTooLarge")),
    ("4.4.7", "smtp; 421 4.4.7 timed out", "failed", ("Transient", "General")),
    ("4.0.0", None, "delayed", ("Transient", "General")),
    (None, "smtp; 550 unrouteable address", "failed", ("Permanent", "General")),
    (None, "smtp; 450 try later", "failed", ("Transient", "General")),
    (None, "user unknown", "failed", ("Permanent", "NoEmail")),
    (None, None, "failed", ("Undetermined", "Undetermined")),
    ("garbage", "no idea", None, ("Undetermined", "Undetermined")),
    ("2.0.0", "smtp; 250 ok", "delivered", ("Undetermined", "Undetermined")),
])
def test_classify_follows_ses_table(status, diagnostic, action, expected):
    assert classify(status, diagnostic, action) == expected


def test_classify_never_yields_ses_internal_subtypes():
    statuses = [f"{k}.{s}.{d}" for k in "45" for s in range(8) for d in range(11)]
    found = {classify(status, "text", "failed") for status in statuses}
    assert all(sub not in ("Suppressed", "OnAccountSuppressionList") for _, sub in found)
    assert {t for t, _ in found} == {"Permanent", "Transient"}


# ---------------------------------------------------------------------------------------------------- robustness


def test_random_bytes_never_raise():
    rng = random.Random(9)
    for size in [0, 1, 2, 10, 100, 1000, 10_000] * 20:
        assert isinstance(parse_report(rng.randbytes(size)), Report)


def test_mutated_reports_never_raise():
    """Random bytes flipped, deleted and inserted in real report shapes."""
    rng = random.Random(3464)
    for base in (crlf(POSTFIX_DSN), crlf(ARF), crlf(QMAIL), crlf(EXIM_DSN)):
        for _ in range(150):
            data = bytearray(base)
            for _ in range(rng.randint(1, 12)):
                pos = rng.randrange(len(data))
                action = rng.randrange(3)
                if action == 0:
                    data[pos] = rng.randrange(256)
                elif action == 1:
                    del data[pos: pos + rng.randint(1, 200)]
                else:
                    data[pos:pos] = rng.choice([b"\r\n", b"\n\n", b"--", b":", b";", b"\x00", b"=?", b"\xff\xfe",
                                                b"Content-Type: message/delivery-status\r\n", b"boundary="])
            assert isinstance(parse_report(bytes(data)), Report)


@pytest.mark.parametrize("raw, reason", [
    (b"", "no report part, no bounce or auto-reply signs"),
    (b"\x00\xff\xfe garbage \x80\x81", "no report part, no bounce or auto-reply signs"),
    (crlf("From: a@b\nContent-Type: multipart/report; report-type=foo; boundary=x\n\n--x\n\nhi\n--x--\n"),
     "multipart/report (foo) of no known kind"),
    (crlf("From: a@b\nContent-Type: multipart/report; report-type=delivery-status; boundary=x\n\n--x\n"
          "Content-Type: message/delivery-status\n\nnonsense here\n\n--x--\n"),
     "delivery-status part without recipient fields"),
])
def test_malformed_reports_are_unknown_with_a_reason(raw: bytes, reason: str):
    report = parse_report(raw)
    assert (report.kind, report.reason) == ("unknown", reason)


def test_missing_boundary_is_read_as_text():
    raw = POSTFIX_DSN.replace(';\n\tboundary="8A1B2C3D4E.1763859723/mx.example.net"', "")
    report = parse_report(crlf(raw))
    assert report.kind == "bounce" and report.reason == "non-standard bounce (Postfix/qmail text; no DSN part)"
    assert [(r.email, r.status) for r in report.recipients] == [("nobody@example.org", "5.1.1"),
                                                                ("full@example.org", "5.2.2")]


def test_huge_headers_bad_charsets_and_deep_nesting_never_raise():
    huge = "".join(f"X-Filler-{i}: {'x' * 200}\n" for i in range(3000)) + POSTFIX_DSN
    assert parse_report(crlf(huge)).kind == "bounce"
    bad_charset = POSTFIX_DSN.replace("charset=us-ascii", "charset=x-no-such-charset").encode() + b"\xff\xfe\x80"
    bad_charset = bad_charset.replace(b"Subject: Undelivered", b"Subject: =?x-bad?q?=FF?= \xe9 Undelivered")
    assert parse_report(bad_charset).kind == "bounce"
    nested = "".join(f'Content-Type: multipart/mixed; boundary="b{i}"\n\n--b{i}\n' for i in range(3000))
    assert parse_report(crlf("From: a@b\n" + nested)).kind == "unknown"
    long_line = parse_report(b"From: MAILER-DAEMON@x\r\nSubject: failure notice\r\n\r\n<" + b"a" * 500_000 + b"@x.y>:")
    assert long_line.kind == "bounce"


HOSTILE_TEXTS = {
    "angles": b"<" * 200_000, "angle-lines": b"<a\n" * 60_000, "dots": b"a." * 100_000, "ats": b"@" * 200_000,
    "long-address": b"<a@" + b"a." * 100_000, "spaces": b"Reported error:" + b" " * 100_000,
    "statuses": b"5.5." * 50_000, "verp": b"bounce+" * 50_000, "blank-lines": b" \n" * 100_000,
}


@pytest.mark.parametrize("body", HOSTILE_TEXTS.values(), ids=HOSTILE_TEXTS.keys())
@pytest.mark.parametrize("ctype", [b"text/plain", b"text/html"], ids=["plain", "html"])
def test_hostile_text_is_scanned_in_linear_time(body: bytes, ctype: bytes):
    """Shapes that make naive patterns backtrack quadratically (a hang here is a timeout failure)."""
    raw = b"From: MAILER-DAEMON@x.example\r\nSubject: failure notice\r\nContent-Type: " + ctype + b"\r\n\r\n" + body
    assert parse_report(raw).kind == "bounce"


def test_hostile_address_headers():
    """email.utils.getaddresses recurses once per address: thousands of them must not matter."""
    to = ", ".join(f'"x{i}" <a{i}@example.org>' for i in range(5000))
    report = parse_report(crlf(f"To: {to}\nDelivered-To: {VERP}\n" + QMAIL))
    assert report.kind == "bounce" and VERP in report.addresses_mentioned
    assert parse_report(b"To: " + b"a" * 1_000_000 + b"\r\n\r\n").kind == "unknown"
