"""Delivery to real upstreams: STARTTLS (required), implicit TLS, AUTH, a bounded pool of reused connections,
and systemd's readiness notification."""

from __future__ import annotations

import smtplib
import socket
import ssl

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from .harness import RelayProcess, UpstreamHandler, free_port

trustme = pytest.importorskip("trustme")
MESSAGE = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: up\r\n\r\nhello\r\n"


class CountingHandler(UpstreamHandler):
    def __init__(self):
        super().__init__()
        self.sessions = 0

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        self.sessions += 1
        session.host_name = hostname
        return responses


def authenticator(server, session, envelope, mechanism, auth_data):
    ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (b"relay", b"up-pw")
    return AuthResult(success=ok)


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    ca_path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    return server_ctx, ca_path


def send(port: int, count: int = 1) -> None:
    with smtplib.SMTP("127.0.0.1", port) as client:
        for _ in range(count):
            client.sendmail("a@example.com", ["b@example.org"], MESSAGE)


def test_required_starttls_with_auth(tmp_path, tls):
    server_ctx, ca_path = tls
    handler = UpstreamHandler()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, tls_context=server_ctx,
                            require_starttls=True, authenticator=authenticator, auth_required=True)
    controller.start()
    relay = RelayProcess(tmp_path / "r", port, upstream={"tls": "starttls", "ca_file": str(ca_path),
                                                         "username": "relay", "password": "up-pw"})
    try:
        relay.start()
        send(relay.smtp_port)
        relay.wait_events("Delivery", 1)
        assert len(handler.messages) == 1
    finally:
        relay.stop()
        controller.stop()


def test_implicit_tls_and_a_wrong_certificate_is_a_delay_not_a_bounce(tmp_path, tls):
    server_ctx, ca_path = tls
    handler = UpstreamHandler()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, ssl_context=server_ctx)
    controller.start()
    try:
        for trust, expected in (({"ca_file": str(ca_path)}, "Delivery"), ({}, "DeliveryDelay")):
            relay = RelayProcess(tmp_path / expected, port, upstream={"tls": "implicit", **trust})
            relay.start()
            try:
                send(relay.smtp_port)
                relay.wait_events(expected, 1)
                assert relay.events("Bounce") == []
            finally:
                relay.stop()
        assert len(handler.messages) == 1  # only the relay that trusts the CA delivered
    finally:
        controller.stop()


def test_connections_are_reused_and_bounded(tmp_path):
    handler = CountingHandler()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    relay = RelayProcess(tmp_path / "r", port, upstream={"connections": 2})
    try:
        relay.start()
        send(relay.smtp_port, count=30)
        relay.wait_events("Delivery", 30)
        assert len(handler.messages) == 30
        assert 1 <= handler.sessions <= 2
    finally:
        relay.stop()
        controller.stop()


def test_systemd_readiness_notification(tmp_path):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(20)
    relay = RelayProcess(tmp_path / "r", None, env={"NOTIFY_SOCKET": path})
    try:
        relay.start()
        assert sock.recv(100) == b"READY=1"
        relay.stop()
        assert sock.recv(100) == b"STOPPING=1"
    finally:
        relay.stop()
        sock.close()
