"""Hostile bytes and headers at acceptance and delivery, end to end through a running relay (a subprocess).

- the event loop keeps serving (the tracking pixel answers) while relay reads and renders a hostile message:
  a header folded 600,000 times, 300,000 header fields, 30,000 HTML parts;
- a header relay cannot decode (a broken encoded word, an unknown charset, nested groups) is recorded as written,
  never a 451 at every try;
- a bare CR is a line end from intake on: what relay signs, stores and sends are the same bytes, and a field
  cannot hide inside another;
- a pixel added at the end of an HTML part goes before its final line break, in every transfer encoding.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import http.client
import json
import re
import threading
import time
from email import message_from_bytes, policy
from pathlib import Path

import dkim as dkimpy
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay import offload
from relay.core import dkim as relay_dkim
from relay.core import events as ev
from relay.core import headers
from relay.core.headers import HeaderBlock, HeaderError, HeaderField, split_header_block, to_crlf
from relay.core.instrument import _join_adjacent
from relay.core.intake import INLINE_BYTES, INLINE_HEADER_LINES, INLINE_PARTS, heavy, intake, mail_facts, many_parts
from relay.core.resolve import sender_identity
from relay.store import mail_json

from .harness import RelayProcess, Upstream, wait_port
from .raw_smtp import dot_stuffed, raw_transaction

PIXEL = re.compile(r'<img src="http://127\.0\.0\.1:\d+/o/[^"]+" width="1" height="1" alt="" border="0" '
                   r'style="border:0;width:1px;height:1px" />')


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    """A relay delivering to its capture folder: each copy exactly as relay produced it."""
    r = RelayProcess(tmp_path_factory.mktemp("hardening") / "relay").start()
    wait_port(r.tracking_port)
    yield r
    r.stop()


def transaction(port: int, message: bytes) -> tuple[str, float, float]:
    """One SMTP transaction (see raw_smtp.raw_transaction): bare CRs reach relay as sent."""
    return raw_transaction(port, dot_stuffed(message))


def submitted_id(answer: str) -> str:
    m = re.fullmatch(r"250 Ok (\S+)", answer)
    assert m, answer
    return m.group(1)


def delivered(relay: RelayProcess, message_id: str, timeout: float = 60.0) -> bytes:
    """The copy relay delivered (capture upstream), without the capture's envelope lines."""
    folder = relay.workdir / "data" / "delivered"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(folder.glob(f"{message_id}.*.eml"))
        if found:
            data = found[0].read_bytes()
            return data.split(b"\r\n", 2)[2]  # after X-Relay-Envelope-From and -To
        time.sleep(0.05)
    raise TimeoutError(f"{message_id} not delivered in {timeout}s\n{relay.log()[-2000:]}")


class PixelProbe:
    """Pixel requests on a keep-alive connection from a thread, one at a time with a short pause: (start,
    latency) of each. A request that meets a stalled event loop waits it out."""

    def __init__(self, port: int):
        self.port, self.samples, self.stop = port, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PixelProbe:
        self.thread.start()
        time.sleep(0.2)
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(60)

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        while not self.stop.is_set():
            start = time.monotonic()
            conn.request("GET", "/o/not-a-token")  # answered (with the GIF) like any pixel load
            conn.getresponse().read()
            self.samples.append((start, time.monotonic() - start))
            time.sleep(0.01)
        conn.close()

    def worst(self, since: float, until: float) -> tuple[float, int]:
        """The longest latency of the requests started in [since, until), and how many there were."""
        window = [lat for t, lat in self.samples if since <= t < until]
        return max(window, default=0.0), len(window)


# --- A: no stall on hostile messages -------------------------------------------------------------------------

HTML_PART = b'<html><body><a href="https://shop.example.com/x">x</a></body></html>\r\n'
HEAD = b"From: News <news@example.com>\r\nTo: rcpt@example.org\r\nSubject: hostile\r\nMIME-Version: 1.0\r\n" \
       b"X-SES-CONFIGURATION-SET: marketing\r\n"


