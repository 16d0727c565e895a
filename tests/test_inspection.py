"""Inspection end to end: one running relay sends, delivers, bounces; a person opens and clicks; then the views,
`relay stats`, `relay events tail`, /metrics, the logs, privacy, `relay purge` (an old link still redirects)
and `relay forget` are checked against what happened; on SQLite and on PostgreSQL."""

from __future__ import annotations

import contextlib
import json
import re
import smtplib
import subprocess
import sys
import time
import urllib.error
import urllib.request
from email import message_from_bytes, policy

from prometheus_client.parser import text_string_to_metric_families

from relay.config import hash_password

from .harness import ROOT, RelayProcess, Upstream, database_text, dict_rows, free_port, wait_port

PASSWORD = "s3cret-PASSWORD-7f2a"
BODY_MARKER = "BODY-MARKER-8c1f"
BROWSER = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36"
MESSAGE = (
    "From: News <news@example.com>\r\nTo: list@example.org\r\nSubject: Spring sale\r\n"
    "X-SES-CONFIGURATION-SET: marketing\r\nMIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
    f'<html><body><p>{BODY_MARKER}</p><a href="https://shop.example.com/sale" ses:tags="slot:hero;">Sale</a>\r\n'
    "</body></html>\r\n"
).encode()
LINK = "https://shop.example.com/sale"


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


class InspectedRelay(RelayProcess):
    """Clicks right after delivery count as human here (the default calls them scanners: < 10 s)."""

    def write_config(self) -> None:
        super().write_config()
        text = self.config_path.read_text().replace("[tracking]\n", "[tracking]\nearly_click_seconds = 0\n", 1)
        self.config_path.write_text(text)


