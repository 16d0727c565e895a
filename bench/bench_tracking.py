"""Tracking listener throughput: requests/s and p99 latency for pixel loads and clicks, every event persisted.

Runs `relay track` as its own process on 127.0.0.1 against a fresh SQLite store, drives it with wrk (Debian's
`wrk`; a bounded asyncio load generator when wrk is missing) at 50 concurrent connections, then checks that
the store holds an event for every answered request. With nginx installed, nginx serving a static GIF on a
loopback port is measured the same way as the baseline. Prints one line per run, the medians, and JSON.

    python bench/bench_tracking.py [--duration 5] [--runs 3] [--connections 50] [--baseline DIR]

`--baseline DIR` runs a second listener from another checkout (`/work/main`, say) beside this one and loads
the two in turn, run by run, so both see the same disturbance from other load on the machine: an A/B.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from relay import config as config_module  # noqa: E402
from relay.core import events, tokens  # noqa: E402
from relay.core.headers import split_header_block  # noqa: E402
from relay.store import MessageRow, Store, open_store  # noqa: E402
from relay.tracking import GIF  # noqa: E402

MID = "0100018c1a2b3c4d-05e008de-024e-4226-841e-98f0e0d61bb1-000000"
RCPT = "reader@example.org"
UA = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36"
TARGETS = {"pixel_rps": 40_000, "click_rps": 30_000, "p99_ms": 10.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if s.recv(16).startswith(b"HTTP/1.1"):
                    return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing answers on port {port}")


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children (relay's workers, nginx's workers), all threads."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry.name) == pid or int(fields[1]) == pid:  # fields[1] is the parent's pid
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def measured(pid: int, port: int, path: str, args: argparse.Namespace) -> dict:
    """One load run, with the server's CPU time per answered request: a figure that other load on this
    shared machine disturbs much less than requests per second."""
    before = tree_cpu_seconds(pid)
    result = load(port, path, args.duration, args.connections, args.threads)
    result["cpu_us"] = (tree_cpu_seconds(pid) - before) / max(result["requests"], 1) * 1e6
    return result


# --- load generators -----------------------------------------------------------------------------------------

def run_wrk(url: str, duration: float, connections: int, threads: int) -> dict:
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "--latency", "-H", f"User-Agent: {UA}", url],
        capture_output=True, text=True, timeout=duration + 60,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    p99 = _ms(re.search(r"99%\s+([\d.]+\w+)", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {"rps": rps, "p99_ms": p99, "requests": total, "non_2xx_3xx": int(errors.group(1)) if errors else 0,
            "socket_errors": socket_errors.group(1) if socket_errors else ""}


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    value, unit = float(m.group(1)), m.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


async def _py_load(port: int, path: str, duration: float, connections: int, cap: int) -> dict:
    """A bounded keep-alive HTTP/1.1 load generator (when wrk is missing): raw sockets, one request at a time
    per connection, `cap` requests at most."""
    latencies: list[float] = []
    request = f"GET {path} HTTP/1.1\r\nHost: bench\r\nUser-Agent: {UA}\r\n\r\n".encode()
    stop_at = time.monotonic() + duration

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.monotonic() < stop_at and len(latencies) < cap:
                start = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"Content-Length: (\d+)", head, re.I).group(1))
                if length:
                    await reader.readexactly(length)
                latencies.append(time.perf_counter() - start)
        finally:
            writer.close()

    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(connections)))
    elapsed = time.monotonic() - start
    latencies.sort()
    return {"rps": len(latencies) / elapsed, "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
            "requests": len(latencies), "non_2xx_3xx": 0, "socket_errors": ""}


def load(port: int, path: str, duration: float, connections: int, threads: int) -> dict:
    if shutil.which("wrk"):
        return run_wrk(f"http://127.0.0.1:{port}{path}", duration, connections, threads)
    return asyncio.run(_py_load(port, path, duration, connections, cap=2_000_000))


# --- the systems under test ------------------------------------------------------------------------------

def seed(cfg: config_module.Config) -> None:
    store = open_store(cfg.store_target)
    raw = f"From: news@shop.example\r\nTo: {RCPT}\r\nSubject: Sale\r\n\r\nhello\r\n".encode()
    ms = int(time.time() * 1000) - 3_600_000
    mail = events.mail_object(events.MailFacts(MID, ms, "news@shop.example", [RCPT],
                                               split_header_block(raw).fields, "marketing"))
    row = MessageRow(MID, events.iso_ms(ms), "news@shop.example", "marketing", "Sale", None, len(raw), "127.0.0.1",
                     None, mail, {})
    store.submit(Store.accept_work(row, [RCPT], raw, [])).result()
    store.close()


def start_relay(tmp: Path, port: int, workers: int, root: Path = ROOT) -> tuple[subprocess.Popen, config_module.Config]:
    path = tmp / "relay.toml"
    path.write_text(f'[relay]\ndata_dir = "data"\n[tracking]\nlisten = "127.0.0.1:{port}"\nworkers = {workers}\n')
    cfg = config_module.load(path)
    seed(cfg)
    proc = subprocess.Popen([sys.executable, "-m", "relay.cli", "track", "--config", str(path)],
                            cwd=tmp, env={**os.environ, "PYTHONPATH": str(root)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_http(port)
    if workers > 1:
        time.sleep(2.0)  # the extra workers start after the first one; wrk connects once per run
    return proc, cfg


def start_nginx(tmp: Path, port: int) -> subprocess.Popen | None:
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if nginx is None:
        return None
    (tmp / "www" / "o").mkdir(parents=True)
    (tmp / "www" / "o" / "pixel").write_bytes(GIF)
    conf = tmp / "nginx.conf"
    conf.write_text(f"""