def folded_header() -> bytes:
    """One header of 600,000 folded lines (2.4 MB)."""
    return HEAD + b"X-Folded: start\r\n" + b" y\r\n" * 600_000 + b"Content-Type: text/html\r\n\r\n" + HTML_PART


def many_fields() -> bytes:
    return HEAD + b"".join(b"X-Field-%d: value\r\n" % i for i in range(300_000)) + \
        b"Content-Type: text/html\r\n\r\n" + HTML_PART


def many_html_parts() -> bytes:
    part = (b'--b\r\nContent-Type: text/html\r\n\r\n'
            b'<html><body><a href="https://shop.example.com/%d">x</a></body></html>\r\n')
    return HEAD + b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n' + \
        b"".join(part % i for i in range(30_000)) + b"--b--\r\n"


@pytest.mark.parametrize("make", [folded_header, many_fields, many_html_parts], ids=["folded", "fields", "parts"])
def test_the_pixel_keeps_answering_while_a_hostile_message_is_accepted_and_delivered(relay, make):
    message = make()
    with PixelProbe(relay.tracking_port) as probe:
        answer, start, replied = transaction(relay.smtp_port, message)
        copy = delivered(relay, submitted_id(answer), timeout=120)
        done = time.monotonic()
    worst, count = probe.worst(start, done)
    assert count >= 5, (count, probe.samples[-5:])
    assert worst < 1.0, f"a pixel request waited {worst:.2f} s (accepted in {replied - start:.2f} s)"
    assert copy.count(b"\r\n") >= message.count(b"\r\n")  # everything arrived (plus the added fields)


def test_split_header_block_reads_a_header_folded_600000_times_in_one_field():
    raw = folded_header()
    start = time.monotonic()
    block = split_header_block(raw)
    assert time.monotonic() - start < 5.0  # ~0.02 s; rebuilding the field at every line took about a minute
    assert [f.name for f in block.fields] == ["From", "To", "Subject", "MIME-Version", "X-SES-CONFIGURATION-SET",
                                             "X-Folded", "Content-Type"]
    assert block.to_bytes() == raw and block.fields[5].value == "start" + " y" * 600_000


def _split_as_before(raw: bytes, email_package_end: bool = True) -> HeaderBlock:
    """The line-by-line reading split_header_block replaced (quadratic on folded fields): the reference."""
    fields: list[HeaderField] = []
    pos, size = 0, len(raw)
    while pos < size:
        end = raw.find(b"\r\n", pos)
        stop = size if end < 0 else end + 2
        line = raw[pos:stop]
        if line == b"\r\n":
            return HeaderBlock(fields, raw[stop:], b"\r\n")
        malformed = not re.match(rb"From |[!-9;-~]*:|[ \t]", line)
        if malformed and email_package_end:
            return HeaderBlock(fields, raw[pos:], b"")
        if (malformed or line[:1] in (b" ", b"\t")) and fields:
            fields[-1] = HeaderField(fields[-1].name, fields[-1].raw + line)
        else:
            m = re.match(rb"([!-9;-~]+)[ \t]*:", line)
            fields.append(HeaderField(m.group(1).decode("ascii") if m else "", line))
        pos = stop
    return HeaderBlock(fields, b"", b"")


HEADER_LINES = st.lists(st.sampled_from([b"Subject: a", b"From: x@y", b" folded", b"\tfolded", b"", b"no colon",
                                         b"From nobody", b"X-A:", b"Bad Name: v", b"::", b" ", b"x\rcr", b"x\ny"]),
                        max_size=12)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(lines=HEADER_LINES, tail=st.sampled_from([b"", b"\r\n", b"body\r\n"]), package=st.booleans())
def test_split_header_block_reads_as_the_line_by_line_reference(lines, tail, package):
    raw = b"\r\n".join(lines) + tail
    got, want = split_header_block(raw, email_package_end=package), _split_as_before(raw, package)
    assert [(f.name, f.raw) for f in got.fields] == [(f.name, f.raw) for f in want.fields]
    assert (got.body, got.separator) == (want.body, want.separator) and got.to_bytes() == raw


