"""The tracking listener over real HTTP on 127.0.0.1: pixel, redirects, HEAD, limits, proxies, pages."""

from __future__ import annotations

import socket
import time

import pytest

from relay.core import tokens
from relay.core.tokens import Keyring, SigningKey
from relay.tracking import GIF, NO_STORE

from .test_tracking_helpers import (
    CHROME,
    MID,
    RCPT,
    Listener,
    header,
    load,
    raw_request,
    request,
    store_message,
    stored,
)


@pytest.fixture
def listener(tmp_path):
    cfg = load(tmp_path, 'max_link_age = "30d"\ntrusted_proxies = ["127.0.0.2/32"]\nclient_timeout = "2s"')
    server = Listener(cfg)
    store_message(server.store)
    yield server
    server.stop()


def _location_bytes(port: int, token: str) -> bytes | None:
    answer = raw_request(port, f"GET /c/{token} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
    head = answer.split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.lower() == b"location":
            return value.strip()
    return None


# --- pixel -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_pixel_good_token_answers_gif_and_records(listener, method):
    status, headers, body = request(listener.port, method, "/o/" + listener.open_token())
    assert status == 200
    assert header(headers, "Content-Type") == "image/gif"
    assert header(headers, "Cache-Control") == NO_STORE
    assert header(headers, "Set-Cookie") is None
    assert header(headers, "Content-Length") == "43"
    assert body == (GIF if method == "GET" else b"")
    listener.flush()
    opens = stored(listener.store, "Open")
    assert len(opens) == 1
    assert opens[0]["open"]["userAgent"] == CHROME
    assert opens[0]["open"]["ipAddress"] == "127.0.0.1"
    assert opens[0]["mail"]["messageId"] == MID


@pytest.mark.parametrize("token", ["", "garbage", "A" * 60, "x/../../etc/passwd", "%00%0d%0a"])
def test_pixel_bad_token_still_answers_gif_without_event(listener, token):
    status, headers, body = request(listener.port, "GET", "/o/" + token)
    assert (status, body, header(headers, "Cache-Control")) == (200, GIF, NO_STORE)
    listener.flush()
    assert stored(listener.store, "Open") == []


def test_pixel_with_click_token_or_other_key_records_nothing(listener):
    other = Keyring((SigningKey("zz", b"z" * 32),))
    for token in (tokens.sign_open(other, MID, RCPT, int(time.time())), listener.click_token("https://a.example/")):
        assert request(listener.port, "GET", "/o/" + token)[2] == GIF
    listener.flush()
    assert stored(listener.store, "Open") == []


def test_every_open_is_recorded(listener):
    token = listener.open_token()
    for _ in range(5):
        request(listener.port, "GET", "/o/" + token)
    listener.flush()
    assert len(stored(listener.store, "Open")) == 5


# --- clicks ------------------------------------------------------------------------------------------------

DESTINATIONS = [
    "https://shop.example/p?a=1&b=2&c=%26x",
    "https://shop.example/page#section-2",
    "https://shop.example/p?q=a%20b&r=%E2%82%AC#frag?x=1&y",
    "https://bücher.example/straße?ü=1#ä",
    "https://xn--bcher-kva.example/path/",
    "http://shop.example:8081/a;b,c/~d?e=f=g",
    "https://shop.example/?redirect=https%3A%2F%2Fother.example%2F&sig=abc%2B%2F%3D",
    "https://shop.example/" + "long/" * 300,
]


@pytest.mark.parametrize("url", DESTINATIONS)
def test_click_redirects_byte_exactly(listener, url):
    token = listener.click_token(url, 3, {"campaign": ["autumn"], "pos": ["hero"]})
    sent = url if url.isascii() else "https://xn--bcher-kva.example/stra%C3%9Fe?%C3%BC=1#%C3%A4"  # its URI form
    assert _location_bytes(listener.port, token) == sent.encode("ascii")
    status, headers, _ = request(listener.port, "GET", "/c/" + token)
    assert status == 302
    assert header(headers, "Cache-Control") == NO_STORE
    assert header(headers, "Referrer-Policy") == "no-referrer"
    assert header(headers, "Set-Cookie") is None
    listener.flush()
    clicks = stored(listener.store, "Click")
    assert len(clicks) == 2
    assert clicks[0]["click"]["link"] == url
    assert clicks[0]["click"]["linkTags"] == {"campaign": ["autumn"], "pos": ["hero"]}
    assert clicks[0]["mail"]["tags"]["ses:configuration-set"] == ["marketing"]


def _mangled(token: str) -> list[str]:
    flipped = token[:30] + ("B" if token[30] != "B" else "C") + token[31:]
    return [token[:-1], token[: len(token) // 2], flipped, token + "A", token.lower()]


def test_tampered_truncated_and_foreign_tokens_get_404_without_redirect(listener):
    url = "https://shop.example/reset?token=abc"
    good = listener.click_token(url)
    other = Keyring((SigningKey("k9", b"q" * 32),))
    bad = _mangled(good) + [
        tokens.sign_click(other, MID, RCPT, int(time.time()), 0, url),
        # re-signed with another key under the listener's own key id
        tokens.sign_click(Keyring((SigningKey(listener.keyring.signing.kid, b"r" * 32),)), MID, RCPT,
                          int(time.time()), 0, url),
        listener.open_token(),
        "",
    ]
    for token in bad:
        status, headers, body = request(listener.port, "GET", "/c/" + token)
        assert status == 404, token
        assert header(headers, "Location") is None
        assert token.encode() not in body or not token
    listener.flush()
    assert stored(listener.store, "Click") == []


def test_404_page_reflects_no_input(listener):
    probe = "%3Cscript%3Ealert(1)%3C%2Fscript%3E"
    for path in (f"/c/{probe}", f"/nothing/{probe}", f"/c/x?u=<script>{probe}"):
        status, _, body = request(listener.port, "GET", path)
        assert status == 404
        assert b"script" not in body.lower() and b"alert" not in body


def test_expired_token_gets_404_and_pixel_records_nothing(listener):
    old = int(time.time()) - 31 * 86400
    url = "https://shop.example/old"
    assert request(listener.port, "GET", "/c/" + listener.click_token(url, issued=old))[0] == 404
    assert request(listener.port, "GET", "/o/" + listener.open_token(issued=old))[2] == GIF
    assert request(listener.port, "GET", "/c/" + listener.click_token(url, issued=old + 2 * 86400))[0] == 302
    listener.flush()
    assert len(stored(listener.store, "Click")) == 1
    assert stored(listener.store, "Open") == []


def test_head_on_click_answers_without_counting(listener):
    token = listener.click_token("https://shop.example/x")
    status, headers, body = request(listener.port, "HEAD", "/c/" + token)
    assert (status, header(headers, "Location"), body) == (302, "https://shop.example/x", b"")
    assert request(listener.port, "HEAD", "/c/broken")[0] == 404
    listener.flush()
    assert stored(listener.store, "Click") == []


def test_non_http_destination_is_never_redirected(listener):
    for url in ("javascript:alert(1)", "data:text/html,x", "https://a.example/\r\nSet-Cookie: x=1"):
        assert request(listener.port, "GET", "/c/" + listener.click_token(url))[0] == 404


def test_click_event_without_message_row_still_redirects(listener):
    mid = "0100018c00000000-00000000-0000-0000-0000-000000000000-000000"
    token = listener.click_token("https://shop.example/gone", message_id=mid, recipient="x@example.net")
    assert request(listener.port, "GET", "/c/" + token)[0] == 302
    listener.flush()
    [click] = stored(listener.store, "Click", mid)
    assert click["mail"]["messageId"] == mid
    assert click["mail"]["destination"] == ["x@example.net"]
    assert click["mail"]["timestamp"].startswith("2023-")


# --- limits ------------------------------------------------------------------------------------------------

def test_headers_over_8k_get_400(listener):
    token = listener.open_token()
    cookies = {f"Cookie{i}": "c" * 1000 for i in range(9)}
    assert request(listener.port, "GET", "/o/" + token, {"User-Agent": CHROME, **cookies})[0] == 400
    assert request(listener.port, "GET", "/c/" + listener.click_token("https://a.example/"), cookies)[0] == 400
    assert request(listener.port, "GET", "/o/" + token, {"Cookie": "c" * 9000})[0] == 400
    assert request(listener.port, "GET", "/o/" + token, {"Cookie": "c" * 7000})[0] == 200
    listener.flush()
    assert len(stored(listener.store, "Open")) == 1


def test_slow_client_is_disconnected(listener):
    with socket.create_connection(("127.0.0.1", listener.port), timeout=10) as s:
        s.sendall(b"GET /o/x HTTP/1.1\r\nHost: t\r\n")  # never finishes its headers
        start = time.monotonic()
        s.settimeout(8)
        assert s.recv(1024) == b""
        assert time.monotonic() - start < 7


# --- proxies -----------------------------------------------------------------------------------------------

def test_forwarded_for_honoured_only_from_trusted_proxies(listener):
    token = listener.open_token()
    xff = {"User-Agent": CHROME, "X-Forwarded-For": "198.51.100.7, 203.0.113.9"}
    request(listener.port, "GET", "/o/" + token, xff, source="127.0.0.2")  # trusted proxy
    request(listener.port, "GET", "/o/" + token, xff, source="127.0.0.1")  # anyone else
    request(listener.port, "GET", "/o/" + token, {**xff, "X-Forwarded-For": "not-an-ip"}, source="127.0.0.2")
    listener.flush()
    ips = [e["open"]["ipAddress"] for e in stored(listener.store, "Open")]
    assert ips == ["203.0.113.9", "127.0.0.1", "127.0.0.2"]


def test_forwarded_chain_through_several_trusted_proxies(tmp_path):
    cfg = load(tmp_path, 'trusted_proxies = ["127.0.0.0/8", "10.0.0.0/8"]')
    server = Listener(cfg)
    try:
        headers = {"User-Agent": CHROME, "X-Forwarded-For": "192.0.2.1, 198.51.100.2, 10.1.2.3"}
        request(server.port, "GET", "/o/" + server.open_token(), headers)
        server.flush()
        assert [e["open"]["ipAddress"] for e in stored(server.store, "Open")] == ["198.51.100.2"]
    finally:
        server.stop()


# --- other pages -------------------------------------------------------------------------------------------

def test_health_and_landing_pages(listener):
    status, _, body = request(listener.port, "GET", "/healthz")
    assert (status, body) == (200, b"ok\n")
    status, headers, body = request(listener.port, "GET", "/", {"Host": "<script>x</script>"})
    assert status == 200 and b"Link tracking" in body and b"script" not in body
    assert header(headers, "Set-Cookie") is None
    assert request(listener.port, "POST", "/c/abc")[0] == 405
    assert request(listener.port, "GET", "/robots.txt")[0] == 404


def test_keep_alive_connection_serves_many_requests(listener):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", listener.port, timeout=10)
    try:
        for _ in range(20):
            conn.request("GET", "/o/" + listener.open_token(), headers={"User-Agent": CHROME})
            resp = conn.getresponse()
            assert resp.read() == GIF
    finally:
        conn.close()
    listener.flush()
    assert len(stored(listener.store, "Open")) == 20


def test_long_destination_and_undecodable_user_agent(listener):
    url = "https://shop.example/p?data=" + "x" * 12000 + "#end"
    assert _location_bytes(listener.port, listener.click_token(url)) == url.encode()
    answer = raw_request(listener.port, b"GET /o/" + listener.open_token().encode() + b" HTTP/1.1\r\nHost: t\r\n"
                         b"User-Agent: Mozilla/5.0 \xff\xfe(broken)\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(GIF)
    listener.flush()
    [opened] = stored(listener.store, "Open")
    assert opened["open"]["userAgent"].startswith("Mozilla/5.0 ") and "(broken)" in opened["open"]["userAgent"]
    assert len(stored(listener.store, "Click")) == 1


def test_key_rotation_old_key_still_verifies(tmp_path):
    cfg = load(tmp_path)
    keys = cfg.tracking.keys_file
    keys.parent.mkdir(parents=True, exist_ok=True)
    old, new = SigningKey("old1", b"o" * 32), SigningKey("new1", b"n" * 32)
    keys.write_text(f"new1 {new.secret.hex()}\nold1 {old.secret.hex()}\n")
    server = Listener(cfg)
    try:
        assert server.keyring.signing.kid == "new1"
        issued = int(time.time())
        by_old = tokens.sign_click(Keyring((old,)), MID, RCPT, issued, 0, "https://shop.example/old-mail")
        by_new = tokens.sign_click(server.keyring, MID, RCPT, issued, 0, "https://shop.example/new-mail")
        assert _location_bytes(server.port, by_old) == b"https://shop.example/old-mail"
        assert _location_bytes(server.port, by_new) == b"https://shop.example/new-mail"
        retired = tokens.sign_click(Keyring((SigningKey("gone", b"g" * 32),)), MID, RCPT, issued, 0, "https://x.example/")
        assert request(server.port, "GET", "/c/" + retired)[0] == 404
    finally:
        server.stop()


def test_forwarded_proto_honoured_only_from_trusted_proxies(listener):
    from relay.core.challenge import CHALLENGE_PATH, make_challenge

    path = CHALLENGE_PATH + make_challenge(listener.keyring, int(time.time()))
    headers = {"User-Agent": CHROME, "X-Forwarded-Proto": "https"}
    assert request(listener.port, "GET", path, headers, source="127.0.0.2")[2].split()[-1] == b"https"
    assert request(listener.port, "GET", path, headers, source="127.0.0.1")[2].split()[-1] == b"http"


# --- the fast path and aiohttp answer alike -----------------------------------------------------------------

def _responses(answer: bytes, head_requests: bool = False) -> list[tuple[bytes, dict[bytes, bytes], bytes]]:
    """Split keep-alive responses read from one socket: (status line, headers without Date/Server, body)."""
    out = []
    while answer:
        head, _, answer = answer.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        fields = {k.lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
        length = 0 if head_requests else int(fields.get(b"content-length", b"0"))
        body, answer = answer[:length], answer[length:]
        for volatile in (b"date", b"server"):
            fields.pop(volatile, None)
        out.append((lines[0], fields, body))
    return out


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_fast_path_answers_as_aiohttp_does(listener, method):
    # `Content-Length: 0` is harmless, and is one of the things that send a request to aiohttp's handler
    requests = {}
    for label, extra in (("fast", b""), ("aiohttp", b"Content-Length: 0\r\n")):
        pixel = f"{method} /o/{listener.open_token()} HTTP/1.1\r\nHost: t\r\n".encode() + extra
        click = f"{method} /c/{listener.click_token('https://shop.example/ü?a=1&b=2#x')} HTTP/1.1\r\nHost: t\r\n"
        answer = raw_request(listener.port, pixel + b"\r\n" + click.encode() + extra + b"Connection: close\r\n\r\n")
        requests[label] = _responses(answer, head_requests=method == "HEAD")
    assert requests["fast"] == requests["aiohttp"]
    (pixel_status, pixel_fields, gif), (click_status, click_fields, _) = requests["fast"]
    assert (pixel_status, pixel_fields[b"content-length"], gif) == (b"HTTP/1.1 200 OK", b"43",
                                                                    GIF if method == "GET" else b"")
    assert click_status == b"HTTP/1.1 302 Found"
    assert click_fields[b"location"] == b"https://shop.example/%C3%BC?a=1&b=2#x"
    listener.flush()
    assert len(stored(listener.store, "Open")) == 2  # a HEAD open counts too (with a machine verdict)
    assert len(stored(listener.store, "Click")) == (2 if method == "GET" else 0)


def test_connection_handed_to_aiohttp_mid_stream_keeps_order(listener):
    pixel = f"GET /o/{listener.open_token()} HTTP/1.1\r\nHost: t\r\nUser-Agent: {CHROME}\r\n\r\n".encode()
    damaged = f"GET /c/{listener.click_token('https://shop.example/a')[:-3]} HTTP/1.1\r\nHost: t\r\n\r\n".encode()
    post = b"POST /o/x HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc"
    last = f"GET /o/{listener.open_token()} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode()
    # pipelined: two answered on the fast path, then aiohttp from the damaged click on, in the order sent
    answer = raw_request(listener.port, pixel + pixel + damaged + b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
                         + post + last)
    statuses = [status for status, _, _ in _responses(answer)]
    assert statuses == [b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK", b"HTTP/1.1 404 Not Found", b"HTTP/1.1 200 OK",
                        b"HTTP/1.1 405 Method Not Allowed", b"HTTP/1.1 200 OK"]
    listener.flush()
    assert len(stored(listener.store, "Open")) == 3


def test_fast_path_honours_connection_close_and_closes(listener):
    with socket.create_connection(("127.0.0.1", listener.port), timeout=5) as s:
        s.sendall(f"GET /o/{listener.open_token()} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := s.recv(65536):  # ends because the server closes
            answer += chunk
    [(status, fields, body)] = _responses(answer)
    assert (status, fields[b"connection"], body) == (b"HTTP/1.1 200 OK", b"close", GIF)


def test_click_whose_destination_cannot_be_sent_gets_500_and_the_listener_lives(listener):
    token = listener.click_token("https://shop.example/\ud800")  # a lone surrogate: signable, not sendable
    answer = raw_request(listener.port, f"GET /c/{token} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 500 ")
    assert request(listener.port, "GET", "/o/" + listener.open_token())[0] == 200
