"""Reports are accepted from anyone: a report folded hundreds of thousands of times is read in linear time
(each field joined once), not one rebuild of the field per continuation line."""

from __future__ import annotations

import time

from relay.core import reports

FOLDS = 300_000  # about 1.5 MB; joined line by line this took over a minute


def test_a_delivery_status_folded_a_hundred_thousand_times_is_read_promptly():
    text = "Final-Recipient: rfc822; a@example.org\r\nDiagnostic-Code: smtp; 550\r\n" + " more\r\n" * FOLDS
    started = time.perf_counter()
    blocks = reports._text_blocks(text)
    assert time.perf_counter() - started < 2.0
    assert blocks[0][1][1].startswith("smtp; 550 more more") and blocks[0][1][1].count(" more") == FOLDS


def test_quoted_headers_folded_a_hundred_thousand_times_are_read_promptly():
    text = "Message-ID: <m@example.com>\nSubject: s\n" + " y\n" * FOLDS + "\nbody\n"
    started = time.perf_counter()
    quoted = reports._quoted_headers(text)
    assert time.perf_counter() - started < 2.0
    assert quoted[0] == ("Message-ID", "<m@example.com>") and quoted[1][1].count(" y") == FOLDS