@settings(max_examples=300)
@given(st.text(alphabet="ab \t\r\n:", max_size=40))
def test_unfolding_removes_exactly_the_line_breaks_before_a_blank(text):
    assert headers._unfold(text) == re.sub(r"\r?\n(?=[ \t])", "", text)


def test_quoted_printable_template_joins_adjacent_pieces_in_linear_time():
    pieces = [b"<p>x</p>" * 5] * 50_000 + [0, b"end"]  # adding each piece to the run before took 37 s
    start = time.monotonic()
    joined = _join_adjacent(pieces)
    assert time.monotonic() - start < 2.0
    assert joined == [b"<p>x</p>" * 5 * 50_000, 0, b"end"]


def test_a_quoted_printable_part_with_300000_placeholders_is_delivered_promptly(relay):
    # An encoded line end (=0D) makes the template encode the whole part from its pieces: one per placeholder
    html = b"<html><body>=0D" + (b"{{ses:openTracker}}" + b"x" * 40) * 300_000 + b"</body></html>\r\n"
    body = re.sub(rb"\r?\n", b"\r\n", binascii.b2a_qp(html.replace(b"=0D", b"\r"), istext=False))
    message = HEAD + b"Content-Type: text/html\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n" + body
    assert b"=0D" in body and b"\r\r" not in body
    answer, start, _ = transaction(relay.smtp_port, message)
    copy = delivered(relay, submitted_id(answer), timeout=20)  # ~2 s; joining its pieces alone took 75 s
    html_out = message_from_bytes(copy, policy=policy.default).get_content()
    assert "{{ses:openTracker}}" not in html_out and len(PIXEL.findall(html_out)) == 1


def test_heavy_work_runs_in_one_thread_one_piece_at_a_time_and_light_work_on_the_loop():
    spans: list[tuple[int, float, float]] = []

    def work() -> None:
        start = time.monotonic()
        time.sleep(0.05)
        spans.append((threading.get_ident(), start, time.monotonic()))

    async def main() -> None:
        await offload.run(False, work)
        await asyncio.gather(*(offload.run(True, work) for _ in range(3)))

    asyncio.run(main())
    loop_thread = threading.get_ident()
    (inline, *threaded) = spans
    assert inline[0] == loop_thread and loop_thread not in {t for t, _, _ in threaded}
    assert len({t for t, _, _ in threaded}) == offload.THREADS == 1
    assert all(a[2] <= b[1] for a, b in zip(threaded, threaded[1:], strict=False))  # never two at once


def test_the_thresholds_for_leaving_the_event_loop():
    small = b"From: a@b.c\r\n\r\n" + b"x" * (INLINE_BYTES - 15)
    assert len(small) == INLINE_BYTES and not heavy(small) and heavy(small + b"x")
    fields = b"X-A: b\r\n" * INLINE_HEADER_LINES + b"\r\nbody\r\n"
    assert not heavy(fields) and heavy(b"X-A: b\r\n" + fields)
    assert heavy(b"X-A: b\n" * (INLINE_HEADER_LINES + 1) + b"\nbody\n")  # bare LF too (before to_crlf)
    parts = b"C: d\r\n\r\n" + b"\r\n--b\r\n\r\nx" * INLINE_PARTS
    assert not many_parts(parts) and many_parts(parts + b"\r\n--b--\r\n")


# --- B: headers relay cannot decode --------------------------------------------------------------------------

UNDECODABLE = {
    "broken base64 subject": (b"Subject: =?utf-8?b?QUJDR?=\r\n", "subject", "=?utf-8?b?QUJDR?="),
    "broken base64 name": (b"Subject: s\r\nReply-To: =?utf-8?b?QUJDR?= <r@example.com>\r\n", "replyTo",
                           ["=?utf-8?b?QUJDR?= <r@example.com>"]),
    "unknown charset": ("Subject: =?utfé-8?q?x?=\r\n".encode(), "subject", "=?utfé-8?q?x?="),
    "unknown charset in a name": ("Subject: s\r\nCc: =?utfé-8?q?x?= <c@example.com>\r\n".encode(), "cc",
                                  ["=?utfé-8?q?x?= <c@example.com>"]),
    "nested groups": (b"Subject: s\r\nBcc: " + b"a:" * 1000 + b"\r\n", "bcc", ["a:" * 1000]),
}


