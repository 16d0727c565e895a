"""The tracking listener under hostile connections and requests, against a real `relay serve` subprocess over
127.0.0.1: a connection cap below the open-file limit (idle connections closed first, SMTP keeps working), one
HTTP parser and one set of limits whichever side answers, and redirects in URI form."""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import resource
import smtplib
import socket
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay import config as config_module
from relay import tracking
from relay.core import tokens
from relay.tracking import BAD_REQUEST, GIF

from .harness import RelayProcess, Upstream, wait_port
from .test_tracking_helpers import raw_request

MID = "0100018c1a2b3c4d-05e008de-024e-4226-841e-98f0e0d61bb1-000000"
RCPT = "reader@example.org"


@dataclass
class Relay(RelayProcess):
    tracking_toml: str = ""  # more [tracking] keys, as TOML lines

    def write_config(self) -> None:
        super().write_config()
        text = self.config_path.read_text()
        anchor = f'default_host = "127.0.0.1:{self.tracking_port}"\n'
        self.config_path.write_text(text.replace(anchor, anchor + self.tracking_toml + "\n", 1))

    def start(self) -> Relay:
        super().start()
        wait_port(self.tracking_port, proc=self.proc)
        return self

    def keyring(self) -> tokens.Keyring:
        return config_module.load(self.config_path).keyring()

    def open_path(self) -> str:
        return "/o/" + tokens.sign_open(self.keyring(), MID, RCPT, int(time.time()))

    def click_path(self, url: str) -> str:
        return "/c/" + tokens.sign_click(self.keyring(), MID, RCPT, int(time.time()), 0, url, {})


def _nofile(limit: int):
    def lower() -> None:  # in the child, before exec: relay starts with this open-file limit
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    return lower


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    process = Relay(tmp_path_factory.mktemp("relay"), tracking_toml='client_timeout = "30s"').start()
    yield process
    process.stop()


