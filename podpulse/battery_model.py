"""Battery anomaly model: expected bud drain from context (TensorFlow/Keras), scored per device-day.

Features, per device-hour with paired drain samples (``device_hourly`` joined
with ``devices``): hours of playback over the paired samples, the shares of
in-ear time in each noise-control mode, the mean output level while playing,
model and firmware (one-hot). Bud temperature and charge-cycle age are not in
the rollups yet, so the model does not use them.

The network predicts the % each bud drains in that hour. A device-day is scored
by how far the observed drain departs from the expected one (|log ratio| of the
worse bud) and by left/right imbalance, each as a robust z-score over the
fleet's device-days; the score is the larger of the two. A device-day is flagged
above ``threshold`` (default 3.5 robust standard deviations).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from podpulse.contract import DEVICE_ID
from podpulse.errors import ConfigError

__all__ = ["NAME", "FEATURE_SQL", "FEATURE_COLUMNS", "device_days_sql", "Features", "BatteryModel", "features_from_rows", "robust_z", "metadata", "load",
           "score_rows"]

NAME = "battery-anomaly"  # the registry's name of this model

FEATURE_SQL = """
SELECT h.device_id, CAST(h.hour + INTERVAL '10 hours' AS DATE) AS day, d.model, d.firmware,
       h.drain_playback_s / 3600.0 AS playback_h,
       h.anc_s / nullif(h.in_ear_s, 0) AS anc, h.adaptive_s / nullif(h.in_ear_s, 0) AS adaptive,
       h.transparency_s / nullif(h.in_ear_s, 0) AS transparency,
       h.output_dba_sum / nullif(h.output_samples, 0) AS output_dba,
       h.drain_left_pct, h.drain_right_pct
FROM device_hourly h JOIN devices d USING (device_id)
WHERE h.drain_playback_s > 0
"""
FEATURE_COLUMNS = ("device_id", "day", "model", "firmware", "playback_h", "anc", "adaptive", "transparency",
                   "output_dba", "drain_left_pct", "drain_right_pct")
NUMERIC = ("playback_h", "anc", "adaptive", "transparency", "output_dba")


def device_days_sql(device_id: str, days: int) -> str:
    """FEATURE_SQL's rows of one device's last ``days`` days of data. Both filters name the device,
    so the store reads its rows by key (device_hourly's primary key starts with device_id), never
    the fleet's."""
    if not DEVICE_ID.fullmatch(device_id) or not isinstance(days, int) or days < 1:
        raise ValueError(f"not a device id and a number of days: {device_id!r}, {days!r}")
    return (f"SELECT * FROM ({FEATURE_SQL}) f WHERE device_id = '{device_id}' AND day >= "
            f"(SELECT max(day) FROM ({FEATURE_SQL}) g WHERE device_id = '{device_id}') - {days} ORDER BY day")
SCHEMA = ("models", "firmwares", "mean", "scale")  # what a saved version's feature_schema holds, for load()


@dataclass
class Features:
    device_id: np.ndarray
    day: np.ndarray
    x_numeric: np.ndarray  # (n, len(NUMERIC)), raw
    model: np.ndarray
    firmware: np.ndarray
    y: np.ndarray  # (n, 2): % drained, left and right

    def __len__(self) -> int:
        return len(self.y)


def features_from_rows(rows: dict[str, np.ndarray]) -> Features:
    """Columns of :data:`FEATURE_SQL` (as numpy arrays, e.g. from Ray Data) → Features."""
    numeric = np.column_stack([np.nan_to_num(np.asarray(rows[c], dtype=np.float64)) for c in NUMERIC])
    return Features(np.asarray(rows["device_id"]), np.asarray(rows["day"]), numeric,
                    np.asarray(rows["model"]), np.asarray(rows["firmware"]),
                    np.column_stack([rows["drain_left_pct"], rows["drain_right_pct"]]).astype(np.float64))


def robust_z(x: np.ndarray) -> np.ndarray:
    median = np.median(x)
    mad = 1.4826 * np.median(np.abs(x - median))
    return (x - median) / (mad if mad > 0 else 1.0)


class BatteryModel:
    def __init__(self, models: list[str], firmwares: list[str], mean: np.ndarray, scale: np.ndarray,
                 network=None, threshold: float = 3.5):
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
    def score_days(self, f: Features) -> dict[str, np.ndarray]:
        """One score per device-day: drain departure and imbalance, as robust z-scores."""
        expected = self.expected(f)
        keys = np.char.add(np.char.add(f.device_id.astype(str), "|"), f.day.astype(str))
        uniq, inverse = np.unique(keys, return_inverse=True)
        sums = {name: np.zeros((len(uniq), 2)) for name in ("obs", "exp")}
        np.add.at(sums["obs"], inverse, f.y)
        np.add.at(sums["exp"], inverse, expected)
        ratio = np.clip(sums["obs"], 0.5, None) / np.clip(sums["exp"], 0.5, None)
        departure = np.abs(np.log(ratio)).max(axis=1)
        imbalance = np.abs(sums["obs"][:, 0] - sums["obs"][:, 1]) / (sums["obs"].sum(axis=1) + 1.0)
        score = np.maximum(robust_z(departure), robust_z(imbalance))
        devices = np.array([k.split("|", 1)[0] for k in uniq.tolist()])
        days = np.array([k.split("|", 1)[1] for k in uniq.tolist()])
        return {"device_id": devices, "day": days, "score": score, "departure": departure,
                "imbalance": imbalance, "flagged": score >= self.threshold}

    @staticmethod
    def by_device(days: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Device ids and their mean device-day score."""
        devices, inverse = np.unique(days["device_id"], return_inverse=True)
        total = np.zeros(len(devices))
        np.add.at(total, inverse, days["score"])
        count = np.bincount(inverse, minlength=len(devices))
        return devices, total / count


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
                         meta.get("threshold", 3.5))
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
