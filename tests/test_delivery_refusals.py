"""Refusals by the upstream, read by the SMTP step they answer: only an address refusal suppresses the recipient.

A content, size or sender refusal is a Transient bounce, final for that message; the next message to the same
address is delivered. A refusal of relay itself (relaying denied) is retried. The upstreams are real: an
aiosmtpd server answering with Postfix's reply lines at the step Postfix sends them (not pipelining: relay's
one-command-at-a-time path), and a private Exim daemon refusing by its own ACLs and limits (pipelining).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import smtplib
import time
from pathlib import Path

import pytest

from relay.core.outcome import DATA, END_OF_DATA, MAIL, RCPT

from .harness import RelayProcess, Upstream, UpstreamHandler
from .test_deliver_pipelining import BODIES, Script, scripted
from .test_inbound_exim import EXIM_MAIN, exim_daemon

SPAM = "554 5.7.1 spam content"
TOO_BIG = "552 5.3.4 Message size exceeds fixed limit"
LINE_TOO_LONG = "500 Line too long"
USER_UNKNOWN = "550 5.1.1 <{}>: Recipient address rejected: User unknown in virtual mailbox table"
RELAY_DENIED = "554 5.7.1 <{}>: Relay access denied"


def message(subject: str, to: str) -> bytes:
    return f"From: app@example.com\r\nTo: {to}\r\nSubject: {subject}\r\n\r\nhello\r\n".encode()


def send(relay: RelayProcess, sender: str, recipient: str, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=30) as client:
        client.sendmail(sender, [recipient], message(subject, recipient))


def bounces(relay: RelayProcess) -> dict[str, dict]:
    return {r[2]: json.loads(r[4])["bounce"] for r in relay.events("Bounce")}


def suppressed(relay: RelayProcess) -> set[str]:
    with contextlib.closing(relay.db()) as conn:
        return {r[0] for r in conn.execute("SELECT email_address FROM suppressed_destinations")}


def wait_until(check, timeout: float = 30.0, what: str = "", relay: RelayProcess | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.05)
    raise TimeoutError(f"{what}\n{relay.log()[-3000:] if relay else ''}")


# --- the step each reply answered ---------------------------------------------------------------------------

@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "one at a time"])
@pytest.mark.parametrize(("script", "step"), [
    (Script(mail="552 5.3.4 too big", rcpt="503 5.5.1 no sender", data="503 5.5.1 no recipients"), MAIL),
    (Script(rcpt="550 5.1.1 no such user", data="554 5.5.1 no valid recipients"), RCPT),
    (Script(data="554 5.5.1 no thanks"), DATA),
    (Script(final="554 5.7.1 spam"), END_OF_DATA),
    (Script(), END_OF_DATA),
], ids=["MAIL", "RCPT", "DATA", "end of DATA", "accepted"])
def test_a_reply_names_the_step_it_answered(script, step, pipelining):
    script = dataclasses.replace(script, pipelining=pipelining)
    replies, server, pooled = asyncio.run(scripted(script, BODIES["plain"], BODIES["leading dots"]))
    assert [r.step for r in replies] == [step, step]
    assert pooled == 1 and server.connections == 1  # refusals keep the connection (RSET)


# --- Postfix's replies from an aiosmtpd upstream ----------------------------------------------------------------

class PostfixLike(UpstreamHandler):
    """Refuses as Postfix does, at the step Postfix does: a too large SIZE at MAIL FROM (chosen by the sender
    here), an unknown user or a relay refusal at RCPT TO, content at the end of DATA (chosen by the subject)."""

    def __init__(self):
        super().__init__()
        self.relay_denied = True
        self.refused: list[tuple[str, str]] = []  # (recipient or sender, reply) of every refusal

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if address.startswith("big@"):
            self.refused.append((address, TOO_BIG))
            return TOO_BIG
        envelope.mail_from, envelope.mail_options = address, list(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        reply = USER_UNKNOWN.format(address) if address.startswith("unknown@") else \
            RELAY_DENIED.format(address) if address.endswith("@elsewhere.test") and self.relay_denied else None
        if reply:
            self.refused.append((address, reply))
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server, session, envelope):
        replies = {b"Subject: spam": SPAM, b"Subject: huge": TOO_BIG, b"Subject: long line": LINE_TOO_LONG}
        for subject, reply in replies.items():
            if subject in envelope.original_content:
                self.refused.append((envelope.rcpt_tos[0], reply))
                return reply
        return await super().handle_DATA(server, session, envelope)


@pytest.fixture
def postfix_like(tmp_path):
    upstream = Upstream()
    upstream.handler = PostfixLike()
    upstream.start()
    relay = RelayProcess(tmp_path / "relay", upstream.port).start()
    yield relay, upstream
    relay.stop()
    upstream.stop()


def test_a_content_refusal_bounces_transient_and_the_next_message_is_delivered(postfix_like):
    relay, upstream = postfix_like
    refusals = [  # sender, recipient, subject -> (bounceType, bounceSubType)
        ("app@example.com", "carol@example.org", "spam", ("Transient", "ContentRejected")),
        ("app@example.com", "dan@example.org", "huge", ("Transient", "MessageTooLarge")),
        ("app@example.com", "erin@example.org", "long line", ("Transient", "ContentRejected")),
        ("big@example.com", "frank@example.org", "hello", ("Transient", "MessageTooLarge")),
        ("app@example.com", "unknown@example.org", "hello", ("Permanent", "NoEmail")),
    ]
    for sender, recipient, subject, _ in refusals:
        send(relay, sender, recipient, subject)
    got = wait_until(lambda: len(bounces(relay)) == len(refusals) and bounces(relay), what="bounces", relay=relay)
    for _, recipient, _, expected in refusals:
        assert (got[recipient]["bounceType"], got[recipient]["bounceSubType"]) == expected, got[recipient]
    assert suppressed(relay) == {"unknown@example.org"}  # only the address refusal

    time.sleep(1.5)  # several retry intervals (0.3 s here): a refusal is final for its message, never retried
    assert len(upstream.handler.refused) == len(refusals)
    assert relay.events("DeliveryDelay") == []

    for _, recipient, _, _ in refusals:
        send(relay, "app@example.com", recipient, "a normal message")
    relay.wait_events("Delivery", 4)
    delivered = {m.rcpt_tos[0] for m in upstream.messages}
    assert delivered == {"carol@example.org", "dan@example.org", "erin@example.org", "frank@example.org"}
    # the unknown address stays suppressed: its next message is not sent (SES's OnAccountSuppressionList)
    last = wait_until(lambda: [r for r in relay.events("Bounce") if r[2] == "unknown@example.org"][1:],
                      what="suppressed bounce", relay=relay)
    assert json.loads(last[0][4])["bounce"]["bounceSubType"] == "OnAccountSuppressionList"


def test_relaying_denied_is_retried_never_bounced_or_suppressed(postfix_like):
    relay, upstream = postfix_like
    send(relay, "app@example.com", "grace@elsewhere.test", "hello")
    delays = relay.wait_events("DeliveryDelay", 2)  # refused, retried, refused again
    delay = json.loads(delays[0][4])["deliveryDelay"]
    assert delay["delayType"] == "SendingDeferral"
    assert "Relay access denied" in delay["delayedRecipients"][0]["diagnosticCode"]
    upstream.handler.relay_denied = False  # the operator fixed the upstream's relay permissions
    relay.wait_events("Delivery", 1)
    assert [m.rcpt_tos for m in upstream.messages] == [["grace@elsewhere.test"]]
    assert relay.events("Bounce") == [] and suppressed(relay) == set()


# --- a real Exim as the upstream ------------------------------------------------------------------------------

EXIM_CONFIG = EXIM_MAIN + """acl_smtp_rcpt = acl_check_rcpt
acl_smtp_data = acl_check_data
message_size_limit = 20K

