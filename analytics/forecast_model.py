"""Usage forecast: listening hours of each region for the next 7 days (TensorFlow/Keras).

A region is (state, urban); a day is an AEST date (UTC+10), as in the reports.
The series come from ``device_hourly`` (:data:`USAGE_SQL`), one value per
region-day, zero where a region had no listening.

The model is one small network trained across regions. Its input, for a
forecast made at the start of day ``t``: the region's last ``lookback`` days
(14 by default) divided by their mean (the region's level), the day-of-week
one-hot of each of the 7 target days, and the urban flag. It predicts the 7
days as multiples of the level, so big and small regions share one weekly
shape; hours = ratio × level. Training windows end before the held-out week;
a window whose target week runs past that end is trained on the days it has
(masked loss).

Evaluation (:func:`holdout`): MAPE over the final 7 days of every region whose
mean is at least :data:`MIN_MEAN_HOURS` a day, beside the seasonal-naive
forecast (the same weekday one week earlier) on the same days. Smaller regions
are left out of the MAPE and out of training (their day-to-day noise is most
of their value); the result names them.

A saved version (``jobs.train``) is a directory with ``model.keras`` and
``metadata.json``; the latter also publishes the forecast of the week after
the data (``next_week``), which is what Serve answers: :func:`week_ahead` reads
it, :func:`load` the network.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np

from podpulse.errors import ConfigError

__all__ = ["NAME", "USAGE_SQL", "HORIZON", "MIN_MEAN_HOURS", "RegionSeries", "series_from_rows", "seasonal_naive",
           "mape", "UsageForecaster", "holdout", "WeekAhead", "metadata", "week_ahead", "load"]

NAME = "usage-forecast"  # the registry's name of this model

USAGE_SQL = """
SELECT CAST(hour + INTERVAL '10 hours' AS DATE) AS day, state, urban, sum(listening_s) / 3600.0 AS hours,
       count(DISTINCT hour) AS hours_seen, count(DISTINCT device_id) AS devices
