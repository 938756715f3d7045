"""Fixtures of the podpulse tests."""

from __future__ import annotations

import functools
from datetime import datetime, timezone

import pytest

# Monday 2 November 2026, 00:00 in Sydney (AEST, UTC+10): the start of the tests that assert dates.
FIXED_START = datetime(2026, 11, 1, 14, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def fixed_start():
    """Make ``bench.report.build_store`` simulate from FIXED_START, for tests that assert dates.

    ``build_store`` takes no start, so the simulator's default (the latest Monday that
    fits before now) is pinned while the module runs; and as the stored data is older
    than the decoder's event-time window allows once the calendar has moved on, it is
    decoded without the window (it goes straight to the store, not through Kafka).
    """
    import bench.report
    from podpulse import simulator
    from podpulse.contract import decode_batch

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(simulator, "default_start", lambda hours, now=None: FIXED_START)
        patch.setattr(bench.report, "decode_batch", functools.partial(decode_batch, window=None))
        yield FIXED_START
