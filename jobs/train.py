"""Training jobs: read features from the store with Ray Data, train, evaluate, register.

``podpulse train --model battery-anomaly`` (or ``usage-forecast``) runs here, locally or as
``ray job submit --working-dir . -- podpulse train ...`` on a cluster. The battery
model's evaluation needs the simulator's ground truth of injected faults
(``--truth FILE``, written by ``podpulse simulate``); without it the metrics are
null and say why. The usage forecast is scored on the store's own final week.

A battery-anomaly version flags devices (score at or over its threshold); their
device-days from the day the fault shows go to the ``anomalies`` table, with the
version, the device's score and the statistic that decided it, for the serving
replicas to count: the devices there are the devices training's figures count.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from analytics.battery_model import NUMERIC, BatteryModel, features_from_rows
from analytics.forecast_model import HORIZON, holdout, series_from_rows
from analytics.queries import DEFAULT_K
from analytics.registry import new_version, record_anomalies, register
from jobs.data import read_features, read_usage
from jobs.segments import train_segments
from podpulse.errors import ConfigError
from storage.config import StorageConfig

__all__ = ["evaluate", "train", "train_battery_anomaly", "train_usage_forecast", "MODELS"]


def _truth(path: Path | None) -> dict[str, str] | None:
    if path is None:
        return None
    try:
        return {t["device_id"]: t["fault"] for t in json.loads(Path(path).read_text())}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"cannot read ground truth {path}: {e}") from e


def _isolation_forest_scores(f, devices: np.ndarray) -> np.ndarray:
    """Baseline: scikit-learn IsolationForest on per-device aggregates of the same features."""
    from sklearn.ensemble import IsolationForest  # lazy: scikit-learn takes 1.6 s to import

    index = {d: i for i, d in enumerate(devices.tolist())}
    rows = np.array([index[d] for d in f.device_id.tolist()])
    n = len(devices)
    sums = np.zeros((n, f.x_numeric.shape[1] + 2))
    np.add.at(sums, rows, np.hstack([f.x_numeric, f.y]))
    counts = np.bincount(rows, minlength=n)[:, None]
    playback = np.maximum(sums[:, [0]], 1e-6)
    per_hour = sums[:, -2:] / playback  # drain per playback hour, left and right
    imbalance = np.abs(per_hour[:, [0]] - per_hour[:, [1]])
    x = np.hstack([per_hour, imbalance, sums[:, 1:-2] / counts])
    forest = IsolationForest(n_estimators=200, random_state=0).fit(x)
    return -forest.score_samples(x)  # higher: more anomalous


def evaluate(devices: dict[str, np.ndarray], baseline: np.ndarray, truth: dict[str, str]) -> dict:
    """Device-level figures against the injected faults: ROC AUC of the score and of the baseline's,
    precision and recall of the flagged devices, overall and per fault kind. A kind's AUC, precision and
    recall set its devices against the healthy ones only (precision: its flagged devices over those plus
    the flagged healthy ones), so each kind is judged as if it were the fleet's only fault."""
    from sklearn.metrics import roc_auc_score  # lazy: 1 s to import

    kinds = np.array([truth.get(d, "") for d in devices["device_id"].tolist()])
    score, flagged = devices["score"], devices["flagged"]
    healthy = kinds == ""

    def figures(faulty: np.ndarray) -> dict:
        pool = faulty | healthy
        y = faulty[pool]
        if y.all() or not y.any():
            return {"devices": int(faulty.sum()), "auc": None, "baseline_auc": None, "precision": None,
                    "recall": None}
        hits = int((flagged & faulty).sum())
        false = int((flagged & healthy).sum())
        return {"devices": int(faulty.sum()), "auc": float(roc_auc_score(y, score[pool])),
                "baseline_auc": float(roc_auc_score(y, baseline[pool])),
                "precision": hits / (hits + false) if hits + false else 0.0, "recall": hits / int(faulty.sum())}

    overall = figures(~healthy)
    return {**{k: overall[k] for k in ("auc", "baseline_auc", "precision", "recall")},
            "healthy_flagged": int((flagged & healthy).sum()), "healthy_devices": int(healthy.sum()),
            "by_fault": {kind: figures(kinds == kind) for kind in sorted(set(kinds.tolist()) - {""})}}


