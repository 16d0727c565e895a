"""Several relay nodes on one PostgreSQL database, and the database going away: real relay processes, a real
PostgreSQL (a database of the test's own), real SMTP on 127.0.0.1. Every message answered 250 is delivered;
duplicates are counted and reported (delivery is at least once after a crash)."""

from __future__ import annotations

import contextlib
import itertools
import re
import signal
import smtplib
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field

import pytest

from .conftest import postgres_database
from .harness import ROOT, RelayProcess, TcpProxy, Upstream, wait_port

pytestmark = pytest.mark.timeout(240)
MAX_MESSAGES = 3000  # bounded load


def message(n: int) -> bytes:
    body = (b"y" * 76 + b"\r\n") * 20
    return (b"From: load@example.com\r\nTo: sink@example.org\r\nX-SES-CONFIGURATION-SET: marketing\r\n"
            b"Subject: load %d\r\nContent-Type: text/html\r\n\r\n<p><a href=\"https://example.com/%d\">x</a></p>\r\n"
            % (n, n) + body)


@dataclass
class Load:
    """Clients sending messages to the given SMTP ports in turn, one message per transaction."""

    ports: list[int]
    accepted: list[str] = field(default_factory=list)  # relay ids answered 250
    refused: Counter = field(default_factory=Counter)  # reply code -> count
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    counter: itertools.count = field(default_factory=itertools.count)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self, clients: int) -> Load:
        for i in range(clients):
            t = threading.Thread(target=self._client, args=(self.ports[i % len(self.ports)],), daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def _client(self, port: int) -> None:
        while not self.stop.is_set():
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                    client.ehlo("load")
                    n = next(self.counter)
                    while not self.stop.is_set() and n < MAX_MESSAGES:
                        client.mail("load@example.com")
                        client.rcpt("sink@example.org")
                        code, reply = client.data(message(n))
                        with self.lock:
                            if code == 250:
                                self.accepted.append(reply.decode().split()[1])
                            else:
                                self.refused[code] += 1
                        if code == 250:
                            n = next(self.counter)
                        else:  # refused for now: the same message again a little later, as an MTA retries
                            client.rset()
                            time.sleep(0.05)
                    return
            except (OSError, smtplib.SMTPException):
                time.sleep(0.1)  # a node killed or restarting: the client tries again, maybe another one

    def finish(self) -> set[str]:
        self.stop.set()
        for t in self.threads:
            t.join(30)
        return set(self.accepted)

    def wait_accepted(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.accepted) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(self.accepted) >= count, f"only {len(self.accepted)} accepted; refused {dict(self.refused)}"


def relay_ids(upstream: Upstream) -> list[str]:
    return [re.search(rb" id (\S+)", m.data).group(1).decode() for m in upstream.messages]


def wait_delivered(upstream: Upstream, acked: set[str], timeout: float) -> Counter:
    deadline = time.monotonic() + timeout
    while not acked <= set(relay_ids(upstream)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return Counter(relay_ids(upstream))


def node(tmp_path, name: str, upstream: Upstream, url: str, **kw) -> RelayProcess:
    """A relay node on the shared database; every node has the same tracking keys (any listener answers any
    link), nothing else in common."""
    return RelayProcess(tmp_path / name, upstream.port, store_url=url, node_id=name,
                        tracking={"keys_file": str(tmp_path / "tracking-keys")}, **kw)


def responsiveness(relay: RelayProcess, seconds: float) -> tuple[list[float], list[float]]:
    """For `seconds`: how long SMTP NOOPs and pixel requests take, a few times a second."""
    smtp, pixel = [], []
    deadline = time.monotonic() + seconds
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=30) as client:
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            client.noop()
            smtp.append(time.monotonic() - t0)
            t0 = time.monotonic()
            with urllib.request.urlopen(f"http://127.0.0.1:{relay.tracking_port}/o/not-a-token.gif", timeout=30):
                pixel.append(time.monotonic() - t0)
            time.sleep(0.2)
    return smtp, pixel


def test_postgres_unreachable_answers_451_loses_nothing_and_recovers_without_restart(tmp_path):
    upstream = Upstream().start()
    with postgres_database() as url:
        proxy = TcpProxy(("127.0.0.1", 5432)).start()
        proxied = re.sub(r"@[^/]+/", f"@127.0.0.1:{proxy.port}/", url)
        relay = node(tmp_path, "a", upstream, proxied).start()
        load = Load([relay.smtp_port]).start(4)
        try:
            load.wait_accepted(100, 60)
            proxy.cut()  # the database is gone for 20 s, in the middle of the load
            cut_at = len(load.accepted)
            smtp_waits, pixel_waits = responsiveness(relay, seconds=20)
            during = len(load.accepted) - cut_at
            proxy.restore()
            load.wait_accepted(cut_at + during + 100, 90)  # accepting again, same process
            acked = load.finish()
            delivered = wait_delivered(upstream, acked, 90)
            lost = acked - set(delivered)
            print(f"\ndatabase away 20 s under load: {len(acked)} answered 250, refused {dict(load.refused)},"
                  f" {during} answered 250 while away, {len(lost)} lost,"
                  f" {sum(1 for n in delivered.values() if n > 1)} delivered twice")
            assert load.refused.get(451, 0) > 0, "the outage was never noticed"
            # the node keeps answering while the database is away: no read holds its event loop
            print(f"away: NOOP max {max(smtp_waits) * 1000:.0f} ms, pixel max {max(pixel_waits) * 1000:.0f} ms")
            assert max(smtp_waits) < 1.0 and max(pixel_waits) < 1.0
            assert during <= 8, "250 answered while the database could not commit"  # only those in flight
            assert not lost
            assert relay.proc.poll() is None
        finally:
            load.finish()
            relay.stop()
            proxy.stop()
    upstream.stop()


def test_three_nodes_one_killed_every_250_delivered_and_a_click_counts_once_on_any_node(tmp_path):
    upstream = Upstream().start()
    with postgres_database() as url:
        # the shortest lease, so the dead node's copies pass to the others within the test
        nodes = [node(tmp_path, name, upstream, url, delivery={"concurrency": 8}, store={"lease": "10s"})
                 for name in ("a", "b", "c")]
        for n in nodes:
            n.start()
        load = Load([n.smtp_port for n in nodes]).start(6)
        try:
            load.wait_accepted(600, 90)
            nodes[1].proc.send_signal(signal.SIGKILL)  # mid-load: its accepted copies are leased to it
            nodes[1].proc.wait()
            load.wait_accepted(1200, 90)
            acked = load.finish()
            delivered = wait_delivered(upstream, acked, 120)  # by the two others, once b's leases ran out
            lost = acked - set(delivered)
            twice = sum(1 for n in delivered.values() if n > 1)
            print(f"\nthree nodes, one killed: {len(acked)} answered 250, {len(lost)} lost, {twice} delivered twice")
            assert not lost

            def queued() -> int:
                with contextlib.closing(nodes[0].db()) as db:
                    return db.execute("SELECT COUNT(*) FROM recipients WHERE state = 'queued'").fetchone()[0]

            deadline = time.monotonic() + 60  # what b had in flight passes to a and c once its lease ran out
            while queued() and time.monotonic() < deadline:
                time.sleep(0.5)
            assert queued() == 0
            nodes[1].start()  # restarted later: nothing of its own left to deliver
            # a tracked link followed once, through each node's listener in turn: three clicks, each recorded once
            link = re.search(rb'href="(http://127\.0\.0\.1:\d+/c/[^"]+)"', upstream.messages[0].data).group(1).decode()
            path = link.split("/", 3)[3]
            for n in nodes:
                wait_port(n.tracking_port)  # the restarted node's listener opens after its SMTP port
                req = urllib.request.Request(f"http://127.0.0.1:{n.tracking_port}/{path}",
                                             headers={"User-Agent": "Mozilla/5.0 (X11; Linux x86_64)"})
                opener = urllib.request.build_opener(_NoRedirect())
                with pytest.raises(urllib.error.HTTPError) as answer:
                    opener.open(req, timeout=10)
                assert answer.value.code == 302
            deadline = time.monotonic() + 30
            while len(nodes[0].events("Click")) < 3 and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1)
            assert len(nodes[0].events("Click")) == 3
        finally:
            load.finish()
            for n in nodes:
                n.stop()
    upstream.stop()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def test_the_node_publishing_a_destination_is_killed_and_another_takes_over_skipping_nothing(tmp_path):
    from .test_destinations import Receiver

    upstream = Upstream().start()
    receiver = Receiver().start()
    extra = f"""
[[configuration_sets.marketing.destinations]]
name = "hook"
type = "webhook"
url = "http://127.0.0.1:{receiver.port}/events"
event_types = ["SEND", "DELIVERY"]
retry_initial = "0.05s"
retry_max = "0.2s"
"""
    with postgres_database() as url:
        nodes = [node(tmp_path, name, upstream, url, extra=extra) for name in ("a", "b")]
        for n in nodes:
            n.start()
        load = Load([n.smtp_port for n in nodes]).start(4)
        try:
            load.wait_accepted(200, 60)
            leader = next(n for n in nodes if "this node now runs destination marketing/hook" in n.log())
            leader.proc.send_signal(signal.SIGKILL)
            leader.proc.wait()
            load.wait_accepted(500, 60)
            load.finish()
            other = next(n for n in nodes if n is not leader)

            def wanted() -> set[int]:
                with contextlib.closing(other.db()) as db:
                    return {r[0] for r in db.execute("SELECT id FROM events WHERE configuration_set = 'marketing'"
                                                     " AND type IN ('Send', 'Delivery')").fetchall()}

            deadline = time.monotonic() + 90
            while not wanted() <= set(receiver.ok_ids()) and time.monotonic() < deadline:
                time.sleep(0.2)
            missing = wanted() - set(receiver.ok_ids())
            twice = sum(1 for n in Counter(receiver.ok_ids()).values() if n > 1)
            print(f"\nleader killed: {len(wanted())} events, {len(missing)} missing, {twice} received twice")
            assert "this node now runs destination marketing/hook" in other.log()
            assert not missing
        finally:
            load.finish()
            for n in nodes:
                n.stop()
            receiver.stop()
    upstream.stop()


