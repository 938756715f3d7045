"""Battery anomaly model: expected bud drain from context (TensorFlow/Keras), devices scored on its departures.

Features, per device-hour with paired drain samples (``device_hourly`` joined
with ``devices``): hours of playback over the paired samples, the shares of
in-ear time in each noise-control mode, the mean output level while playing,
model and firmware (one-hot). The buds' temperature while playing (rollups
since migration 10, v2 devices) is not an input of the network, so that a
warmer bud cannot explain away its own extra drain: it is judged on its own.

The network predicts the % each bud drains in that hour. Summed per device-day,
observed over expected gives a log ratio per bud; a device is judged on its
series of days (:data:`STATISTICS`, :func:`device_statistics`): its level
against the fleet's (a battery that always drains fast, one bud faster than the
other), the largest step in it from one day on against its own day-to-day noise
(a fault that begins or grows: the simulator's subtle faults), hours in which
one bud's reading fell far more than its twin's (a sensor that drops out), and
the largest rise in its buds' daily temperature (a battery running hot).
Its score is the largest of them, in robust standard deviations; a device is
flagged at ``threshold`` (:data:`THRESHOLD`) or over. That flag is the one
definition of a flagged device: training's precision and recall count it, its
device-days are what ``anomalies`` holds, and the metric counts those devices.
A device's own battery health (0.7-1.0 of capacity, unknown to the model) moves
its level, not its steps, which is why the steps find the subtle faults.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from podpulse.contract import DEVICE_ID
from podpulse.errors import ConfigError

__all__ = ["NAME", "FEATURE_SQL", "FEATURE_COLUMNS", "device_days_sql", "Features", "BatteryModel", "features_from_rows",
           "STATISTICS", "device_statistics", "robust_scale", "robust_z", "metadata", "load", "score_rows"]

NAME = "battery-anomaly"  # the registry's name of this model

FEATURE_SQL = """
SELECT h.device_id, CAST(h.hour + INTERVAL '10 hours' AS DATE) AS day, d.model, d.firmware,
       h.drain_playback_s / 3600.0 AS playback_h,
       h.anc_s / nullif(h.in_ear_s, 0) AS anc, h.adaptive_s / nullif(h.in_ear_s, 0) AS adaptive,
       h.transparency_s / nullif(h.in_ear_s, 0) AS transparency,
       h.output_dba_sum / nullif(h.output_samples, 0) AS output_dba,
       h.drain_left_pct, h.drain_right_pct,
       h.temp_c_sum / nullif(h.temp_samples, 0) AS temp_c