@pytest.mark.parametrize("case", UNDECODABLE, ids=list(UNDECODABLE))
def test_a_header_relay_cannot_decode_is_accepted_and_recorded_as_written(relay, case):
    fields, key, recorded = UNDECODABLE[case]
    message = b"From: News <news@example.com>\r\nTo: rcpt@example.org\r\n" + fields + b"\r\nhello\r\n"
    answer, _, _ = transaction(relay.smtp_port, message)
    message_id = submitted_id(answer)  # it was a 451 at every try, then a bounce
    assert b"hello" in delivered(relay, message_id)
    records = [json.loads(r[4]) for r in relay.wait_events("Send", 1, timeout=30) if r[1] == message_id]
    assert records and records[0]["mail"]["commonHeaders"][key] == recorded


def test_a_from_display_name_relay_cannot_decode_keeps_its_address(relay):
    message = b"From: =?utf-8?b?QUJDR?= <news@example.com>\r\nTo: rcpt@example.org\r\nSubject: s\r\n\r\nhi\r\n"
    answer, _, _ = transaction(relay.smtp_port, message)
    message_id = submitted_id(answer)
    delivered(relay, message_id)
    record, = [json.loads(r[4]) for r in relay.events("Send") if r[1] == message_id]
    assert record["mail"]["commonHeaders"]["from"] == ["=?utf-8?b?QUJDR?= <news@example.com>"]
    assert record["mail"]["tags"]["ses:from-domain"] == ["example.com"]


ENCODED_WORD = st.builds(
    lambda charset, enc, text: f"=?{charset}?{enc}?{text}?=",
    st.sampled_from(["utf-8", "iso-8859-1", "us-ascii", "utfé-8", "unknown-8bit", "x", "", "utf-7", "gb2312"]),
    st.sampled_from(["b", "q", "B", "Q", "x", ""]),
    st.text(alphabet="QUJDRa=_+/?:@<>\"", max_size=12),
)
VALUE = st.lists(st.one_of(ENCODED_WORD, st.sampled_from([" ", ",", ":", ";", "<", ">", "@", '"', "\\", "(", ")",
                                                          "a", "b@c", "é", "a:" * 300, "\t", "\r\n "])),
                 max_size=10).map("".join)
NAMES = st.sampled_from(["From", "To", "Cc", "Bcc", "Reply-To", "Sender", "Subject", "Return-Path", "Date",
                         "Message-ID", "Content-Type", "X-SES-CONFIGURATION-SET", "X-SES-MESSAGE-TAGS", "X-Other"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fields=st.lists(st.tuples(NAMES, VALUE), max_size=6), raw_bytes=st.binary(max_size=20))
def test_intake_and_the_mail_object_raise_only_header_errors(fields, raw_bytes):
    head = b"".join(f"{name}: {value}\r\n".encode() for name, value in fields) + b"X-Raw: " + raw_bytes + b"\r\n"
    try:
        item = intake(head + b"\r\nbody\r\n", "s@example.com", "mid", "relay.test")
    except HeaderError:
        return
    mail = ev.mail_object(mail_facts(item, message_id="mid", now_ms=0, mail_from="s@example.com",
                                     recipients=["r@example.org"]))
    mail_json(mail).encode("utf-8")  # storable
    assert isinstance(sender_identity(item.block, "s@example.com"), str)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(VALUE, st.text(max_size=40)))
def test_the_header_decoders_never_raise(value):
    assert isinstance(headers.decoded(value), str)
    assert all(isinstance(a, str) for a in headers.addresses(value))
    block = split_header_block(f"From: {value}\r\n\r\n".encode("utf-8", "surrogatepass"))
    assert isinstance(sender_identity(block, "s@example.com"), str)