worker_processes auto;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/nginx-tmp;
    proxy_temp_path {tmp}/nginx-tmp;
    fastcgi_temp_path {tmp}/nginx-tmp;
    uwsgi_temp_path {tmp}/nginx-tmp;
    scgi_temp_path {tmp}/nginx-tmp;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        location = /healthz {{ return 200 "ok"; }}
        location /o/ {{
            root {tmp}/www;
            default_type image/gif;
            add_header Cache-Control "no-store, no-cache, must-revalidate, private";
        }}
    }}
}}
""")
    proc = subprocess.Popen([nginx, "-c", str(conf), "-p", str(tmp)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_http(port)
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def persisted(cfg: config_module.Config, kind: str) -> int:
    with sqlite3.connect(cfg.database_path) as db:
        return db.execute("SELECT COUNT(*) FROM events WHERE type = ?", (kind,)).fetchone()[0]


def listener_paths(cfg: config_module.Config) -> dict[str, str]:
    keyring = cfg.keyring()
    issued = int(time.time())
    return {
        "pixel": "/o/" + tokens.sign_open(keyring, MID, RCPT, issued),
        "click": "/c/" + tokens.sign_click(keyring, MID, RCPT, issued, 3, "https://shop.example/sale?a=1&b=2#x",
                                           {"campaign": ["autumn"]}),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2, help="wrk threads")
    ap.add_argument("--workers", type=int, default=1, help="relay track worker processes (SO_REUSEPORT)")
    ap.add_argument("--baseline", type=Path, help="another checkout's root, measured in turn with this one")
    args = ap.parse_args()
    tool = "wrk" if shutil.which("wrk") else "python load generator"
    results: dict[str, list[dict]] = {"pixel": [], "click": [], "nginx_gif": []}
    listeners = {"": ROOT} if args.baseline is None else {"": ROOT, "_baseline": args.baseline.resolve()}
    stored, answered, warm = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-tracking-") as tmpdir:
        tmp = Path(tmpdir)
        running = {}
        try:
            for suffix, root in listeners.items():
                (tmp / f"relay{suffix}").mkdir()
                port = free_port()
                proc, cfg = start_relay(tmp / f"relay{suffix}", port, args.workers, root)
                running[suffix] = (proc, cfg, port, listener_paths(cfg))
                results[f"pixel{suffix}"], results[f"click{suffix}"] = [], []
                # warm-up (caches); its opens are persisted too
                warm[suffix] = load(port, running[suffix][3]["pixel"], 1.0, args.connections, args.threads)["requests"]
            for i in range(args.runs):
                for kind in ("pixel", "click"):
                    for suffix in sorted(running, reverse=i % 2 == 1):  # in turn, the order alternating
                        proc, _, port, paths = running[suffix]
                        results[kind + suffix].append(measured(proc.pid, port, paths[kind], args))
        finally:
            for proc, *_ in running.values():
                stop(proc)
        for suffix, (_, cfg, _, _) in running.items():
            for kind, event in (("pixel", "Open"), ("click", "Click")):
                answered[kind + suffix] = sum(r["requests"] - r["non_2xx_3xx"] for r in results[kind + suffix])
                stored[kind + suffix] = persisted(cfg, event)
            stored[f"pixel{suffix}"] -= warm[suffix]
        nginx_port = free_port()
        (tmp / "nginx").mkdir()
        nginx = start_nginx(tmp / "nginx", nginx_port)
        if nginx is not None:
            try:
                for _ in range(args.runs):
                    results["nginx_gif"].append(measured(nginx.pid, nginx_port, "/o/pixel", args))
            finally:
                stop(nginx)
    summary = {}
    for kind, runs in results.items():
        if not runs:
            continue
        summary[kind] = {"rps_median": statistics.median(r["rps"] for r in runs),
                         "p99_ms_median": statistics.median(r["p99_ms"] for r in runs),
                         "cpu_us_median": statistics.median(r["cpu_us"] for r in runs), "runs": runs}
        for r in runs:
            print(f"{kind:14s} {r['rps']:10.0f} req/s  p99 {r['p99_ms']:7.2f} ms  cpu {r['cpu_us']:6.1f} us/req"
                  f"  ({r['requests']} requests"
                  f"{', errors ' + r['socket_errors'] if r['socket_errors'] else ''})")
    print(f"\nload: {tool}, {args.connections} connections, {args.duration:g} s x {args.runs} runs, "
          f"{os.cpu_count()} CPUs, relay workers: {args.workers}")
    for kind in answered:
        s = summary[kind]
        print(f"{kind:14s} median {s['rps_median']:10.0f} req/s  p99 {s['p99_ms_median']:6.2f} ms  "
              f"cpu {s['cpu_us_median']:6.1f} us/req   persisted {stored[kind]} / answered {answered[kind]}")
    if "nginx_gif" in summary:
        base = summary["nginx_gif"]["rps_median"]
        print(f"nginx GIF  median {base:10.0f} req/s  p99 {summary['nginx_gif']['p99_ms_median']:6.2f} ms  "
              f"cpu {summary['nginx_gif']['cpu_us_median']:6.1f} us/req  "
              f"(relay pixel = {summary['pixel']['rps_median'] / base:.1%} of nginx, "
              f"click = {summary['click']['rps_median'] / base:.1%})")
    else:
        print("nginx not installed: no baseline")
    ok = all(stored[k] >= answered[k] for k in stored)
    print(f"every answered hit persisted: {ok}")
    print(f"targets: {TARGETS}")
    print(json.dumps({"tool": tool, "connections": args.connections, "workers": args.workers, "summary": {
        k: {"rps_median": round(v["rps_median"]), "p99_ms_median": round(v["p99_ms_median"], 2),
            "cpu_us_median": round(v["cpu_us_median"], 1)}
        for k, v in summary.items()}, "persisted": stored, "answered": answered}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
