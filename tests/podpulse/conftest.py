"""Fixtures of the podpulse tests."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

# Monday 2 November 2026, 00:00 in Sydney (AEST, UTC+10): the start of the tests that assert dates.
FIXED_START = datetime(2026, 11, 1, 14, tzinfo=timezone.utc)


@pytest.fixture(scope="session")
def fixed_start() -> datetime:
    """Where the stores of tests that assert dates begin (``build_store(..., start=fixed_start)``)."""
    return FIXED_START