def train_battery_anomaly(config: StorageConfig, *, truth_path: Path | None = None,
                          registry: Path = Path("podpulse-data/models"), epochs: int = 8,
                          truth: dict[str, str] | None = None, top: int = 10,
                          threshold: float | None = None) -> dict:
    """Train, evaluate against the injected faults when given, register a version. ``truth_path``:
    the simulator's ground truth, by the ids it sent (mapped to pseudonyms here); ``truth``: device
    → fault by the ids as stored. The result names the ``top`` most anomalous devices.

    The flagged devices (:meth:`BatteryModel.score_devices`) are the ones the figures count, and
    their device-days go to ``anomalies`` (:meth:`BatteryModel.flagged_rows`) before the version's
    ``metadata.json``, so a replica that finds the version in the registry finds them too."""
    started = time.perf_counter()
    f = features_from_rows(read_features(config))
    model = BatteryModel.train(f, epochs=epochs)
    if threshold is not None:
        model.threshold = threshold
    days = model.device_days(f)
    devices = model.score_devices(days)
    score = devices["score"]
    if truth is None and truth_path is not None:
        truth = config.pseudonyms().keys(_truth(truth_path))
    rows = model.flagged_rows(days, devices)
    metrics: dict = {"auc": None, "baseline_auc": None, "precision": None, "recall": None,
                     "devices": int(len(score)), "flagged_devices": int(devices["flagged"].sum()),
                     "device_days": int(len(days["day"])), "flagged_device_days": int(len(rows["day"])),
                     "threshold": model.threshold}
    if truth is not None:
        metrics |= evaluate(devices, _isolation_forest_scores(f, devices["device_id"]), truth)
    else:
        metrics["note"] = "no --truth given: AUC, precision and recall need the injected faults"
    version = new_version()
    path = Path(registry).resolve() / "battery-anomaly" / version
    path.mkdir(parents=True)
    model.network.save(path / "model.keras")
    record_anomalies(config, version, rows)
    metadata = {
        "name": "battery-anomaly", "version": version, "metrics": metrics,
        "data_window": {"from": str(min(f.day)), "to": str(max(f.day)), "device_hours": len(f)},
        "feature_schema": {"numeric": list(NUMERIC), "models": model.models, "firmwares": model.firmwares,
                           "mean": model.mean.tolist(), "scale": model.scale.tolist()},
        "threshold": model.threshold, "epochs": epochs,
    }
    (path / "metadata.json").write_text(json.dumps(metadata, indent=1))
    register(config, "battery-anomaly", version, path, metrics, metadata)
    worst = np.argsort(-score)[:top]
    most_anomalous = [{"device_id": str(devices["device_id"][i]), "score": round(float(score[i]), 2),
                       "flagged": bool(devices["flagged"][i]), "reason": str(devices["reason"][i])}
                      | ({"injected_fault": truth.get(str(devices["device_id"][i]))} if truth is not None else {})
                      for i in worst]
    return {**metrics, "version": version, "path": str(path), "most_anomalous": most_anomalous,
            "seconds": round(time.perf_counter() - started, 1)}


def train_usage_forecast(config: StorageConfig, *, registry: Path = Path("podpulse-data/models"),
                         epochs: int = 100, lookback: int = 14, k: int | None = None) -> dict:
    """Train the 7-day usage forecast, score it on the held-out final week, register it.

    The registered network is the one evaluated (trained without the held-out
    week). ``metadata.json`` also carries its forecast of the week after the
    data, for regions with at least ``k`` devices (the reports' k-anonymity).
    """
    k = DEFAULT_K if k is None else k
    started = time.perf_counter()
    series = series_from_rows(read_usage(config))
    model, metrics = holdout(series, lookback=lookback, epochs=epochs)
    next_week = model.predict(series, series.days)
    shown = [i for i in range(len(series.regions)) if series.devices[i] >= k]
    version = new_version()
    path = Path(registry).resolve() / "usage-forecast" / version
    path.mkdir(parents=True)
    model.save(path / "model.keras")
    metadata = {
        "name": "usage-forecast", "version": version, "metrics": metrics,
        "data_window": {"from": series.day(0), "to": series.day(series.days - 1), "days": series.days,
                        "regions": [[state, urban] for state, urban in series.regions]},
        "parameters": {"lookback": lookback, "horizon": HORIZON, "epochs": epochs,
                       "input": "last `lookback` days / their mean, weekday one-hot of each target day, urban"},
        "next_week": {"from": series.day(series.days), "to": series.day(series.days + HORIZON - 1), "k": k,
                      "suppressed": len(series.regions) - len(shown),
                      "regions": [{"state": series.regions[i][0], "urban": series.regions[i][1],
                                 "hours": [round(float(h), 2) for h in next_week[i]]} for i in shown]},
    }
    (path / "metadata.json").write_text(json.dumps(metadata, indent=1))
    register(config, "usage-forecast", version, path, metrics, metadata)
    return {**metrics, "version": version, "path": str(path), "seconds": round(time.perf_counter() - started, 1)}


def train(model: str, config: StorageConfig, *, registry: Path, truth: Path | None = None,
          profiles: Path | None = None, epochs: int | None = None) -> dict:
    """Train one of :data:`MODELS` and register a version. ``truth`` (battery-anomaly): the simulator's
    ground truth of injected faults, for AUC, precision and recall; ``profiles`` (listening-segments):
    the simulator's behaviour profile of each device (``podpulse bench store``), to score the segments
    against; both keyed by the ids as sent. ``epochs``: None for each model's default."""
    extra = {"epochs": epochs} if epochs else {}
    if model == "battery-anomaly":
        return train_battery_anomaly(config, truth_path=truth, registry=registry, **extra)
    if model == "usage-forecast":
        return train_usage_forecast(config, registry=registry, **extra)
    if model == "listening-segments":
        return train_segments(config, registry=registry, profiles=_profiles(config, profiles), **extra)
    raise ConfigError(f"--model must be one of {', '.join(MODELS)}, got {model!r}")


MODELS = ("battery-anomaly", "usage-forecast", "listening-segments")


def _profiles(config: StorageConfig, path: Path | None) -> dict[str, str] | None:
    """The simulator's profiles file, keyed by the ids as stored; None when not given."""
    if path is None:
        return None
    try:
        return config.pseudonyms().keys(json.loads(Path(path).read_text()))
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(f"--profiles: cannot read {path}: {e}") from None
