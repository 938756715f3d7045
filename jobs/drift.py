"""Feature drift of the battery model: has the fleet moved away from what the model was trained on?

Per numeric feature (:data:`analytics.battery_model.NUMERIC`, as the model sees
them: missing shares are 0), the population stability index of the most recent
days in the store against the model's training window (``data_window`` in its
``metadata.json``). Rule of thumb: PSI < 0.1 stable, 0.1-0.2 moderate, > 0.2 a
real shift: retrain. ``podpulse drift`` prints it once; every Serve replica
computes it for the version it serves on a schedule (``drift_interval_s``) and
sets the ``ray_podpulse_feature_drift_psi`` gauge the drift alert watches.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from analytics.battery_model import FEATURE_COLUMNS, FEATURE_SQL, NUMERIC, features_from_rows
from jobs.data import read_features
from podpulse.errors import ConfigError
from storage.reader import run_queries

__all__ = ["psi", "drift_report", "served_drift", "compare", "window_of", "THRESHOLD", "EPSILON"]

THRESHOLD = 0.2
EPSILON = 1e-4  # the share given to an empty bin, so that its log stays finite


def _bins(expected: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """The quantile cuts of ``expected`` and its point masses (values repeated across quantiles)."""
    values, repeats = np.unique(np.quantile(expected, np.linspace(0, 1, bins + 1)), return_counts=True)
    return values, values[repeats > 1]


def _shares(x: np.ndarray, cuts: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Share of ``x`` in each bin: between consecutive inner cuts (the first and last bins open
    to -inf and +inf), then one bin per point mass (exactly that value)."""
    inner = cuts[1:-1]
    cell = np.searchsorted(inner, x, side="right")
    if len(points):
        i = np.minimum(np.searchsorted(points, x), len(points) - 1)
        cell = np.where(points[i] == x, len(inner) + 1 + i, cell)
    return np.bincount(cell, minlength=len(inner) + 1 + len(points)) / len(x)


def psi(expected: np.ndarray, actual: np.ndarray, bins: int = 10) -> float:
    """Population stability index of ``actual`` against ``expected``: sum of (a - e) ln(a / e)
    over the bins' shares.

    Bins are cut at the quantiles of ``expected`` (each holds about 1/bins of
    it), the first and last open-ended. A value repeated across quantiles (a
    point mass, such as a share of exactly 0) is a bin of its own. An empty
    bin counts as a share of ``EPSILON``. NaNs are ignored.
    """
    expected = np.asarray(expected, np.float64)
    actual = np.asarray(actual, np.float64)
    expected, actual = expected[~np.isnan(expected)], actual[~np.isnan(actual)]
    if len(expected) == 0 or len(actual) == 0:
        raise ValueError("psi needs at least one value in each sample")
    if bins < 1:
        raise ValueError("bins must be at least 1")
    cuts, points = _bins(expected, bins)
    e = np.maximum(_shares(expected, cuts, points), EPSILON)
    a = np.maximum(_shares(actual, cuts, points), EPSILON)
    return float(np.sum((a - e) * np.log(a / e)))


def window_of(meta: dict, where: str = "the version's metadata") -> tuple[np.datetime64, np.datetime64]:
    """The training window (first and last AEST day) of a version's ``metadata.json`` contents."""
    try:
        window = meta["data_window"]
        return np.datetime64(window["from"], "D"), np.datetime64(window["to"], "D")
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"cannot read the training window from {where}: {e}") from e


def drift_report(config, model_dir: Path, *, recent_days: int = 7, bins: int = 10) -> dict:
    """PSI per feature of the last ``recent_days`` days after the training window against the window
    (:func:`compare`), the features read from the store by Ray Data."""
    if not (Path(model_dir) / "metadata.json").exists():
        raise ConfigError(f"{model_dir} is not a registered model version (no metadata.json)")
    try:
        meta = json.loads((Path(model_dir) / "metadata.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the training window from {model_dir}/metadata.json: {e}") from e
    start, end = window_of(meta, f"{model_dir}/metadata.json")
    return compare(features_from_rows(read_features(config)), start, end, recent_days=recent_days, bins=bins)


def served_drift(source, meta: dict, *, recent_days: int = 7, bins: int = 10) -> dict:
    """:func:`compare` for a served version (its ``metadata.json`` contents ``meta``), the features read
    on ``source`` (a StorageConfig or a replica's ReaderPool) from the window's first day on: what a
    Serve replica computes on its schedule (``drift_interval_s``) for the drift gauge."""
    start, end = window_of(meta)
    sql = f"SELECT * FROM ({FEATURE_SQL}) f WHERE day >= DATE '{start}'"  # a date from np.datetime64: safe
    rows = run_queries(source, {"f": sql}, kind="rollups")["f"]
    if not rows:
        raise ConfigError(f"no device-hours with battery drain since {start} in the store")
    f = features_from_rows(dict(zip(FEATURE_COLUMNS, map(np.array, zip(*rows)))))
    return compare(f, start, end, recent_days=recent_days, bins=bins)


def compare(f, start: np.datetime64, end: np.datetime64, *, recent_days: int = 7, bins: int = 10) -> dict:
    """PSI per feature of the last ``recent_days`` days after the window ``start``..``end`` against the
    window, over the features ``f``.

    With nothing newer than the window in the store, the window's last 2 days
    are compared with the rest of it, and ``note`` says so.
    """
    day = f.day.astype("datetime64[D]")
    newer = day > end
    if newer.any():
        last = day[newer].max()
        recent = newer & (day > last - np.timedelta64(recent_days, "D"))
        baseline = (day >= start) & (day <= end)
        note = None
    else:
        recent = (day > end - np.timedelta64(2, "D")) & (day <= end)
        baseline = (day >= start) & (day <= end - np.timedelta64(2, "D"))
        note = (f"no data newer than the training window ({start} .. {end}): its last 2 days "
                "are compared with the rest of it")
    if not recent.any() or not baseline.any():
        raise ConfigError(f"not enough device-hours to compare: {int(recent.sum())} recent, "
                          f"{int(baseline.sum())} in the training window")
    scores = {name: psi(f.x_numeric[baseline, j], f.x_numeric[recent, j], bins) for j, name in enumerate(NUMERIC)}
    max_psi = max(scores.values())
    report = {"features": scores, "max_psi": max_psi, "retrain": max_psi > THRESHOLD, "threshold": THRESHOLD,
              "training_window": {"from": str(start), "to": str(end), "device_hours": int(baseline.sum())},
              "recent": {"from": str(day[recent].min()), "to": str(day[recent].max()),
                         "device_hours": int(recent.sum())}}
    if note:
        report["note"] = note
    return report
