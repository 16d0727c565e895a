"""Event-loop stalls under hostile messages: the tracking listener's pixel latency while relay accepts and
delivers one hostile message, beside the same listener's latency with nothing else to do (same run).

    python bench/bench_stall.py [--baseline DIR] [--only folded,big,parts,fields] [--idle 2] [--json]

Relay runs as a subprocess (`relay serve` with the tests' harness configuration, the `marketing` set: open and
click tracking) and delivers over SMTP to an aiosmtpd sink in a process of its own. A probe process keeps a
few keep-alive connections loading the pixel, one request at a time with a short pause, and records when each
request started and how long it took. This process sends each hostile message over a raw SMTP connection
(dot-stuffed beforehand, so only sockets run meanwhile). Pixel requests are split by when they started:
"accept" from the first byte of the message to relay's reply, "deliver" from the reply to the sink's receipt.
A request that meets a stall waits it out, so `max` is the longest stall seen.

Hostile messages: `folded`, one header of 600,000 folded lines (2.4 MB); `big`, a 39 MB HTML message;
`parts`, 10,000 HTML parts; `fields`, 100,000 header fields.
`--baseline DIR` also runs the relay of another checkout (e.g. /work/main) and measures both in turn,
scenario by scenario, so both see the same disturbance from other load on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from relay import config as config_module  # noqa: E402
from relay.core import tokens  # noqa: E402
from tests.harness import RelayProcess, Upstream, free_port, wait_port  # noqa: E402
from tests.raw_smtp import dot_stuffed, raw_transaction  # noqa: E402

MID = "0100018c1a2b3c4d-05e008de-024e-4226-841e-98f0e0d61bb1-000000"
RCPT = "reader@example.org"
PROBE_CONNECTIONS = 4
PROBE_PAUSE_S = 0.005  # between one connection's requests: sample the loop, do not load it


# --- hostile messages ----------------------------------------------------------------------------------------

def _head(extra: bytes = b"") -> bytes:
    return (b"From: News <news@example.com>\r\nTo: " + RCPT.encode() + b"\r\nSubject: hostile\r\n"
            b"X-SES-CONFIGURATION-SET: marketing\r\n" + extra + b"MIME-Version: 1.0\r\n")


_HTML = b'<html><body><p>Hello</p><a href="https://shop.example.com/x">x</a></body></html>\r\n'


def folded_header(lines: int = 600_000) -> bytes:
    return (_head(b"X-Folded: start\r\n" + b" y\r\n" * lines)
            + b"Content-Type: text/html; charset=utf-8\r\n\r\n" + _HTML)


def big_message(size: int = 39_000_000) -> bytes:
    """One HTML part of `size` bytes: paragraphs of text, a link every few KB (most past SES's 250)."""
    para = b"<p>" + b"The quick brown fox jumps over the lazy dog. " * 20 + b"</p>\r\n"
    link = b'<p><a href="https://shop.example.com/item?id=%d">item</a></p>\r\n'
    block = para * 4
    body, n = [b"<html><body>\r\n"], 0
    total = 0
    while total < size:
        chunk = block + link % n
        body.append(chunk)
        total += len(chunk)
        n += 1
    body.append(b"</body></html>\r\n")
    return _head() + b"Content-Type: text/html; charset=utf-8\r\n\r\n" + b"".join(body)


def many_parts(parts: int = 10_000) -> bytes:
    one = (b"--b\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
           b'<html><body><a href="https://shop.example.com/p%d">part</a></body></html>\r\n')
    return (_head() + b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
            + b"".join(one % i for i in range(parts)) + b"--b--\r\n")


def many_fields(fields: int = 100_000) -> bytes:
    return (_head(b"".join(b"X-Field-%d: value %d\r\n" % (i, i) for i in range(fields)))
            + b"Content-Type: text/html; charset=utf-8\r\n\r\n" + _HTML)


SCENARIOS = {"folded": folded_header, "big": big_message, "parts": many_parts, "fields": many_fields}


# --- the probe: pixel requests in a process of its own -------------------------------------------------------

def probe(port: int, path: str, stop, out) -> None:
    """Pixel requests until `stop` is set; sends [(start, latency), ...] (time.monotonic seconds) to `out`."""
    request = f"GET {path} HTTP/1.1\r\nHost: bench\r\nUser-Agent: bench-stall\r\n\r\n".encode()
    samples: list[tuple[float, float]] = []

    async def one_connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while not stop.is_set():
                start = time.monotonic()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"Content-Length: (\d+)", head, re.I).group(1))
                await reader.readexactly(length)
                samples.append((start, time.monotonic() - start))
                await asyncio.sleep(PROBE_PAUSE_S)
        finally:
            writer.close()

    async def main() -> None:
        await asyncio.gather(*(one_connection() for _ in range(PROBE_CONNECTIONS)))

    asyncio.run(main())
    out.send(samples)
    out.close()


