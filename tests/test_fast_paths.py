"""The shortcuts taken for throughput keep behaviour: no configuration or suppression read before each message,
but a change committed before a message is queued still applies to it; events spliced from the stored mail JSON
are byte for byte what encoding the whole record gives; plain MAIL/RCPT paths parse as aiosmtpd parses them;
batched log lines come out whole and in order.

The pipeline runs on a real store, SQLite and PostgreSQL in turn; changes come through a second Store on the
same database, as from `relay config-set` or `relay suppression` in another process.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import random
import threading
import tomllib

import pytest
from aiosmtpd.smtp import SMTP

from relay import sets
from relay.config import parse
from relay.core import events as ev
from relay.core.resolve import TrackingOptions
from relay.core.suppression import Suppression
from relay.pipeline import Pipeline, Refusal, Submission
from relay.resolve import Resolver
from relay.service import LoopBatchedHandler
from relay.smtp import RelaySMTP
from relay.store import Store, mail_json, open_store, record_json, suppress

from .conftest import store_toml

TOML = """
[relay]
data_dir = "data"
hostname = "relay.test"
[tracking]
default_host = "t.example.net"
require_verified_domains = false
"""


@pytest.fixture
def env(tmp_path, store_url):
    cfg = parse(tomllib.loads(TOML + store_toml(store_url)), tmp_path, tmp_path / "relay.toml")
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    store = open_store(cfg.store_target)
    other = open_store(cfg.store_target)  # another process's writer
    pipeline = Pipeline(cfg, store, Resolver(cfg, store), None, None, None)
    yield cfg, store, other, pipeline
    other.close()
    store.close()


def submission(set_name: str | None, *rcpts: str) -> Submission:
    head = f"X-SES-CONFIGURATION-SET: {set_name}\r\n" if set_name else ""
    data = f"{head}From: a@example.com\r\nSubject: s\r\n\r\nbody\r\n".encode()
    return Submission("a@example.com", list(rcpts), data, "127.0.0.1", "client", None, False)


def stored(store: Store, message_id: str) -> tuple:
    return store.query("SELECT configuration_set, settings_json FROM messages WHERE id = ?", (message_id,))[0]


def test_a_set_created_after_the_model_was_cached_is_used_by_the_next_message(env):
    cfg, store, other, pipeline = env
    asyncio.run(pipeline.accept(submission(None, "x@example.org")))  # the model is cached now
    with pytest.raises(Refusal, match="Configuration set <late> does not exist"):
        asyncio.run(pipeline.accept(submission("late", "x@example.org")))
    sets.create_set(cfg, other, "late")
    msg = asyncio.run(pipeline.accept(submission("late", "x@example.org")))
    assert msg.configuration_set == "late"
    assert stored(store, msg.id)[0] == "late"


def test_a_changed_option_reaches_the_next_message(env):
    cfg, store, other, pipeline = env
    sets.create_set(cfg, other, "news")
    first = asyncio.run(pipeline.accept(submission("news", "x@example.org")))
    assert not first.settings.open_tracking
    sets.put_tracking(cfg, other, "set", "news", TrackingOptions(open_tracking=True))
    second = asyncio.run(pipeline.accept(submission("news", "x@example.org")))
    assert second.settings.open_tracking
    assert json.loads(stored(store, second.id)[1]) == second.settings.to_json()


def test_an_address_suppressed_after_a_message_is_final_for_the_next(env):
    cfg, store, other, pipeline = env
    first = asyncio.run(pipeline.accept(submission(None, "x@example.org", "y@example.org")))
    assert first.to_deliver(["x@example.org", "y@example.org"]) == ["x@example.org", "y@example.org"]
    other.submit(lambda conn: suppress(conn, [Suppression("Y@example.org", "BOUNCE", "2026-01-01T00:00:00.000Z",
                                                          None, None)])).result()
    second = asyncio.run(pipeline.accept(submission(None, "x@example.org", "y@example.org")))
    assert second.to_deliver(["x@example.org", "y@example.org"]) == ["x@example.org"]
    assert store.query("SELECT recipient, state FROM recipients WHERE message_id = ? ORDER BY position",
                       (second.id,)) == [("x@example.org", "queued"), ("y@example.org", "bounced")]
    assert [e["eventType"] for e in store.events(second.id)] == ["Send", "Bounce"]


def test_events_spliced_from_the_stored_mail_are_the_encoded_records(env):
    cfg, store, other, pipeline = env
    msg = asyncio.run(pipeline.accept(submission(None, "x@example.org")))
    assert stored(store, msg.id) and msg.mail_json == mail_json(msg.mail)
    assert store.events(msg.id) == [ev.send_record(msg.mail)]
    mail = dict(msg.mail, headers=[{"name": "Subject", "value": "caf\u00e9 \u2028 \"q\" <a> \\"}])
    records = [ev.send_record(mail), ev.reject_record(mail, "Bad content"),
               ev.delivery_record(mail, "x@example.org", 10**12, "250 ok", "relay.test", "127.0.0.1"),
               ev.delay_record(mail, "x@example.org", 10**12, "TransientCommunicationFailure", "4.0.0", "421",
                               10**12 + 1),
               {"mail": mail, "eventType": "Send", "send": {}}]  # another key order: encoded whole
    for record in records:
        assert record_json(record, mail_json(mail)) == json.dumps(record, separators=(",", ":"))


def test_plain_paths_parse_as_aiosmtpd_does():
    ours, theirs = RelaySMTP.__new__(RelaySMTP), SMTP.__new__(SMTP)
    cases = ["<a@b>", "<a@b> SIZE=10 BODY=8BITMIME", "<a@b>  SIZE=10", "<a@b> (c) X=1", "<a@b>\tX=1", "<a@b> ",
             "<a.b@c.d>", "<a..b@c>", "<.a@b>", "<a.@b>", "<a@b.>", "<a@-b>", "<\"q\"@b>", "<@r:a@b>",
             "<a@[1.2.3.4]>", "<a@b>>", "<a@b>x", "< a@b>", "<a b@c>", "<>", "<x!#$%&'*+/=?^_`{|}~-@ex.com>",
             "<a@b_c>", "<\u00e9@b>", "<a@b..c>", "<a@b>\n", "a@b", "<averyverylonglocalpart@example.com>"]
    rng = random.Random(7)
    cases += ["<" + "".join(rng.choice("ab.@<>-_+\" :[]x()") for _ in range(rng.randint(1, 10))) + ">"
              + rng.choice(["", " X=1", "x", "  Y", " (c)", " "]) for _ in range(3000)]

    def parse_with(server, arg):
        try:
            return server._getaddr(arg)
        except Exception as exc:  # aiosmtpd's parser fails on some garbage; ours must fail the same way
            return type(exc).__name__

    for limit in (0, 5, 64):
        ours.local_part_limit = theirs.local_part_limit = limit
        for arg in cases:
            assert parse_with(ours, arg) == parse_with(theirs, arg), (limit, arg)


def test_batched_log_lines_are_written_whole_in_order_at_the_end_of_the_iteration():
    stream = io.StringIO()
    log = logging.getLogger("relay.test-batched")
    log.propagate, log.level = False, logging.INFO

    async def main() -> list[str]:
        handler = LoopBatchedHandler(stream, asyncio.get_running_loop())
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        log.addHandler(handler)
        try:
            seen = []
            log.info("one")
            log.info("two")
            seen.append(stream.getvalue())  # same iteration: nothing written yet
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            seen.append(stream.getvalue())
            log.info("three")
            log.warning("four")  # at once, after what is pending
            seen.append(stream.getvalue())
            thread = threading.Thread(target=log.info, args=("five",))  # another thread: at once
            thread.start()
            thread.join()
            seen.append(stream.getvalue())
            log.info("six")
            handler.flush()  # as logging.shutdown does
            seen.append(stream.getvalue())
            return seen
        finally:
            log.removeHandler(handler)

    assert asyncio.run(main()) == [
        "",
        "INFO one\nINFO two\n",
        "INFO one\nINFO two\nINFO three\nWARNING four\n",
        "INFO one\nINFO two\nINFO three\nWARNING four\nINFO five\n",
        "INFO one\nINFO two\nINFO three\nWARNING four\nINFO five\nINFO six\n",
    ]


def test_a_message_prepared_again_after_a_stale_model_is_still_scanned(env, tmp_path):
    """The fast path is abandoned before its virus scan when the cached model lacks the message's set; the
    message prepared again must be scanned all the same (here clamd is unreachable: 451, as configured)."""
    from relay.config import ScanSettings
    from relay.scan import ClamdScanner

    cfg, store, other, pipeline = env
    pipeline.scanner = ClamdScanner(ScanSettings(clamd_socket=tmp_path / "no-clamd.sock", timeout=2))
    with pytest.raises(Refusal, match="^451"):
        asyncio.run(pipeline.accept(submission(None, "x@example.org")))  # scanned; the model is cached now
    sets.create_set(cfg, other, "late")
    with pytest.raises(Refusal, match="^451"):
        asyncio.run(pipeline.accept(submission("late", "x@example.org")))
    assert store.query("SELECT COUNT(*) FROM messages")[0][0] == 0