def cli(relay: RelayProcess, *args: str, timeout: float = 30) -> str:
    done = subprocess.run([sys.executable, "-m", "relay.cli", *args, "--config", str(relay.config_path)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout


def links_of(data: bytes) -> tuple[str, str]:
    html = message_from_bytes(data, policy=policy.default).get_content()
    click = re.findall(r'href="(http://127\.0\.0\.1:\d+/c/[^"]+)"', html)
    pixel = re.findall(r'src="(http://127\.0\.0\.1:\d+/o/[^"]+)"', html)
    assert len(click) == 1 and len(pixel) == 1, html
    return click[0], pixel[0]


def hit(url: str) -> int:
    request = urllib.request.Request(url, headers={"User-Agent": BROWSER})
    try:
        with urllib.request.build_opener(NoRedirect).open(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as answer:
        return answer.code


def query(relay: RelayProcess, sql: str, params: tuple = ()) -> list[dict]:
    with contextlib.closing(relay.db()) as conn:
        return dict_rows(conn.execute(sql, params))


def scrape(port: int) -> dict[tuple, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_views_stats_metrics_logs_privacy_purge_and_forget(tmp_path, store_url):
    upstream = Upstream().start()
    metrics_port, dead_port = free_port(), free_port()
    extra = f"""
[[configuration_sets.marketing.destinations]]
name = "app"
url = "http://127.0.0.1:{dead_port}/events"
event_types = ["DELIVERY", "OPEN", "CLICK"]
retry_initial = "30s"

[metrics]
listen = "127.0.0.1:{metrics_port}"

[privacy]
truncate_ip = true
drop_user_agent = true
"""
    smtp_extra = f'[[smtp.users]]\nusername = "app"\npassword_hash = "{hash_password(PASSWORD)}"\n'
    relay = InspectedRelay(tmp_path / "r", upstream.port, extra=extra, smtp_extra=smtp_extra,
                           store_url=store_url).start()
    try:
        wait_port(metrics_port, proc=relay.proc)  # listening last: every session below is counted
        with smtplib.SMTP("127.0.0.1", relay.smtp_port) as client:
            client.login("app", PASSWORD)
            client.sendmail("news@example.com", ["ann@example.org", "bob@example.org"], MESSAGE)
        copies = {m.rcpt_tos[0]: links_of(m.data) for m in upstream.wait_for(2)}
        upstream.handler.reply = "550 5.1.1 <carol@example.org>: no such user"
        with smtplib.SMTP("127.0.0.1", relay.smtp_port) as client:
            client.sendmail("news@example.com", ["carol@example.org"], MESSAGE)
        relay.wait_events("Bounce", 1)
        upstream.handler.reply = None
        with smtplib.SMTP("127.0.0.1", relay.smtp_port) as client:
            client.sendmail("news@example.com", ["dave@example.org"], MESSAGE)
        dave_click = links_of(upstream.wait_for(3)[2].data)[0]

        tail = subprocess.Popen([sys.executable, "-m", "relay.cli", "events", "tail", "--type", "Click", "--count",
                                 "1", "--interval", "0.1", "--config", str(relay.config_path)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        time.sleep(1.5)  # let tail note the newest event id: it follows what comes after
        assert hit(copies["ann@example.org"][1]) == 200
        assert hit(copies["bob@example.org"][0]) == 302
        relay.wait_events("Open", 1)
        relay.wait_events("Click", 1)
        out, err = tail.communicate(timeout=20)
        assert tail.returncode == 0, err
        assert re.search(r"Click +marketing \S+ bob@example\.org https://shop\.example\.com/sale", out), out

        check_privacy(relay)
        check_views(relay)
        check_stats(relay)
        check_metrics(metrics_port)
        check_purge_keeps_links(relay, dave_click)
        check_forget(relay)
    finally:
        relay.stop()
        upstream.stop()
    log = relay.log()
    assert PASSWORD not in log and BODY_MARKER not in log
    assert re.search(r"smtp ip=127\.0\.0\.1 from=<news@example\.com> rcpts=2 size=\d+ id=\S+ set=marketing", log)
    assert re.search(r"delivery id=\S+ rcpt=carol@example\.org attempt=1 state=bounced", log)


def check_privacy(relay: RelayProcess) -> None:
    opened = json.loads(relay.events("Open")[0][4])["open"]
    assert opened["ipAddress"] == "127.0.0.0" and opened["userAgent"] == ""
    verdicts = query(relay, "SELECT v.verdict, v.client FROM tracking_verdicts v JOIN events e ON e.id = v.event_id"
                            " WHERE e.type = 'Open'")
    assert verdicts == [{"verdict": "human", "client": "Chrome 120.0"}]  # judged before the user agent was dropped


def today(relay: RelayProcess) -> str:
    return query(relay, "SELECT substr(MAX(time), 1, 10) AS d FROM events")[0]["d"]


def check_views(relay: RelayProcess) -> None:
    day = today(relay)
    funnel = query(relay, "SELECT * FROM funnel_daily WHERE configuration_set = 'marketing' AND day = ?", (day,))
    assert len(funnel) == 1
    row = funnel[0]
    assert {k: row[k] for k in ("sent", "delivered", "bounced_permanent", "bounced_transient", "delayed",
                                "complained", "opens", "unique_opens", "human_opens", "machine_opens",
                                "unique_human_opens", "clicks", "unique_clicks", "human_clicks",
                                "unique_human_clicks")} == {
        "sent": 3, "delivered": 3, "bounced_permanent": 1, "bounced_transient": 0, "delayed": 0, "complained": 0,
        "opens": 1, "unique_opens": 1, "human_opens": 1, "machine_opens": 0,
        "unique_human_opens": 2,  # bob's click proves an open his images did not report
        "clicks": 1, "unique_clicks": 1, "human_clicks": 1, "unique_human_clicks": 1}
    assert (row["open_rate"], row["human_open_rate"], row["click_rate"]) == (0.3333, 0.6667, 0.3333)

    links = query(relay, "SELECT * FROM link_clicks WHERE configuration_set = 'marketing'")
    assert [(r["link"], json.loads(r["link_tags"]), r["clicks"], r["unique_clicks"], r["human_clicks"])
            for r in links] == [(LINK, {"slot": ["hero"]}, 1, 1, 1)]
    assert links[0]["first_click"] == links[0]["last_click"]

    people = {r["recipient"]: r for r in query(relay, "SELECT * FROM recipient_engagement")}
    assert set(people) == {"ann@example.org", "bob@example.org", "carol@example.org", "dave@example.org"}
    assert people["carol@example.org"]["bounce_state"] == "Permanent"
    assert people["carol@example.org"]["delivered"] == 0 and people["carol@example.org"]["last_engaged"] is None
    assert (people["ann@example.org"]["opens"], people["ann@example.org"]["human_opens"]) == (1, 1)
    assert (people["bob@example.org"]["clicks"], people["bob@example.org"]["human_clicks"]) == (1, 1)
    engaged = query(relay, "SELECT recipient FROM recipient_engagement WHERE last_engaged >= ? ORDER BY 1", (day,))
    assert [r["recipient"] for r in engaged] == ["ann@example.org", "bob@example.org"]

    message_id = relay.events("Click")[0][1]
    timeline = query(relay, "SELECT * FROM message_timeline WHERE message_id = ? ORDER BY event_id", (message_id,))
    assert [r["type"] for r in timeline] == ["Send", "Delivery", "Delivery", "Open", "Click"]
    assert [r["recipient"] for r in timeline][-2:] == ["ann@example.org", "bob@example.org"]
    assert timeline[-1]["detail"] == LINK and timeline[-1]["verdict"] == "human"


def check_stats(relay: RelayProcess) -> None:
    text = cli(relay, "stats", "--config-set", "marketing")
    head, rule, line = text.splitlines()[:3]
    assert head.split()[:4] == ["day", "set", "sent", "delivered"] and set(rule) <= {"-", " "}
    assert line.split()[:6] == [today(relay), "marketing", "3", "3", "1", "0"], text
    assert "33.3%" in line and "66.7%" in line
    rows = json.loads(cli(relay, "stats", "--json"))
    view = query(relay, "SELECT * FROM funnel_daily WHERE configuration_set = 'marketing'")
    assert [r for r in rows if r["configuration_set"] == "marketing"] == view  # the same numbers as the view
    links = json.loads(cli(relay, "stats", "--by", "link", "--json", "--since", "1d"))
    assert [(r["link"], r["clicks"], r["human_clicks"]) for r in links] == [(LINK, 1, 1)]
    people = json.loads(cli(relay, "stats", "--by", "recipient", "--json"))
    assert people[0]["recipient"] in ("ann@example.org", "bob@example.org") and len(people) == 4
    assert "bob@example.org" in cli(relay, "stats", "--by", "recipient")


def check_metrics(port: int) -> None:
    samples = scrape(port)
    assert metric(samples, "relay_messages_accepted_total", configuration_set="marketing") == 3
    assert metric(samples, "relay_delivered_total", configuration_set="marketing") == 3
    assert metric(samples, "relay_bounced_total", configuration_set="marketing", bounce_type="Permanent") == 1
    assert metric(samples, "relay_opens_total", configuration_set="marketing", verdict="human") == 1
    assert metric(samples, "relay_clicks_total", configuration_set="marketing", verdict="human") == 1
    assert metric(samples, "relay_queue_depth", configuration_set="marketing") == 0
    assert metric(samples, "relay_queue_oldest_age_seconds", configuration_set="marketing") == 0
    assert metric(samples, "relay_smtp_sessions_total") >= 3  # and the harness's port probe
    assert metric(samples, "relay_instrumentation_warnings_total", configuration_set="marketing") == 0
    assert metric(samples, "relay_dkim_warnings_total", configuration_set="marketing") >= 0
    # the webhook's receiver is down: Delivery, Open and Click events wait beyond its cursor
    assert metric(samples, "relay_webhook_outbox_depth", configuration_set="marketing", destination="app") >= 3
    again = scrape(port)  # counters are read incrementally: a second scrape counts nothing twice
    assert metric(again, "relay_delivered_total", configuration_set="marketing") == 3


def check_purge_keeps_links(relay: RelayProcess, dave_click: str) -> None:
    """dave's message is made 90 days old; a purge removes it; his link still redirects and is counted."""
    old = "2020-01-01T00:00:00.000Z"
    with contextlib.closing(relay.db()) as conn, conn:
        mid = conn.execute("SELECT message_id FROM recipients WHERE recipient = 'dave@example.org'").fetchone()[0]
        conn.execute("UPDATE events SET time = ? WHERE message_id = ?", (old, mid))
        conn.execute("UPDATE messages SET received_at = ? WHERE id = ?", (old, mid))
    assert "purged 2 events and 1 messages" in cli(relay, "purge")
    assert query(relay, "SELECT COUNT(*) AS n FROM messages WHERE id = ?", (mid,))[0]["n"] == 0
    assert query(relay, "SELECT COUNT(*) AS n FROM recipients WHERE message_id = ?", (mid,))[0]["n"] == 0
    assert query(relay, "SELECT COUNT(*) AS n FROM events WHERE type = 'Send'")[0]["n"] == 2  # the rest stays
    assert hit(dave_click) == 302
    rows = relay.wait_events("Click", 2)
    record = json.loads(rows[-1][4])
    assert rows[-1][2] == "dave@example.org" and record["click"]["link"] == LINK
    assert record["mail"]["messageId"] == mid and record["mail"]["source"] == ""  # the minimal mail object


def check_forget(relay: RelayProcess) -> None:
    out = cli(relay, "forget", "ann@example.org")
    assert "events=3" in out and "recipients=1" in out, out  # Send, Delivery, Open
    with contextlib.closing(relay.db()) as conn:
        dump = database_text(conn)
    assert "ann@example.org" not in dump
    assert "forgotten@forgotten.invalid" in dump and "bob@example.org" in dump


def test_running_relay_purges_old_records_periodically(tmp_path, store_url):
    relay = RelayProcess(tmp_path / "r", extra='[retention]\ndays = 30\ninterval = "0.2s"\n',
                         store_url=store_url).start()
    try:
        old, new = "2020-01-01T00:00:00.000Z", "2099-01-01T00:00:00.000Z"
        with contextlib.closing(relay.db()) as conn, conn:
            conn.executemany("INSERT INTO events (type, time, message_id, recipient, configuration_set, record)"
                             " VALUES (?, ?, ?, 'x@example.org', NULL, '{}')",
                             [("Send", old, "m-old"), ("Send", new, "m-new")])
            conn.execute("INSERT INTO messages (id, received_at, mail_from, size, mail_json, settings_json)"
                         " VALUES ('m-old', ?, 'a@example.com', 1, '{}', '{}')", (old,))
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and query(relay, "SELECT COUNT(*) AS n FROM messages")[0]["n"]:
            time.sleep(0.1)
        assert query(relay, "SELECT message_id FROM events") == [{"message_id": "m-new"}]
        assert query(relay, "SELECT COUNT(*) AS n FROM messages")[0]["n"] == 0
        # the round logs once its last purge (stored reports) is done, after the messages are gone
        done = r"maintenance retention_days=30 purged_events=\d+ purged_messages=\d+"
        while time.monotonic() < deadline and not re.search(done, relay.log()):
            time.sleep(0.1)
    finally:
        relay.stop()
    assert re.search(done, relay.log())
