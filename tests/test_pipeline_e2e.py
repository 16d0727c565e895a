"""The whole path through a running relay: accept → instrument → sign → deliver → click and open → events."""

from __future__ import annotations

import json
import re
import smtplib
import urllib.error
import urllib.request
from email import message_from_bytes, policy

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from relay.core import dkim as relay_dkim

from .harness import RelayProcess, Upstream

HTML = (
    b"From: News <news@example.com>\r\nTo: list@example.org\r\nSubject: Spring sale\r\n"
    b"X-SES-CONFIGURATION-SET: marketing\r\nX-SES-MESSAGE-TAGS: campaign=spring\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
    b'<html><body><p>Hi</p><a href="https://shop.example.com/sale?a=1&amp;b=2#top" ses:tags="slot:hero;">Sale</a>\r\n'
    b'<a href="mailto:help@example.com">Help</a> <a ses:no-track href="https://example.com/u">Unsub</a>\r\n'
    b"</body></html>\r\n"
)


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def test_tracked_signed_copies_per_recipient_and_click_events(tmp_path):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_path = tmp_path / "example.com.s1.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    record = relay_dkim.key_record(relay_dkim.load_private_key(key_path.read_bytes())).encode()
    extra = f'[[dkim.keys]]\ndomain = "example.com"\nselector = "s1"\nprivate_key_file = "{key_path}"\n'
    upstream = Upstream().start()
    relay = RelayProcess(tmp_path / "r", upstream.port, extra=extra)
    relay.start()
    try:
        with smtplib.SMTP("127.0.0.1", relay.smtp_port) as client:
            client.sendmail("news@example.com", ["ann@example.org", "bob@example.org"], HTML)
        copies = {m.rcpt_tos[0]: m.data for m in upstream.wait_for(2)}
        assert set(copies) == {"ann@example.org", "bob@example.org"}
        links = {}
        for rcpt, data in copies.items():
            assert dkim.verify(data, dnsfunc=lambda name, timeout=5: record), rcpt
            html = message_from_bytes(data, policy=policy.default).get_content()
            assert "ses:" not in html and "mailto:help@example.com" in html and '"https://example.com/u"' in html
            tracked = re.findall(r'href="(http://127\.0\.0\.1:\d+/c/[^"]+)"', html)
            pixel = re.findall(r'src="(http://127\.0\.0\.1:\d+/o/[^"]+)"', html)
            assert len(tracked) == 1 and len(pixel) == 1, html
            links[rcpt] = (tracked[0], pixel[0])
        assert links["ann@example.org"] != links["bob@example.org"]  # who clicked is known

        opener = urllib.request.build_opener(NoRedirect)
        try:
            opener.open(links["bob@example.org"][0].replace("&amp;", "&"))
        except urllib.error.HTTPError as redirect:
            assert redirect.code == 302
            assert redirect.headers["Location"] == "https://shop.example.com/sale?a=1&b=2#top"
        with urllib.request.urlopen(links["ann@example.org"][1]) as pixel:
            assert pixel.headers["Content-Type"] == "image/gif"

        click = json.loads(relay.wait_events("Click", 1)[0][4])
        assert click["click"]["link"] == "https://shop.example.com/sale?a=1&b=2#top"
        assert click["click"]["linkTags"] == {"slot": ["hero"]}
        assert click["mail"]["destination"] == ["ann@example.org", "bob@example.org"]
        assert click["mail"]["tags"]["campaign"] == ["spring"]
        opened = relay.wait_events("Open", 1)[0]
        assert opened[2] == "ann@example.org" and opened[3] == "marketing"
        assert len(relay.wait_events("Delivery", 2)) == 2
    finally:
        relay.stop()
        upstream.stop()


def test_key_rotation_on_sighup_keeps_old_links_working(tmp_path):
    import signal
    import time

    from relay.core import tokens
    from relay.core.tokens import Keyring, SigningKey

    upstream = Upstream().start()
    relay = RelayProcess(tmp_path / "r", upstream.port).start()
    message = HTML.replace(b'ses:tags="slot:hero;" ', b"")
    try:
        def link(n: int) -> str:
            with smtplib.SMTP("127.0.0.1", relay.smtp_port) as client:
                client.sendmail("news@example.com", ["ann@example.org"], message)
            html = message_from_bytes(upstream.wait_for(n)[n - 1].data, policy=policy.default).get_content()
            return re.findall(r'href="(http://127\.0\.0\.1:\d+/c/[^"]+)"', html)[0]

        old = link(1)
        keys_file = relay.workdir / "data" / "tracking-keys"
        new_key = SigningKey("new", bytes(range(32)))
        keys_file.write_text(f"new {new_key.secret.hex()}\n" + keys_file.read_text())
        relay.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "configuration reloaded" not in relay.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        fresh = link(2)
        only_new = Keyring((new_key,))
        assert tokens.verify(only_new, fresh.rsplit("/", 1)[1]) is not None  # the new key signs
        assert tokens.verify(only_new, old.rsplit("/", 1)[1]) is None
        opener = urllib.request.build_opener(NoRedirect)
        for url in (old, fresh):  # and every listed key still verifies
            try:
                opener.open(url)
                raise AssertionError("no redirect")
            except urllib.error.HTTPError as redirect:
                assert redirect.code == 302 and redirect.headers["Location"].startswith("https://shop.example.com/")
    finally:
        relay.stop()
        upstream.stop()