def test_a_configuration_set_made_through_one_node_applies_on_another_for_the_next_message(tmp_path):
    upstream = Upstream().start()
    with postgres_database() as url:
        a, b = (node(tmp_path, name, upstream, url) for name in ("a", "b"))
        a.start()
        b.start()
        try:
            message = (b"From: news@example.com\r\nTo: c@example.org\r\nX-SES-CONFIGURATION-SET: launch\r\n"
                       b"Subject: s\r\n\r\nbody\r\n")
            with smtplib.SMTP("127.0.0.1", b.smtp_port, timeout=30) as client, pytest.raises(
                    smtplib.SMTPDataError, match="Configuration Set does not exist"):
                client.sendmail("news@example.com", ["c@example.org"], message)
            done = subprocess.run([sys.executable, "-m", "relay.cli", "config-set", "create", "launch", "--config",
                                   str(a.config_path)], capture_output=True, text=True, timeout=60, cwd=ROOT)
            assert done.returncode == 0, done.stderr
            with smtplib.SMTP("127.0.0.1", b.smtp_port, timeout=30) as client:
                client.sendmail("news@example.com", ["c@example.org"], message)  # accepted by the other node
            sets = [r[3] for r in b.wait_events("Send", 1)]
            assert sets == ["launch"]
        finally:
            a.stop()
            b.stop()
    upstream.stop()