FROM device_hourly h JOIN devices d USING (device_id)
WHERE h.drain_playback_s > 0
"""
FEATURE_COLUMNS = ("device_id", "day", "model", "firmware", "playback_h", "anc", "adaptive", "transparency",
                   "output_dba", "drain_left_pct", "drain_right_pct", "temp_c")
NUMERIC = ("playback_h", "anc", "adaptive", "transparency", "output_dba")


def device_days_sql(device_id: str, days: int) -> str:
    """FEATURE_SQL's rows of one device's last ``days`` days of data. Both filters name the device,
    so the store reads its rows by key (device_hourly's primary key starts with device_id), never
    the fleet's."""
    if not DEVICE_ID.fullmatch(device_id) or not isinstance(days, int) or days < 1:
        raise ValueError(f"not a device id and a number of days: {device_id!r}, {days!r}")
    return (f"SELECT * FROM ({FEATURE_SQL}) f WHERE device_id = '{device_id}' AND day >= "
            f"(SELECT max(day) FROM ({FEATURE_SQL}) g WHERE device_id = '{device_id}') - {days} ORDER BY day")
SCHEMA = ("models", "firmwares", "mean", "scale")
  # what a saved version's feature_schema holds, for load()
THRESHOLD = 4.0  # the device score at which a device is flagged (chosen on seed 7's fleet; the README's figures)


@dataclass
class Features:
    device_id: np.ndarray
    day: np.ndarray
    x_numeric: np.ndarray  # (n, len(NUMERIC)), raw
    model: np.ndarray
    firmware: np.ndarray
    y: np.ndarray  # (n, 2): % drained, left and right
    temp: np.ndarray | None = None  # the buds' mean °C while playing (NaN: not measured, v1)

    def __len__(self) -> int:
        return len(self.y)


def features_from_rows(rows: dict[str, np.ndarray]) -> Features:
    """Columns of :data:`FEATURE_SQL` (as numpy arrays, e.g. from Ray Data) → Features."""
    numeric = np.column_stack([np.nan_to_num(np.asarray(rows[c], dtype=np.float64)) for c in NUMERIC])
    return Features(np.asarray(rows["device_id"]), np.asarray(rows["day"]), numeric,
                    np.asarray(rows["model"]), np.asarray(rows["firmware"]),
                    np.column_stack([rows["drain_left_pct"], rows["drain_right_pct"]]).astype(np.float64),
                    np.asarray(rows["temp_c"], dtype=np.float64) if "temp_c" in rows else None)


class BatteryModel:
    def __init__(self, models: list[str], firmwares: list[str], mean: np.ndarray, scale: np.ndarray,
                 network=None, threshold: float = THRESHOLD):
        self.models, self.firmwares = list(models), list(firmwares)
        self.mean, self.scale = mean, scale
        self.network = network
        self.threshold = threshold
        self._graph = None

    def _infer(self, x: np.ndarray) -> np.ndarray:
        """The network as one TensorFlow graph. Keras' eager ``__call__`` dispatches layer by layer
        (~5 ms a call here) and ``predict()`` sets up a data pipeline (~35 ms); the traced graph
        takes any batch size without retracing and costs well under a millisecond for small batches."""
        import tensorflow as tf  # lazy: TensorFlow takes 5 s to import

        if self._graph is None:
            network = self.network
            self._graph = tf.function(lambda t: network(t, training=False)).get_concrete_function(
                tf.TensorSpec([None, x.shape[1]], tf.float32))  # called directly: no signature matching
        return self._graph(tf.constant(x)).numpy()

    # -- features to the network's input --------------------------------------------------
    def encode(self, f: Features) -> np.ndarray:
        numeric = (f.x_numeric - self.mean) / self.scale

        def one_hot(values, vocab):
            index = {v: i for i, v in enumerate(vocab)}
            out = np.zeros((len(values), len(vocab) + 1), dtype=np.float32)  # last: unseen
            out[np.arange(len(values)), [index.get(v, len(vocab)) for v in values]] = 1
            return out

        return np.hstack([numeric, one_hot(f.model, self.models), one_hot(f.firmware, self.firmwares)]).astype(
            np.float32)

    @classmethod
    def train(cls, f: Features, epochs: int = 8, seed: int = 0) -> "BatteryModel":
        import tensorflow as tf  # lazy: TensorFlow takes 5 s to import

        tf.keras.utils.set_random_seed(seed)
        mean, scale = f.x_numeric.mean(axis=0), f.x_numeric.std(axis=0) + 1e-6
        model = cls(sorted(set(f.model.tolist())), sorted(set(f.firmware.tolist())), mean, scale)
        x = model.encode(f)
        net = tf.keras.Sequential([
            tf.keras.Input(shape=(x.shape[1],)),
            tf.keras.layers.Dense(32, activation="relu"),
            tf.keras.layers.Dense(16, activation="relu"),
            tf.keras.layers.Dense(2, activation="softplus"),  # drain is never negative
        ])
        net.compile(optimizer=tf.keras.optimizers.Adam(0.005), loss=tf.keras.losses.Huber(delta=2.0))
        net.fit(x, f.y, epochs=epochs, batch_size=1024, verbose=0, shuffle=True)
        model.network = net
        return model

    def expected(self, f: Features) -> np.ndarray:
        x = self.encode(f)
        step = 65_536  # bounds the activations held at once
        return np.vstack([self._infer(x[i:i + step]) for i in range(0, max(len(x), 1), step)]).astype(np.float64)

    # -- scoring ---------------------------------------------------------------------
    def device_days(self, f: Features) -> dict[str, np.ndarray]:
        """Observed and expected drain per device-day, sorted by device then day: ``device_id``,
        ``day``, ``observed`` and ``expected`` ((n, 2): % drained, left and right), ``jumps`` (hours in
        which one bud's reading fell JUMP_PCT points more than its twin's) and ``temp`` (the buds' mean
        °C while playing; NaN where not measured)."""
        expected = self.expected(f)
        keys = np.char.add(np.char.add(f.device_id.astype(str), "|"), f.day.astype(str))
        uniq, inverse = np.unique(keys, return_inverse=True)  # sorted: by device, then ISO day
        observed, expect = np.zeros((len(uniq), 2)), np.zeros((len(uniq), 2))
        np.add.at(observed, inverse, f.y)
        np.add.at(expect, inverse, expected)
        jumps = np.bincount(inverse, weights=np.abs(f.y[:, 0] - f.y[:, 1]) > JUMP_PCT, minlength=len(uniq))
        temp = np.full(len(uniq), np.nan)
        if f.temp is not None:
            known = ~np.isnan(f.temp)
            hours = np.bincount(inverse[known], minlength=len(uniq))
            total = np.bincount(inverse[known], weights=f.temp[known], minlength=len(uniq))
            temp = np.where(hours > 0, total / np.maximum(hours, 1), np.nan)
        split = np.char.partition(uniq.astype(str), "|")
        return {"device_id": split[:, 0], "day": split[:, 2], "observed": observed, "expected": expect,
                "jumps": jumps, "temp": temp}

    def score_devices(self, days: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One score per device: the largest of :func:`device_statistics`, the levels as robust z-scores
        over the fleet, the shifts as they are (already in units of the device's own noise). A device is flagged at or over ``threshold``: the one
        definition of a flagged device, for training's figures, ``anomalies`` and the metric."""
        stats = device_statistics(days)
        floors = {"sensor_jumps": JUMP_FLOOR}
        z = np.column_stack([stats[name] if name in IN_NOISE_UNITS else robust_z(stats[name], floors.get(name, MIN_NOISE))
                             for name in STATISTICS])
        z[~stats["judged"]] = 0.0  # too few judged days to say anything
        best = z.argmax(axis=1)
        score = z[np.arange(len(best)), best]
        reason = np.array(STATISTICS)[best]
        since = stats["first_day"].copy()  # a level is the device's all along; a shift begins on its day
        for name, day in stats["since"].items():
            since = np.where(reason == name, day, since)
        return {"device_id": stats["device_id"], "score": score, "reason": reason,
                "flagged": score >= self.threshold, "since": since}

    def flagged_rows(self, days: dict[str, np.ndarray], devices: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``anomalies`` rows of the flagged devices: each of its device-days from the day its fault
        shows (the change point, for a shift; its first day otherwise), with the device's score and
        reason. The distinct devices of these rows are exactly the flagged devices."""
        index = {d: i for i, d in enumerate(devices["device_id"].tolist())}
        which = np.array([index[d] for d in days["device_id"].tolist()], dtype=np.int64)
        keep = devices["flagged"][which] & (days["day"] >= devices["since"][which])
        return {"device_id": days["device_id"][keep], "day": days["day"][keep],
                "score": devices["score"][which][keep], "reason": devices["reason"][which][keep]}


# What a device is judged on, from its device-days' log ratio of observed to expected drain (both buds),
# and of its left bud's observed drain to its right's (the buds are twins: one expectation for both):
# ``drain`` both buds' over the whole window (a battery that drains faster than its use explains, all along);
# ``drain_shift`` the largest rise of that from one day on (a fault that begins, or grows);
# ``imbalance`` the left-right difference over the window (one bud drains faster, or its sensor is stuck);
# ``imbalance_shift`` the largest change of that difference from one day on.
# ``sensor_jumps`` the hours in which one bud's reading fell JUMP_PCT points more than the other's, both in
# the ears: no battery drains so, a sensor that reads 0 for a moment does;
# ``temp_shift`` the largest rise of its buds' daily temperature while playing, from one day on (v2 only).
STATISTICS = ("drain", "drain_shift", "imbalance", "imbalance_shift", "sensor_jumps", "temp_shift")
IN_NOISE_UNITS = ("drain_shift", "imbalance_shift", "temp_shift")  # scored as they are
MIN_TEMP_NOISE = 0.2  # °C: a day's mean temperature is known to about this
JUMP_PCT = 20.0
JUMP_FLOOR = 0.5  # sensor_jumps' z-score scale is at least this: two such hours, and a device is flagged
MIN_EXPECTED_PCT = 5.0  # a device-day is judged when each bud was expected to drain at least this
MIN_SEGMENT = 3  # days on each side of a change point
FLOOR = 0.5  # a device's own day-to-day noise is taken as at least this share of the fleet's
MIN_NOISE = 0.03  # and at least this: the % readings are whole numbers, a day drains some 10-40%


def _log_ratio(observed: np.ndarray, expected: np.ndarray) -> np.ndarray:
    return np.log(np.clip(observed, 0.5, None) / np.clip(expected, 0.5, None))


def _largest_step(x: np.ndarray, starts: np.ndarray, ends: np.ndarray, floor: float,
                  signed: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per segment ``x[start:end]``: the largest standardised step in its median (median after − median
    before, over 1.2533 σ √(1/before + 1/after)), with at least MIN_SEGMENT values each side, and the
    index where the later part starts (where the standardised step in its means is largest, the estimate
    of a single shift's day). Medians for the size, so that one odd day moves nothing. σ is the segment's
    own day-to-day noise (from its successive differences, which a step barely moves), at least
    ``floor``. Rises only when ``signed``; either way otherwise. 0 and -1 where a segment is too short."""
    step = np.zeros(len(starts))
    where = np.full(len(starts), -1, dtype=np.int64)
    for j, (a, b) in enumerate(zip(starts.tolist(), ends.tolist())):
        n = b - a
        if n < 2 * MIN_SEGMENT:
            continue
        v = x[a:b]
        scale = max(robust_scale(np.diff(v)) / np.sqrt(2.0), floor)
        k = np.arange(MIN_SEGMENT, n - MIN_SEGMENT + 1)
        before_mask = np.arange(n)[None, :] < k[:, None]
        grid = np.broadcast_to(v, (len(k), n))
        before = np.nanmedian(np.where(before_mask, grid, np.nan), axis=1)
        after = np.nanmedian(np.where(before_mask, np.nan, grid), axis=1)
        spread = scale * np.sqrt(1.0 / k + 1.0 / (n - k))
        t = (after - before) / (1.2533 * spread)
        c = np.cumsum(v)  # where: the split of the largest step in means (the estimate of one mean shift)
        at = (c[-1] - c[k - 1]) / (n - k) - c[k - 1] / k
        if not signed:
            t, at = np.abs(t), np.abs(at)
        step[j], where[j] = t.max(), a + k[int((at / spread).argmax())]
    return step, where


def device_statistics(days: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """:data:`STATISTICS` per device from :meth:`BatteryModel.device_days` (sorted by device and day),
    the levels over the whole window, the shifts over the device-days each bud was expected to drain
    MIN_EXPECTED_PCT or more. ``judged``: false for a device whose whole window expects less;
    ``first_day``: its first device-day; ``since``: per shift statistic, the day its step begins."""
    judged = (days["expected"] >= MIN_EXPECTED_PCT).all(axis=1)
    devices, first, owner = np.unique(days["device_id"], return_index=True, return_inverse=True)
    first_day = days["day"][first]
    d = {k: v[judged] for k, v in days.items()}
    drain = _log_ratio(d["observed"], d["expected"]).mean(axis=1)
    lopsided = _log_ratio(d["observed"][:, 0], d["observed"][:, 1])  # twins: the buds' expectations are one
    ids, starts, counts = np.unique(d["device_id"], return_index=True, return_counts=True)
    ends = starts + counts
    out = {name: np.zeros(len(devices)) for name in STATISTICS}
    since = {name: first_day.copy() for name in ("drain_shift", "imbalance_shift", "temp_shift")}
    out["sensor_jumps"] = np.bincount(owner, weights=days["jumps"], minlength=len(devices))
    if len(ids):
        pos = np.searchsorted(devices, ids)
        level = np.array([np.median(drain[a:b]) for a, b in zip(starts, ends)])
        side = np.array([np.median(lopsided[a:b]) for a, b in zip(starts, ends)])
        # day-to-day noise around each device's own level, pooled over the fleet
        noise = robust_scale(drain - np.repeat(level, counts))
        noise_side = robust_scale(lopsided - np.repeat(side, counts))
        rise, at = _largest_step(drain, starts, ends, max(FLOOR * noise, MIN_NOISE), signed=True)
        turn, at_side = _largest_step(lopsided, starts, ends, max(FLOOR * noise_side, MIN_NOISE), signed=False)
        out["drain_shift"][pos], out["imbalance_shift"][pos] = rise, turn
        for name, change in (("drain_shift", at), ("imbalance_shift", at_side)):
            since[name][pos] = np.where(change >= 0, d["day"][np.maximum(change, 0)], first_day[pos])
    measured = ~np.isnan(days["temp"])
    if measured.any():
        t_ids, t_starts, t_counts = np.unique(days["device_id"][measured], return_index=True, return_counts=True)
        t_pos = np.searchsorted(devices, t_ids)
        warmer, t_at = _largest_step(days["temp"][measured], t_starts, t_starts + t_counts, MIN_TEMP_NOISE,
                                     signed=True)
        out["temp_shift"][t_pos] = warmer
        since["temp_shift"][t_pos] = np.where(t_at >= 0, days["day"][measured][np.maximum(t_at, 0)], first_day[t_pos])
    # the levels: over the whole window (every day, judged or not), so a short window still judges them
    total_obs, total_exp = np.zeros((len(devices), 2)), np.zeros((len(devices), 2))
    np.add.at(total_obs, owner, days["observed"])
    np.add.at(total_exp, owner, days["expected"])
    out["drain"] = _log_ratio(total_obs, total_exp).mean(axis=1)
    out["imbalance"] = np.abs(_log_ratio(total_obs[:, 0], total_obs[:, 1]))
    enough = (total_exp >= MIN_EXPECTED_PCT).all(axis=1)
    return {"device_id": devices, **out, "judged": enough, "first_day": first_day, "since": since}


def robust_scale(x: np.ndarray) -> float:
    """A robust standard deviation: 1.4826 × the MAD; where more than half the values are equal (the MAD
    is 0: a mostly-zero feature), 1.2533 × the mean absolute deviation from the median (as consistent
    for a normal sample); 0 only when every value is the same."""
    if len(x) == 0:
        return 0.0
    median = np.median(x)
    mad = 1.4826 * np.median(np.abs(x - median))
    return float(mad) if mad > 0 else float(1.2533 * np.mean(np.abs(x - median)))


def robust_z(x: np.ndarray, floor: float = 0.0) -> np.ndarray:
    """(x − median) / :func:`robust_scale` (at least ``floor``); all zeros when the values do not vary."""
    x = np.asarray(x, dtype=np.float64)
    scale = max(robust_scale(x), floor)
    return (x - np.median(x)) / scale if scale > 0 else np.zeros_like(x)


def metadata(path) -> dict:
    """``metadata.json`` of a saved battery-anomaly version (the directory ``path``), checked for
    what :func:`load` needs: its version, its feature schema (vocabularies, scaling)."""
    file = Path(path) / "metadata.json"
    try:
        meta = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the battery-anomaly metadata {file}: {e}") from e
    schema = meta.get("feature_schema") if isinstance(meta, dict) else None
    if not (isinstance(schema, dict) and meta.get("name", NAME) == NAME and isinstance(meta.get("version"), str)
            and all(isinstance(schema.get(k), list) for k in SCHEMA)):
        raise ConfigError(f"{file} is not a battery-anomaly version's metadata: it needs name {NAME!r}, a version "
                          f"and a feature_schema with {', '.join(SCHEMA)}")
    return meta


def load(path) -> BatteryModel:
    """A saved battery-anomaly version: the directory ``path`` (``model.keras`` and ``metadata.json``)."""
    meta = metadata(path)  # before TensorFlow's import: a wrong directory fails at once

    import tensorflow as tf  # lazy: TensorFlow takes 5 s to import

    schema = meta["feature_schema"]
    model = BatteryModel(schema["models"], schema["firmwares"], np.array(schema["mean"]),
                         np.array(schema["scale"]), tf.keras.models.load_model(Path(path) / "model.keras"),
                         meta.get("threshold", THRESHOLD))
    model.version = meta["version"]
    return model


def score_rows(model: BatteryModel, rows: list[dict]) -> list[dict]:
    """Device-hour rows (the columns of FEATURE_SQL) → expected drain and departure per row."""
    columns = {c: np.array([r.get(c, "") for r in rows]) for c in ("device_id", "day")}
    columns |= {c: np.array([r[c] for r in rows]) for c in ("model", "firmware", *NUMERIC,
                                                           "drain_left_pct", "drain_right_pct")}
    f = features_from_rows(columns)
    expected = model.expected(f)
    ratio = np.clip(f.y, 0.5, None) / np.clip(expected, 0.5, None)
    departure = np.abs(np.log(ratio)).max(axis=1)
    imbalance = np.abs(f.y[:, 0] - f.y[:, 1]) / (f.y.sum(axis=1) + 1.0)
    return [{"expected_left_pct": float(e[0]), "expected_right_pct": float(e[1]), "departure": float(d),
             "imbalance": float(i)} for e, d, i in zip(expected, departure, imbalance)]
