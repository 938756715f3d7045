"""Listening segments: who listens when, and how noise control follows the surroundings.

Each device-week (AEST weeks, Monday first) is described by :data:`FEATURES`
(:func:`week_features`, from the hourly rollups): its listening in each hour of
the day on weekdays and at weekends, as shares of its week's listening (48);
its listening hours (log); its in-ear shares of noise cancellation, adaptive,
transparency and off; its cancelling share (ANC or adaptive) in loud hours
(ambient 60 dBA or more) and in quiet ones; its mean ambient level; its sound
dose (log); its mean output level.

A small Keras autoencoder compresses the standardised features to ``LATENT``
numbers, and k-means clusters the device-weeks in that space (the number of
segments chosen by silhouette, 3 to 6). Each segment is named from its centroid's
listening profile (:func:`name`): the window of the week where its share of
listening stands out most from the fleet's: ``commuter`` (weekdays 7-9 and
17-19), ``desk worker`` (weekdays 9-17), ``evening listener`` (19-24) or
``weekend listener``; two segments that earn the same name are numbered.

The evaluation (:func:`evaluate`) sets it against k-means on the raw
standardised features with the same number of segments: the silhouette of each
labelling, measured in the raw feature space for both; stability, the adjusted
Rand index between labellings trained with different seeds; and, when the
simulator's behaviour profiles are given, the adjusted Rand index against them.

What is kept (a registry version, ``listening-segments``): the encoder, the
scaling, the centroids and names, the evaluation, and the summary that
``GET /v1/segments`` and the report serve: segment shares per region (state ×
urban/rural; regions of fewer than ``k`` devices left out) and, per segment,
the cancelling share by ambient level band. Counts and shares only.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from analytics.registry import new_version, register
from jobs.data import read_sql
from podpulse.errors import ConfigError
from podpulse.localtime import REPORT_UTC_OFFSET_H
from podpulse.privacy import MIN_K

__all__ = ["HOURLY_SQL", "FEATURES", "week_features", "name", "train_segments", "evaluate", "summary", "NAME"]

NAME = "listening-segments"
LATENT = 4
LOUD_DBA = 60.0
AMBIENT_BANDS = ((0, 45), (45, 55), (55, 65), (65, 200))  # dBA, for cancelling share by ambient level
MIN_WEEK_LISTENING_H = 0.5  # a device-week with less listening says nothing about when

HOURLY_SQL = """
SELECT h.device_id, d.state, d.urban, h.hour, h.listening_s, h.in_ear_s, h.anc_s, h.adaptive_s,
       h.transparency_s, h.off_s, h.ambient_dba_sum, h.ambient_samples, h.dose_s, h.output_dba_sum,
       h.output_samples
