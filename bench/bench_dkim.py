"""DKIM signing speed: relay's Signer (RSA-2048 and Ed25519, relaxed/relaxed) beside dkimpy's `dkim.sign`.

    python bench/bench_dkim.py [MESSAGE] [--runs N]

MESSAGE defaults to ../shared/bench/msg60k.eml (a 60 KB newsletter). Both sign the same CRLF bytes with the
same header list in the same run; the figures are medians of N runs after a warm-up. Targets (issue 5):
≤ 1 ms per RSA-2048 signature, ≤ 0.7 ms per Ed25519 signature.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import dkim as dkimpy
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from relay.config import DkimKey, DkimSettings  # noqa: E402
from relay.core import dkim as core  # noqa: E402
from relay.core.headers import split_header_block, to_crlf  # noqa: E402
from relay.sign import Signer  # noqa: E402

DEFAULT_MESSAGE = ROOT.parent / "shared" / "bench" / "msg60k.eml"
TARGETS_MS = {"rsa": 1.0, "ed25519": 0.7}


def median_ms(fn: Callable[[], object], runs: int) -> float:
    for _ in range(max(3, runs // 20)):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def write_key(folder: Path, name: str, key) -> Path:
    path = folder / name
    path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    path.chmod(0o600)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("message", nargs="?", default=str(DEFAULT_MESSAGE))
    parser.add_argument("--runs", type=int, default=300)
    args = parser.parse_args()
    data = to_crlf(Path(args.message).read_bytes())
    domain = "example-shop.com"
    rsa_key = rsa.generate_private_key(65537, 2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rsa_signer = Signer(DkimSettings((DkimKey(domain, "r1", write_key(folder, "r.pem", rsa_key)),)))
        ed_signer = Signer(DkimSettings((DkimKey(domain, "e1", write_key(folder, "e.pem", ed_key), "ed25519-sha256"),)))
    assert rsa_signer.sign(data, original=data).data != data, f"From domain of the message is not {domain}"
    names = [n.encode() for n in core.header_names_to_sign(split_header_block(data).fields)]
    rsa_pem = rsa_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())
    # The application's own signature on the original, then a change (as instrumentation makes): relay finds the
    # broken signature (recomputing its body hash), removes it and signs.
    app_signed = dkimpy.sign(data, b"app", domain.encode(), rsa_pem, include_headers=names) + data
    changed = app_signed.replace(b"</body>", b"<img src=x></body>", 1)

    results = {
        "relay rsa-sha256": median_ms(lambda: rsa_signer.sign(data, original=data), args.runs),
        "relay ed25519-sha256": median_ms(lambda: ed_signer.sign(data, original=data), args.runs),
        "relay rsa-sha256, app signature broken": median_ms(
            lambda: rsa_signer.sign(changed, original=app_signed), args.runs),
        "dkimpy dkim.sign rsa-sha256": median_ms(
            lambda: dkimpy.sign(data, b"r1", domain.encode(), rsa_pem, canonicalize=(b"relaxed", b"relaxed"),
                                include_headers=names), max(30, args.runs // 5)),
    }
    print(f"message: {args.message} ({len(data)} bytes), medians of {args.runs} runs")
    for label, ms in results.items():
        print(f"  {label:<40} {ms:8.3f} ms")
    dk = results["dkimpy dkim.sign rsa-sha256"]
    print(f"  ratio dkimpy rsa / relay rsa-sha256     {dk / results['relay rsa-sha256']:8.1f}x")
    print(f"  ratio dkimpy rsa / relay ed25519-sha256 {dk / results['relay ed25519-sha256']:8.1f}x")
    ok = results["relay rsa-sha256"] <= TARGETS_MS["rsa"] and results["relay ed25519-sha256"] <= TARGETS_MS["ed25519"]
    verdict = "met" if ok else "MISSED"
    print(f"  targets (rsa ≤ {TARGETS_MS['rsa']} ms, ed25519 ≤ {TARGETS_MS['ed25519']} ms): {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