FROM device_hourly GROUP BY 1, 2, 3
"""
HORIZON = 7
SEASON = 7
MIN_MEAN_HOURS = 1.0
_EPOCH_WEEKDAY = 3  # 1970-01-01 was a Thursday (Monday = 0)


@dataclass
class RegionSeries:
    """Dense listening hours: ``hours[i, j]`` of region ``regions[i]`` on ``day0 + j``."""

    regions: list[tuple[str, bool]]
    day0: np.datetime64  # first AEST day
    hours: np.ndarray  # (regions, days)
    devices: np.ndarray  # (regions,): the most distinct devices a region had on one day
    dropped_days: list[str]  # incomplete days at either end, left out

    @property
    def days(self) -> int:
        return self.hours.shape[1]

    def day(self, j: int) -> str:
        return str(self.day0 + np.timedelta64(j, "D"))

    @property
    def urban(self) -> np.ndarray:
        return np.array([u for _, u in self.regions], dtype=np.float32)


def series_from_rows(rows: dict[str, np.ndarray]) -> RegionSeries:
    """Columns of :data:`USAGE_SQL` → dense series. A first or last day on which no region has
    rows in all 24 hours is incomplete (ingest started or stopped within it) and is dropped."""
    days = np.asarray(rows["day"]).astype("datetime64[D]")
    seen = np.asarray(rows["hours_seen"], dtype=np.int64)
    first, last = days.min(), days.max()
    complete = {edge: seen[days == edge].max() >= 24 for edge in (first, last)}
    day0 = first if complete[first] else first + np.timedelta64(1, "D")
    stop = last if complete[last] else last - np.timedelta64(1, "D")
    dropped = sorted({d for d, ok in complete.items() if not ok})
    keep = (days >= day0) & (days <= stop)
    days = days[keep]
    if len(days) == 0:
        return RegionSeries([], first, np.zeros((0, 0)), np.zeros(0, np.int64), [str(d) for d in dropped])
    states = np.asarray(rows["state"])[keep].astype(str)
    urban = np.asarray(rows["urban"])[keep].astype(bool)
    regions = sorted(set(zip(states.tolist(), urban.tolist())))
    index = {r: i for i, r in enumerate(regions)}
    row = np.array([index[r] for r in zip(states.tolist(), urban.tolist())])
    col = (days - day0).astype(np.int64)
    hours = np.zeros((len(regions), int((stop - day0).astype(np.int64)) + 1))
    np.add.at(hours, (row, col), np.asarray(rows["hours"], dtype=np.float64)[keep])
    devices = np.zeros(len(regions), np.int64)
    np.maximum.at(devices, row, np.asarray(rows["devices"], dtype=np.int64)[keep])
    return RegionSeries(regions, day0, hours, devices, [str(d) for d in dropped])


def seasonal_naive(history: np.ndarray, horizon: int = HORIZON, season: int = SEASON) -> np.ndarray:
    """Each target day repeats the same weekday of the last ``season`` days: (..., n) → (..., horizon)."""
    last = history[..., -season:]
    return np.concatenate([last] * (horizon // season + 1), axis=-1)[..., :horizon]


def mape(actual: np.ndarray, forecast: np.ndarray) -> float:
    """Mean absolute percentage error, in % over the points whose actual is not zero."""
    actual, forecast = np.asarray(actual, np.float64), np.asarray(forecast, np.float64)
    ok = actual != 0
    if not ok.any():
        return float("nan")
    return float(np.mean(np.abs(actual[ok] - forecast[ok]) / np.abs(actual[ok])) * 100)


def _masked_mae(y_true, y_pred):
    import tensorflow as tf  # lazy: TensorFlow takes 5 s to import

    ok = tf.math.is_finite(y_true)
    err = tf.where(ok, tf.abs(tf.where(ok, y_true, 0.0) - y_pred), 0.0)
    return tf.reduce_sum(err, axis=-1) / tf.maximum(tf.reduce_sum(tf.cast(ok, y_pred.dtype), axis=-1), 1.0)


class UsageForecaster:
    def __init__(self, lookback: int = 14, horizon: int = HORIZON, network=None):
        self.lookback, self.horizon, self.network = lookback, horizon, network

    # -- series to the network's input ---------------------------------------------------
    def encode(self, history: np.ndarray, first_day: np.datetime64, urban: np.ndarray):
        """``history``: (regions, lookback) hours before ``first_day``, the first target day.
        Returns the network input and each region's level (mean hours a day)."""
        level = np.maximum(history.mean(axis=1), 1e-3)
        weekday = (int(first_day.astype("datetime64[D]").astype(np.int64)) + _EPOCH_WEEKDAY
                   + np.arange(self.horizon)) % 7
        dow = np.zeros((self.horizon, 7), np.float32)
        dow[np.arange(self.horizon), weekday] = 1
        n = len(history)
        x = np.hstack([history / level[:, None], np.tile(dow.ravel(), (n, 1)), urban.reshape(n, 1)])
        return x.astype(np.float32), level

    def _windows(self, s: RegionSeries, end: int, rows: np.ndarray):
        """Training windows of regions ``rows`` whose first target day is before ``end``."""
        xs, ys = [], []
        for origin in range(self.lookback, end):
            x, level = self.encode(s.hours[rows, origin - self.lookback:origin],
                                   s.day0 + np.timedelta64(origin, "D"), s.urban[rows])
            y = np.full((len(rows), self.horizon), np.nan, np.float32)
            n = min(self.horizon, end - origin)
            y[:, :n] = s.hours[rows, origin:origin + n] / level[:, None]
            xs.append(x)
            ys.append(y)
        return np.vstack(xs), np.vstack(ys)

    @classmethod
    def train(cls, s: RegionSeries, end: int, rows: np.ndarray, *, lookback: int = 14, epochs: int = 100,
              seed: int = 0) -> "UsageForecaster":
        """Fit on the days before ``end`` of regions ``rows``."""
        import tensorflow as tf  # lazy: TensorFlow takes 5 s to import

        tf.keras.utils.set_random_seed(seed)
        model = cls(lookback)
        x, y = model._windows(s, end, rows)
        net = tf.keras.Sequential([
            tf.keras.Input(shape=(x.shape[1],)),
            tf.keras.layers.Dense(32, activation="relu"),
            tf.keras.layers.Dense(model.horizon, bias_initializer="ones"),  # ratios to the level, ~1
        ])
        net.compile(optimizer=tf.keras.optimizers.Adam(0.003), loss=_masked_mae)
        net.fit(x, y, epochs=epochs, batch_size=32, verbose=0, shuffle=True)
        model.network = net
        return model

    def predict(self, s: RegionSeries, origin: int) -> np.ndarray:
        """Hours of every region for days ``origin`` .. ``origin + horizon - 1`` (origin may be
        ``s.days``: the week after the data)."""
        x, level = self.encode(s.hours[:, origin - self.lookback:origin],
                               s.day0 + np.timedelta64(origin, "D"), s.urban)
        ratio = np.asarray(self.network.predict(x, batch_size=4096, verbose=0), dtype=np.float64)
        return np.clip(ratio, 0, None) * level[:, None]

    def save(self, path) -> None:
        self.network.save(path, include_optimizer=False)

    @classmethod
    def load(cls, path, lookback: int, horizon: int = HORIZON) -> "UsageForecaster":
        import tensorflow as tf  # lazy: TensorFlow takes 5 s to import

        return cls(lookback, horizon, tf.keras.models.load_model(path, compile=False))