FROM device_hourly h JOIN devices d ON d.device_id = h.device_id
WHERE h.in_ear_s > 0
"""
HOURLY_COLUMNS = ("device_id", "state", "urban", "hour", "listening_s", "in_ear_s", "anc_s", "adaptive_s",
                  "transparency_s", "off_s", "ambient_dba_sum", "ambient_samples", "dose_s", "output_dba_sum",
                  "output_samples")
PROFILE = [f"{kind}_{h:02d}" for kind in ("weekday", "weekend") for h in range(24)]
FEATURES = (*PROFILE, "log_listening_h", "anc_share", "adaptive_share", "transparency_share", "off_share",
            "cancelling_loud", "cancelling_quiet", "ambient_dba", "log_dose_h", "output_dba")


def week_features(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """:data:`HOURLY_SQL`'s columns → one row per device-week with at least MIN_WEEK_LISTENING_H of listening:
    ``device_id``, ``week`` (its Monday, AEST), ``state``, ``urban``, ``x`` (n × len(FEATURES)) and, per
    ambient band, the in-ear seconds and the cancelling seconds (``band_in_ear``, ``band_cancelling``)."""
    hour = np.asarray(rows["hour"]).astype("datetime64[h]") + np.timedelta64(REPORT_UTC_OFFSET_H, "h")  # AEST
    day = hour.astype("datetime64[D]")
    weekday = (day.astype(np.int64) + 3) % 7  # 1970-01-01 was a Thursday: Monday = 0
    week = day - weekday.astype("timedelta64[D]")
    local_h = (hour - day).astype(np.int64)
    devices = np.asarray(rows["device_id"]).astype(str)
    keys = np.char.add(np.char.add(devices, "|"), week.astype(str))
    uniq, first, index = np.unique(keys, return_index=True, return_inverse=True)
    n = len(uniq)

    def total(values, where=None) -> np.ndarray:
        v = np.asarray(values, dtype=np.float64)
        return np.bincount(index, weights=v if where is None else np.where(where, v, 0.0), minlength=n)

    f = lambda c: np.nan_to_num(np.asarray(rows[c], dtype=np.float64))  # noqa: E731 - a column as floats
    listening, in_ear = f("listening_s"), f("in_ear_s")
    slot = local_h + 24 * (weekday >= 5)
    profile = np.zeros((n, 48))
    np.add.at(profile, (index, slot), listening)
    week_listening = profile.sum(axis=1)
    cancelling = f("anc_s") + f("adaptive_s")
    ambient = f("ambient_dba_sum") / np.maximum(f("ambient_samples"), 1)
    loud = ambient >= LOUD_DBA
    ear = total(in_ear)
    x = np.column_stack([
        profile / np.maximum(week_listening, 1e-9)[:, None],
        np.log1p(week_listening / 3600),
        *(total(f(c)) / np.maximum(ear, 1e-9) for c in ("anc_s", "adaptive_s", "transparency_s", "off_s")),
        total(cancelling, loud) / np.maximum(total(in_ear, loud), 1e-9),
        total(cancelling, ~loud) / np.maximum(total(in_ear, ~loud), 1e-9),
        total(f("ambient_dba_sum")) / np.maximum(total(f("ambient_samples")), 1),
        np.log1p(total(f("dose_s")) / 3600),
        total(f("output_dba_sum")) / np.maximum(total(f("output_samples")), 1),
    ])
    band_in_ear = np.column_stack([total(in_ear, (ambient >= lo) & (ambient < hi)) for lo, hi in AMBIENT_BANDS])
    band_cancel = np.column_stack([total(cancelling, (ambient >= lo) & (ambient < hi)) for lo, hi in AMBIENT_BANDS])
    keep = week_listening >= MIN_WEEK_LISTENING_H * 3600
    split = np.char.partition(uniq.astype(str), "|")
    return {"device_id": split[keep, 0], "week": split[keep, 2], "state": np.asarray(rows["state"])[first][keep],
            "urban": np.asarray(rows["urban"])[first][keep].astype(bool), "x": x[keep],
            "band_in_ear": band_in_ear[keep], "band_cancelling": band_cancel[keep]}


WINDOWS = {  # a segment's name: the window of the week where its listening stands out most from the fleet's
    "commuter": lambda p: p[7:9].sum() + p[17:19].sum(),  # weekday commutes
    "desk worker": lambda p: p[9:17].sum(),  # weekday working hours
    "evening listener": lambda p: p[19:24].sum() + p[24 + 19:48].sum(),  # every evening
    "weekend listener": lambda p: p[24:48].sum(),
}


def name(centroid_profile: np.ndarray, fleet_profile: np.ndarray) -> str:
    """A segment's name from its centroid's 48 listening shares (weekday hours 0-23, then weekend): the
    :data:`WINDOWS` entry where its share is the largest multiple of the fleet's."""
    lift = {n: window(centroid_profile) / max(window(fleet_profile), 1e-9) for n, window in WINDOWS.items()}
    return max(lift, key=lift.get)


