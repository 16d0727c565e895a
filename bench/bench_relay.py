"""End-to-end throughput of relay: messages/s accepted and delivered, with N concurrent client connections.

    python bench/bench_relay.py [--connections 16] [--messages 3000] [--runs 3] [--compare DIR] [--only-5k]
                                [--store postgresql://postgres@127.0.0.1:5432/postgres [--nodes 1 2]]

Everything runs on 127.0.0.1: a lean pipelining SMTP load generator (this process), relay as a subprocess
(`relay serve`, durable queue, SQLite events) and a fast counting SMTP sink that announces PIPELINING (a
subprocess; relay then sends each envelope in one round trip). The baseline, measured in the same run with the
same generator and sink, is an aiosmtpd → aiosmtplib pass-through with no durability and no events. Prints
medians over the runs, the ratio to the baseline, and relay's peak RSS.
Scenarios: a 5 KB plain message (no configuration set, no signing) and the 61 KB HTML message msg60k.eml (in
../shared/bench, or further up from a worktree) sent with the `marketing` set (open and click tracking: the whole
instrumentation path) and signed with DKIM (RSA-2048, a key made for the bench; the sink counts the signed
messages it receives).
`--compare DIR` also runs the relay of another checkout (e.g. `git worktree add /tmp/base main`) in the same
runs, interleaved with the others, for an A/B of a change on a noisy machine.
`--store URL` (a PostgreSQL server) also measures relay on PostgreSQL, in a fresh database per run (dropped
after), with each `--nodes` count of relay processes on this machine: one configuration and tracking keys, an
SMTP port each, the generator's connections spread across them. Beside relay on SQLite in the same runs it
prints the CPU time per message of each node and of PostgreSQL's processes (when the server runs here) and, on
paper, PostgreSQL's own counters per message and how many nodes one server carries (bench/pg_costs.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import multiprocessing
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pg_costs import PostgresRun, ServerCapacity, print_model, print_paper, unreachable

ROOT = Path(__file__).resolve().parent.parent
# ../shared beside the project's checkout; a worktree under the project's folder finds it further up
MSG60K = next((p / "shared" / "bench" / "msg60k.eml" for p in ROOT.parents
               if (p / "shared" / "bench" / "msg60k.eml").exists()), ROOT.parent / "shared" / "bench" / "msg60k.eml")
DKIM_DOMAIN = "example-shop.com"  # msg60k.eml's From domain
DRAIN_TIMEOUT_S = 30.0  # outcomes still to be written once the sink has every message: a few ms in practice
# The database server "on paper" (bench/pg_costs.py), each changeable on the command line:
SERVER_CORES = 8  # a mid-size dedicated database machine (e.g. AWS db.m6i.2xlarge)
SERVER_WAL_MB_S = 60  # half a cloud volume's baseline (AWS gp3: 125 MB/s): checkpoints write the pages again
SERVER_FLUSHES_S = 1000  # a network volume takes about 1 ms per write and flush (pg_test_fsync measures yours)


@dataclass(frozen=True)
class Setup:
    """What one measurement runs: relay of `root` on SQLite (`store` None) or on the PostgreSQL server `store`
    with `nodes` processes; `root` None is the pass-through baseline."""

    label: str
    root: Path | None
    store: str | None = None
    nodes: int = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the process meant to listen on {port} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(port)


# --- the sink: a minimal SMTP server that counts messages ---------------------------------------------------

def dkim_signed(data: bytes) -> bool:
    head = data[:data.find(b"\r\n\r\n")]
    return head.startswith(b"DKIM-Signature:") or b"\r\nDKIM-Signature:" in head


def run_sink(port: int, counts) -> None:
    """`counts`: a shared array of [messages received, of which DKIM-signed]."""

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
                signed = dkim_signed(await reader.readuntil(b"\r\n.\r\n"))
                with counts.get_lock():
                    counts[0] += 1
                    counts[1] += signed
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


async def drive(ports: list[int], messages: list[bytes], total: int, connections: int, counts) -> dict:
    """Send `total` messages over `connections` connections spread across `ports` in turn; wait until the sink
    has them."""
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(i)
    latencies: list[float] = []
    base, base_signed = counts[0], counts[1]
    start = time.perf_counter()
    each = await asyncio.gather(*(client(ports[i % len(ports)], messages, queue, latencies)
                                  for i in range(connections)))
    accepted = sum(each)
    accept_s = time.perf_counter() - start
    deadline = time.monotonic() + 120
    while counts[0] - base < accepted and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    e2e_s = time.perf_counter() - start
    delivered = counts[0] - base
    latencies.sort()
    result = {"accepted": accepted, "delivered": delivered, "signed": counts[1] - base_signed,
              "accept_rate": accepted / accept_s, "e2e_rate": delivered / e2e_s,
              "p99_accept_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))]}
    for n in range(len(ports)):  # what each node answered 250 to (it also delivers those: it holds their lease)
        result[f"accepted_node{n}"] = sum(each[n::len(ports)])
    return result


def plain_message(size: int) -> bytes:
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
    head = b"From: load@example.com\r\nTo: sink@example.org\r\nSubject: benchmark\r\nMIME-Version: 1.0\r\n" \
           b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
    return head + line * ((size - len(head)) // len(line))


def html_message() -> bytes:
    raw = MSG60K.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    raw = b"X-SES-CONFIGURATION-SET: marketing\r\n" + raw
    return raw.replace(b"\r\n.", b"\r\n..")  # dot-stuffing for the raw generator


def relay_config(workdir: Path, smtp_port: int, sink_port: int, connections: int, dkim_key: Path | None,
                 tracking_keys: Path, store_url: str | None = None, node_id: str | None = None) -> Path:
    """One node's configuration; every node of a setup differs only in its ports, folder and node id. Without
    `dkim_key` nothing is signed (with a key, mail from other domains would carry a warning each)."""
    path = workdir / "relay.toml"
    store = f'[store]\nurl = "{store_url}"\nnode_id = "{node_id}"\n' if store_url else ""
    dkim = (f'[dkim]\n[[dkim.keys]]\ndomain = "{DKIM_DOMAIN}"\nselector = "bench"\nprivate_key_file = "{dkim_key}"\n'
            if dkim_key else "")
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
{store}[tracking]
listen = "127.0.0.1:{free_port()}"
default_host = "track.example.com"
keys_file = "{tracking_keys}"
{dkim}[configuration_sets.marketing]
open_tracking = true
click_tracking = true
""")
    return path