# --- C: a bare CR is a line end from intake on ---------------------------------------------------------------

def _key_file(path: Path, key) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return path


@pytest.fixture
def signing_relay(tmp_path):
    yield from _signing_relay(tmp_path)


def _signing_relay(tmp_path: Path):
    """A relay signing example.com with an RSA and an Ed25519 key, delivering over SMTP to an aiosmtpd upstream
    (aiosmtplib writes every bare CR as CRLF on the wire, as any sender would)."""
    pytest.importorskip("nacl", reason="dkimpy verifies ed25519-sha256 only with pynacl installed")
    keys = {"r1": rsa.generate_private_key(65537, 2048), "e1": ed25519.Ed25519PrivateKey.generate()}
    algorithms = {"r1": "rsa-sha256", "e1": "ed25519-sha256"}
    extra = "".join(f'[[dkim.keys]]\ndomain = "example.com"\nselector = "{sel}"\nalgorithm = "{algorithms[sel]}"\n'
                    f'private_key_file = "{_key_file(tmp_path / sel, key)}"\n' for sel, key in keys.items())
    records = {f"{sel}._domainkey.example.com.": relay_dkim.key_record(key) for sel, key in keys.items()}
    extra += '[configuration_sets.fallback]\ndkim_fallback_domain = "example.com"\n'  # for mail without a From
    upstream = Upstream().start()
    r = RelayProcess(tmp_path / "relay", upstream.port, extra=extra).start()
    yield r, upstream, records
    r.stop()
    upstream.stop()


def _verifies(data: bytes, records: dict[str, str], idx: int) -> bool:
    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        record = records.get(name.decode())
        return record.encode() if record else None

    try:
        return dkimpy.DKIM(data).verify(idx=idx, dnsfunc=dnsfunc)
    except dkimpy.ValidationError:
        return False


def _spooled(relay: RelayProcess, message_id: str, timeout: float = 20.0) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.closing(relay.db()) as conn:
            row = conn.execute("SELECT raw FROM spool WHERE message_id = ?", (message_id,)).fetchone()
        if row:
            return bytes(row[0])
        time.sleep(0.05)
    raise TimeoutError(message_id)