def _standardise(x: np.ndarray):
    """Centred; the 48 listening shares scaled together by one spread (scaled one by one, the night hours'
    rare listening would weigh as much as the commute's), every other feature by its own."""
    mean = x.mean(axis=0)
    scale = np.concatenate([np.full(48, x[:, :48].std() + 1e-9), x[:, 48:].std(axis=0) + 1e-6])
    return (x - mean) / scale, mean, scale


def _encoder(z: np.ndarray, seed: int, epochs: int):
    import tensorflow as tf  # lazy: TensorFlow takes 5 s to import

    tf.keras.utils.set_random_seed(seed)
    inputs = tf.keras.Input(shape=(z.shape[1],))
    hidden = tf.keras.layers.Dense(24, activation="relu")(inputs)
    latent = tf.keras.layers.Dense(LATENT, name="latent")(hidden)
    out = tf.keras.layers.Dense(z.shape[1])(tf.keras.layers.Dense(24, activation="relu")(latent))
    auto = tf.keras.Model(inputs, out)
    auto.compile(optimizer=tf.keras.optimizers.Adam(0.005), loss="mse")
    auto.fit(z, z, epochs=epochs, batch_size=256, verbose=0, shuffle=True)
    return tf.keras.Model(inputs, latent)


def _kmeans(points: np.ndarray, k: int, seed: int):
    from sklearn.cluster import KMeans  # lazy: scikit-learn takes 1.6 s to import

    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit(points)


def _silhouette(z: np.ndarray, labels: np.ndarray, seed: int) -> float:
    from sklearn.metrics import silhouette_score  # lazy: as _kmeans

    if len(set(labels.tolist())) < 2:
        return float("nan")
    return float(silhouette_score(z, labels, sample_size=min(len(z), 5_000), random_state=seed))


def fit(z: np.ndarray, *, seed: int = 0, epochs: int = 30, k: int | None = None):
    """The encoder, its latent points, the k-means on them and the number of segments (``k``, or
    chosen by the silhouette in the latent space among 3 to 6: with 2, a handful of odd weeks won)."""
    encoder = _encoder(z, seed, epochs)
    latent = encoder.predict(z, batch_size=4096, verbose=0)
    if k is None:
        scores = {c: _silhouette(latent, _kmeans(latent, c, seed).labels_, seed) for c in range(3, 7)}
        k = max(scores, key=scores.get)
    return encoder, latent, _kmeans(latent, k, seed), k


def evaluate(z: np.ndarray, labels: np.ndarray, k: int, *, seed: int, epochs: int,
             devices: np.ndarray, profiles: dict[str, str] | None = None) -> dict:
    """The segments against k-means on the raw standardised features (same k): silhouettes in the raw
    space, stability across a second seed (adjusted Rand index), and agreement with ``profiles``."""
    from sklearn.metrics import adjusted_rand_score  # lazy: as _kmeans

    raw = _kmeans(z, k, seed).labels_
    again = fit(z, seed=seed + 1, epochs=epochs, k=k)[2].labels_
    raw_again = _kmeans(z, k, seed + 1).labels_
    out = {"k": k, "silhouette": _silhouette(z, labels, seed), "baseline_silhouette": _silhouette(z, raw, seed),
           "stability_ari": float(adjusted_rand_score(labels, again)),
           "baseline_stability_ari": float(adjusted_rand_score(raw, raw_again)),
           "profiles_ari": None, "baseline_profiles_ari": None}
    if profiles:
        known = np.array([d in profiles for d in devices.tolist()])
        truth = np.array([profiles.get(d, "") for d in devices.tolist()])[known]
        if known.any():
            out["profiles_ari"] = float(adjusted_rand_score(truth, labels[known]))
            out["baseline_profiles_ari"] = float(adjusted_rand_score(truth, raw[known]))
            out["profiles_devices"] = int(len(set(devices[known].tolist())))
    return out


