"""Shared fixtures. The corpus in ../shared/corpus is optional: tests that use it skip when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORPUS = Path(os.environ.get("RELAY_CORPUS", ROOT.parent / "shared" / "corpus"))


@pytest.fixture(scope="session")
def corpus() -> Path:
    if not (CORPUS / "eml").is_dir():
        pytest.skip(f"corpus not found at {CORPUS} (set RELAY_CORPUS)")
    return CORPUS
