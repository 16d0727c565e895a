"""What an unauthenticated SMTP client can make relay hold: memory for endless command lines, connections,
and the event loop (AUTH).

    python bench/bench_smtp_flood.py [--connections 25] [--megabytes 40] [--held 300] [--runs 3] [--compare DIR]

Everything runs on 127.0.0.1 against `relay serve` (a subprocess, capture upstream, 127.0.0.1 not trusted, so
the client is treated as an outside one).
- memory: --connections clients each send `EHLO x`, then `MAIL FROM:<` and --megabytes MB with no line end;
  relay's RSS is read from /proc once everything was sent (or after 20 s), and its peak (VmHWM).
- connections: --held clients connect at once from 127.0.0.1 and --held more from 127.0.0.2..5; counted are
  those that got the 220 greeting and are still open a moment later.
- AUTH: the time AUTH PLAIN takes for a user's wrong password and for an unknown user name (medians of 9 each,
  alternating); then, while 8 clients send wrong passwords in a loop, the time a NOOP takes on another session.
`--compare DIR` also runs the relay of another checkout (e.g. /work/main) in the same runs, alternating.
Prints medians over the runs.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from relay.config import hash_password  # noqa: E402
from tests.harness import RelayProcess  # noqa: E402

MB = 1024 * 1024


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


async def endless_command(port: int, size: int, deadline: float) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reader.readline()
    writer.write(b"EHLO x\r\nMAIL FROM:<")
    chunk = b"a" * MB
    sent = 0
    while sent < size and time.monotonic() < deadline:
        writer.write(chunk)
        sent += len(chunk)
        try:
            await asyncio.wait_for(writer.drain(), max(0.01, deadline - time.monotonic()))
        except TimeoutError:
            break  # relay stopped reading: what it holds is what it buffered


async def memory_attack(pid: int, port: int, connections: int, size: int) -> tuple[float, float, float]:
    idle = rss_mb(pid)[0]
    deadline = time.monotonic() + 20
    tasks = [asyncio.create_task(endless_command(port, size, deadline)) for _ in range(connections)]
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(0.5)  # let relay read what is in flight
    loaded, peak = rss_mb(pid)
    return idle, loaded, peak


async def hold(port: int, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes] | None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        greeting = await asyncio.wait_for(reader.readline(), 10)
    except (OSError, TimeoutError):
        return None
    return reader, writer, greeting


async def connection_attack(port: int, per_source: int) -> tuple[int, int]:
    """(connections held from 127.0.0.1, from all addresses)"""
    sources = ["127.0.0.1"] * per_source + [f"127.0.0.{2 + i % 4}" for i in range(per_source)]
    opened = []
    for i in range(0, len(sources), 50):  # in batches: the listen backlog (100) is not what is measured
        opened += await asyncio.gather(*(hold(port, s) for s in sources[i:i + 50]))
    await asyncio.sleep(0.5)
    held = [False] * len(opened)
    for i, item in enumerate(opened):
        if item is None:
            continue
        reader, writer, greeting = item
        held[i] = greeting.startswith(b"220") and not reader.at_eof()
        writer.close()
    return sum(held[:per_source]), sum(held)


async def smtp_session(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reader.readline()
    writer.write(b"EHLO x\r\n")
    while (await reader.readline())[3:4] == b"-":
        pass
    return reader, writer


async def timed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, command: bytes) -> float:
    start = time.perf_counter()
    writer.write(command + b"\r\n")
    await reader.readline()
    return time.perf_counter() - start


def auth_line(user: bytes, password: bytes) -> bytes:
    return b"AUTH PLAIN " + base64.b64encode(b"\0" + user + b"\0" + password)


async def auth_attack(port: int) -> dict:
    reader, writer = await smtp_session(port)
    known, unknown = [], []
    for i in range(9):
        known.append(await timed(reader, writer, auth_line(b"app", b"wrong%d" % i)))
        unknown.append(await timed(reader, writer, auth_line(b"nobody%d" % i, b"wrong")))
    stop = asyncio.Event()

    async def attacker() -> None:
        r, w = await smtp_session(port)
        while not stop.is_set():
            await timed(r, w, auth_line(b"app", b"wrong"))

    attackers = [asyncio.create_task(attacker()) for _ in range(8)]
    await asyncio.sleep(0.3)
    noops = []
    for _ in range(40):
        noops.append(await timed(reader, writer, b"NOOP"))
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.gather(*attackers)
    return {"auth_known_ms": 1000 * statistics.median(known), "auth_unknown_ms": 1000 * statistics.median(unknown),
            "noop_ms": 1000 * statistics.median(noops)}


def run_once(checkout: Path, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        relay = RelayProcess(Path(tmp), None, smtp_extra="trusted_networks = []",
                             env={"PYTHONPATH": str(checkout)}).start()
        try:
            idle, loaded, peak = asyncio.run(memory_attack(relay.proc.pid, relay.smtp_port, args.connections,
                                                           args.megabytes * MB))
        finally:
            relay.stop()
        relay = RelayProcess(Path(tmp) / "b", None, smtp_extra="trusted_networks = []",
                             env={"PYTHONPATH": str(checkout)}).start()
        try:
            held_one, held = asyncio.run(connection_attack(relay.smtp_port, args.held))
        finally:
            relay.stop()
        users = f'auth_fail_limit = 100000\n[[smtp.users]]\nusername = "app"\npassword_hash = "{hash_password("pw")}"'
        relay = RelayProcess(Path(tmp) / "c", None, smtp_extra=f"trusted_networks = []\n{users}",
                             env={"PYTHONPATH": str(checkout)}).start()
        try:
            auth = asyncio.run(auth_attack(relay.smtp_port))
        finally:
            relay.stop()
    return {"idle_mb": idle, "attack_mb": loaded, "peak_mb": peak, "held_one": held_one, "held": held, **auth}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--connections", type=int, default=25)
    ap.add_argument("--megabytes", type=int, default=40)
    ap.add_argument("--held", type=int, default=300, help="connections from 127.0.0.1, and as many from others")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--compare", type=Path, help="also measure the relay of this checkout (A/B)")
    args = ap.parse_args()
    checkouts = {"this": ROOT} | ({"compare": args.compare.resolve()} if args.compare else {})
    rows: dict[str, list[dict]] = {name: [] for name in checkouts}
    for _ in range(args.runs):
        for name, path in checkouts.items():
            rows[name].append(run_once(path, args))
    print(f"{args.connections} connections x {args.megabytes} MB command line without end; "
          f"{2 * args.held} connections held open ({args.held} from 127.0.0.1); medians of {args.runs} runs")
    for name, path in checkouts.items():
        med = {key: statistics.median(r[key] for r in rows[name]) for key in rows[name][0]}
        print(f"  {name} ({path}): RSS idle {med['idle_mb']:.0f} MB, under attack {med['attack_mb']:.0f} MB,"
              f" peak {med['peak_mb']:.0f} MB; connections held {med['held']:.0f}"
              f" ({med['held_one']:.0f} from 127.0.0.1); AUTH wrong password {med['auth_known_ms']:.1f} ms,"
              f" unknown user {med['auth_unknown_ms']:.1f} ms; NOOP during an AUTH flood {med['noop_ms']:.1f} ms")


if __name__ == "__main__":
    main()