def write_dkim_key(folder: Path) -> Path:
    """An RSA-2048 signing key for DKIM_DOMAIN, private to its owner as relay requires."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    path = folder / "dkim.pem"
    key = rsa.generate_private_key(65537, 2048)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
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


def measure(setup: Setup, messages: list[bytes], total: int, connections: int, dkim_key: Path | None) -> dict:
    counts = multiprocessing.Array("q", 2)
    sink_port = free_port()
    sink = multiprocessing.Process(target=run_sink, args=(sink_port, counts), daemon=True)
    sink.start()
    wait_port(sink_port)
    load = Load(messages, total, connections, sink_port, sink.pid, counts)
    try:
        if setup.root is None:
            return measure_passthrough(load)
        with tempfile.TemporaryDirectory() as tmp:
            if setup.store is None:
                return measure_relay(setup, load, Path(tmp), dkim_key)
            with PostgresRun(setup.store, setup.root) as pg:
                return measure_relay(setup, load, Path(tmp), dkim_key, pg)
    finally:
        sink.terminate()
        sink.join(5)


@dataclass
class Load:
    """One run's load, its sink, and what to measure around it."""

    messages: list[bytes]
    total: int
    connections: int
    sink_port: int
    sink_pid: int
    counts: object  # the sink's [received, signed]

    def run(self, ports: list[int], pids: list[int], drained: Callable[[], None] = lambda: None) -> dict:
        """Drive the load at `ports` (served by the processes `pids`); CPU per delivered message of each party,
        read once `drained` says the servers have recorded every outcome. On 2 cores the sum of the parties
        bounds the rate (2 s / sum)."""
        # the generator is this process's main thread (not the thread watching PostgreSQL's backends)
        before = ([cpu_seconds(p) for p in pids], cpu_seconds(self.sink_pid), time.thread_time())
        result = asyncio.run(drive(ports, self.messages, self.total, self.connections, self.counts))
        generator = time.thread_time()
        drained()
        after = ([cpu_seconds(p) for p in pids], cpu_seconds(self.sink_pid), generator)
        delivered = max(1, result["delivered"])
        servers = [a - b for a, b in zip(after[0], before[0], strict=True)]
        result["cpu_server_ms"] = 1000 * sum(servers) / delivered
        result["cpu_sink_ms"] = 1000 * (after[1] - before[1]) / delivered
        result["cpu_generator_ms"] = 1000 * (after[2] - before[2]) / delivered
        for n, cpu in enumerate(servers):
            result[f"cpu_node{n}_ms"] = 1000 * cpu / max(1, result[f"accepted_node{n}"])
        result["rss_mb"] = max(peak_rss_mb(p) for p in pids)
        return result


