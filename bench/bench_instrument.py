"""Instrumentation benchmark, with same-run baselines.

    python bench/bench_instrument.py [--corpus ../shared/corpus] [--message ../shared/bench/msg60k.eml] [--runs N]

Prints:
  * HTML rewrite throughput (MB/s of decoded HTML) over the corpus templates and the bench message's HTML part,
    next to a plain compiled-regex tag scan and an lxml parse + serialise of the same bytes;
  * per-message time on the bench message: the first copy (parse, analyse, render) and each extra recipient
    (token substitution only), next to the email package parsing, rewriting and regenerating it.
Times are medians over many runs, wall clock and thread CPU (the CPU figure is steadier on a busy machine).
"""

from __future__ import annotations

import argparse
import email
import email.policy
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from relay.core import instrument as core  # noqa: E402
from relay.core import mime  # noqa: E402
from relay.core.intake import intake  # noqa: E402
from relay.core.settings import TrackingSettings  # noqa: E402
from relay.core.tokens import Keyring, SigningKey  # noqa: E402
from relay.instrument import Instrumenter  # noqa: E402

RING = Keyring((SigningKey("bench", b"b" * 32),))
MID = "0100018c1a2b3c4d-05e008de-024e-4226-841e-98f0e0d61bb1-000000"
SETTINGS = TrackingSettings(True, True, "track.example.com", pixel_position="auto",
                            tracking_hosts=frozenset({"track.example.com"}))
TAG = re.compile(rb"<[^>]*>")
HREF = re.compile(r'href="(https?://[^"]+)"')


def median_ms(fn: Callable[[int], object], runs: int) -> tuple[float, float]:
    """(wall, thread CPU) medians in milliseconds."""
    fn(0)
    wall, cpu = [], []
    for i in range(runs):
        c = time.thread_time_ns()
        t = time.perf_counter_ns()
        fn(i)
        wall.append(time.perf_counter_ns() - t)
        cpu.append(time.thread_time_ns() - c)
    return statistics.median(wall) / 1e6, statistics.median(cpu) / 1e6


def throughput(docs: list[bytes], fn: Callable[[bytes], object], runs: int) -> tuple[float, float]:
    """MB/s over all docs: total bytes / sum of per-doc median times (wall, CPU)."""
    total = sum(len(d) for d in docs)
    wall = cpu = 0.0
    for doc in docs:
        w, c = median_ms(lambda _i, doc=doc: fn(doc), runs)
        wall, cpu = wall + w, cpu + c
    return total / 1e6 / (wall / 1e3), total / 1e6 / (cpu / 1e3)


def html_part(raw: bytes) -> bytes:
    part = next(p for p in mime.leaves(mime.parse(raw)) if p.content_type == "text/html")
    return mime.decode_body(raw[part.body_start:part.body_end], part.cte)


def regex_scan(doc: bytes) -> int:
    return sum(1 for _ in TAG.finditer(doc))


def lxml_round_trip(doc: bytes) -> bytes:
    import lxml.html

    return lxml.html.tostring(lxml.html.document_fromstring(doc))


def rewrite(doc: bytes) -> bytes:
    return core.rewrite_html(doc, SETTINGS, RING, MID, "rcpt@example.org", 1700000000)  # no report, as delivery


def email_package(raw: bytes) -> bytes:
    """The email package's way: parse, rewrite the HTML's links, regenerate the whole message."""
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    part = next(p for p in msg.walk() if p.get_content_type() == "text/html")
    text = HREF.sub(lambda m: 'href="https://track.example.com/c/' + "x" * 150 + '"', part.get_content())
    part.set_content(text, subtype="html", cte="quoted-printable")
    return msg.as_bytes()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default=str(ROOT.parent / "shared" / "corpus"))
    ap.add_argument("--message", default=str(ROOT.parent / "shared" / "bench" / "msg60k.eml"))
    ap.add_argument("--runs", type=int, default=300)
    args = ap.parse_args()
    raw = intake(Path(args.message).read_bytes(), "", MID, "relay.bench").raw
    bench_html = html_part(raw)
    docs = [p.read_bytes() for p in sorted(Path(args.corpus, "html").rglob("*.html"))]
    lxml_docs = [d for d in docs if d.strip()]
    runs = max(20, args.runs // 10)

    print(f"HTML rewrite throughput, MB/s (wall / thread CPU; medians of {runs} runs per document)")
    for label, sample in ((f"corpus html ({len(docs)} files, {sum(map(len, docs)) / 1e6:.2f} MB)", docs),
                          (f"bench message HTML part ({len(bench_html) / 1024:.1f} KB)", [bench_html])):
        print(f"  {label}")
        for name, fn, data in (("relay rewrite", rewrite, sample), ("baseline: regex tag scan", regex_scan, sample),
                               ("baseline: lxml parse+serialise", lxml_round_trip,
                                [d for d in sample if d in lxml_docs] or sample)):
            w, c = throughput(data, fn, runs)
            print(f"    {name:34s} {w:8.1f} / {c:8.1f}")

    first = median_ms(lambda i: Instrumenter(RING).copy(MID, raw, SETTINGS, f"u{i}@example.org", 1700000000),
                      args.runs)
    shared = Instrumenter(RING)
    shared.copy(MID, raw, SETTINGS, "warm@example.org", 1700000000)
    extra = median_ms(lambda i: shared.copy(MID, raw, SETTINGS, f"u{i}@example.org", 1700000000), args.runs * 5)
    baseline = median_ms(lambda i: email_package(raw), max(50, args.runs // 3))
    links = shared.copy(MID, raw, SETTINGS, "x@example.org", 1).report["links_wrapped"]
    print(f"\nPer message: {Path(args.message).name} ({len(raw) / 1024:.1f} KB, {links} links wrapped), "
          "ms (wall / thread CPU, medians)")
    print(f"  first copy (parse + analyse + render)   {first[0]:7.3f} / {first[1]:7.3f}   target <= 1")
    print(f"  each extra recipient (cached plan)      {extra[0]:7.3f} / {extra[1]:7.3f}   target <= 0.2")
    print(f"  baseline: email package parse+rewrite+regenerate {baseline[0]:7.3f} / {baseline[1]:7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
