"""Firmware regression detection over seeds: how soon after a rollout, and how many false alarms.

Per seed, two fleets are written straight to DuckDB stores (``testbed.stores.build_store``):
one whose mid-window firmware (7A305) drains ``regression`` times as fast, one
where it does not. Detection (:func:`analytics.regressions.detect_rows`) then runs
on what was known at the end of each day, from the release on:

- **delay**: per model that runs the new version, the days after the release and
  the devices compared when it is first raised, on the regressed fleet;
- **false alarms**: findings raised on the fleet without a regression, over every
  day and model (each day's run is a chance to raise one).

Baseline, on the same days: an unpaired comparison with no usage control, as a
dashboard would make it: per device, % drained per playback hour on each
version; a Welch t-test (p < 1 - confidence) and a mean change over ``min_effect``.

    podpulse bench detect --seeds 5 --json
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from analytics.regressions import CONFIDENCE, MIN_EFFECT, detect_rows, read_hours
from podpulse.simulator import FIRMWARE, Fleet, FleetSpec
from storage.config import StorageConfig
from testbed.stores import build_store

__all__ = ["run", "unpaired"]

NEW = FIRMWARE[-1]  # the release in the middle of the window


def unpaired(rows: dict[str, np.ndarray], until, min_k: int, min_effect: float = MIN_EFFECT,
             confidence: float = CONFIDENCE) -> dict[str, bool]:
    """The baseline: per model, is NEW flagged against its predecessor by an unpaired Welch t-test on
    devices' drain per playback hour (every device on either version, no usage control)?"""
    from scipy.stats import ttest_ind  # lazy: scipy comes with scikit-learn

    day = rows["day"].astype("datetime64[D]")
    known = day <= np.datetime64(until, "D")
    out = {}
    models, firmwares, devices = (rows[c].astype(str) for c in ("model", "firmware", "device_id"))
    for model in sorted(set(models[known & (firmwares == NEW)].tolist())):
        rates = []
        for fw in (FIRMWARE[-2], NEW):
            mine = known & (models == model) & (firmwares == fw)
            ids, index = np.unique(devices[mine], return_inverse=True)
            drain = np.bincount(index, weights=rows["drain_pct"][mine].astype(float), minlength=len(ids))
            play = np.bincount(index, weights=rows["playback_h"][mine].astype(float), minlength=len(ids))
            rates.append((drain / np.maximum(play, 1e-9))[play >= 0.5])
        if min(len(r) for r in rates) < min_k:
            continue
        change = rates[1].mean() / rates[0].mean() - 1
        out[model] = bool(ttest_ind(rates[1], rates[0], equal_var=False).pvalue < 1 - confidence
                          and change > min_effect)
    return out


def _days_after(rows, release: str) -> list:
    days = np.unique(rows["day"].astype("datetime64[D]"))
    return [d for d in days.tolist() if d >= np.datetime64(release, "D").astype(object)]


def run(seeds: int = 5, devices: int = 2_000, days: int = 21, regression: float = 1.25, min_k: int = 10,
        first_seed: int = 100) -> dict:
    delays, baseline_delays, false_alarms, baseline_false, runs, missed, baseline_missed = [], [], 0, 0, 0, 0, 0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="podpulse-bench-detect-") as tmp:
        for seed in range(first_seed, first_seed + seeds):
            spec = FleetSpec(devices=devices, hours=24 * days, seed=seed, regressed_firmware=NEW, regression=regression)
            truth = Fleet.build(spec).firmware_truth()
            stores = {}
            for name, extra in (("regressed", {"regressed_firmware": NEW, "regression": regression}), ("clean", {})):
                path = Path(tmp) / f"{seed}-{name}.duckdb"
                build_store(path, devices, days, seed=seed, start=spec.start, **extra)
                stores[name] = read_hours(StorageConfig.embedded(path))
            first: dict[str, tuple] = {}
            first_baseline: dict[str, int] = {}
            for until in _days_after(stores["regressed"], truth["release"]):
                after = (np.datetime64(until, "D") - np.datetime64(truth["release"], "D")).astype(int)
                for f in detect_rows(stores["regressed"], min_k=min_k, until=until, seed=seed):
                    if f.firmware == NEW and f.regression and f.model not in first:
                        first[f.model] = (int(after), f.devices)
                for model, flagged in unpaired(stores["regressed"], until, min_k).items():
                    if flagged and model not in first_baseline:
                        first_baseline[model] = int(after)
            for until in _days_after(stores["clean"], truth["release"]):
                runs += 1
                false_alarms += sum(f.regression for f in detect_rows(stores["clean"], min_k=min_k, until=until,
                                                                       seed=seed))
                baseline_false += sum(unpaired(stores["clean"], until, min_k).values())
            for model in truth["models"]:
                if model in first:
                    delays.append({"seed": seed, "model": model, "days": first[model][0], "devices": first[model][1]})
                else:
                    missed += 1
                if model in first_baseline:
                    baseline_delays.append(first_baseline[model])
                else:
                    baseline_missed += 1
    days_after = [d["days"] for d in delays]
    return {
        "seeds": seeds, "devices": devices, "days": days, "regression": regression, "min_k": min_k,
        "min_effect": MIN_EFFECT, "confidence": CONFIDENCE,
        "detected": len(delays), "missed": missed,
        "delay_days_median": float(np.median(days_after)) if delays else None,
        "delay_days_max": max(days_after) if delays else None,
        "devices_at_detection_median": float(np.median([d["devices"] for d in delays])) if delays else None,
        "false_alarms": false_alarms, "daily_runs_without_regression": runs,
        "baseline": {"detected": len(baseline_delays), "missed": baseline_missed,
                     "delay_days_median": float(np.median(baseline_delays)) if baseline_delays else None,
                     "false_alarms": baseline_false},
        "by_seed": delays, "seconds": round(time.perf_counter() - started, 1),
    }