begin acl
acl_check_rcpt:
  deny    message = relay not permitted
          !domains = +local_domains
  require verify = sender
  require verify = recipient
  accept

acl_check_data:
  deny    message = spam content
          condition = ${{if match{{$message_body}}{{BUY NOW}}}}
  accept

begin routers
senders:
  driver = accept
  domains = example.com
  verify_only
users:
  driver = accept
  domains = +local_domains
  local_parts = carol : dan : erin
  transport = devnull

begin transports
devnull:
  driver = appendfile
  file = /dev/null
  user = {user}
"""


@pytest.fixture
def exim_upstream(tmp_path):
    """A private Exim daemon that refuses by its ACLs: unknown users, relaying, unverifiable senders, a size limit,
    a spam phrase."""
    with exim_daemon(EXIM_CONFIG) as (port, base):
        relay = RelayProcess(tmp_path / "relay", port).start()
        try:
            yield relay, base
        finally:
            relay.stop()


def exim_received(base: Path) -> list[str]:
    """Local parts Exim delivered to (its "=>" log lines)."""
    log = "\n".join(p.read_text(errors="replace") for p in sorted((base / "log").glob("*")))
    return [line.split(" => ", 1)[1].split()[0] for line in log.splitlines() if " => " in line]


def test_exim_refusals_suppress_only_the_unknown_address(exim_upstream):
    relay, base = exim_upstream
    big = "From: app@example.com\r\nTo: dan@example.org\r\nSubject: big\r\n\r\n" + ("x" * 76 + "\r\n") * 400
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=30) as client:
        client.sendmail("app@example.com", ["carol@example.org"], message("offer", "carol@example.org")
                        .replace(b"hello", b"BUY NOW"))  # 550 spam content, at the end of DATA
        client.sendmail("app@example.com", ["dan@example.org"], big.encode())  # 552 at MAIL FROM (SIZE=)
        client.sendmail("app@nowhere.invalid", ["erin@example.org"], message("hi", "erin@example.org"))
        client.sendmail("app@example.com", ["nobody@example.org"], message("hi", "nobody@example.org"))
        client.sendmail("app@example.com", ["x@elsewhere.test"], message("hi", "x@elsewhere.test"))
    got = wait_until(lambda: len(bounces(relay)) == 4 and bounces(relay), what="bounces", relay=relay)
    types = {rcpt: (b["bounceType"], b["bounceSubType"], b["bouncedRecipients"][0]["diagnosticCode"])
             for rcpt, b in got.items()}
    assert types == {
        "carol@example.org": ("Transient", "ContentRejected", "smtp; 550 spam content"),
        "dan@example.org": ("Transient", "MessageTooLarge", "smtp; 552 Message size exceeds maximum permitted"),
        "erin@example.org": ("Transient", "General", "smtp; 550 Verification failed for <app@nowhere.invalid>\n"
                                                     "Unrouteable address\nSender verify failed"),
        "nobody@example.org": ("Permanent", "General", "smtp; 550 Unrouteable address"),
    }
    assert suppressed(relay) == {"nobody@example.org"}
    delay = json.loads(relay.wait_events("DeliveryDelay", 1)[0][4])["deliveryDelay"]  # relay not permitted
    assert (delay["delayedRecipients"][0]["emailAddress"], delay["delayType"]) == ("x@elsewhere.test",
                                                                                   "SendingDeferral")
    # the next normal message to each refused recipient goes through
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=30) as client:
        for rcpt in ("carol@example.org", "dan@example.org", "erin@example.org"):
            client.sendmail("app@example.com", [rcpt], message("hi", rcpt))
    relay.wait_events("Delivery", 3)
    wait_until(lambda: len(exim_received(base)) == 3, what="exim deliveries", relay=relay)
    assert sorted(exim_received(base)) == ["carol", "dan", "erin"]
