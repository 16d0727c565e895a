"""Tracking hits under pressure: a pixel flood against `relay serve` (SMTP, delivery and the listener in one
process, sharing one store), the store as fast as the disk allows.

Per run: wrk floods the pixel URL for `--duration` seconds at `--connections` connections while the relay's RSS
is sampled every 50 ms; then the drain: the time until the store holds every answered hit (or, when some were
dropped, until its last growth; the metrics listener tells how many were dropped). Prints one line per run, the
medians, and JSON.

    python bench/bench_tracking_pressure.py [--duration 10] [--runs 3] [--connections 50] [--baseline DIR]
        [--command serve|track] [--buffer N]

`--baseline DIR` runs the same from another checkout (`/work/main`, say), in turn with this one, run by run.
`--buffer N` sets tracking.max_buffered_hits for this checkout (the baseline has no such key).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_tracking import MID, RCPT, UA, _ms, seed  # noqa: E402
from relay import config as config_module  # noqa: E402
from relay.core import tokens  # noqa: E402
from tests.harness import free_port, wait_port  # noqa: E402


def rss_mb(pid: int) -> float:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) / 1024


class RssSampler(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stopped = pid, 0.0, threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.05):
            self.peak = max(self.peak, rss_mb(self.pid))


def start(root: Path, tmp: Path, command: str, buffer: int | None) -> tuple[subprocess.Popen, Path, int, int, str]:
    tmp.mkdir(parents=True)
    port, smtp_port, metrics_port = free_port(), free_port(), free_port()
    extra = f"max_buffered_hits = {buffer}\n" if buffer else ""
    path = tmp / "relay.toml"
    path.write_text(f'[relay]\ndata_dir = "data"\n[smtp]\nlisten = "127.0.0.1:{smtp_port}"\n'
                    f'[upstream]\ntype = "capture"\ncapture_dir = "{tmp}/out"\n'
                    f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n'
                    f'[tracking]\nlisten = "127.0.0.1:{port}"\n{extra}')
    cfg = config_module.load(path)
    seed(cfg)
    pixel = "/o/" + tokens.sign_open(cfg.keyring(), MID, RCPT, int(time.time()))
    proc = subprocess.Popen([sys.executable, "-m", "relay.cli", command, "--config", str(path)], cwd=tmp,
                            env={**os.environ, "PYTHONPATH": str(root)}, stdout=subprocess.DEVNULL,
                            stderr=open(tmp / "relay.log", "wb"))  # noqa: SIM115 - the child holds it
    wait_port(port, proc=proc)
    return proc, cfg.database_path, port, metrics_port, pixel


def dropped(metrics_port: int) -> int:
    """relay_tracking_hits_dropped_total summed over reasons (0 where the metric does not exist)."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    except OSError:
        return 0
    return int(sum(float(v) for v in re.findall(r"^relay_tracking_hits_dropped_total\{[^}]*\} (\S+)", text, re.M)))


def opens(db: Path) -> int:
    with sqlite3.connect(db, timeout=30) as conn:
        return conn.execute("SELECT COUNT(*) FROM events WHERE type = 'Open'").fetchone()[0]


def flood(pid: int, db: Path, port: int, metrics_port: int, pixel: str, args) -> dict:
    before = opens(db) + dropped(metrics_port)
    sampler = RssSampler(pid)
    rss_before = rss_mb(pid)
    sampler.start()
    out = subprocess.run(["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{args.duration:g}s", "--latency",
                          "-H", f"User-Agent: {UA}", f"http://127.0.0.1:{port}{pixel}"],
                         capture_output=True, text=True, timeout=args.duration + 60).stdout
    ended = time.monotonic()
    answered = int(re.search(r"(\d+) requests in", out).group(1))
    p99 = _ms(re.search(r"99%\s+([\d.]+\w+)", out).group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    # the store's count alone while it grows (a scrape of /metrics is heavy): done when it holds every answered
    # hit or has not grown for 5 s (some were dropped); the drain took until its last growth
    stored, last_growth = opens(db), time.monotonic()
    while stored - before < answered and time.monotonic() - last_growth < 5.0:
        time.sleep(0.05)
        now = opens(db)
        if now != stored:
            stored, last_growth = now, time.monotonic()
    drain = max(0.0, last_growth - ended)
    accounted = stored + dropped(metrics_port) - before
    sampler.stopped.set()
    sampler.join()
    return {"rps": rps, "p99_ms": p99, "answered": answered, "accounted": accounted, "drain_s": round(drain, 2),
            "rss_before_mb": round(rss_before), "rss_peak_mb": round(max(sampler.peak, rss_before))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2, help="wrk threads")
    ap.add_argument("--command", choices=("serve", "track"), default="serve")
    ap.add_argument("--buffer", type=int, help="tracking.max_buffered_hits of this checkout")
    ap.add_argument("--baseline", type=Path, help="another checkout's root, measured in turn with this one")
    args = ap.parse_args()
    trees = {"this": (ROOT, args.buffer)}
    if args.baseline is not None:
        trees["baseline"] = (args.baseline.resolve(), None)
    results: dict[str, list[dict]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory(prefix="bench-pressure-") as tmpdir:
        for i in range(args.runs):
            for name in sorted(trees, reverse=i % 2 == 1):  # in turn, the order alternating
                root, buffer = trees[name]
                # a fresh relay per run: RSS peaks are not hidden by what an earlier run left allocated
                proc, db, port, metrics_port, pixel = start(root, Path(tmpdir) / f"{name}{i}", args.command, buffer)
                try:
                    r = flood(proc.pid, db, port, metrics_port, pixel, args)
                finally:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(120)
                results[name].append(r)
                print(f"{name:9s} {r['rps']:8.0f} req/s  p99 {r['p99_ms']:7.2f} ms  RSS {r['rss_before_mb']:5d} ->"
                      f" {r['rss_peak_mb']:5d} MB  drain {r['drain_s']:6.2f} s  accounted {r['accounted']}"
                      f" / answered {r['answered']}", flush=True)
    summary = {name: {key: statistics.median(r[key] for r in runs)
                      for key in ("rps", "p99_ms", "rss_peak_mb", "drain_s")} for name, runs in results.items()}
    print(f"\n`relay {args.command}`, wrk {args.connections} connections, {args.duration:g} s x {args.runs} runs,"
          f" {os.cpu_count()} CPUs")
    for name, s in summary.items():
        print(f"{name:9s} median {s['rps']:8.0f} req/s  p99 {s['p99_ms']:7.2f} ms  RSS peak {s['rss_peak_mb']:6.0f}"
              f" MB  drain {s['drain_s']:6.2f} s")
    print(json.dumps({"command": args.command, "summary": summary, "runs": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