def _split(answer: bytes) -> tuple[bytes, dict[bytes, bytes], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
    return lines[0], fields, body


def _read_response(s: socket.socket, head_request: bool = False) -> tuple[int, bytes]:
    """(status, body) of one response read from a keep-alive socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, f"closed without an answer after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, fields, _ = _split(head + b"\r\n\r\n")
    length = 0 if head_request else int(fields.get(b"content-length", b"0"))
    while len(body) < length:
        body += s.recv(65536)
    return int(status.split()[1]), body[:length]


# --- A. file descriptors --------------------------------------------------------------------------------------

def test_connection_cap_is_three_quarters_of_the_open_file_limit():
    connection_cap = tracking.connection_cap
    assert connection_cap(0, 1024) == 768  # Debian's nginx: 768 worker_connections under 1,024 files
    assert connection_cap(0, 65536) == 49152
    assert connection_cap(100, 1024) == 100
    assert connection_cap(5000, 1024) == 768  # never above the ceiling: SMTP keeps its quarter
    assert connection_cap(0, resource.RLIM_INFINITY) == 786432


def test_idle_connections_beyond_the_cap_leave_smtp_and_clicks_working(tmp_path):
    """1,100 idle connections used to exhaust the descriptors (EMFILE): SMTP stopped accepting, clicks stopped
    answering, nothing was logged. Here relay may open 512 files (cap 384) and gets 600 idle connections."""
    upstream = Upstream().start()
    relay = Relay(tmp_path, upstream_port=upstream.port, tracking_toml='client_timeout = "60s"',
                  preexec=_nofile(512)).start()
    idle: list[socket.socket] = []
    try:
        for _ in range(600):
            idle.append(socket.create_connection(("127.0.0.1", relay.tracking_port), timeout=10))
        time.sleep(1.0)  # relay accepts what it can
        with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=10) as smtp:
            refused = smtp.sendmail("app@shop.example", [RCPT], b"From: app@shop.example\r\nTo: reader@example.org"
                                    b"\r\nSubject: still here\r\n\r\nhello\r\n")
        assert refused == {}
        assert len(upstream.wait_for(1)) == 1
        conn = http.client.HTTPConnection("127.0.0.1", relay.tracking_port, timeout=10)
        conn.request("GET", relay.click_path("https://shop.example/x"))
        response = conn.getresponse()
        assert (response.status, response.getheader("Location")) == (302, "https://shop.example/x")
        conn.close()
        assert "tracking listener at its connection cap (384, open-file limit 512)" in relay.log()
        assert relay.proc.poll() is None
    finally:
        for s in idle:
            s.close()
        relay.stop()
        upstream.stop()


def test_the_listener_survives_running_out_of_descriptors(tmp_path):
    """SMTP connections take the descriptors the cap leaves (256 files: 192 for tracking, 23 used at rest):
    accepting tracking connections fails for a while, and resumes once SMTP gives some back."""
    relay = Relay(tmp_path, tracking_toml='client_timeout = "60s"', preexec=_nofile(256)).start()
    smtp = [socket.create_connection(("127.0.0.1", relay.smtp_port), timeout=10) for _ in range(60)]
    idle: list[socket.socket] = []
    try:
        time.sleep(0.5)
        idle += [socket.create_connection(("127.0.0.1", relay.tracking_port), timeout=10) for _ in range(200)]
        time.sleep(1.5)  # relay accepts until no descriptor is left
        for s in smtp:
            s.close()
        conn = http.client.HTTPConnection("127.0.0.1", relay.tracking_port, timeout=15)
        conn.request("GET", relay.click_path("https://shop.example/back"))
        assert conn.getresponse().status == 302
        conn.close()
        assert "tracking listener: accepting failed ([Errno 24] Too many open files)" in relay.log()
    finally:
        for s in smtp + idle:
            s.close()
        relay.stop()


def test_at_the_cap_the_oldest_idle_connection_is_closed_first(tmp_path):
    relay = Relay(tmp_path, tracking_toml='max_connections = 4\nclient_timeout = "60s"').start()
    try:
        first = socket.create_connection(("127.0.0.1", relay.tracking_port), timeout=10)
        time.sleep(0.3)
        rest = [socket.create_connection(("127.0.0.1", relay.tracking_port), timeout=10) for _ in range(3)]
        time.sleep(0.3)
        # a keep-alive connection in use is not closed: it just answered, so it is the newest idle one
        rest[0].sendall(f"GET {relay.open_path()} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        assert _read_response(rest[0]) == (200, GIF)
        status, _, _ = _split(raw_request(relay.tracking_port, f"GET {relay.open_path()} HTTP/1.1\r\nHost: t\r\n"
                                        "Connection: close\r\n\r\n".encode()))
        assert status == b"HTTP/1.1 200 OK"
        assert first.recv(1) == b""  # closed by relay: the oldest idle connection
        rest[0].sendall(f"GET {relay.open_path()} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        assert _read_response(rest[0]) == (200, GIF)
        for s in [first, *rest]:
            s.close()
        assert "at its connection cap (4," in relay.log()
    finally:
        relay.stop()


def test_at_the_cap_busy_connections_are_not_closed_and_new_ones_wait(tmp_path):
    relay = Relay(tmp_path, tracking_toml='max_connections = 3\nclient_timeout = "60s"').start()
    try:
        pixel = f"GET {relay.open_path()} HTTP/1.1\r\nHost: t\r\n".encode()
        busy = [socket.create_connection(("127.0.0.1", relay.tracking_port), timeout=10) for _ in range(3)]
        for s in busy:
            s.sendall(pixel)  # a request begun, not finished
        time.sleep(0.5)
        waiting = socket.create_connection(("127.0.0.1", relay.tracking_port), timeout=10)
        waiting.sendall(pixel + b"\r\n")
        time.sleep(1.0)
        busy[0].sendall(b"\r\n")  # finished: answered, and idle, so the waiting connection can take its place
        assert _read_response(busy[0]) == (200, GIF)
        assert _read_response(waiting) == (200, GIF)
        for s in busy[1:]:
            s.sendall(b"\r\n")
            assert _read_response(s) == (200, GIF)  # never cut off mid-request
        for s in [*busy, waiting]:
            s.close()
        assert "every connection is busy, new ones wait" in relay.log()
    finally:
        relay.stop()


def test_connections_ending_every_way_give_their_place_back(tmp_path):
    relay = Relay(tmp_path, tracking_toml="max_connections = 3").start()
    try:
        pixel = f"GET {relay.open_path()} HTTP/1.1\r\nHost: t\r\n".encode()
        health = b"GET /healthz HTTP/1.1\r\nHost: t\r\n"
        endings = [pixel + b"Connection: close\r\n\r\n", health + b"Connection: close\r\n\r\n",
                   b"GET /o/x HTTP/1.1\r\nX: \x00\r\n\r\n", health + b"\r\n" + pixel + b"\r\n", pixel, b""]
        for _ in range(3):
            for ending in endings:
                with socket.create_connection(("127.0.0.1", relay.tracking_port), timeout=10) as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    s.sendall(ending)  # then closed: by relay after its answer, or reset by the client
                    s.settimeout(0.3)
                    with contextlib.suppress(OSError):
                        s.recv(65536)
        time.sleep(0.5)
        held = [socket.create_connection(("127.0.0.1", relay.tracking_port), timeout=5) for _ in range(3)]
        for s in held:
            s.sendall(pixel + b"\r\n")
            assert _read_response(s) == (200, GIF)  # three places, all free again
            s.close()
    finally:
        relay.stop()


def test_the_systemd_unit_raises_the_open_file_limit():
    unit = (Path(__file__).resolve().parent.parent / "systemd" / "relay.service").read_text()
    assert "\nLimitNOFILE=65536\n" in unit


# --- B. one parser, one set of limits -------------------------------------------------------------------------

def test_a_pixel_request_with_1000_header_fields_gets_400(relay):
    fields = b"a: b\r\n" * 1000  # 6 KB: under the 8 KB limit, over the 100 fields
    answer = raw_request(relay.tracking_port, f"GET {relay.open_path()} HTTP/1.1\r\nHost: t\r\n".encode() + fields
                       + b"Connection: close\r\n\r\n")
    status, headers, body = _split(answer)
    assert (status, body) == (b"HTTP/1.1 400 Bad Request", BAD_REQUEST)
    assert headers[b"connection"] == b"close"


def test_a_raw_non_ascii_pixel_path_gets_the_gif(relay):
    for target in (b"/o/\xc3\xa9t\xc3\xa9", b"/o/\xe9", relay.open_path().encode() + b"\xff"):
        request = b"GET " + target + b" HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        answer = raw_request(relay.tracking_port, request)
        status, headers, body = _split(answer)
        assert (status, headers[b"content-type"], body) == (b"HTTP/1.1 200 OK", b"image/gif", GIF), target


@pytest.mark.parametrize("after_aiohttp", [False, True])
def test_a_400_to_head_has_no_body(relay, after_aiohttp):
    first = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n" if after_aiohttp else b""
    for bad in (f"HEAD {relay.open_path()} HTTP/1.1\r\nHost: t\r\nCookie: {'c' * 9000}\r\n\r\n".encode(),
                f"HEAD {relay.open_path()} HTTP/1.1\r\nHost: t\r\n".encode() + b"a: b\r\n" * 200 + b"\r\n",
                b"HEAD /o/x HTTP/1.1\r\nHost: t\r\nX: a\x00b\r\n\r\n"):
        answer = raw_request(relay.tracking_port, first + bad)
        if after_aiohttp:
            assert _split(answer)[2].startswith(b"ok\nHTTP/1.1 400 ")
            answer = answer[answer.index(b"HTTP/1.1 400 "):]
        status, headers, body = _split(answer)
        assert status.split()[1] == b"400"
        assert body == b""  # the server closed right after the head
        assert headers[b"content-length"] == str(len(BAD_REQUEST)).encode()  # what a GET would have got


def _odd_requests(relay: Relay) -> dict[str, bytes]:
    """Requests for a pixel, each odd in one way (the pixel answers 200 to any request it accepts)."""
    path = relay.open_path().encode()
    line = b"GET " + path + b" HTTP/1.1\r\n"
    host = b"Host: t\r\n"
    long_path = path + b"?" + b"q" * (32768 - len(b"GET  HTTP/1.1") - len(path) - 1)
    return {
        "plain": line + host + b"\r\n",
        "1000 fields": line + host + b"a: b\r\n" * 1000 + b"\r\n",
        "100 fields": line + host + b"a: b\r\n" * 99 + b"\r\n",
        "101 fields": line + host + b"a: b\r\n" * 100 + b"\r\n",
        "8192 bytes of fields": line + host + b"Cookie: " + b"c" * (8192 - 9 - 10) + b"\r\n\r\n",
        "8193 bytes of fields": line + host + b"Cookie: " + b"c" * (8193 - 9 - 10) + b"\r\n\r\n",
        "one 9000-byte field": line + host + b"Cookie: " + b"c" * 9000 + b"\r\n\r\n",
        "32768-byte request line": b"GET " + long_path + b" HTTP/1.1\r\n" + host + b"\r\n",
        "32769-byte request line": b"GET " + long_path + b"q HTTP/1.1\r\n" + host + b"\r\n",
        "no Host": line + b"\r\n",
        "two Hosts": line + host + b"Host: u\r\n\r\n",
        "two User-Agents": line + host + b"User-Agent: a\r\nUser-Agent: b\r\n\r\n",
        "two Content-Lengths": line + host + b"Content-Length: 0\r\nContent-Length: 0\r\n\r\n",
        "bad Content-Length": line + host + b"Content-Length: x\r\n\r\n",
        "Content-Length: 0": line + host + b"Content-Length: 0\r\n\r\n",
        "a body": line + host + b"Content-Length: 3\r\n\r\nabc",
        "chunked": line + host + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        "Expect": line + host + b"Expect: 100-continue\r\n\r\n",
        "raw non-ASCII target": b"GET /o/\xc3\xa9 HTTP/1.1\r\n" + host + b"\r\n",
        "non-ASCII field value": line + host + b"User-Agent: caf\xc3\xa9 \xff\r\n\r\n",
        "NUL in a value": line + host + b"X: a\x00b\r\n\r\n",
        "control in a name": line + host + b"X\x01: b\r\n\r\n",
        "space before colon": line + b"Host : t\r\n\r\n",
        "folded field": line + host + b"X: a\r\n b\r\n\r\n",
        "bare LF": line[:-2] + b"\n" + b"Host: t\n\n",
        "lower-case method": b"get " + path + b" HTTP/1.1\r\n" + host + b"\r\n",
        "HTTP/1.0 without Host": b"GET " + path + b" HTTP/1.0\r\n\r\n",
        "HTTP/2.0": b"GET " + path + b" HTTP/2.0\r\n" + host + b"\r\n",
        "absolute form": b"GET http://t" + path + b" HTTP/1.1\r\n" + host + b"\r\n",
        "leading blank line": b"\r\n" + line + host + b"\r\n",
        "fragment": b"GET " + path + b"#x HTTP/1.1\r\n" + host + b"\r\n",
        "Connection: upgrade": line + host + b"Upgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        "tab in a value": line + host + b"User-Agent: a\tb\r\n\r\n",
    }


def _status(port: int, request: bytes, after: bytes = b"") -> int | None:
    """The status of the answer to `request`, sent as the first request of a connection or after `after` (whose
    answer is read first); None if the connection closed without one."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        if after:
            s.sendall(after)
            _read_response(s)
        s.sendall(request)
        data = b""
        with contextlib.suppress(ConnectionResetError):
            while b"\r\n" not in data and (chunk := s.recv(65536)):
                data += chunk
    return int(data.split()[1]) if data.startswith(b"HTTP/") else None


def test_the_fast_path_and_aiohttp_answer_odd_requests_alike(relay):
    """Each odd request as the first of a connection (the listener's own answers) and after a request aiohttp
    answered (the connection is aiohttp's from then on): the same status."""
    aiohttp_first = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
    statuses = {name: (_status(relay.tracking_port, request), _status(relay.tracking_port, request, aiohttp_first))
                for name, request in _odd_requests(relay).items()}
    assert {name: s for name, s in statuses.items() if s[0] != s[1]} == {}
    expected = {name: 200 for name in statuses} | {name: 400 for name in (
        "1000 fields", "101 fields", "8193 bytes of fields", "one 9000-byte field", "32769-byte request line",
        "no Host", "two Hosts", "two User-Agents", "two Content-Lengths", "bad Content-Length", "NUL in a value",
        "control in a name", "space before colon", "folded field", "bare LF", "lower-case method")} | {
        "absolute form": 404}  # aiohttp's raw_path is then the whole URL: no pixel path
    assert {name: s[0] for name, s in statuses.items()} == expected


def test_the_limits_follow_the_configuration(tmp_path):
    relay = Relay(tmp_path, tracking_toml="max_headers = 3\nmax_header_bytes = 300\nmax_request_line = 400").start()
    try:
        path = relay.open_path().encode()
        pad = b"?" + b"q" * (400 - len(b"GET  HTTP/1.1") - len(path) - 1)
        cookie = b"Cookie: " + b"c" * (300 - 9 - 10) + b"\r\n"  # with "Host: t": 300 bytes of fields
        requests = {
            (b"GET " + path + b" HTTP/1.1\r\nHost: t\r\na: b\r\nc: d\r\n\r\n"): 200,
            (b"GET " + path + b" HTTP/1.1\r\nHost: t\r\na: b\r\nc: d\r\ne: f\r\n\r\n"): 400,
            (b"GET " + path + b" HTTP/1.1\r\nHost: t\r\n" + cookie + b"\r\n"): 200,
            (b"GET " + path + b" HTTP/1.1\r\nHost: t\r\nc" + cookie + b"\r\n"): 400,
            (b"GET " + path + pad + b" HTTP/1.1\r\nHost: t\r\n\r\n"): 200,
            (b"GET " + path + pad + b"q HTTP/1.1\r\nHost: t\r\n\r\n"): 400,
        }
        assert {r: _status(relay.tracking_port, r) for r in requests} == requests
    finally:
        relay.stop()


def test_limit_keys_are_checked(tmp_path):
    path = tmp_path / "relay.toml"
    path.write_text('[tracking]\nmax_connections = -1\nmax_headers = 0\nmax_header_bytes = "8k"\n')
    with pytest.raises(config_module.ConfigError) as err:
        config_module.load(path)
    text = "\n".join(err.value.problems)
    for key in ("tracking.max_connections", "tracking.max_headers", "tracking.max_header_bytes"):
        assert key in text
    path.write_text("[tracking]\n")
    t = config_module.load(path).tracking
    assert (t.max_connections, t.max_request_line, t.max_header_bytes, t.max_headers) == (0, 32768, 8192, 100)


# --- C. redirects in URI form ---------------------------------------------------------------------------------

class _Destination(http.server.ThreadingHTTPServer):
    """Where links lead: records the Host and target of every request."""

    def __init__(self):
        self.seen: list[tuple[str, str]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.seen.append((self.headers["Host"], self.path))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)


class _EveryNameIsThisMachine(urllib.request.HTTPHandler):
    """urllib's HTTP, every host name resolving to 127.0.0.1 (the links' hosts are not in any DNS)."""

    class Connection(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.create_connection(("127.0.0.1", self.port), self.timeout)

    def http_open(self, req):
        return self.do_open(self.Connection, req)


def test_a_browser_like_client_follows_a_unicode_link_to_its_destination(relay):
    destination = _Destination()
    thread = threading.Thread(target=destination.serve_forever, daemon=True)
    thread.start()
    try:
        port = destination.server_address[1]
        link = f"http://bücher.example:{port}/straße?q=größe"
        opener = urllib.request.build_opener(_EveryNameIsThisMachine())
        with opener.open(f"http://127.0.0.1:{relay.tracking_port}{relay.click_path(link)}", timeout=10) as answer:
            assert answer.read() == b"ok"
        assert destination.seen == [(f"xn--bcher-kva.example:{port}", "/stra%C3%9Fe?q=gr%C3%B6%C3%9Fe")]
        [location] = [v for k, v in _split(raw_request(relay.tracking_port, (
            f"GET {relay.click_path(link)} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").encode()))[1].items()
            if k == b"location"]
        assert location == f"http://xn--bcher-kva.example:{port}/stra%C3%9Fe?q=gr%C3%B6%C3%9Fe".encode()
        # the Click event keeps the link as the message had it
        clicks = relay.wait_events("Click", 2)
        assert {json.loads(c[4])["click"]["link"] for c in clicks} == {link}
    finally:
        destination.shutdown()
        destination.server_close()


# --- the listener's reader and aiohttp's parser judge alike ---------------------------------------------------

_METHODS = [b"GET", b"HEAD", b"POST", b"OPTIONS", b"PRI", b"get", b"G\xc3\x89T", b"DELETE", b"GET "]
_TARGETS = [b"/o/abc", b"/c/abc?x=1&y", b"/o/a%20b", b"/o/%zz", b"*", b"http://h/o/x", b"http:///o/x", b"o/x",
            b"https://u@h:99/o", b"https://h:99999/o", b"/o/<>\"{}|^`", b"//x", b"/o/x#f", b"/o/\x7f", b"/o/a b", b""]
_VERSIONS = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.x", b"http/1.1", b"HTTP/1.1 ", b"HTTP/11"]
_FIELDS = [b"Host: t", b"Host: u", b"Host:", b"host:t", b"User-Agent: a", b"User-Agent: caf\xc3\xa9 \xff",
           b"X-Forwarded-For: 1.2.3.4", b"X: a\x00b", b"X: \x7f", b"X\x01: b", b"X : y", b" folded", b"\tfolded",
           b"X: a\tb", b"X: y ", b"X:y", b": v", b"X", b"Content-Length: 0", b"Content-Length: 00",
           b"Content-Length: x", b"Content-Length: -1", b"Content-Length: 1 1", b"Transfer-Encoding: gzip",
           b"Connection: close", b"Connection: keep-alive", b"Expect: 100-continue", b"Content-Type: a", b"ETag: x",
           b"X-\xff: v", b"Cookie: " + b"c" * 3000, b"a: b", b"X: a\rb"]


def _aiohttp_accepts(head: bytes, settings) -> bool:
    """aiohttp's parser (llhttp through its C extension), set up as the listener sets it up, then `_handle`'s
    size rule: whether aiohttp would answer this request rather than refuse it."""
    import asyncio

    from aiohttp.http_exceptions import HttpProcessingError
    from aiohttp.http_parser import HttpRequestParser

    class Protocol:  # the parser's payloads ask their protocol to pause and resume reading
        def pause_reading(self, **_):
            pass

        def resume_reading(self, **_):
            pass

    loop = asyncio.new_event_loop()
    try:
        parser = HttpRequestParser(Protocol(), loop, 2 ** 16, max_line_size=settings.max_request_line,
                                   max_field_size=settings.max_header_bytes, max_headers=settings.max_headers)
        messages, _, _ = parser.feed_data(head)
    except HttpProcessingError:
        return False
    finally:
        loop.close()
    return bool(messages) and tracking._headers_size(messages[0][0].raw_headers) <= settings.max_header_bytes


def _reader_accepts(head: bytes, settings) -> bool | None:
    """Whether the listener's reader takes the request; None when it leaves the judging to aiohttp (an upgrade
    or a chunked body: aiohttp reads the rest of that connection)."""
    reader = tracking._RequestReader(settings)
    reader.feed(head)
    try:
        request = reader.next()
    except tracking._Refused:
        return False
    assert request is not None, head
    return None if request.passthrough else True


@settings(max_examples=600, deadline=None)
@given(method=st.sampled_from(_METHODS), target=st.sampled_from(_TARGETS), version=st.sampled_from(_VERSIONS),
       fields=st.lists(st.sampled_from(_FIELDS), max_size=6), filler=st.sampled_from([0, 1, 98, 99, 100, 3000]),
       host_first=st.booleans())
def test_the_reader_refuses_what_aiohttp_refuses_and_only_that(method, target, version, fields, filler, host_first):
    listener = config_module.TrackingConfig()
    lines = [method + b" " + target + b" " + version] + ([b"Host: t"] if host_first else [])
    lines += fields + [b"f: v"] * filler
    head = b"\r\n".join(lines) + b"\r\n\r\n"
    if b"\n" in head.replace(b"\r\n", b""):
        return
    ours = _reader_accepts(head, listener)
    if ours is not None:
        assert ours == _aiohttp_accepts(head, listener), head[:300]