def measure_passthrough(load: Load) -> dict:
    port = free_port()
    proc = multiprocessing.Process(target=run_passthrough, args=(port, load.sink_port, load.connections), daemon=True)
    proc.start()
    try:
        wait_port(port)
        return load.run([port], [proc.pid])
    finally:
        proc.terminate()
        proc.join(30)


def measure_relay(setup: Setup, load: Load, tmp: Path, dkim_key: Path | None, pg: PostgresRun | None = None
                  ) -> dict:
    """relay of setup.root, `setup.nodes` processes on one store (SQLite when `pg` is None)."""
    nodes: list[tuple[subprocess.Popen, int, Path]] = []
    try:
        for n in range(setup.nodes):  # one after the other: the first makes the tracking keys the others read
            workdir = tmp / f"node{n}"
            workdir.mkdir()
            port = free_port()
            cfg = relay_config(workdir, port, load.sink_port, load.connections, dkim_key, tmp / "tracking-keys",
                               pg.url if pg else None, f"bench{n}")
            with open(workdir / "relay.log", "wb") as log:
                # run from `root`: `python -m` puts the working directory first on sys.path, before PYTHONPATH
                proc = subprocess.Popen([sys.executable, "-m", "relay.cli", "serve", "--config", str(cfg)],
                                        cwd=setup.root, stdout=log, stderr=log,
                                        env={**os.environ, "PYTHONPATH": str(setup.root)})
            nodes.append((proc, port, workdir))
            wait_port(port, proc=proc)
        if pg is not None:
            pg.begin()
        queued = pg.queued if pg is not None else sqlite_queued(tmp / "node0" / "data" / "relay.sqlite3")
        result = load.run([port for _, port, _ in nodes], [proc.pid for proc, _, _ in nodes],
                          lambda: wait_drained(queued))
        if pg is not None:
            result.update(pg.cpu_per_message(result["delivered"]))
            stop_nodes(nodes)  # their backends publish their counters as they exit
            result.update(pg.costs_per_message(result["delivered"]))
        return result
    except Exception:
        for _, _, workdir in nodes:
            print(f"--- {workdir / 'relay.log'} (end)\n{(workdir / 'relay.log').read_text(errors='replace')[-3000:]}")
        raise
    finally:
        stop_nodes(nodes)


def stop_nodes(nodes: list[tuple[subprocess.Popen, int, Path]]) -> None:
    for proc, _, _ in nodes:
        if proc.poll() is None:
            proc.terminate()
    for proc, _, _ in nodes:
        proc.wait(30)


def sqlite_queued(path: Path) -> Callable[[], int]:
    def queued() -> int:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
            return db.execute("SELECT COUNT(*) FROM recipients WHERE state = 'queued'").fetchone()[0]

    return queued


