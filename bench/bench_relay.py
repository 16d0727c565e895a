"""End-to-end throughput of relay: messages/s accepted and delivered, with N concurrent client connections.

    python bench/bench_relay.py [--connections 16] [--messages 3000] [--runs 3] [--compare DIR] [--only-5k]

Everything runs on 127.0.0.1: a lean pipelining SMTP load generator (this process), relay as a subprocess
(`relay serve`, durable queue, SQLite events) and a fast counting SMTP sink that announces PIPELINING (a
subprocess; relay then sends each envelope in one round trip). The baseline, measured in the same run with the
same generator and sink, is an aiosmtpd → aiosmtplib pass-through with no durability and no events. Prints
medians over the runs, the ratio to the baseline, and relay's peak RSS.
Scenarios: a 5 KB plain message (no configuration set) and the 60 KB HTML message ../shared/bench/msg60k.eml
sent with the `marketing` set (open and click tracking: the whole instrumentation path).
`--compare DIR` also runs the relay of another checkout (e.g. `git worktree add /tmp/base main`) in the same
runs, interleaved with the others, for an A/B of a change on a noisy machine.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MSG60K = ROOT.parent / "shared" / "bench" / "msg60k.eml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(port)


# --- the sink: a minimal SMTP server that counts messages ---------------------------------------------------

def run_sink(port: int, counter) -> None:
    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await converse(reader, writer)
        except ConnectionError:
            pass  # a client that went away
        writer.close()

    async def converse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 sink ESMTP\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 SIZE 100000000\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                await reader.readuntil(b"\r\n.\r\n")
                with counter.get_lock():
                    counter.value += 1
                writer.write(b"250 2.0.0 Ok: queued\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                break
            else:
                writer.write(b"250 2.0.0 Ok\r\n")
            await writer.drain()

    async def main() -> None:
        server = await asyncio.start_server(session, "127.0.0.1", port, limit=2**24)
        async with server:
            await server.serve_forever()

    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    asyncio.run(main())


# --- the baseline: aiosmtpd → aiosmtplib, no durability ----------------------------------------------------

def run_passthrough(port: int, sink_port: int, connections: int) -> None:
    import aiosmtplib
    from aiosmtpd.smtp import SMTP

    async def main() -> None:
        pool: asyncio.Queue = asyncio.Queue()
        for _ in range(connections):
            client = aiosmtplib.SMTP(hostname="127.0.0.1", port=sink_port, start_tls=False)
            await client.connect()
            pool.put_nowait(client)

        class Forward:
            async def handle_DATA(self, server, session, envelope):
                client = await pool.get()
                try:
                    await client.sendmail(envelope.mail_from, envelope.rcpt_tos, envelope.original_content)
                finally:
                    pool.put_nowait(client)
                return "250 Ok"

        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: SMTP(Forward(), data_size_limit=None), "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    asyncio.run(main())


# --- the load generator --------------------------------------------------------------------------------------

async def client(port: int, messages: list[bytes], queue: asyncio.Queue, latencies: list[float]) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=2**20)
    await reader.readline()
    writer.write(b"EHLO load\r\n")
    while not (await reader.readline()).startswith(b"250 "):
        pass
    accepted = 0
    while True:
        try:
            i = queue.get_nowait()
        except asyncio.QueueEmpty:
            break
        start = time.perf_counter()
        writer.write(b"MAIL FROM:<load@example.com>\r\nRCPT TO:<sink@example.org>\r\nDATA\r\n")
        replies = [await reader.readline() for _ in range(3)]
        if not replies[2].startswith(b"354"):
            raise RuntimeError(replies)
        writer.write(messages[i % len(messages)] + b".\r\n")
        reply = await reader.readline()
        if reply.startswith(b"250"):
            accepted += 1
            latencies.append(time.perf_counter() - start)
    writer.write(b"QUIT\r\n")
    await writer.drain()
    writer.close()
    return accepted


async def drive(port: int, messages: list[bytes], total: int, connections: int, counter) -> dict:
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(i)
    latencies: list[float] = []
    base = counter.value
    start = time.perf_counter()
    accepted = sum(await asyncio.gather(*(client(port, messages, queue, latencies) for _ in range(connections))))
    accept_s = time.perf_counter() - start
    deadline = time.monotonic() + 120
    while counter.value - base < accepted and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    e2e_s = time.perf_counter() - start
    delivered = counter.value - base
    latencies.sort()
    return {"accepted": accepted, "delivered": delivered, "accept_rate": accepted / accept_s,
            "e2e_rate": delivered / e2e_s, "p99_accept_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))]}


def plain_message(size: int) -> bytes:
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
    head = b"From: load@example.com\r\nTo: sink@example.org\r\nSubject: benchmark\r\nMIME-Version: 1.0\r\n" \
           b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
    return head + line * ((size - len(head)) // len(line))


def html_message() -> bytes:
    raw = MSG60K.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    raw = b"X-SES-CONFIGURATION-SET: marketing\r\n" + raw
    return raw.replace(b"\r\n.", b"\r\n..")  # dot-stuffing for the raw generator


def relay_config(workdir: Path, smtp_port: int, sink_port: int, connections: int) -> Path:
    path = workdir / "relay.toml"
    path.write_text(f"""
