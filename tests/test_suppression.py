"""The account suppression list: suppressed recipients are not relayed and get SES's Send + Bounce
(OnAccountSuppressionList); a permanent bounce lists the address; per-set reasons; `relay suppression`.

End to end through relay as a subprocess with an aiosmtpd upstream; the store parts on a real database. The
tests that touch the store run on both backends (SQLite, PostgreSQL), but for those the CLI drives (see there).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from relay.core import events as ev
from relay.core.suppression import Suppression
from relay.store import (
    EventRow,
    MessageRow,
    Store,
    open_store,
    suppress,
    suppression_entries,
    unsuppress,
    with_suppression,
)
from relay.suppression import parse_csv, to_csv

from .conftest import INTEGRITY_ERRORS, sqlite_run_only
from .harness import ROOT, RelayProcess, Upstream, UpstreamHandler
from .test_destinations import wait_until
from .test_events import REFERENCE, keys
from .test_relay_e2e import submit

SETS = """
[configuration_sets.lenient]
suppression_reasons = ["COMPLAINT"]
"""


def message(set_name: str | None = None) -> bytes:
    head = f"X-SES-CONFIGURATION-SET: {set_name}\r\n" if set_name else ""
    return (f"{head}From: Sender <sender@example.com>\r\nTo: list@example.org\r\nSubject: News\r\n"
            "Message-ID: <n-1@example.com>\r\n\r\nHello\r\n").encode()


def send(relay: RelayProcess, rcpts: tuple[str, ...], set_name: str | None = None) -> str:
    code, reply = submit(relay.smtp_port, message(set_name), rcpts=rcpts)
    assert code == 250, reply
    return re.match(rb"Ok (\S+)$", reply).group(1).decode()


def cli(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relay.cli", "suppression", *args, "--config", str(config)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)


def rows(relay: RelayProcess, sql: str, *params) -> list[tuple]:
    with contextlib.closing(relay.db()) as conn:
        return conn.execute(sql, params).fetchall()


def message_events(relay: RelayProcess, message_id: str) -> list[tuple[str, str | None, dict]]:
    return [(t, r, json.loads(rec)) for t, r, rec in rows(
        relay, "SELECT type, recipient, record FROM events WHERE message_id = ? ORDER BY id", message_id)]


class RefusingHandler(UpstreamHandler):
    """An upstream that refuses some recipients at RCPT with a 5xx, and counts every RCPT it sees."""

    def __init__(self, refused: set[str]):
        super().__init__()
        self.refused, self.rcpts = refused, []

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        self.rcpts.append(address)
        if address.lower() in self.refused:
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"


@pytest.fixture
def upstream():
    u = Upstream()
    u.handler = RefusingHandler({"gone@example.org"})
    u.start()
    yield u
    u.stop()


@pytest.fixture
def relay(tmp_path, upstream, store_url):
    r = RelayProcess(tmp_path / "relay", upstream.port, extra=SETS, store_url=store_url).start()
    yield r
    r.stop()


# --- end to end ---------------------------------------------------------------------------------------------

def test_a_suppressed_recipient_is_bounced_at_acceptance_and_the_other_is_relayed(relay, upstream):
    added = cli(relay.config_path, "add", "Blocked@Example.ORG", "--reason", "BOUNCE")
    assert added.returncode == 0, added.stderr
    message_id = send(relay, ("ok@example.org", "blocked@example.org"), "marketing")
    upstream.wait_for(1)
    wait_until(lambda: len(message_events(relay, message_id)) == 3, what="3 events")
    assert [(m.rcpt_tos) for m in upstream.messages] == [["ok@example.org"]]
    assert "blocked@example.org" not in upstream.handler.rcpts  # never even offered upstream
    got = message_events(relay, message_id)
    assert [(t, r) for t, r, _ in got if t in ("Send", "Bounce")] == [
        ("Send", None), ("Bounce", "blocked@example.org")]  # one Send per message (SES's)
    assert [(t, r) for t, r, _ in got if t == "Delivery"] == [("Delivery", "ok@example.org")]
    bounce = next(rec for t, _, rec in got if t == "Bounce")
    send_record = next(rec for t, _, rec in got if t == "Send")
    # SES's record, field by field (../shared/reference, when it is there)
    if REFERENCE.is_dir():
        ref = json.loads((REFERENCE / "bounce.json").read_text())
        assert set(bounce) == set(ref)
        assert keys(ref["bounce"], "bounce.") == keys(bounce["bounce"], "bounce.")
        assert keys(ref["mail"]) <= keys(bounce["mail"])
    assert bounce["mail"] == send_record["mail"]
    detail = bounce["bounce"]
    assert (detail["bounceType"], detail["bounceSubType"]) == ("Permanent", "OnAccountSuppressionList")
    assert detail["bouncedRecipients"] == [{"emailAddress": "blocked@example.org", "action": "failed",
                                            "status": "5.1.1", "diagnosticCode": ev.SUPPRESSED_DIAGNOSTIC}]
    assert detail["reportingMTA"] == "dsn; relay.test"
    assert ev.SES_ID_FORMAT.match(detail["feedbackId"])
    assert detail["timestamp"] == bounce["mail"]["timestamp"]  # at acceptance, as SES does
    assert rows(relay, "SELECT recipient, state, attempts FROM recipients WHERE message_id = ? ORDER BY position",
                message_id) == [("ok@example.org", "delivered", 1), ("blocked@example.org", "bounced", 0)]
    # the OnAccountSuppressionList bounce does not refresh the entry (it was added by hand: no message id)
    assert rows(relay, "SELECT email_address, reason, message_id FROM suppressed_destinations") == [
        ("blocked@example.org", "BOUNCE", None)]
    # every copy is final: the body stays only for the console, retention.message_bodies (2 days) long
    assert rows(relay, "SELECT COUNT(*) FROM spool WHERE message_id = ?", message_id) == [(1,)]


@sqlite_run_only  # its store work (accept_work with final copies) runs on both backends in the unit test below
def test_a_message_whose_recipients_are_all_suppressed_is_accepted_and_final(relay, upstream):
    assert cli(relay.config_path, "add", "a@example.org", "--reason", "COMPLAINT").returncode == 0
    assert cli(relay.config_path, "add", "b@example.org", "--reason", "UNSUBSCRIBE").returncode == 0
    message_id = send(relay, ("A@example.org", "b@example.org"))  # no set: the account's reasons (all three)
    # final in the accepting transaction: nothing queued, nothing spooled, straight after the 250
    assert rows(relay, "SELECT recipient, state, last_response FROM recipients WHERE message_id = ?"
                " ORDER BY position", message_id) == [
        ("A@example.org", "bounced", "not sent: on the suppression list (COMPLAINT)"),
        ("b@example.org", "bounced", "not sent: on the suppression list (UNSUBSCRIBE)")]
    assert rows(relay, "SELECT COUNT(*) FROM spool WHERE message_id = ?", message_id) == [(0,)]
    assert [(t, r) for t, r, _ in message_events(relay, message_id)] == [
        ("Send", None), ("Bounce", "A@example.org"),
        ("Bounce", "b@example.org")]
    send(relay, ("ok@example.org",))  # the relay goes on as usual
    upstream.wait_for(1)
    assert upstream.handler.rcpts == ["ok@example.org"]
    assert "Traceback" not in relay.log()


def test_a_5xx_lists_the_address_and_the_next_message_is_not_relayed(relay, upstream):
    first = send(relay, ("gone@example.org",), "marketing")
    bounce, = relay.wait_events("Bounce", 1)
    assert json.loads(bounce[4])["bounce"]["bounceType"] == "Permanent"
    entry, = rows(relay, "SELECT email_address, reason, message_id, feedback_id FROM suppressed_destinations")
    assert entry[:3] == ("gone@example.org", "BOUNCE", first)
    assert entry[3] == json.loads(bounce[4])["bounce"]["feedbackId"]
    assert upstream.handler.rcpts == ["gone@example.org"]
    second = send(relay, ("Gone@Example.org",), "marketing")
    wait_until(lambda: len(relay.events("Bounce")) == 2, what="second bounce")
    record = json.loads(relay.events("Bounce")[1][4])
    assert record["mail"]["messageId"] == second
    assert record["bounce"]["bounceSubType"] == "OnAccountSuppressionList"
    assert upstream.handler.rcpts == ["gone@example.org"]  # not offered upstream again
    assert rows(relay, "SELECT message_id FROM suppressed_destinations") == [(first,)]  # not re-added
    # a set whose reasons exclude BOUNCE still sends to it (and would not list it either)
    send(relay, ("gone@example.org",), "lenient")
    wait_until(lambda: len(relay.events("Bounce")) == 3, what="third bounce")
    assert upstream.handler.rcpts == ["gone@example.org", "gone@example.org"]
    assert json.loads(relay.events("Bounce")[2][4])["bounce"]["bounceSubType"] != "OnAccountSuppressionList"
    # ... while an address listed for a reason it applies is not sent to
    assert cli(relay.config_path, "add", "angry@example.org", "--reason", "COMPLAINT").returncode == 0
    angry = send(relay, ("angry@example.org",), "lenient")
    assert [t for t, _, _ in message_events(relay, angry)] == ["Send", "Bounce"]
    # and removing the entry sends again
    removed = cli(relay.config_path, "remove", "gone@example.org")
    assert removed.returncode == 0 and "removed 1 entry" in removed.stdout
    send(relay, ("gone@example.org",), "marketing")
    wait_until(lambda: len(upstream.handler.rcpts) == 3, what="offered again")


# --- the CLI on a real database --------------------------------------------------------------------------------
# SQLite only: each call is a process (about a second on PostgreSQL). The store's side of every command (suppress,
# unsuppress, the filtered and paged list, set options) runs on both backends in the unit tests below and in
# tests/test_api_suppression.py.

def test_cli_add_list_remove_import_export_round_trip(tmp_path):
    first = RelayProcess(tmp_path / "one")
    first.write_config()
    config = first.config_path
    assert cli(config, "add", " Someone@Example.COM ", "--reason", "bounce").returncode == 0
    assert cli(config, "add", "someone@example.com", "--reason", "COMPLAINT").returncode == 0
    bad = cli(config, "add", "not-an-address", "--reason", "BOUNCE")
    assert bad.returncode == 1 and "not an email address" in bad.stderr
    bad = cli(config, "add", "x@example.com", "--reason", "SPAM")
    assert bad.returncode == 1 and "SPAM" in bad.stderr
    listed = cli(config, "list")
    assert listed.returncode == 0
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["EMAIL", "REASON", "LAST", "UPDATE", "MESSAGE", "ID"]
    assert [ln.split()[:2] for ln in lines[1:]] == [["someone@example.com", "BOUNCE"],
                                                     ["someone@example.com", "COMPLAINT"]]
    as_json = json.loads(cli(config, "list", "--reason", "COMPLAINT", "--json").stdout)
    assert [(e["EmailAddress"], e["Reason"]) for e in as_json] == [("someone@example.com", "COMPLAINT")]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", as_json[0]["LastUpdateTime"])
    assert json.loads(cli(config, "list", "--since", "2999-01-01", "--json").stdout) == []
    assert len(json.loads(cli(config, "list", "--since", "1d", "--json").stdout)) == 2

    csv_in = tmp_path / "in.csv"
    csv_in.write_text("email,reason\nA@example.net,BOUNCE\nb@example.net, complaint\nbroken line\n"
                      "c@example.net,SPAM\n\nd@example.net,UNSUBSCRIBE\n")
    imported = cli(config, "import", str(csv_in))
    assert imported.returncode == 1  # some lines were bad: they are skipped and reported with their numbers
    assert "imported 3 entries, skipped 2 bad lines" in imported.stdout
    assert f"{csv_in}:4: skipped" in imported.stderr and f"{csv_in}:5: skipped" in imported.stderr
    assert "SPAM" in imported.stderr

    exported = tmp_path / "out.csv"
    assert cli(config, "export", str(exported)).returncode == 0
    text = exported.read_text()
    assert text.splitlines() == ["email,reason", "a@example.net,BOUNCE", "b@example.net,COMPLAINT",
                                 "d@example.net,UNSUBSCRIBE", "someone@example.com,BOUNCE",
                                 "someone@example.com,COMPLAINT"]
    assert cli(config, "export").stdout == text  # stdout without a file

    second = RelayProcess(tmp_path / "two")
    second.write_config()
    clean = cli(second.config_path, "import", str(exported))
    assert clean.returncode == 0 and "imported 5 entries, skipped 0 bad lines" in clean.stdout
    again = tmp_path / "again.csv"
    assert cli(second.config_path, "export", str(again)).returncode == 0
    assert again.read_text() == text  # export -> import round-trips

    removed = cli(config, "remove", "SOMEONE@example.com", "--reason", "COMPLAINT")
    assert removed.returncode == 0 and "removed 1 entry" in removed.stdout
    missing = cli(config, "remove", "someone@example.com", "--reason", "COMPLAINT")
    assert missing.returncode == 1 and "does not exist on your suppression list" in missing.stderr
    assert cli(config, "remove", "someone@example.com").returncode == 0
    assert "someone@example.com" not in cli(config, "list").stdout


def test_cli_set_options(tmp_path):
    r = RelayProcess(tmp_path / "r", extra=SETS)
    r.write_config()
    made = subprocess.run([sys.executable, "-m", "relay.cli", "config-set", "create", "news", "--config",
                           str(r.config_path)], env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert made.returncode == 0
    assert cli(r.config_path, "options", "news").stdout.strip() == \
        "news: BOUNCE, COMPLAINT, UNSUBSCRIBE  [the account's [suppression] reasons]"
    assert cli(r.config_path, "options", "news", "--reasons", "complaint").stdout.strip() == \
        "news: COMPLAINT  [configuration set news]"
    assert cli(r.config_path, "options", "news", "--reasons", "").stdout.strip() == \
        "news: (none: the list does not apply)  [configuration set news]"
    assert "[the account's [suppression] reasons]" in cli(r.config_path, "options", "news", "--inherit").stdout
    assert cli(r.config_path, "options", "lenient").stdout.strip() == "lenient: COMPLAINT  [configuration set lenient]"
    refused = cli(r.config_path, "options", "lenient", "--reasons", "BOUNCE")
    assert refused.returncode == 1 and "read-only" in refused.stderr
    assert cli(r.config_path, "options", "nope").returncode == 1
    assert cli(r.config_path, "options", "news", "--reasons", "SPAM").returncode == 1


# --- units -------------------------------------------------------------------------------------------------------

def _row(message_id: str) -> MessageRow:
    return MessageRow(message_id, "2026-11-23T00:00:00.000Z", "s@example.com", None, "subj", None, 5, "127.0.0.1",
                      None, {"messageId": message_id}, {})


def test_accept_work_records_final_recipients_and_spools_only_what_is_left(store_target):
    store = open_store(store_target)
    try:
        final = {"b@x.org": ("bounced", "not sent")}
        store.submit(Store.accept_work(_row("m1"), ["a@x.org", "b@x.org"], b"raw", [], final)).result(5)
        store.submit(Store.accept_work(_row("m2"), ["b@x.org"], b"raw", [], final)).result(5)
        store.submit(Store.accept_work(_row("m3"), ["c@x.org"], b"raw", [])).result(5)  # old callers: unchanged
        assert store.query("SELECT message_id, recipient, position, state, last_response FROM recipients"
                           " ORDER BY message_id, position") == [
            ("m1", "a@x.org", 0, "queued", None), ("m1", "b@x.org", 1, "bounced", "not sent"),
            ("m2", "b@x.org", 0, "bounced", "not sent"), ("m3", "c@x.org", 0, "queued", None)]
        assert store.query("SELECT message_id FROM spool ORDER BY message_id") == [("m1",), ("m3",)]
        assert [(c.message_id, c.recipient) for c in store.pending_copies()] == [("m1", "a@x.org"),
                                                                                 ("m3", "c@x.org")]
        # the queued one's outcome drops the spool as before
        store.submit(Store.recipient_work("m1", "a@x.org", "delivered", 1, None, "250", "t", [])).result(5)
        assert store.query("SELECT message_id FROM spool") == [("m3",)]
    finally:
        store.close()


def test_with_suppression_is_one_transaction(store_target):
    store = open_store(store_target)
    try:
        entry = Suppression("x@example.org", "BOUNCE", "2026-11-23T00:00:00.000Z", "m", "f")
        assert with_suppression(Store.events_work([]), []) is not None
        store.submit(with_suppression(Store.events_work([EventRow("Bounce", "t", "m", "x", None, {})]),
                                      [entry])).result(5)
        assert store.tracking_read(suppression_entries) == [entry]

        unstorable = Suppression("y@example.org", None, "t")  # type: ignore[arg-type]  # NOT NULL fails
        with pytest.raises(INTEGRITY_ERRORS):
            store.submit(with_suppression(Store.events_work([EventRow("Bounce", "t", "m2", "y", None, {})]),
                                          [unstorable])).result(5)
        assert store.tracking_read(suppression_entries) == [entry]
        assert len(store.events()) == 1  # the second event went with the entry that failed
    finally:
        store.close()


def test_entries_filters_and_keyset_pages(store_target):
    store = open_store(store_target)
    try:
        entries = [Suppression(f"u{i}@example.org", reason, f"2026-11-2{i}T00:00:00.000Z")
                   for i in range(5) for reason in ("BOUNCE", "COMPLAINT")]
        store.submit(lambda conn: suppress(conn, entries)).result(5)
        read = store.tracking_read
        assert len(read(suppression_entries)) == 10
        assert {e.reason for e in read(suppression_entries, None, ["COMPLAINT"])} == {"COMPLAINT"}
        assert [e.email_address for e in read(suppression_entries, None, ["BOUNCE"], "2026-11-21T00:00:00.000Z",
                                              "2026-11-23T00:00:00.000Z")] == ["u1@example.org", "u2@example.org"]
        pages, after = [], None
        while True:  # bounded: 10 entries, 3 a page
            page = read(suppression_entries, None, (), None, None, after, 3)
            pages.append(page)
            if len(page) < 3 or len(pages) > 5:
                break
            after = (page[-1].email_address, page[-1].reason)
        assert [e for p in pages for e in p] == read(suppression_entries)
        assert read(suppression_entries, "U3@EXAMPLE.ORG") == [entries[6], entries[7]]
        assert store.submit(lambda conn: unsuppress(conn, "u3@example.org", ["BOUNCE"])).result(5) == 1
        assert store.submit(lambda conn: unsuppress(conn, "u3@example.org")).result(5) == 1
        assert store.submit(lambda conn: unsuppress(conn, "u3@example.org")).result(5) == 0
    finally:
        store.close()


def test_parse_csv_header_optional_bad_lines_numbered():
    parsed = parse_csv("a@x.org,BOUNCE\nb@x.org,complaint,extra\n\"c@x.org\",UNSUBSCRIBE\na@x.org,BOUNCE\n", "t")
    assert [(e.email_address, e.reason) for e in parsed.entries] == [("a@x.org", "BOUNCE"), ("c@x.org", "UNSUBSCRIBE")]
    assert [n for n, _ in parsed.bad] == [2]
    headed = parse_csv("email,reason\nd@x.org,BOUNCE\n", "t")
    assert [e.email_address for e in headed.entries] == ["d@x.org"] and not headed.bad
    assert parse_csv(to_csv(headed.entries), "t").entries == headed.entries
    assert [n for n, _ in parse_csv("x,BOUNCE\nnobody,BOUNCE\n", "t").bad] == [1, 2]  # not a header: a reason
