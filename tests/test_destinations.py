"""Event destinations end to end: relay as a process, a real aiohttp receiver on 127.0.0.1, JSON Lines files.

The receiver is down, then answers 500, then is slow (beyond the destination's timeout), then recovers:
every event of the set arrives, in order per message, signed, with no duplicate beyond at-least-once. The
tests whose subject is what the store keeps (cursors across a backlog and a restart, set-aside events) run on
both store backends; the JSON Lines file and the CLI's changes reaching a running relay run on SQLite (the
CLI's store works and the change counter run on both in tests/test_sets.py and tests/test_api.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import smtplib
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from aiohttp import web

from relay.core import publish

from .harness import ROOT, RelayProcess, Upstream, free_port

REFERENCE = ROOT.parent / "shared" / "reference" / "ses-events"
SECRET = "hook-secret"
MESSAGE = (b"From: News <news@example.com>\r\nTo: rcpt@example.org\r\nSubject: Hi\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: text/html\r\n\r\n<p>Hello <a href=\"https://example.com/x\">x</a></p>\r\n")


class Receiver:
    """An HTTP receiver in its own thread. `status` and `delay` decide the answers; `got` holds
    (event id, body, headers, status answered, answered within the client's timeout)."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.status = 200
        self.delay = 0.0
        self.got: list[tuple[int, bytes, dict, int, bool]] = []
        self.lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        status, delay = self.status, self.delay
        with self.lock:
            self.got.append((int(request.headers["X-Relay-Event-Id"]), body, dict(request.headers), status,
                             delay == 0))
        if delay:
            await asyncio.sleep(delay)
        return web.Response(status=status, text="ok" if status == 200 else "no")

    def start(self) -> Receiver:
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            app = web.Application()
            app.router.add_post("/{tail:.*}", self.handle)
            self._runner = web.AppRunner(app)
            self._loop.run_until_complete(self._runner.setup())
            self._loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop = None

    def ok_ids(self) -> list[int]:
        with self.lock:
            return [g[0] for g in self.got if g[3] == 200]


def submit(port: int, data: bytes, set_name: str | None = "hooks", sender: str = "news@example.com") -> str:
    head = f"X-SES-CONFIGURATION-SET: {set_name}\r\n".encode() if set_name else b""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test")
        code, reply = client.mail(sender)
        assert code == 250
        client.rcpt("rcpt@example.org")
        code, reply = client.data(head + data)
    assert code == 250, reply
    return re.match(rb"Ok (\S+)$", reply).group(1).decode()


def set_events(r: RelayProcess, set_name: str, types: tuple[str, ...]) -> list[tuple[int, str, str]]:
    """(id, type, message id) of a set's events in the database."""
    with contextlib.closing(r.db()) as conn:
        marks = ",".join("?" * len(types))
        return conn.execute(f"SELECT id, type, message_id FROM events WHERE configuration_set = ? AND type IN"
                            f" ({marks}) ORDER BY id", (set_name, *types)).fetchall()


def wait_until(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(what)


def hooks_toml(hook_port: int, jsonl: Path, extra: str = "") -> str:
    return f"""
[configuration_sets.hooks]
open_tracking = true
[[configuration_sets.hooks.destinations]]
name = "plain"
type = "webhook"
url = "http://127.0.0.1:{hook_port}/plain"
secret = "{SECRET}"
event_types = ["SEND", "DELIVERY"]
timeout = "0.5s"
retry_initial = "0.05s"
retry_max = "0.2s"
[[configuration_sets.hooks.destinations]]
name = "sns"
type = "webhook"
url = "http://127.0.0.1:{hook_port}/sns"
sns_envelope = true
secret = "{SECRET}"
event_types = ["SEND", "DELIVERY"]
timeout = "0.5s"
retry_initial = "0.05s"
retry_max = "0.2s"
[[configuration_sets.hooks.destinations]]
name = "lines"
type = "file"
path = "{jsonl}"
event_types = ["SEND", "DELIVERY"]
[[configuration_sets.hooks.destinations]]
name = "off"
type = "file"
path = "{jsonl}.disabled"
event_types = ["SEND", "DELIVERY"]
enabled = false
{extra}
"""


@pytest.fixture
def upstream():
    u = Upstream().start()
    yield u
    u.stop()


def test_webhook_down_500_slow_then_recovers(tmp_path, upstream, store_url):
    hook = Receiver()
    jsonl = tmp_path / "events.jsonl"
    r = RelayProcess(tmp_path / "r", upstream.port, extra=hooks_toml(hook.port, jsonl), store_url=store_url).start()
    try:
        mids = [submit(r.smtp_port, MESSAGE) for _ in range(4)]
        wait_until(lambda: len(set_events(r, "hooks", ("Send", "Delivery"))) == 8, what="8 events")
        expected = [row[0] for row in set_events(r, "hooks", ("Send", "Delivery"))]
        # The receiver is down; the file destination is not held up by it.
        wait_until(lambda: jsonl.exists() and len(jsonl.read_text().splitlines()) == 8, what="file lines")
        hook.start()
        hook.status = 500
        wait_until(lambda: len(hook.got) >= 6, what="500 answers")
        hook.status, hook.delay = 200, 1.0  # beyond the 0.5 s timeout: the sender gives up and retries
        wait_until(lambda: len(hook.got) >= 10, what="slow answers")
        hook.delay = 0.0
        wait_until(lambda: _complete(hook, expected), what="all events delivered")
        mids += [submit(r.smtp_port, MESSAGE)]  # after recovery, new events flow at once
        wait_until(lambda: len(set_events(r, "hooks", ("Send", "Delivery"))) == 10)
        expected = [row[0] for row in set_events(r, "hooks", ("Send", "Delivery"))]
        wait_until(lambda: _complete(hook, expected), what="new events delivered")
        assert not (Path(f"{jsonl}.disabled")).exists()  # a disabled destination receives nothing
    finally:
        r.stop()
        hook.stop()
    assert any(g[3] == 500 for g in hook.got) and any(not g[4] for g in hook.got)  # both failure kinds happened
    _check_deliveries(hook, expected, set_events(r, "hooks", ("Send", "Delivery")))


def _complete(hook: Receiver, expected: list[int]) -> bool:
    with hook.lock:
        by_path: dict[str, set[int]] = {}
        for event_id, _, headers, status, fast in hook.got:
            if status == 200 and fast:
                by_path.setdefault(headers.get("x-amz-sns-message-type", "plain"), set()).add(event_id)
    return all(set(expected) <= by_path.get(k, set()) for k in ("plain", "Notification"))


def _check_deliveries(hook: Receiver, expected: list[int], rows: list[tuple]) -> None:
    message_of = {row[0]: row[2] for row in rows}
    for kind in ("plain", "Notification"):
        got = [g for g in hook.got if g[2].get("x-amz-sns-message-type", "plain") == kind]
        # No duplicates beyond at-least-once: an event is answered 200 in time at most once.
        fast_ok = [g[0] for g in got if g[3] == 200 and g[4]]
        assert sorted(fast_ok) == sorted(set(fast_ok)) and set(fast_ok) == set(expected)
        # Order per message (and per destination): first arrivals follow the events' order.
        first: list[int] = []
        for g in got:
            if g[0] not in first:
                first.append(g[0])
        assert first == sorted(first)
        for mid in set(message_of.values()):
            ids = [i for i in first if message_of.get(i) == mid]
            assert ids == sorted(ids) and len(ids) == 2
        for event_id, body, headers, _, _ in got:
            assert publish.verify(SECRET, body, headers["X-Relay-Signature"])
            record = json.loads(body) if kind == "plain" else None
            if kind == "Notification":
                env = json.loads(body)
                assert set(env) == {"Type", "MessageId", "TopicArn", "Subject", "Message", "Timestamp"}
                assert env["Type"] == "Notification" and env["Subject"] == "Amazon SES Email Event Notification"
                assert env["TopicArn"] == "arn:aws:sns:local:000000000000:hooks-sns"
                assert headers["x-amz-sns-message-id"] == env["MessageId"]
                record = json.loads(env["Message"])
            assert record["eventType"] in ("Send", "Delivery") and record["mail"]["messageId"] == message_of[event_id]


def test_a_restart_in_the_middle_of_a_backlog_loses_nothing(tmp_path, upstream, store_url):
    hook = Receiver()
    r = RelayProcess(tmp_path / "r", upstream.port, extra=hooks_toml(hook.port, tmp_path / "e.jsonl"),
                     store_url=store_url).start()
    try:
        for _ in range(3):
            submit(r.smtp_port, MESSAGE)
        wait_until(lambda: len(set_events(r, "hooks", ("Send", "Delivery"))) == 6)
        hook.start()
        hook.delay = 0.3  # a slow receiver: relay is stopped with most of the backlog still to send
        wait_until(lambda: len(hook.got) >= 1)
        assert r.stop(signal.SIGTERM) == 0
        sent_before = len(hook.ok_ids())
        assert sent_before < 12
        hook.delay = 0.0
        r.start()
        for _ in range(2):
            submit(r.smtp_port, MESSAGE)
        wait_until(lambda: len(set_events(r, "hooks", ("Send", "Delivery"))) == 10)
        expected = [row[0] for row in set_events(r, "hooks", ("Send", "Delivery"))]
        wait_until(lambda: _complete(hook, expected), what="backlog delivered after restart")
    finally:
        r.stop()
        hook.stop()
    counts = {i: hook.ok_ids().count(i) for i in expected}
    assert sum(counts.values()) <= 2 * len(expected) + 4  # at-least-once: only the in-flight ones twice


def _shape(value, depth: int = 0):
    """Keys of a record down to the event's own object (values' types for leaves)."""
    if isinstance(value, dict) and depth < 2:
        return {k: _shape(v, depth + 1) for k, v in value.items()}
    return type(value).__name__


def test_jsonl_matches_ses_examples_and_reopens_after_sighup(tmp_path, upstream):
    jsonl = tmp_path / "events.jsonl"
    r = RelayProcess(tmp_path / "r", upstream.port, extra=hooks_toml(free_port(), jsonl)).start()
    try:
        submit(r.smtp_port, MESSAGE)
        wait_until(lambda: jsonl.exists() and len(jsonl.read_text().splitlines()) == 2, what="2 lines")
        lines = jsonl.read_bytes().split(b"\n")
        assert lines[-1] == b""
        examples = {"Send": "send.json", "Delivery": "delivery.json"}
        for line in lines[:-1]:
            record = json.loads(line)
            if not REFERENCE.is_dir():
                continue
            example = json.loads((REFERENCE / examples[record["eventType"]]).read_text())
            assert set(record) == set(example)
            mine, theirs = _shape(record), _shape(example)
            assert set(theirs["mail"]) - {"sourceArn", "sendingAccountId"} <= set(mine["mail"]), record["mail"]
            detail = {"Send": "send", "Delivery": "delivery"}[record["eventType"]]
            if isinstance(theirs[detail], dict):
                assert set(theirs[detail]) <= set(mine[detail])
        rotated = tmp_path / "events.jsonl.1"
        jsonl.rename(rotated)
        r.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "configuration reloaded" in r.log(), what="reload")
        submit(r.smtp_port, MESSAGE)
        wait_until(lambda: jsonl.exists() and len(jsonl.read_text().splitlines()) == 2, what="new file")
        assert len(rotated.read_text().splitlines()) == 2
        assert not Path(f"{jsonl}.disabled").exists()
    finally:
        r.stop()


def test_hot_change_from_the_cli_while_serving(tmp_path, upstream):
    r = RelayProcess(tmp_path / "r", upstream.port).start()

    def cli(*args: str) -> None:
        out = subprocess.run([sys.executable, "-m", "relay.cli", *args, "--config", str(r.config_path)],
                             capture_output=True, text=True, env={"PYTHONPATH": str(ROOT)}, timeout=60)
        assert out.returncode == 0, out.stderr

    try:
        with smtplib.SMTP("127.0.0.1", r.smtp_port, timeout=30) as client:
            code, _ = client.sendmail("news@example.com", ["rcpt@example.org"],
                                      b"X-SES-CONFIGURATION-SET: fresh\r\n" + MESSAGE) or (250, b"")
    except smtplib.SMTPDataError as exc:
        assert exc.smtp_code == 554 and b"Configuration set <fresh> does not exist" in exc.smtp_error
    try:
        cli("config-set", "create", "fresh")
        cli("tracking", "set", "--config-set", "fresh", "--open", "on", "--click", "on")
        submit(r.smtp_port, MESSAGE, "fresh")
        got = upstream.wait_for(1)
        assert f"127.0.0.1:{r.tracking_port}/o/".encode() in got[-1].data
        assert f"127.0.0.1:{r.tracking_port}/c/".encode() in got[-1].data
        # A default set for the sender's domain: the next message without the header uses it.
        cli("config-set", "default", "example.com", "--set", "fresh")
        submit(r.smtp_port, MESSAGE, None)
        got = upstream.wait_for(2)
        assert f"127.0.0.1:{r.tracking_port}/o/".encode() in got[-1].data
        rows = r.events("Send")
        assert rows[-1][3] == "fresh" and json.loads(rows[-1][4])["mail"]["tags"]["ses:configuration-set"] == ["fresh"]
        # The identity is the From address, not MAIL FROM; with no set at all: relayed, recorded, not instrumented.
        submit(r.smtp_port, MESSAGE.replace(b"news@example.com", b"other@elsewhere.example"), None)
        got = upstream.wait_for(3)
        assert b"/o/" not in got[-1].data and r.events("Send")[-1][3] is None
    finally:
        r.stop()


def test_a_refused_event_is_set_aside_and_the_rest_goes_on(tmp_path, upstream, store_url):
    hook = Receiver().start()
    hook.status = 400
    extra = f"""
[configuration_sets.strict]
[[configuration_sets.strict.destinations]]
name = "w"
type = "webhook"
url = "http://127.0.0.1:{hook.port}/"
event_types = ["SEND"]
retry_initial = "0.05s"
retry_max = "0.1s"
max_refusals = 2
"""
    r = RelayProcess(tmp_path / "r", upstream.port, extra=extra, store_url=store_url).start()
    try:
        submit(r.smtp_port, MESSAGE, "strict")
        wait_until(lambda: len(hook.got) >= 2, what="two refusals")
        hook.status = 200
        submit(r.smtp_port, MESSAGE, "strict")
        wait_until(lambda: len(hook.ok_ids()) == 1, what="the next event")
        with contextlib.closing(r.db()) as conn:
            failures = conn.execute("SELECT destination, event_id, status FROM destination_failures").fetchall()
        first = set_events(r, "strict", ("Send",))[0][0]
        assert failures == [("w", first, 400)]
        assert [g[0] for g in hook.got if g[3] == 400] == [first, first]
    finally:
        r.stop()
        hook.stop()


def test_cli_destinations_follow_while_serving_and_a_disabled_one_receives_nothing(tmp_path, upstream):
    r = RelayProcess(tmp_path / "r", upstream.port).start()
    out = tmp_path / "cli.jsonl"

    def cli(*args: str) -> None:
        done = subprocess.run([sys.executable, "-m", "relay.cli", *args, "--config", str(r.config_path)],
                              capture_output=True, text=True, env={"PYTHONPATH": str(ROOT)}, timeout=60)
        assert done.returncode == 0, done.stderr

    def lines() -> list[dict]:
        return [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []

    try:
        cli("config-set", "create", "live")
        cli("destination", "add", "live", "f", "--type", "file", "--path", str(out), "--events", "send")
        first = submit(r.smtp_port, MESSAGE, "live")
        wait_until(lambda: len(lines()) == 1, what="first line")
        cli("destination", "disable", "live", "f")
        time.sleep(0.3)  # the publisher notices within POLL_S
        submit(r.smtp_port, MESSAGE, "live")
        r.wait_events("Send", 2)
        cli("destination", "enable", "live", "f")
        third = submit(r.smtp_port, MESSAGE, "live")
        wait_until(lambda: len(lines()) == 2, what="line after enabling")
        time.sleep(0.3)
        assert [x["mail"]["messageId"] for x in lines()] == [first, third]
    finally:
        r.stop()
