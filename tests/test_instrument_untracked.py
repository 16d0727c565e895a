"""Copies for sets without open or click tracking: the analysis is skipped when no part can be HTML, and the
copy is byte for byte what the full analysis gives (corpus messages skip cleanly when the corpus is absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.core import instrument as core
from relay.core.headers import HeaderError
from relay.core.intake import intake
from relay.core.settings import TrackingSettings
from relay.core.tokens import Keyring, SigningKey
from relay.instrument import Instrumenter

RING = Keyring((SigningKey("ku", b"u" * 32),))
MID = "0100018c1a2b3c4d-05e008de-024e-4226-841e-98f0e0d61bb1-000000"
CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"
UNTRACKED = [TrackingSettings(), TrackingSettings(list_unsubscribe=True, return_path_domain="bounces.example.com")]
HEAD = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: s\r\nMIME-Version: 1.0\r\n"
MESSAGES = {
    "plain": HEAD + b"Content-Type: text/plain\r\n\r\nhello {{ses:openTracker}} ses:no-track\r\n",
    "no content type": HEAD + b"\r\n<a ses:no-track href=\"https://example.com/\">x</a>\r\n",
    "html, upper case type": HEAD + b"Content-Type: TEXT/HTML\r\n\r\n<p>{{ses:openTracker}}</p>\r\n",
    "alternative with markers": HEAD + b"Content-Type: multipart/alternative; boundary=b\r\n\r\n--b\r\n"
    b"Content-Type: text/plain\r\n\r\nplain\r\n--b\r\nContent-Type: text/html\r\n\r\n"
    b"<a ses:no-track href=\"https://example.com/\">x</a>{{ses:openTracker}}\r\n--b--\r\n",
}


class FullAnalysis(Instrumenter):
    """Today's path without the skip: every message analysed."""

    def plan(self, message_id: str, raw: bytes, settings: TrackingSettings) -> core.Plan:
        return core.analyse(raw, settings)


def full_analysis(raw: bytes, settings: TrackingSettings) -> bytes:
    return FullAnalysis(RING).copy(MID, raw, settings, "r@example.org", 1700000000, position=0).data


def instrumenter_copy(raw: bytes, settings: TrackingSettings) -> bytes:
    return Instrumenter(RING).copy(MID, raw, settings, "r@example.org", 1700000000, position=0).data


@pytest.mark.parametrize("settings", UNTRACKED, ids=["defaults", "list-unsubscribe"])
@pytest.mark.parametrize("name", MESSAGES)
def test_untracked_copy_equals_the_full_analysis(name, settings):
    raw = MESSAGES[name]
    assert instrumenter_copy(raw, settings) == full_analysis(raw, settings)


def test_untracked_html_still_loses_its_markers():
    """Why the skip needs "no HTML part": SES removes opt-out markers and placeholders even without tracking."""
    for name in ("html, upper case type", "alternative with markers"):
        raw = MESSAGES[name]
        assert instrumenter_copy(raw, TrackingSettings()) != raw
        assert b"{{ses:openTracker}}" not in instrumenter_copy(raw, TrackingSettings())
    plain = MESSAGES["plain"]
    assert instrumenter_copy(plain, TrackingSettings()) == plain


def test_untracked_corpus_copies_equal_the_full_analysis():
    paths = sorted((CORPUS / "eml").rglob("*.eml")) if (CORPUS / "eml").is_dir() else []
    if not paths:
        pytest.skip(f"corpus not found at {CORPUS}")
    for path in paths:
        try:
            raw = intake(path.read_bytes(), "", MID, "relay.test").raw
        except HeaderError:
            continue  # relay refuses it at the door
        for settings in UNTRACKED:
            assert instrumenter_copy(raw, settings) == full_analysis(raw, settings), path


def test_the_analysis_is_skipped_only_for_untracked_messages_without_html():
    skipped = {name: not Instrumenter(RING).plan(MID, raw, TrackingSettings()).report_parts
               for name, raw in MESSAGES.items()}
    assert skipped == {"plain": True, "no content type": True, "html, upper case type": False,
                       "alternative with markers": False}
    tracked = TrackingSettings(open_tracking=True)
    assert Instrumenter(RING).plan(MID, MESSAGES["plain"], tracked).report_parts  # tracked: analysed as before