def holdout(s: RegionSeries, *, lookback: int = 14, epochs: int = 100, seed: int = 0) -> tuple[
        UsageForecaster, dict]:
    """Train on all but the final ``HORIZON`` days, score those days against seasonal-naive.

    Regions are kept by their mean before the held-out week (nothing held out is used but its
    actuals)."""
    need = lookback + 2 * HORIZON
    if s.days < need:
        raise ConfigError(f"the usage forecast needs at least {need} complete days in the store "
                          f"({lookback} of history + a week of training targets + a held-out week); "
                          f"it has {s.days}")
    end = s.days - HORIZON
    rows = np.flatnonzero(s.hours[:, :end].mean(axis=1) >= MIN_MEAN_HOURS)
    if len(rows) == 0:
        raise ConfigError(f"no region listens {MIN_MEAN_HOURS} h a day on average: nothing to forecast")
    model = UsageForecaster.train(s, end, rows, lookback=lookback, epochs=epochs, seed=seed)
    actual = s.hours[rows, end:]
    forecast = model.predict(s, end)[rows]
    naive = seasonal_naive(s.hours[rows, :end])
    small = [f"{st}/{'urban' if u else 'rural'}" for i, (st, u) in enumerate(s.regions) if i not in rows]
    metrics = {
        "mape": mape(actual, forecast), "baseline_mape": mape(actual, naive),
        "baseline": "seasonal naive: the same weekday one week earlier",
        "regions": len(s.regions), "evaluated_regions": int(len(rows)), "days": int(s.days),
        "held_out": {"from": s.day(end), "to": s.day(s.days - 1)},
        "note": (f"MAPE over the final {HORIZON} days of the regions with a mean of at least "
                 f"{MIN_MEAN_HOURS:g} h a day before it; left out: {', '.join(small) or 'none'}"),
    }
    if s.dropped_days:
        metrics["note"] += f"; incomplete days dropped: {', '.join(s.dropped_days)}"
    return model, metrics


# -- a saved version -------------------------------------------------------------------------

@dataclass(frozen=True)
class WeekAhead:
    """What a saved version publishes: its forecast of the ``HORIZON`` days after its data, per
    region with at least ``k`` devices (``suppressed`` regions had fewer), and the week it was
    evaluated on (``held_out``: ``{"from", "to"}``, AEST days)."""

    version: str
    start: date  # the first forecast day (AEST)
    k: int
    suppressed: int
    hours: dict[tuple[str, bool], tuple[float, ...]]  # (state, urban) -> listening hours, one a day
    held_out: dict[str, str]

    def days(self, state: str, urban: bool) -> list[tuple[str, float]] | None:
        """``(day, hours)`` of the region's forecast, or None when it publishes none for it."""
        hours = self.hours.get((state, bool(urban)))
        if hours is None:
            return None
        return [((self.start + timedelta(days=i)).isoformat(), h) for i, h in enumerate(hours)]


def metadata(path) -> dict:
    """``metadata.json`` of a saved usage-forecast version (the directory ``path``)."""
    file = Path(path) / "metadata.json"
    try:
        meta = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the usage-forecast metadata {file}: {e}") from e
    if not (isinstance(meta, dict) and meta.get("name", NAME) == NAME and isinstance(meta.get("version"), str)):
        raise ConfigError(f"{file} is not a usage-forecast version's metadata: it needs name {NAME!r} and a version")
    return meta


def week_ahead(path) -> WeekAhead:
    """The forecast a saved version publishes (its metadata's ``next_week``)."""
    meta = metadata(path)
    try:
        week = meta["next_week"]
        hours = {(str(r["state"]), bool(r["urban"])): tuple(float(h) for h in r["hours"]) for r in week["regions"]}
        return WeekAhead(meta["version"], date.fromisoformat(week["from"]), int(week["k"]),
                         int(week.get("suppressed", 0)), hours, dict(meta.get("metrics", {}).get("held_out") or {}))
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{Path(path) / 'metadata.json'}: no usable next_week forecast "
                          f"({type(e).__name__}: {e})") from e


def load(path) -> UsageForecaster:
    """A saved version's network, with the lookback and horizon it was trained with."""
    parameters = metadata(path).get("parameters") or {}
    return UsageForecaster.load(Path(path) / "model.keras", int(parameters.get("lookback", 14)),
                                int(parameters.get("horizon", HORIZON)))
