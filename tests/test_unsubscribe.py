"""One-click unsubscribe (RFC 8058) end to end: relay as a subprocess adds List-Unsubscribe and
List-Unsubscribe-Post under its DKIM signature; the tracking listener's /u/ page records nothing on GET (what
scanners do) and a Subscription event plus a suppression entry on the one-click POST (what Gmail does).
The listener's edge cases run against the TrackingServer in-process with a real store, SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import smtplib
import time
from pathlib import Path

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from relay.core import tokens
from relay.core.headers import split_header_block

from .harness import RelayProcess, Upstream
from .test_dkim import Keys, signature_tags, verify
from .test_tracking_helpers import MID, RCPT, Listener, load, request, store_message

ROOT = Path(__file__).resolve().parents[1]
# The reference examples live beside the project (../shared); a worktree sits one level deeper.
REFERENCE = next((p for p in (ROOT.parent / "shared" / "reference" / "ses-events",
                              ROOT.parent.parent / "shared" / "reference" / "ses-events") if p.is_dir()), None)
DEFENDER = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 " \
           "Safari/537.36 Microsoft-Defender-SafeLinks Barracuda Sentinel (EE)"
GMAIL_POST_UA = "Mozilla/5.0 (compatible; Google-Unsubscribe)"
BOUNCE_DOMAIN = "bounces.example.com"

SETS = f"""
[configuration_sets.news]
open_tracking = true
click_tracking = true
list_unsubscribe = true

[configuration_sets.notices]
list_unsubscribe = true

[bounces]
domain = "{BOUNCE_DOMAIN}"
"""


def _message(set_name: str, extra_headers: bytes = b"") -> bytes:
    return (b"From: News <news@example.com>\r\nTo: list@example.org\r\nSubject: Weekly news\r\n"
            b"X-SES-CONFIGURATION-SET: " + set_name.encode() + b"\r\n" + extra_headers +
            b"MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
            b'<html><body><p>Hi</p><a href="https://shop.example.com/sale">Sale</a></body></html>\r\n')


class HttpsRelay(RelayProcess):
    """Its tracking host counts as reachable over https (a proxy in front, as in production): RFC 8058 wants an
    https URL. Requests in the test go to the listener's plain port, as the proxy's would."""

    def write_config(self) -> None:
        super().write_config()
        text = self.config_path.read_text()
        host = f"127.0.0.1:{self.tracking_port}"
        self.config_path.write_text(text.replace(f'default_host = "{host}"\n',
                                                 f'default_host = "{host}"\nhttps_hosts = ["{host}"]\n', 1))


def _dkim_keys(tmp_path: Path) -> tuple[str, Keys]:
    keys = Keys(tmp_path).add("example.com", "s1", rsa.generate_private_key(public_exponent=65537, key_size=2048))
    (k,) = keys.keys
    return f'[[dkim.keys]]\ndomain = "{k.domain}"\nselector = "{k.selector}"\n' \
           f'private_key_file = "{k.private_key_file}"\n', keys


def _shape(value, skip_names: bool = False):
    """A JSON value's structure: keys and types, lists by their first element (user-chosen names skipped)."""
    if isinstance(value, dict):
        return {} if skip_names else {k: _shape(v, k in ("tags", "headers")) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(value[0])] if value and not skip_names else []
    return type(value).__name__


def _subset(ref, ours, path="") -> list[str]:
    """Where `ours` lacks a field of `ref` or has it with another type."""
    if isinstance(ref, dict):
        if not isinstance(ours, dict):
            return [f"{path}: {type(ours).__name__} instead of an object"]
        return [p for k, v in ref.items() for p in
                ([f"{path}.{k}: missing"] if k not in ours else _subset(v, ours[k], f"{path}.{k}"))]
    if isinstance(ref, list):
        if not isinstance(ours, list):
            return [f"{path}: not a list"]
        return _subset(ref[0], ours[0], path + "[0]") if ref and ours else []
    return [] if ref == ours else [f"{path}: {ours} instead of {ref}"]


def _fields(data: bytes, name: str) -> list[str]:
    return [f.value for f in split_header_block(data).fields if f.lname == name]


async def _call(method: str, url: str, user_agent: str, **kw) -> tuple[int, str]:
    async with aiohttp.ClientSession(headers={"User-Agent": user_agent}) as session, \
            session.request(method, url, allow_redirects=False, **kw) as resp:
        return resp.status, await resp.text()


def call(method: str, url: str, user_agent: str = GMAIL_POST_UA, **kw) -> tuple[int, str]:
    return asyncio.run(_call(method, url, user_agent, **kw))


