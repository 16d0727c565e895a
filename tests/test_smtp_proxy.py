"""Behind a TCP load balancer: the PROXY protocol header names the client, and relay judges the client, not the
balancer (trusted networks, per-client caps, the Received header). A real relay process, real sockets."""

from __future__ import annotations

import socket

import pytest

from .harness import RelayProcess, Upstream


def proxied(port: int, client: str, header: bool = True) -> socket.socket:
    """A connection as a balancer on 127.0.0.1 opens it for `client`."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    if header:
        s.sendall(f"PROXY TCP4 {client} 127.0.0.1 40000 25\r\n".encode())
    return s


def converse(s: socket.socket, *lines: bytes) -> list[bytes]:
    """Send each line and read its reply; the first reply read is the greeting."""
    f = s.makefile("rb")
    replies = [f.readline()]
    for line in lines:
        s.sendall(line)
        reply = f.readline()
        while reply[3:4] == b"-":
            reply = f.readline()
        replies.append(reply)
    return replies


@pytest.fixture
def relay(tmp_path):
    upstream = Upstream().start()
    r = RelayProcess(tmp_path, upstream.port, smtp_extra="""proxy_protocol = true
proxy_networks = ["127.0.0.0/8"]
trusted_networks = ["10.1.2.0/24"]
max_connections_per_client = 2""").start()
    yield r, upstream
    r.stop()
    upstream.stop()


def test_the_client_named_by_the_balancer_is_the_one_judged(relay):
    r, upstream = relay
    with proxied(r.smtp_port, "10.1.2.3") as s:  # a trusted application behind the balancer
        replies = converse(s, b"EHLO app\r\n", b"MAIL FROM:<a@example.com>\r\n", b"RCPT TO:<b@example.org>\r\n",
                           b"DATA\r\n", b"Subject: hi\r\n\r\nbody\r\n.\r\n", b"QUIT\r\n")
    assert replies[0].startswith(b"220") and replies[3].startswith(b"250") and replies[5].startswith(b"250")
    assert b"([10.1.2.3])" in upstream.wait_for(1)[0].data  # Received: from app ([10.1.2.3])
    with proxied(r.smtp_port, "203.0.113.9") as s:  # an outsider through the same balancer
        replies = converse(s, b"EHLO x\r\n", b"MAIL FROM:<a@example.com>\r\n", b"RCPT TO:<b@example.org>\r\n")
    assert replies[3].startswith(b"530")  # not trusted: it must authenticate


def test_per_client_caps_count_the_named_client_and_a_connection_without_header_gets_nothing(relay):
    r, _ = relay
    held = [proxied(r.smtp_port, "198.51.100.7") for _ in range(2)]
    try:
        for s in held:
            assert converse(s)[0].startswith(b"220")
        with proxied(r.smtp_port, "198.51.100.7") as third:
            assert converse(third)[0].startswith(b"421")
        with proxied(r.smtp_port, "198.51.100.8") as other:  # another client through the same balancer
            assert converse(other)[0].startswith(b"220")
        with proxied(r.smtp_port, "", header=False) as bare:  # no PROXY header: no greeting, closed
            bare.sendall(b"EHLO x\r\n")
            bare.settimeout(15)
            assert bare.makefile("rb").readline() == b""
    finally:
        for s in held:
            s.close()
