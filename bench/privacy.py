"""How far the private answers are from the exact ones, and what the differencing attack still learns.

A simulated fleet is written straight to a DuckDB store (``testbed.stores.build_store``). Each
private query (``analytics.private``) is released ``runs`` times, fresh noise each time, and
compared with its exact answer over every cell both show:

- ``usage_trend``: listening hours per (day, state, urban) cell;
- ``state_overview``: listening per device per day, per state: the share of releases within ±2% of
  exact, and how often the 95% interval held the exact figure;
- ``mode_shares``, ``firmware_adoption``: the shares, in percentage points.

The attack: model M's ``usage_trend`` less (model M, its most common firmware)'s, cell by cell,
against the exact difference (the few devices on M's other versions). The baseline is the same
attack on exact answers, as a reader could make it before differential privacy: off by 0.

    podpulse bench privacy --devices 20000 --days 28 --json
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from analytics import private, queries
from analytics.cohort import Cohort
from podpulse.privacy import QUERY_EPSILON
from storage.config import StorageConfig
from storage.reader import open_reader
from testbed.stores import build_store

__all__ = ["run"]


def _median(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 4) if xs else None


def _errors(name: str, exact, answer: dict) -> list[float]:
    """Per cell shown by both: the error of the headline value (relative, or points of a share)."""
    key_len = answer["columns"].index("devices")
    truth = {tuple(r[:key_len]): r for r in exact.rows}
    out = []
    for row in answer["rows"]:
        want = truth.get(tuple(row[:key_len]))
        if want is None:
            continue
        if name == "usage_trend":
            out.append(abs(row[4] - want[4]) / want[4] if want[4] else 0.0)
        elif name == "state_overview":
            out.append(abs(row[2] - want[2]) / want[2] if want[2] else 0.0)
        elif name == "mode_shares":
            out.extend(abs((row[i] or 0) - want[i]) * 100 for i in range(4, 8))
        else:
            out.append(abs(row[3] - want[3]) * 100)
    return out


def _attack(r, covered, k: int, epsilon: float, runs: int) -> dict:
    counts = r.rows("SELECT model, firmware, count(*) FROM devices GROUP BY 1, 2 ORDER BY 3, 1, 2")
    model, rare, targets = counts[0]
    common = max((c for c in counts if c[0] == model and c[1] != rare), key=lambda c: c[2])[1]
    exact_whole = {tuple(x[:3]): x[4] for x in queries.usage_trend(r, *covered, 1, Cohort(model=model)).rows}
    exact_common = {tuple(x[:3]): x[4] for x in
                    queries.usage_trend(r, *covered, 1, Cohort(model=model, firmware=common)).rows}
    truth = {key: v - exact_common.get(key, 0.0) for key, v in exact_whole.items()}
    errors, shown = [], []
    for _ in range(runs):
        whole, part = (private.release(r, "usage_trend", *covered, k, c, epsilon)
                       for c in (Cohort(model=model), Cohort(model=model, firmware=common)))
        a, b = ({tuple(x[:3]): x[4] for x in ans["rows"]} for ans in (whole, part))
        both = [key for key in a if key in b]
        shown.append(len(both))
        errors.extend(abs(a[key] - b[key] - truth.get(key, 0.0)) for key in both)
    target_h = [v for v in truth.values() if v > 0]
    return {"target": f"{model} not on {common}", "devices": int(sum(c[2] for c in counts
                                                                    if c[0] == model and c[1] != common)),
            "cells_compared_per_run": _median(shown), "true_listening_h_per_cell_median": _median(target_h),
            "error_h_median": _median(errors), "error_h_mean": round(statistics.mean(errors), 2) if errors else None,
            "baseline_error_h": 0.0}


def run(devices: int = 20_000, days: int = 28, seed: int = 5, runs: int = 5, epsilon: float = QUERY_EPSILON,
        k: int = 10) -> dict:
    with tempfile.TemporaryDirectory(prefix="podpulse-bench-privacy-") as tmp:
        path = Path(tmp) / "fleet.duckdb"
        started = time.perf_counter()
        build_store(path, devices, days, seed=seed)
        built_s = time.perf_counter() - started
        with open_reader(StorageConfig.embedded(path)) as r:
            covered = queries.data_range(r)
            out = {"devices": devices, "days": (covered[1] - covered[0]).days, "runs": runs,
                   "epsilon_per_answer": epsilon, "k": k, "store_built_s": round(built_s, 1), "queries": {}}
            for name in private.RELEASES:
                exact = queries.QUERIES[name](r, *covered, 1, Cohort())
                errors, timings, spent, within, held, per_state = [], [], 0.0, [], [], {}
                for _ in range(runs):
                    t = time.perf_counter()
                    answer = private.release(r, name, *covered, k, Cohort(), epsilon)
                    timings.append(time.perf_counter() - t)
                    spent = answer["privacy"]["epsilon"]
                    errors.extend(_errors(name, exact, answer))
                    if name == "state_overview":
                        truth = {row[0]: row[2] for row in exact.rows}
                        for row, interval in zip(answer["rows"], answer["intervals"]):
                            ok = abs(row[2] - truth[row[0]]) <= 0.02 * truth[row[0]]
                            within.append(ok)
                            per_state.setdefault(row[0], []).append(ok)
                            low, high = interval["listening_h_per_day"]
                            held.append(low <= truth[row[0]] <= (high if high is not None else float("inf")))
                unit = "relative" if name in ("usage_trend", "state_overview") else "points"
                entry = {"epsilon": spent, "error_median": _median(errors), "error_p95":
                         round(sorted(errors)[int(0.95 * (len(errors) - 1))], 4) if errors else None,
                         "error_unit": unit, "cells_exact": len(exact.rows),
                         "seconds_median": _median(timings), "baseline_error": 0.0}
                if name == "state_overview":
                    entry["listening_within_2pct"] = round(sum(within) / len(within), 3) if within else None
                    entry["listening_within_2pct_by_state"] = {s: round(sum(v) / len(v), 2)
                                                               for s, v in per_state.items()}
                    entry["interval_95_held"] = round(sum(held) / len(held), 3) if held else None
                out["queries"][name] = entry
            out["attack"] = _attack(r, covered, k, epsilon, runs)
    return out