def _suppressed(relay: RelayProcess) -> list[tuple]:
    with contextlib.closing(relay.db()) as conn:
        return conn.execute("SELECT email_address, reason, message_id FROM suppressed_destinations").fetchall()


def test_one_click_unsubscribe_end_to_end(tmp_path):
    dkim_lines, keys = _dkim_keys(tmp_path)
    upstream = Upstream().start()
    relay = HttpsRelay(tmp_path / "r", upstream.port, extra=SETS + dkim_lines)
    relay.start()
    try:
        own = b"List-Unsubscribe: <mailto:leave@example.com?subject=leave>\r\n"
        with smtplib.SMTP("127.0.0.1", relay.smtp_port) as client:
            client.sendmail("news@example.com", ["ann@example.org", "bob@example.org"], _message("news"))
            client.sendmail("news@example.com", ["cat@example.org"], _message("notices"))
            client.sendmail("news@example.com", ["dan@example.org"], _message("news", own))
        copies = {m.rcpt_tos[0]: m.data for m in upstream.wait_for(4)}
        for rcpt, data in copies.items():
            assert verify(data, keys.records), rcpt

        # the application's own List-Unsubscribe is kept exactly, nothing added
        assert _fields(copies["dan@example.org"], "list-unsubscribe") == ["<mailto:leave@example.com?subject=leave>"]
        assert _fields(copies["dan@example.org"], "list-unsubscribe-post") == []

        urls = {}
        for rcpt in ("ann@example.org", "bob@example.org", "cat@example.org"):
            data = copies[rcpt]
            (value,) = _fields(data, "list-unsubscribe")
            assert _fields(data, "list-unsubscribe-post") == ["List-Unsubscribe=One-Click"]
            url, mailto = re.fullmatch(r"<(https://[^>]+)>, <mailto:([^>]+)>", value).groups()
            assert url.startswith(f"https://127.0.0.1:{relay.tracking_port}/u/")
            assert mailto.startswith("unsub+") and mailto.endswith("@" + BOUNCE_DOMAIN)
            urls[rcpt] = url.replace("https://", "http://", 1)  # the proxy's side of it
            # covered by relay's signature, over-signed: a second List-Unsubscribe added on top breaks it
            h = signature_tags(data)[0]["h"].split(":")
            assert h.count("list-unsubscribe") == 2 and h.count("list-unsubscribe-post") == 2
            forged = data.replace(b"\r\nFrom:", b"\r\nList-Unsubscribe: <https://evil.example/u>\r\nFrom:", 1)
            assert not verify(forged, keys.records)
        assert "/c/" in copies["ann@example.org"].decode() and "/c/" not in copies["cat@example.org"].decode()
        assert _fields(copies["cat@example.org"], "x-ses-configuration-set") == []

        # scanners GET (and HEAD): a page with a button, nothing recorded
        status, page = call("GET", urls["ann@example.org"], DEFENDER)
        assert status == 200 and "a***@example.org" in page and "ann@example.org" not in page
        assert re.search(r'<form method=post[^>]*><button[^>]*name=List-Unsubscribe value=One-Click', page)
        assert "http" not in page and "src=" not in page  # no external resource, no other URL
        assert call("HEAD", urls["ann@example.org"], DEFENDER)[0] == 200
        # damaged or foreign tokens: 404; a POST without RFC 8058's body: 400; all record nothing
        token = urls["ann@example.org"].rsplit("/", 1)[1]
        altered = token[:-3] + ("A" if token[-3] != "A" else "B") + token[-2:]
        assert call("POST", urls["ann@example.org"].replace(token, altered), data="List-Unsubscribe=One-Click",
                    headers={"Content-Type": "application/x-www-form-urlencoded"})[0] == 404
        pixel = re.search(r'src="(http://[^"]+/o/[^"]+)"', copies["ann@example.org"].decode()).group(1)
        assert call("POST", pixel.replace("/o/", "/u/"), data={"List-Unsubscribe": "One-Click"})[0] == 404
        assert call("POST", urls["ann@example.org"])[0] == 400
        assert call("POST", urls["ann@example.org"], data={"List-Unsubscribe": "Maybe"})[0] == 400
        assert call("POST", urls["ann@example.org"], data="List-Unsubscribe=One-Click",
                    headers={"Content-Type": "text/plain"})[0] == 400
        assert relay.events("Subscription") == [] and _suppressed(relay) == []

        # Gmail's one-click POST (form-encoded), then the same again: one event, one suppression entry
        status, page = call("POST", urls["ann@example.org"], data={"List-Unsubscribe": "One-Click"})
        assert status == 200 and "You are unsubscribed" in page
        assert call("POST", urls["ann@example.org"], data={"List-Unsubscribe": "One-Click"})[0] == 200
        # another client posts multipart/form-data (RFC 8058 allows both)
        form = aiohttp.MultipartWriter("form-data")
        form.append("One-Click").set_content_disposition("form-data", name="List-Unsubscribe")
        assert call("POST", urls["cat@example.org"], data=form)[0] == 200

        rows = relay.events("Subscription")
        assert [(r[2], r[3]) for r in rows] == [("ann@example.org", "news"), ("cat@example.org", "notices")]
        event = json.loads(rows[0][4])
        assert event["eventType"] == "Subscription"
        assert event["mail"]["destination"] == ["ann@example.org", "bob@example.org"]
        assert event["subscription"]["contactList"] == "news"
        assert event["subscription"]["source"] == "UnsubscribeHeader"
        assert event["subscription"]["newTopicPreferences"]["unsubscribeAll"] is True
        if REFERENCE is not None:
            ref = json.loads((REFERENCE / "subscription.json").read_text())
            assert set(event) == set(ref)
            expected = _shape(ref["subscription"])
            for prefs in ("newTopicPreferences", "oldTopicPreferences"):  # relay has no topics: empty lists
                expected[prefs]["topicSubscriptionStatus"] = []
            assert _shape(event["subscription"]) == expected
            assert _subset(_shape(ref["mail"]), _shape(event["mail"]), "mail") == []
        sent = json.loads(relay.events("Send")[0][4])["mail"]
        assert event["mail"] == sent  # the message's own mail object, as every event of it carries
        suppressed = sorted(_suppressed(relay))
        assert [(a, r) for a, r, _ in suppressed] == [("ann@example.org", "UNSUBSCRIBE"),
                                                      ("cat@example.org", "UNSUBSCRIBE")]
        assert suppressed[0][2] == rows[0][1]
    finally:
        relay.stop()
        upstream.stop()