[relay]
data_dir = "{workdir}/data"
[smtp]
listen = "127.0.0.1:{smtp_port}"
add_received_header = true
[upstream]
type = "smtp"
host = "127.0.0.1"
port = {sink_port}
tls = "none"
connections = {connections}
[delivery]
concurrency = {connections * 2}
[tracking]
listen = "127.0.0.1:{free_port()}"
default_host = "track.example.com"
[configuration_sets.marketing]
open_tracking = true
click_tracking = true
""")
    return path


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(kind: str, messages: list[bytes], total: int, connections: int, root: Path = ROOT) -> dict:
    counter = multiprocessing.Value("q", 0)
    sink_port, port = free_port(), free_port()
    sink = multiprocessing.Process(target=run_sink, args=(sink_port, counter), daemon=True)
    sink.start()
    wait_port(sink_port)
    with tempfile.TemporaryDirectory() as tmp:
        if kind == "relay":
            cfg = relay_config(Path(tmp), port, sink_port, connections)
            # run from `root`: `python -m` puts the working directory first on sys.path, before PYTHONPATH
            proc = subprocess.Popen([sys.executable, "-m", "relay.cli", "serve", "--config", str(cfg)], cwd=root,
                                    stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(root)})
            pid = proc.pid
        else:
            proc = multiprocessing.Process(target=run_passthrough, args=(port, sink_port, connections), daemon=True)
            proc.start()
            pid = proc.pid
        wait_port(port)
        try:
            before = (cpu_seconds(pid), cpu_seconds(sink.pid), time.process_time())
            result = asyncio.run(drive(port, messages, total, connections, counter))
            after = (cpu_seconds(pid), cpu_seconds(sink.pid), time.process_time())
            result["rss_mb"] = peak_rss_mb(pid)
            # CPU per delivered message of each party: on 2 cores their sum bounds the rate (2 s / sum)
            for i, key in enumerate(("cpu_server_ms", "cpu_sink_ms", "cpu_generator_ms")):
                result[key] = 1000 * (after[i] - before[i]) / max(1, result["delivered"])
        finally:
            proc.terminate()
            (proc.wait if kind == "relay" else proc.join)(30)
            sink.terminate()
            sink.join(5)
    return result


def print_cpu(label: str, row: dict) -> None:
    parts = row["cpu_server_ms"] + row["cpu_sink_ms"] + row["cpu_generator_ms"]
    print(f"  CPU per message, {label}: server {row['cpu_server_ms']:.2f} ms, sink {row['cpu_sink_ms']:.2f} ms,"
          f" generator {row['cpu_generator_ms']:.2f} ms; sum {parts:.2f} ms, so at most"
          f" {1000 * (os.cpu_count() or 1) / parts:.0f} msg/s on {os.cpu_count()} cores")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--compare", type=Path, help="also measure the relay of this checkout (A/B)")
    ap.add_argument("--only-5k", action="store_true", help="skip the 60 KB HTML scenario")
    args = ap.parse_args()
    scenarios = [("5 KB plain", [plain_message(5000)], args.messages)]
    if MSG60K.exists() and not args.only_5k:
        scenarios.append(("60 KB HTML, marketing set", [html_message()], max(300, args.messages // 3)))
    kinds = [("passthrough", ROOT), ("relay", ROOT)] + ([("compared", args.compare)] if args.compare else [])
    labels = {"passthrough": "baseline", "relay": "relay", "compared": f"relay of {args.compare}"}
    print(f"{os.cpu_count()} CPUs; {args.connections} client connections; medians of {args.runs} runs")
    for name, messages, total in scenarios:
        runs: dict[str, list[dict]] = {kind: [] for kind, _ in kinds}
        for _ in range(args.runs):  # interleaved, so the machine's load drifts over every kind alike
            for kind, root in kinds:
                runs[kind].append(measure("passthrough" if kind == "passthrough" else "relay", messages, total,
                                          args.connections, root))
        rows = {kind: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for kind, rs in runs.items()}
        b = rows["passthrough"]
        print(f"\n{name}: {total} messages per run")
        print(f"  baseline aiosmtpd->aiosmtplib (no durability): {b['e2e_rate']:7.0f} msg/s end to end, "
              f"accept p99 {b['p99_accept_ms']:.1f} ms")
        for kind, r in rows.items():
            if kind == "passthrough":
                continue
            print(f"  {labels[kind]} (fsync'd queue, events, per-recipient copy): accepted {r['accept_rate']:7.0f}"
                  f" msg/s, delivered end to end {r['e2e_rate']:7.0f} msg/s, accept p99 {r['p99_accept_ms']:.1f} ms,"
                  f" peak RSS {r['rss_mb']:.0f} MB")
            print(f"  ratio {labels[kind]}/baseline end to end: {r['e2e_rate'] / b['e2e_rate']:.2f}")
            if r["delivered"] < r["accepted"]:
                print(f"  WARNING: only {r['delivered']:.0f} of {r['accepted']:.0f} delivered within the wait")
        for kind, row in rows.items():
            print_cpu(labels[kind], row)


if __name__ == "__main__":
    main()