def wait_drained(queued: Callable[[], int]) -> None:
    """Until the store lists no copy as queued: the last outcomes are written just after the sink's 250."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while queued() and time.monotonic() < deadline:
        time.sleep(0.01)


def ms(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f} ms"


def print_cpu(label: str, row: dict) -> None:
    pg = row.get("cpu_pg_ms", 0.0)
    parts = row["cpu_server_ms"] + row["cpu_sink_ms"] + row["cpu_generator_ms"] + (0.0 if math.isnan(pg) else pg)
    postgres = f", PostgreSQL {ms(pg)}" if "cpu_pg_ms" in row else ""
    print(f"  CPU per message, {label}: server {row['cpu_server_ms']:.2f} ms{postgres}, sink {row['cpu_sink_ms']:.2f}"
          f" ms, generator {row['cpu_generator_ms']:.2f} ms; sum {parts:.2f} ms, so at most"
          f" {1000 * (os.cpu_count() or 1) / parts:.0f} msg/s on {os.cpu_count()} cores")
    if "cpu_pg_ms" in row:
        each = ", ".join(f"{row[f'cpu_node{n}_ms']:.2f} ms" for n in range(row["nodes"]))
        print(f"    relay nodes, each over the messages it accepted: {each}; PostgreSQL: backends serving the run"
              f" {ms(pg)}, whole server {ms(row['cpu_pg_server_ms'])} (its background processes, other clients)")


def setups(args: argparse.Namespace) -> list[Setup]:
    """Everything measured in each run, interleaved so the machine's load drifts over all alike."""
    roots = [(ROOT, "relay")] + ([(args.compare, f"relay of {args.compare}")] if args.compare else [])
    chosen = [Setup("baseline", None)] + [Setup(f"{name}, SQLite" if args.store else name, root)
                                          for root, name in roots]
    if args.store:
        chosen += [Setup(f"{name}, PostgreSQL, {n} node{'s' if n > 1 else ''}", root, args.store, n)
                   for n in args.nodes for root, name in roots]
    return chosen


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--compare", type=Path, help="also measure the relay of this checkout (A/B)")
    ap.add_argument("--only-5k", action="store_true", help="skip the 61 KB HTML scenario")
    ap.add_argument("--store", metavar="URL", help="also measure relay on this PostgreSQL server"
                    " (postgresql://user@host:port/db; each run makes a database of its own and drops it)")
    ap.add_argument("--nodes", type=int, nargs="+", default=[1], metavar="N",
                    help="relay processes sharing the PostgreSQL database, one setup per count (e.g. 1 2)")
    ap.add_argument("--server-cores", type=float, default=SERVER_CORES,
                    help="on paper: the database server's cores (default: %(default)s)")
    ap.add_argument("--server-wal-mb", type=float, default=SERVER_WAL_MB_S,
                    help="on paper: MB of WAL per second the server's disk sustains (default: %(default)s)")
    ap.add_argument("--server-flushes", type=float, default=SERVER_FLUSHES_S,
                    help="on paper: WAL flushes (fsync) per second the server's disk sustains (default: %(default)s)")
    args = ap.parse_args()
    # stopped by `timeout` or kill: unwind as for Ctrl-C, so the nodes stop and the run's database is dropped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    if any(n < 1 for n in args.nodes):
        ap.error("--nodes: at least 1")
    if args.nodes != [1] and not args.store:
        ap.error("--nodes needs --store: several nodes share a PostgreSQL database")
    if args.store and (problem := unreachable(args.store)):
        ap.error(f"--store: {problem}")
    capacity = ServerCapacity(args.server_cores, args.server_wal_mb * 1e6, args.server_flushes)
    scenarios = [("5 KB plain", [plain_message(5000)], args.messages, False)]
    if MSG60K.exists() and not args.only_5k:
        scenarios.append(("61 KB HTML, marketing set, DKIM RSA-2048", [html_message()],
                          max(300, args.messages // 3), True))
    elif not args.only_5k:
        print(f"{MSG60K} not found: the 61 KB HTML scenario is skipped")
    chosen = setups(args)
    print(f"{os.cpu_count()} CPUs; {args.connections} client connections; medians of {args.runs} runs")
    with tempfile.TemporaryDirectory() as keys:
        dkim_key = write_dkim_key(Path(keys))
        for name, messages, total, signed in scenarios:
            runs: dict[Setup, list[dict]] = {setup: [] for setup in chosen}
            for _ in range(args.runs):  # interleaved, so the machine's load drifts over every setup alike
                for setup in chosen:
                    runs[setup].append(measure(setup, messages, total, args.connections, dkim_key if signed else None)
                                       | {"nodes": setup.nodes})
            rows = {setup: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for setup, rs in runs.items()}
            print_scenario(name, total, rows, signed, capacity)


def print_scenario(name: str, total: int, rows: dict[Setup, dict], signed: bool, capacity: ServerCapacity) -> None:
    b = next(row for setup, row in rows.items() if setup.root is None)
    print(f"\n{name}: {total} messages per run")
    print(f"  baseline aiosmtpd->aiosmtplib (no durability): {b['e2e_rate']:7.0f} msg/s end to end, "
          f"accept p99 {b['p99_accept_ms']:.1f} ms")
    for setup, r in rows.items():
        if setup.root is None:
            continue
        print(f"  {setup.label} (durable queue, events, per-recipient copy): accepted {r['accept_rate']:7.0f}"
              f" msg/s, delivered end to end {r['e2e_rate']:7.0f} msg/s, accept p99 {r['p99_accept_ms']:.1f} ms,"
              f" peak RSS {r['rss_mb']:.0f} MB{' per node' if setup.nodes > 1 else ''}")
        print(f"  ratio {setup.label}/baseline end to end: {r['e2e_rate'] / b['e2e_rate']:.2f}")
        if r["delivered"] < r["accepted"]:
            print(f"  WARNING: only {r['delivered']:.0f} of {r['accepted']:.0f} delivered within the wait")
        if signed and r["signed"] < r["delivered"]:
            print(f"  WARNING: only {r['signed']:.0f} of {r['delivered']:.0f} delivered messages were DKIM-signed")
    for setup, row in rows.items():
        print_cpu(setup.label, row)
    if any(setup.store for setup in rows):
        print_model(capacity)
    for setup, row in rows.items():
        if setup.store:
            print_paper(setup.label, row, capacity)


if __name__ == "__main__":
    main()