# --- the listener in-process, with a real store ---------------------------------------------------------------

@pytest.fixture
def listener(tmp_path, store_url):
    server = Listener(load(tmp_path, "max_link_age = 86400\n", store_url=store_url))
    yield server
    server.stop()


def _url(listener: Listener, message_id: str = MID, recipient: str = RCPT, issued: int | None = None) -> str:
    token = tokens.sign_unsubscribe(listener.keyring, message_id, recipient,
                                    int(time.time()) if issued is None else issued)
    return f"/u/{token}"


def _post(listener: Listener, path: str, body: bytes = b"List-Unsubscribe=One-Click",
          content_type: str = "application/x-www-form-urlencoded") -> int:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", listener.port, timeout=10)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": content_type})
        return conn.getresponse().status
    finally:
        conn.close()


def _store_rows(listener: Listener, sql: str) -> list[tuple]:
    return listener.store.tracking_read(lambda conn: conn.execute(sql).fetchall())


def test_links_never_expire_and_methods(listener):
    store_message(listener.store)
    old = _url(listener, issued=int(time.time()) - 400 * 86400)  # past max_link_age: clicks would 404
    assert request(listener.port, "GET", old)[0] == 200
    assert request(listener.port, "PUT", old)[0] == 405
    assert _post(listener, old, b"List-Unsubscribe=One-Click&x=" + b"y" * 5000) == 400  # body over the limit
    assert _store_rows(listener, "SELECT COUNT(*) FROM events WHERE type = 'Subscription'") == [(0,)]
    assert _post(listener, old) == 200
    assert _store_rows(listener, "SELECT recipient FROM events WHERE type = 'Subscription'") == [(RCPT,)]


def test_set_without_the_unsubscribe_reason_records_the_event_only(listener):
    store_message(listener.store)
    listener.store.submit(lambda conn: conn.execute(
        "UPDATE messages SET settings_json = ?", (json.dumps({"suppression_reasons": ["BOUNCE", "COMPLAINT"]}),)
    )).result()
    assert _post(listener, _url(listener)) == 200
    assert _store_rows(listener, "SELECT COUNT(*) FROM events WHERE type = 'Subscription'") == [(1,)]
    assert _store_rows(listener, "SELECT * FROM suppressed_destinations") == []


def test_purged_message_still_suppresses_once(listener):
    # no messages row (retention purged it): no mail object for an event, but the request is honoured
    url = _url(listener, recipient="Reader@Example.org")
    assert _post(listener, url) == 200
    assert _post(listener, url) == 200
    assert _store_rows(listener, "SELECT email_address, reason, message_id FROM suppressed_destinations") == [
        ("reader@example.org", "UNSUBSCRIBE", MID)]
    assert _store_rows(listener, "SELECT COUNT(*) FROM events") == [(0,)]
