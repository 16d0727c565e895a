"""Faults inside a stage never hold or lose a copy: it goes out as it is, with a warning on the message."""

from __future__ import annotations

import asyncio
from pathlib import Path

from relay import config as config_module
from relay.deliver import CaptureUpstream
from relay.instrument import Instrumenter
from relay.pipeline import Pipeline, Submission
from relay.resolve import Resolver
from relay.sign import Signer
from relay.store import open_store

ROOT = Path(__file__).resolve().parent.parent


class FailingSigner(Signer):
    """The real signer with a fault injected: no configured key can make the real one raise on demand."""

    def sign(self, data, *, original, fallback_domain=None):
        raise RuntimeError("HSM unavailable")


def test_a_signing_fault_delivers_unsigned_with_a_warning(tmp_path, store_target):
    cfg = config_module.load(ROOT / "config.example.toml")
    store = open_store(store_target)
    upstream = CaptureUpstream(tmp_path / "out")
    pipeline = Pipeline(cfg, store, Resolver(cfg, store), Instrumenter(cfg.keyring()), FailingSigner(cfg.dkim),
                        upstream)
    message = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: s\r\n\r\nhello\r\n"

    async def run():
        msg = await pipeline.accept(Submission("a@example.com", ["b@example.org"], message, "127.0.0.1", "h",
                                               None, False))
        return msg.id, await pipeline.deliver_copy(msg, "b@example.org", 1)

    message_id, outcome = asyncio.run(run())
    assert outcome.state == "delivered"
    delivered = next((tmp_path / "out").glob("*.eml")).read_bytes()
    assert delivered.endswith(b"\r\n\r\nhello\r\n") and b"DKIM-Signature" not in delivered
    rows = store.query("SELECT stage, warning FROM message_warnings WHERE message_id = ?", (message_id,))
    assert rows == [("sign", "not signed: RuntimeError: HSM unavailable")]
    store.close()