BARE_CR = (b"From: News <news@example.com>\r\nTo: rcpt@example.org\r\nSubject: carriage\r return\r\n"
           b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\none\rtwo\r\r\nthree\r\n\r\rfour\r\n")


def test_a_bare_cr_is_signed_stored_and_sent_as_the_same_crlf_bytes(signing_relay):
    relay, upstream, records = signing_relay
    upstream.handler.reply = "451 4.3.0 not yet"  # held, so the spool can be read before it is delivered
    answer, _, _ = transaction(relay.smtp_port, BARE_CR)
    message_id = submitted_id(answer)
    relay.wait_events("DeliveryDelay", 1, timeout=30)
    stored = _spooled(relay, message_id)
    upstream.handler.reply = None
    arrived = upstream.wait_for(1, timeout=30)[0].data
    assert b"\r" not in stored.replace(b"\r\n", b"")  # no bare CR left
    assert arrived.endswith(stored) and arrived[:-len(stored)].count(b"DKIM-Signature:") == 2
    assert _verifies(arrived, records, 0) and _verifies(arrived, records, 1)  # both failed at the receiver
    assert b"Subject: carriage\r\n return\r\n" in stored and b"one\r\ntwo\r\n\r\nthree\r\n\r\n\r\nfour\r\n" in stored


def test_a_field_behind_a_bare_cr_is_read_and_removed_not_hidden(signing_relay):
    relay, upstream, _ = signing_relay
    message = (b"From: News <news@example.com>\r\nTo: rcpt@example.org\r\n"
               b"Subject: hello\rX-SES-CONFIGURATION-SET: plain\r\n\r\nhi\r\n")
    answer, _, _ = transaction(relay.smtp_port, message)
    message_id = submitted_id(answer)
    arrived = upstream.wait_for(1, timeout=30)[0].data
    assert b"x-ses-configuration-set" not in arrived.lower()  # the recipient saw it on a line of its own
    send, = [r for r in relay.wait_events("Send", 1) if r[1] == message_id]
    assert send[3] == "plain"
    secret = message.replace(b": plain", b": secret")  # a set that does not exist: refused as in any other place
    assert transaction(relay.smtp_port, secret)[0].startswith("554 ")


def _with_bare_cr(corpus: Path) -> list[Path]:
    """Corpus mail with a bare CR that SMTP can carry at all (lines within 998 octets once CRLF)."""
    def sendable(raw: bytes) -> bool:
        return max(map(len, re.split(rb"\r\n|\r|\n", raw))) <= 998

    found = [(p, p.read_bytes()) for p in sorted((corpus / "eml").rglob("*.eml"))]
    return [p for p, raw in found if re.search(rb"\r(?!\n)", raw) and sendable(raw)]


def test_corpus_mail_with_a_bare_cr_arrives_with_signatures_that_verify(corpus, tmp_path):
    messages = _with_bare_cr(corpus)
    if not messages:
        pytest.skip("no corpus message SMTP can carry has a bare CR")
    for relay, upstream, records in _signing_relay(tmp_path):
        for n, path in enumerate(messages, 1):
            # The fallback set signs mail without a From (an Outlook .msg sent as it is, say) for example.com
            answer, _, _ = transaction(relay.smtp_port, b"X-SES-CONFIGURATION-SET: fallback\r\n" + path.read_bytes())
            submitted_id(answer)
            arrived = upstream.wait_for(n, timeout=30)[-1].data
            assert _verifies(arrived, records, 0) and _verifies(arrived, records, 1), path.name


@settings(max_examples=400)
@given(st.binary(max_size=60).map(lambda b: bytes(c % 4 + 97 if c % 3 else (13, 10)[c % 2] for c in b)))
def test_to_crlf_reads_line_ends_as_aiosmtplib_writes_them_also_slice_by_slice(raw):
    from aiosmtplib.protocol import LINE_ENDINGS_REGEX

    want = LINE_ENDINGS_REGEX.sub(b"\r\n", raw)
    assert to_crlf(raw) == want
    saved = headers._SLICE
    headers._SLICE = 5  # the slicing of big messages, on small ones
    try:
        assert to_crlf(raw) == want
        for sub in (b"\r\n", b"\r", b"\n"):
            assert headers._count(raw, sub) == raw.count(sub)
    finally:
        headers._SLICE = saved


# --- D: the pixel at the end of a part goes before its final line break ---------------------------------------

NO_BODY_CLOSE = '<html><p>Hi</p><a href="https://shop.example.com/a">a</a>\r\n<p>tschüss</p></html>\r\n'.encode()
ENCODED = {  # the part's body in each transfer encoding
    "7bit": lambda: NO_BODY_CLOSE.replace("ü".encode(), b"ue"),
    "8bit": lambda: NO_BODY_CLOSE,
    "quoted-printable": lambda: binascii.b2a_qp(NO_BODY_CLOSE, istext=True),
    "base64": lambda: base64.encodebytes(NO_BODY_CLOSE),
}


@pytest.mark.parametrize("cte", ENCODED)
def test_a_pixel_at_the_end_goes_before_the_final_line_break(relay, cte):
    body = re.sub(rb"\r?\n", b"\r\n", ENCODED[cte]())
    message = (HEAD + b"Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: " + cte.encode()
               + b"\r\n\r\n" + body)
    answer, _, _ = transaction(relay.smtp_port, message)
    copy = delivered(relay, submitted_id(answer))
    assert copy.endswith(b"\r\n")  # a single part: the message ended without a line break
    got = message_from_bytes(copy, policy=policy.default).get_body(("html",)).get_content()
    pixel = PIXEL.search(got)
    assert pixel, got
    assert got.replace("\r\n", "\n").endswith("</html>" + pixel.group(0) + "\n"), got[-300:]  # not after it
