"""Australian geography: states, population shares, postcode ranges, urban/rural.

Location in PodPulse is always a 4-digit postcode, never coordinates. This module
maps postcodes to a state and an urban/rural class with one lookup table, so the
simulator (which draws postcodes) and the ingest enrichment (which reads them
back) agree by construction.

Sources and simplifications, stated honestly:

- Population: ABS National, state and territory population, June 2024
  (rounded to thousands).
- Postcode ranges: Australia Post's state allocations for delivery postcodes
  (PO-box-only blocks such as 1000-1999 are left out).
- Urban share: approximately the share of each state's people living in its
  greater capital city and major urban centres (ABS Significant Urban Areas).
  The urban ranges below cover those centres' postcodes roughly, not exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["State", "STATES", "STATE_CODES", "lookup", "postcode_table", "is_urban"]


@dataclass(frozen=True, slots=True)
class State:
    code: str
    name: str
    population: int  # ABS, June 2024
    utc_offset_h: float  # standard time; daylight saving is not modelled
    urban_share: float
    urban: tuple[tuple[int, int], ...]  # inclusive postcode ranges
    rural: tuple[tuple[int, int], ...]


STATES: tuple[State, ...] = (
    State("NSW", "New South Wales", 8_470_000, 10.0, 0.74,
          urban=((2000, 2234), (2280, 2310), (2500, 2530), (2555, 2574), (2745, 2770)),
          rural=((2235, 2279), (2311, 2499), (2531, 2554), (2575, 2599), (2619, 2744),
                 (2771, 2899), (2921, 2999))),
    State("VIC", "Victoria", 7_010_000, 10.0, 0.79,
          urban=((3000, 3228), (3335, 3338), (3750, 3811), (3910, 3978)),
          rural=((3229, 3334), (3339, 3749), (3812, 3909), (3979, 3999))),
    State("QLD", "Queensland", 5_610_000, 10.0, 0.64,
          urban=((4000, 4230), (4500, 4519), (4550, 4575)),
          rural=((4231, 4499), (4520, 4549), (4576, 4999))),
    State("WA", "Western Australia", 2_980_000, 8.0, 0.79,
          urban=((6000, 6199),), rural=((6200, 6797),)),
    State("SA", "South Australia", 1_880_000, 9.5, 0.77,
          urban=((5000, 5199),), rural=((5200, 5799),)),
    State("TAS", "Tasmania", 575_000, 10.0, 0.45,
          urban=((7000, 7099), (7248, 7250)), rural=((7100, 7247), (7251, 7799))),
    State("ACT", "Australian Capital Territory", 475_000, 10.0, 0.99,
          urban=((2600, 2617), (2900, 2914)), rural=((2618, 2618), (2915, 2920))),
    State("NT", "Northern Territory", 255_000, 9.5, 0.55,
          urban=((800, 832),), rural=((833, 899),)),
)

STATE_CODES: tuple[str, ...] = tuple(s.code for s in STATES)


def _build_table() -> tuple[np.ndarray, np.ndarray]:
    state = np.full(10_000, -1, dtype=np.int8)
    urban = np.zeros(10_000, dtype=np.bool_)
    for i, s in enumerate(STATES):
        for is_urban_range, ranges in ((True, s.urban), (False, s.rural)):
            for lo, hi in ranges:
                if (state[lo:hi + 1] != -1).any():
                    raise AssertionError(f"overlapping postcode range {lo}-{hi}")
                state[lo:hi + 1] = i
                urban[lo:hi + 1] = is_urban_range
    return state, urban


_STATE_OF, _URBAN_OF = _build_table()


def postcode_table() -> tuple[np.ndarray, np.ndarray]:
    """(state index or -1, urban flag), each indexed by the postcode as an integer."""
    return _STATE_OF, _URBAN_OF


def lookup(postcodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised postcode → (state index, -1 if unknown; urban flag)."""
    pc = np.asarray(postcodes, dtype=np.int64)
    inside = (pc >= 0) & (pc < 10_000)
    safe = np.where(inside, pc, 0)
    state = np.where(inside, _STATE_OF[safe], -1)
    return state, _URBAN_OF[safe] & inside


def is_urban(postcode: str) -> bool:
    return bool(_URBAN_OF[int(postcode)])
