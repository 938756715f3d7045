"""The fleet's clocks, in one place: the day a report counts in, and each state's local hour.

Reports count days in AEST (UTC+10) for the whole fleet; a state's "local hour" is its standard
time (``podpulse.geo.State.utc_offset_h``). Daylight saving is not modelled.
"""

from __future__ import annotations

from datetime import timedelta

from podpulse import geo

__all__ = ["REPORT_UTC_OFFSET_H", "AEST", "LOCAL_OFFSET_MIN"]

REPORT_UTC_OFFSET_H = 10  # a report day is an AEST day
AEST = timedelta(hours=REPORT_UTC_OFFSET_H)  # Sydney standard time
LOCAL_OFFSET_MIN = {s.code: int(s.utc_offset_h * 60) for s in geo.STATES}  # state → minutes ahead of UTC