class Probe:
    def __init__(self, port: int, path: str):
        self.stop = multiprocessing.Event()
        self.receive, send = multiprocessing.Pipe(duplex=False)
        self.proc = multiprocessing.Process(target=probe, args=(port, path, self.stop, send), daemon=True)
        self.proc.start()
        send.close()

    def finish(self) -> list[tuple[float, float]]:
        self.stop.set()
        samples = self.receive.recv()
        self.proc.join(10)
        return samples


# --- the sink: aiosmtpd in a process of its own --------------------------------------------------------------

class CountingHandler:
    def __init__(self, counter):
        self.counter = counter

    async def handle_DATA(self, server, session, envelope):
        with self.counter.get_lock():
            self.counter.value += 1
        return "250 2.0.0 Ok: counted"


def sink(port: int, counter) -> None:
    upstream = Upstream(port)
    upstream.handler = CountingHandler(counter)
    upstream.start()
    while True:
        time.sleep(3600)


# --- measuring -------------------------------------------------------------------------------------------------

def figures(latencies: list[float]) -> dict:
    if not latencies:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    ordered = sorted(latencies)
    pick = lambda q: round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)  # noqa: E731
    return {"n": len(ordered), "p50_ms": pick(0.5), "p99_ms": pick(0.99), "max_ms": round(ordered[-1] * 1000, 2)}


class Subject:
    """One relay under test, with its own sink."""

    def __init__(self, name: str, root: Path, workdir: Path):
        self.name = name
        self.counter = multiprocessing.Value("q", 0)
        sink_port = free_port()
        self.sink = multiprocessing.Process(target=sink, args=(sink_port, self.counter), daemon=True)
        self.sink.start()
        wait_port(sink_port)
        self.relay = RelayProcess(workdir, sink_port, env={"PYTHONPATH": str(root)},
                                  upstream={"timeout": "600s"})
        self.relay.start()
        wait_port(self.relay.tracking_port)
        cfg = config_module.load(self.relay.config_path)
        self.pixel = "/o/" + tokens.sign_open(cfg.keyring(), MID, RCPT, int(time.time()))

    def idle(self, seconds: float) -> dict:
        p = Probe(self.relay.tracking_port, self.pixel)
        time.sleep(seconds)
        return figures([lat for _, lat in p.finish()])

    def hostile(self, payload: bytes) -> dict:
        delivered = self.counter.value
        p = Probe(self.relay.tracking_port, self.pixel)
        time.sleep(0.3)  # the probe's connections are up
        answer, start, replied = raw_transaction(self.relay.smtp_port, payload, rcpt=RCPT)
        deadline = time.monotonic() + 300
        while answer.startswith("250") and self.counter.value == delivered and time.monotonic() < deadline:
            time.sleep(0.005)
        done = time.monotonic()
        time.sleep(0.3)
        samples = p.finish()
        return {"reply": answer[:60], "accept_s": round(replied - start, 3), "deliver_s": round(done - replied, 3),
                "accept": figures([lat for t, lat in samples if start <= t < replied]),
                "deliver": figures([lat for t, lat in samples if replied <= t < done])}

    def stop(self) -> None:
        self.relay.stop()
        self.sink.terminate()
        self.sink.join(5)


def line(label: str, f: dict) -> str:
    if not f["n"]:
        return f"{label:9s} (no request started)"
    return f"{label:9s} p50 {f['p50_ms']:8.2f}  p99 {f['p99_ms']:9.2f}  max {f['max_ms']:9.2f} ms  ({f['n']} requests)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", type=Path, help="another checkout's root, measured in turn with this one")
    ap.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenarios")
    ap.add_argument("--idle", type=float, default=2.0, help="seconds of pixel load with no hostile message")
    ap.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = ap.parse_args()
    roots = {"this": ROOT} if args.baseline is None else {"this": ROOT, "baseline": args.baseline.resolve()}
    results: dict = {name: {} for name in roots}
    with tempfile.TemporaryDirectory(prefix="bench-stall-") as tmp:
        subjects = [Subject(name, root, Path(tmp) / name) for name, root in roots.items()]
        try:
            for s in subjects:
                results[s.name]["idle"] = s.idle(args.idle)
            for i, scenario in enumerate(args.only.split(",")):
                payload = dot_stuffed(SCENARIOS[scenario]())
                for s in (subjects if i % 2 == 0 else subjects[::-1]):  # in turn, the order alternating
                    results[s.name][scenario] = s.hostile(payload)
                del payload
        finally:
            for s in subjects:
                s.stop()
    print(f"pixel latency, {PROBE_CONNECTIONS} keep-alive connections, {PROBE_PAUSE_S * 1000:g} ms pause; "
          f"{os.cpu_count()} CPUs")
    for name, root in roots.items():
        r = results[name]
        print(f"\n{name} ({root})")
        print("  " + line("idle", r["idle"]))
        for scenario in args.only.split(","):
            s = r[scenario]
            print(f"  {scenario}: {s['reply']!r}, accepted in {s['accept_s']:.2f} s, delivered {s['deliver_s']:.2f} s"
                  " after")
            print("    " + line("accept", s["accept"]))
            print("    " + line("deliver", s["deliver"]))
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
