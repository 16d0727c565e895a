"""HTTPS on the tracking listener with trustme-generated certificates, one per domain, chosen by SNI."""

from __future__ import annotations

import socket
import ssl

import pytest

from .test_tracking_helpers import CHROME, Listener, load, store_message, stored

trustme = pytest.importorskip("trustme")


@pytest.fixture
def tls_listener(tmp_path):
    ca = trustme.CA()
    files = []
    for i, names in enumerate((["track.example.com"], ["links.example.net", "*.wild.example.org"])):
        cert = ca.issue_cert(*names)
        chain, key = tmp_path / f"c{i}.pem", tmp_path / f"k{i}.pem"
        chain.write_bytes(b"".join(p.bytes() for p in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(str(key))
        files.append((names, chain, key))
    certs = "".join(
        f'[[tracking.certificates]]\ndomains = {names!r}\ncertificate = "{chain}"\nkey = "{key}"\n'.replace("'", '"')
        for names, chain, key in files
    )
    cfg = load(tmp_path, 'tls_listen = "127.0.0.1:0"\n' + certs)
    server = Listener(cfg)
    store_message(server.store)
    yield server, ca
    server.stop()


def _https(port: int, ca, server_name: str, path: str, verify: bool = True) -> tuple[bytes, dict]:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    if not verify:
        ctx.check_hostname = False
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=server_name) as s:
        peer = s.getpeercert()
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {server_name}\r\nUser-Agent: {CHROME}\r\n"
                  "Connection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data, peer


def _names(peer: dict) -> set[str]:
    return {v for k, v in peer.get("subjectAltName", ()) if k == "DNS"}


def test_each_domain_gets_its_own_certificate(tls_listener):
    server, ca = tls_listener
    assert server.server.tls_port and server.server.tls_port != server.port
    token = server.open_token()
    for name, expected in (("track.example.com", {"track.example.com"}),
                           ("links.example.net", {"links.example.net", "*.wild.example.org"}),
                           ("a.wild.example.org", {"links.example.net", "*.wild.example.org"})):
        data, peer = _https(server.server.tls_port, ca, name, "/o/" + token)
        assert data.startswith(b"HTTP/1.1 200"), data[:100]
        assert _names(peer) == expected
    server.flush()
    assert len(stored(server.store, "Open")) == 3


def test_unknown_name_gets_the_default_certificate_and_redirect_works(tls_listener):
    server, ca = tls_listener
    _, peer = _https(server.server.tls_port, ca, "other.example", "/healthz", verify=False)
    assert _names(peer) == {"track.example.com"}
    url = "https://shop.example/p?a=1&b=2#top"
    data, _ = _https(server.server.tls_port, ca, "track.example.com", "/c/" + server.click_token(url))
    assert data.startswith(b"HTTP/1.1 302") and f"Location: {url}\r\n".encode() in data
    # plain HTTP keeps working beside HTTPS
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 200")
