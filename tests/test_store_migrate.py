"""`relay store migrate`: a single node's SQLite database moved into PostgreSQL. The database is made the way
a user's is, by a running relay (messages delivered and queued, bounces, opens and clicks with verdicts, a
configuration set and a destination made with the CLI, suppression entries); every row must arrive and every
view must give the same answers on both. Also: a database laid out by the release before migrations were
numbered opens and is brought up to date without losing a row."""

from __future__ import annotations

import contextlib
import smtplib
import sqlite3
import subprocess
import sys
import time
import urllib.request

import pytest

from relay.store import open_store
from relay.store.schema import BASELINE, MIGRATIONS
from relay.store.transfer import TABLES

from .conftest import postgres_database
from .harness import ROOT, RelayProcess, Upstream

VIEWS = ("funnel_daily", "link_clicks", "recipient_engagement", "tracking_engagement", "message_timeline")
BROWSER = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36"


def relay_cli(*args: str, config=None) -> subprocess.CompletedProcess:
    extra = ["--config", str(config)] if config else []
    return subprocess.run([sys.executable, "-m", "relay.cli", *args, *extra], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def send(port: int, rcpt: str, n: int) -> None:
    body = (f"From: News <news@example.com>\r\nTo: {rcpt}\r\nSubject: Issue {n}\r\nX-SES-CONFIGURATION-SET: "
            f"marketing\r\nContent-Type: text/html\r\n\r\n<p><a href=\"https://shop.example.com/{n % 3}\">"
            f"x</a></p>\r\n")
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail("news@example.com", [rcpt], body.encode())


def rows(conn, table: str, columns: list[str]) -> list[tuple]:
    return sorted(tuple(bytes(v) if isinstance(v, memoryview) else v for v in r)
                  for r in conn.execute(f"SELECT {', '.join(columns)} FROM {table}").fetchall())


def make_user_database(tmp_path) -> RelayProcess:
    """A relay on SQLite that delivered, bounced, queued and was opened and clicked, then stopped."""
    upstream = Upstream().start()
    upstream.handler.refuse = {"gone@example.org"}  # a permanent bounce, and a suppression entry
    relay = RelayProcess(tmp_path / "single", upstream.port).start()
    try:
        assert relay_cli("config-set", "create", "newsletters", config=relay.config_path).returncode == 0
        for n in range(12):
            send(relay.smtp_port, ["ann@example.org", "bob@example.org", "gone@example.org"][n % 3], n)
        relay.wait_events("Delivery", 8)
        relay.wait_events("Bounce", 4)
        for message in upstream.messages[:4]:
            link = message.data.split(b'href="', 1)[1].split(b'"', 1)[0].decode()
            with contextlib.suppress(urllib.error.HTTPError):  # a redirect the opener does not follow
                urllib.request.build_opener(_NoRedirect()).open(
                    urllib.request.Request(link, headers={"User-Agent": BROWSER}), timeout=10)
        relay.wait_events("Click", 4)
        upstream.stop()  # the rest stays queued: the upstream is gone
        send(relay.smtp_port, "carol@example.org", 99)
        time.sleep(1)
    finally:
        relay.stop()
    return relay


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def test_every_row_arrives_and_the_views_agree(tmp_path):
    relay = make_user_database(tmp_path)
    with postgres_database() as url:
        done = relay_cli("store", "migrate", "--from", str(relay.db_path), "--to", url)
        assert done.returncode == 0, done.stderr
        source, target = open_store(relay.db_path), open_store(url)
        try:
            with source._reading() as a, target._reading() as b:
                for table in TABLES:
                    columns = [r[1] for r in a.execute(f"PRAGMA table_info({table})")]
                    assert rows(a, table, columns) == rows(b, table, columns), table
                assert a.execute("SELECT COUNT(*) FROM recipients WHERE state = 'queued'").fetchone()[0] >= 1
                assert a.execute("SELECT COUNT(*) FROM tracking_verdicts").fetchone()[0] >= 4
                for view in VIEWS:
                    assert rows(a, view, ["*"]) == rows(b, view, ["*"]), view
        finally:
            source.close()
            target.close()
        again = relay_cli("store", "migrate", "--from", str(relay.db_path), "--to", url)
        assert again.returncode == 1 and "already holds data" in again.stderr  # never into a used database


def test_a_database_of_the_release_before_numbered_migrations_is_brought_up_to_date(tmp_path):
    path = tmp_path / "old.sqlite3"
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        for statement in BASELINE:  # the tables exactly as that release made them, and no schema_migrations
            conn.execute(statement)
        conn.execute("INSERT INTO messages (id, received_at, mail_from, size, mail_json, settings_json)"
                     " VALUES ('m1', '2026-12-01T00:00:00.000Z', 'a@example.com', 10, '{}', '{}')")
        conn.execute("INSERT INTO recipients (message_id, recipient, position, state, updated_at)"
                     " VALUES ('m1', 'b@example.org', 0, 'queued', '2026-12-01T00:00:00.000Z')")
    store = open_store(path)
    try:
        assert [r[0] for r in store.query("SELECT version FROM schema_migrations ORDER BY version")] == [
            m.version for m in MIGRATIONS]
        assert store.query("SELECT recipient, state, lease_owner FROM recipients") == [
            ("b@example.org", "queued", None)]  # kept, and free for any node to claim
    finally:
        store.close()


@pytest.mark.parametrize("target", ["not-a-url", "mysql://x/y"])
def test_migrate_refuses_a_target_that_is_not_postgresql(tmp_path, target):
    (tmp_path / "x.sqlite3").touch()
    done = relay_cli("store", "migrate", "--from", str(tmp_path / "x.sqlite3"), "--to", target)
    assert done.returncode == 1 and "postgresql://" in done.stderr