def summary(weeks: dict[str, np.ndarray], labels: np.ndarray, names: list[str], k_min: int = MIN_K) -> dict:
    """What is served: segment shares of each region's device-weeks (regions of at least ``k_min`` devices),
    and per segment its share of all device-weeks and its cancelling share per ambient band."""
    regions = np.array([f"{s or 'unknown'}-{'urban' if u else 'rural'}" for s, u in zip(weeks["state"], weeks["urban"])])
    by_region = []
    for region in sorted(set(regions.tolist())):
        mine = regions == region
        devices = len(set(weeks["device_id"][mine].tolist()))
        if devices < k_min:
            continue
        counts = np.bincount(labels[mine], minlength=len(names))
        by_region.append({"region": region, "devices": devices, "device_weeks": int(mine.sum()),
                          "shares": {names[i]: float(c / mine.sum()) for i, c in enumerate(counts)}})
    segments = []
    for i, segment in enumerate(names):
        mine = labels == i
        ear, cancel = weeks["band_in_ear"][mine].sum(axis=0), weeks["band_cancelling"][mine].sum(axis=0)
        segments.append({"segment": segment, "device_weeks": int(mine.sum()), "share": float(mine.mean()),
                         "devices": len(set(weeks["device_id"][mine].tolist())),
                         "cancelling_by_ambient": [
                             {"ambient_dba": f"{lo}-{hi}" if hi < 200 else f"{lo}+",
                              "cancelling_share": float(c / e) if e > 0 else None}
                             for (lo, hi), e, c in zip(AMBIENT_BANDS, ear, cancel)]})
    return {"segments": segments, "by_region": by_region, "k": k_min}


def train_segments(config, *, registry: Path = Path("podpulse-data/models"), epochs: int = 30, seed: int = 0,
                   profiles: dict[str, str] | None = None, k_min: int = MIN_K) -> dict:
    """Read the device-weeks (Ray Data), fit, name, evaluate and register a ``listening-segments`` version."""
    started = time.perf_counter()
    rows = read_sql(config, HOURLY_SQL)
    if not rows or len(rows["device_id"]) == 0:
        raise ConfigError("no device-hours in the store: ingest some telemetry first")
    weeks = week_features(rows)
    if len(weeks["device_id"]) < 50:
        raise ConfigError(f"{len(weeks['device_id'])} device-weeks with listening: segments need at least 50")
    z, mean, scale = _standardise(weeks["x"])
    encoder, latent, km, k = fit(z, seed=seed, epochs=epochs)
    labels = km.labels_
    centroids = np.vstack([weeks["x"][labels == i].mean(axis=0) for i in range(k)])
    names = _unique([name(c[:48], weeks["x"][:, :48].mean(axis=0)) for c in centroids])
    metrics = evaluate(z, labels, k, seed=seed, epochs=epochs, devices=weeks["device_id"], profiles=profiles)
    served = summary(weeks, labels, names, k_min)
    version = new_version()
    path = Path(registry).resolve() / NAME / version
    path.mkdir(parents=True)
    encoder.save(path / "encoder.keras")
    metadata = {"name": NAME, "version": version, "metrics": metrics, "names": names,
                "data_window": {"from": str(min(weeks["week"])), "to": str(max(weeks["week"])),
                                "device_weeks": int(len(labels))},
                "feature_schema": {"features": list(FEATURES), "mean": mean.tolist(), "scale": scale.tolist()},
                "centroids": km.cluster_centers_.tolist(), "summary": served, "epochs": epochs, "seed": seed}
    (path / "metadata.json").write_text(json.dumps(metadata, indent=1))
    register(config, NAME, version, path, metrics, metadata)
    return {**metrics, "names": names, "version": version, "path": str(path), "summary": served,
            "seconds": round(time.perf_counter() - started, 1)}


def _unique(names: list[str]) -> list[str]:
    """Names made unique by a number where two segments earn the same one (``commuter 2``)."""
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n} {seen[n]}")
    return out
