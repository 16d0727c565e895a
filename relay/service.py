"""`relay serve`: wires the stages together and runs them until SIGTERM.

SIGTERM/SIGINT: stop accepting, let SMTP transactions in flight finish, let deliveries in flight finish (for a
grace period), flush tracking events, close the store; the queue stays on disk and resumes on the next start.
SIGHUP: reload the configuration file (sets, tracking, DKIM keys, SMTP users and policy) without dropping
connections; listen addresses need a restart. With systemd (Type=notify), READY=1 is sent once listening.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass, field

from relay import config as config_module
from relay.config import Config
from relay.deliver import make_upstream
from relay.destinations import Publisher
from relay.identities import Checker, IdentityKeys
from relay.inbound import InboundStage
from relay.instrument import Instrumenter
from relay.metrics import start_operations, stop_operations  # inspection (issue 8)
from relay.pipeline import Pipeline
from relay.queue import DeliveryQueue
from relay.reputation import Guard
from relay.resolve import Resolver
from relay.scan import make_scanner
from relay.sign import Signer
from relay.smtp import Handler, start_server
from relay.store import Store, open_store

log = logging.getLogger("relay.service")
SMTP_DRAIN_S = 30.0
DELIVERY_GRACE_S = 10.0


class LoopBatchedHandler(logging.StreamHandler):
    """stderr logging that writes the INFO lines of one event-loop iteration together, in one write.

    Under load an iteration serves many transactions and deliveries; one write per line (a system call that also
    hands the GIL to the store's writer thread) cost about a tenth of a message's CPU. Lines keep their order
    and are written at the end of the iteration; WARNING and above, and lines from other threads, are written
    at once (with whatever is pending before them).
    """

    def __init__(self, stream, loop: asyncio.AbstractEventLoop):
        super().__init__(stream)
        self.loop = loop
        self.loop_thread = threading.get_ident()
        self.pending: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:  # called with self.lock held
        try:
            self.pending.append(self.format(record))
        except Exception:
            self.handleError(record)
            return
        if record.levelno >= logging.WARNING or threading.get_ident() != self.loop_thread or self.loop.is_closed():
            self.write_pending()
        elif len(self.pending) == 1:
            self.loop.call_soon(self.write_pending)

    def write_pending(self) -> None:
        with self.lock:
            if not self.pending:
                return
            text, self.pending = "".join(line + self.terminator for line in self.pending), []
            try:
                self.stream.write(text)
                self.stream.flush()
            except OSError:  # stderr gone: nowhere to report it either (StreamHandler's handleError prints there)
                pass

    def flush(self) -> None:
        self.write_pending()
        super().flush()


@contextlib.contextmanager
def batched_logging(loop: asyncio.AbstractEventLoop):
    """The root logger's stderr handler swapped for a LoopBatchedHandler while the loop serves."""
    root = logging.getLogger()
    plain = [h for h in root.handlers if type(h) is logging.StreamHandler and h.stream is sys.stderr]
    batched = []
    for handler in plain:
        b = LoopBatchedHandler(handler.stream, loop)
        b.setFormatter(handler.formatter)
        b.setLevel(handler.level)
        root.removeHandler(handler)
        root.addHandler(b)
        batched.append(b)
    try:
        yield
    finally:
        for b, handler in zip(batched, plain, strict=True):
            b.flush()
            root.removeHandler(b)
            root.addHandler(handler)


def sd_notify(state: str) -> None:
    """systemd's notify protocol: one datagram to $NOTIFY_SOCKET (no dependency needed)."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(path)
            sock.sendall(state.encode())
        except OSError as exc:
            log.warning("sd_notify failed: %s", exc)


@dataclass
class Relay:
    """Every running part of one relay node."""

    config: Config
    store: Store
    pipeline: Pipeline
    queue: DeliveryQueue
    handler: Handler
    tracking: object | None = None
    publisher: object | None = None  # relay.destinations.Publisher (issue 6)
    api: object | None = None  # relay.api.server.ApiServer (issue 7)
    console: object | None = None  # relay.console.ConsoleServer: the web console ([console])
    guard: Guard | None = None  # the reputation guard (relay.reputation)
    checker: Checker | None = None  # identities' DNS checks (relay.identities)
    servers: list[asyncio.base_events.Server] = field(default_factory=list)

    @classmethod
    def build(cls, cfg: Config) -> Relay:
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        store = open_store(cfg.store_target)
        keyring = cfg.keyring()
        upstream = make_upstream(cfg.upstream, cfg.hostname)
        resolver = Resolver(cfg, store)  # configuration sets from the file and the database
        pipeline = Pipeline(cfg, store, resolver, Instrumenter(keyring), Signer(cfg.dkim), upstream,
                            scanner=make_scanner(cfg.scan))  # issue 9: virus scan through clamd
        queue = DeliveryQueue(store, pipeline.deliver_copy, cfg.delivery.concurrency, node=cfg.node_id,
                              lease_s=cfg.store.lease)
        pipeline.lease_for_new = queue.lease_for_new  # an accepted message's copies are this node's to deliver
        pipeline.signer.identity_keys = IdentityKeys(lambda: pipeline.config, resolver)  # identities' DKIM keys
        handler = Handler(cfg.smtp, pipeline, queue.add, InboundStage(cfg, store, keyring))  # issue 9: reports
        relay = cls(cfg, store, pipeline, queue, handler)
        relay.publisher = Publisher(cfg, store, resolver)  # event destinations
        return relay

    async def start(self, with_tracking: bool = True) -> None:
        await self.publisher.start()  # issue 6: event destinations
        await self.queue.start()
        server = await start_server(self.config.smtp, self.config.hostname, self.handler)
        self.servers.append(server)
        if with_tracking:
            from relay.tracking import TrackingServer

            self.tracking = TrackingServer(self.config, self.store, self.config.keyring())
            await self.tracking.start()
        from relay.api.sending import Sender
        from relay.api.server import ApiServer  # api (issue 7): SES-compatible management API

        self.api = ApiServer(lambda: self.config, self.store, Sender(self.pipeline, self.queue.add))
        await self.api.start()
        from relay.console import ConsoleServer  # the web console, on its own listener when [console] has one

        self.console = ConsoleServer(lambda: self.config, self.store)
        await self.console.start()
        tracking_port = self.tracking.port if self.tracking else 0
        self.operations = await start_operations(self)  # inspection (issue 8): /metrics, retention
        self.guard = Guard(lambda: self.config, self.store, self.pipeline.resolver)  # sending control
        self.guard.start()
        self.checker = Checker(lambda: self.config, self.store)  # identities' DNS records, rechecked
        self.checker.start()
        log.info("relay listening: smtp %s:%d, tracking %s:%d, data %s", self.config.smtp.listen_host,
                 self.config.smtp.listen_port, self.config.tracking.listen_host, tracking_port, self.config.data_dir)

    def reload(self) -> None:
        try:
            cfg = config_module.load(self.config.path) if self.config.path else self.config
            signer = Signer(cfg.dkim)
            signer.identity_keys = self.pipeline.signer.identity_keys
            keyring = cfg.keyring()  # a key prepended to the keys file signs from now on; all keep verifying
        except config_module.ConfigError as exc:
            log.error("reload refused, keeping the running configuration: %s", "; ".join(exc.problems))
            return
        if (cfg.smtp.listen_host, cfg.smtp.listen_port) != (self.config.smtp.listen_host,
                                                           self.config.smtp.listen_port):
            log.warning("smtp.listen changed: takes effect after a restart")
        self.config = cfg
        self.pipeline.config = cfg
        self.pipeline.signer = signer
        self.pipeline.scanner = make_scanner(cfg.scan)  # issue 9: [scan]
        self.pipeline.instrumenter.keyring = keyring
        self.handler.inbound.config, self.handler.inbound.keyring = cfg, keyring  # issue 9
        self.handler.settings = cfg.smtp
        self.pipeline.resolver.config = cfg  # issue 6: sets from the reloaded file; reopen destination files
        self.publisher.reopen(cfg)
        if self.tracking is not None:
            self.tracking.reload(cfg, keyring)  # verdict lists, proxies, link age, keys
        log.info("configuration reloaded from %s", cfg.path)

    def _transactions_open(self) -> bool:
        return self.handler.busy > 0 or any(
            s.envelope is not None and s.envelope.mail_from for s in self.handler.sessions
        )

    async def stop(self) -> None:
        for server in self.servers:
            server.close()  # no new connections
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SMTP_DRAIN_S
        while self._transactions_open() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for session in list(self.handler.sessions):
            if session.transport is not None:  # idle, or still stalled after the deadline
                session.transport.write(b"421 4.3.2 Service shutting down\r\n")
                session.transport.close()
        await self.queue.stop(DELIVERY_GRACE_S)
        if self.tracking is not None:
            await self.tracking.stop()
        if self.api is not None:
            await self.api.stop()  # api (issue 7)
        if self.console is not None:
            await self.console.stop()
        await self.pipeline.upstream.close()
        await self.publisher.stop()  # issue 6: cursors are saved as events go; nothing to flush
        await stop_operations(self)  # inspection (issue 8)
        for task in (self.guard, self.checker):
            if task is not None:
                await task.stop()
        await asyncio.to_thread(self.store.close)


async def run(cfg: Config) -> None:
    with batched_logging(asyncio.get_running_loop()):
        await serve_until_stopped(cfg)


async def serve_until_stopped(cfg: Config) -> None:
    relay = Relay.build(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, relay.reload)
    await relay.start()
    gc.freeze()  # startup objects (config, model, caches) leave the collector's sight: shorter full collections
    sd_notify("READY=1")
    await stop.wait()
    log.info("stopping: draining SMTP sessions and deliveries")
    sd_notify("STOPPING=1")
    await relay.stop()
    log.info("stopped")


def serve(config_path: str) -> int:
    cfg = config_module.load(config_path)
    # aiosmtpd logs every command at INFO; relay logs one line per transaction and per delivery instead.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    run_event_loop(run(cfg))
    return 0


def run_event_loop(main):
    """uvloop where it is installed (a dependency on Linux: faster sockets and callbacks), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
