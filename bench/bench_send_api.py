"""What a message costs through the sending API next to SMTP: the time from the request to its MessageId (or 250).

    python bench/bench_send_api.py [--messages 100] [--runs 3] [--compare DIR]

relay runs as `relay serve` (a subprocess, capture upstream) on 127.0.0.1 with the API. Each run sends, one
after another: SMTP messages to 1 and to 10 recipients, then (this checkout only) API SendEmail with Simple
content, SendRawEmail, SendEmail with a stored template. Printed: the median per kind over all messages of all
runs, in milliseconds. `--compare DIR` runs the relay of another checkout (e.g. the branch's merge base) for the
SMTP kinds in the same runs, alternating.
"""

from __future__ import annotations

import argparse
import smtplib
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import boto3  # noqa: E402
from botocore.config import Config as BotoConfig  # noqa: E402

from tests.harness import RelayProcess, free_port, wait_port  # noqa: E402

KEY, SECRET = "AKIDBENCH", "bench-secret-0123456789"
HTML = '<p>Hello</p><a href="https://shop.example.com/sale">Sale</a>'
MESSAGE = (b"From: News <news@example.com>\r\nTo: a@example.org\r\nSubject: bench\r\nX-SES-CONFIGURATION-SET:"
           b" marketing\r\nMIME-Version: 1.0\r\nContent-Type: text/html\r\n\r\n" + HTML.encode() + b"\r\n")


def api_toml(port: int) -> str:
    return f'\n[api]\nlisten = "127.0.0.1:{port}"\n[[api.access_keys]]\nid = "{KEY}"\nsecret = "{SECRET}"\n'


def smtp_times(port: int, count: int, rcpts: int) -> list[float]:
    out = []
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        for _ in range(count):
            start = time.perf_counter()
            client.sendmail("news@example.com", [f"r{i}@example.org" for i in range(rcpts)], MESSAGE)
            out.append(time.perf_counter() - start)
    return out


def api_times(port: int, count: int) -> dict[str, list[float]]:
    v1, v2 = (boto3.client(s, endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                           aws_access_key_id=KEY, aws_secret_access_key=SECRET,
                           config=BotoConfig(retries={"max_attempts": 1})) for s in ("ses", "sesv2"))
    v2.create_email_template(TemplateName="Bench", TemplateContent={"Subject": "Hi {{name}}", "Html": HTML})
    calls = {
        "api SendEmail Simple": lambda: v2.send_email(
            FromEmailAddress="news@example.com", Destination={"ToAddresses": ["a@example.org"]},
            ConfigurationSetName="marketing",
            Content={"Simple": {"Subject": {"Data": "bench"}, "Body": {"Html": {"Data": HTML}}}}),
        "api SendRawEmail": lambda: v1.send_raw_email(RawMessage={"Data": MESSAGE}),
        "api SendEmail Template": lambda: v2.send_email(
            FromEmailAddress="news@example.com", Destination={"ToAddresses": ["a@example.org"]},
            ConfigurationSetName="marketing",
            Content={"Template": {"TemplateName": "Bench", "TemplateData": '{"name": "Ann"}'}}),
    }
    out: dict[str, list[float]] = {}
    for name, call in calls.items():
        call()  # the first call of each kind pays for connections and compilation
        for _ in range(count):
            start = time.perf_counter()
            call()
            out.setdefault(name, []).append(time.perf_counter() - start)
    return out


def run(folder: Path, pythonpath: Path | None, count: int, with_api: bool) -> dict[str, list[float]]:
    api_port = free_port()
    relay = RelayProcess(folder, None, extra=api_toml(api_port) if with_api else "",
                         env={"PYTHONPATH": str(pythonpath)} if pythonpath else {})
    relay.start()
    try:
        times = {"smtp 1 recipient": smtp_times(relay.smtp_port, count, 1),
                 "smtp 10 recipients": smtp_times(relay.smtp_port, count, 10)}
        if with_api:
            wait_port(api_port, proc=relay.proc)
            times.update(api_times(api_port, count))
        return times
    finally:
        relay.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--compare", type=Path, help="another checkout whose relay runs the SMTP kinds too")
    args = parser.parse_args()
    totals: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            for label, path in (("this", None), ("compare", args.compare)):
                if label == "compare" and path is None:
                    continue
                got = run(Path(tmp) / f"{label}{i}", path, args.messages, with_api=label == "this")
                for kind, values in got.items():
                    totals.setdefault(f"{label}: {kind}", []).extend(values)
    for kind, values in totals.items():
        print(f"{kind:40s} median {statistics.median(values) * 1000:7.2f} ms  ({len(values)} messages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
