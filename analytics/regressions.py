"""Firmware regressions: does a new firmware version drain the buds faster than the one it replaced?

For each model, each firmware version is compared with the version that model
ran before it (the versions in the order the fleet first ran them), once at
least ``min_k`` devices have run both. The comparison is paired, device by
device, so that a device's own battery health and habits cancel out:

1. Device-hours with paired drain samples (:data:`HOURS_SQL`) on days a device
   ran one firmware only (the day of an update is left out).
2. The usage mix is controlled for by an expected drain: a least-squares fit,
   on the earlier version's hours of that model, of the % drained in an hour on
   its playback hours, their noise-control shares and their output level.
3. Per device, the log of observed over expected drain on the new version minus
   the same on the old: its drain change with the usage mix taken out. Devices
   need ``MIN_EXPECTED_PCT`` of expected drain on each side.
4. The effect is the mean of those over the devices (shown as a relative
   change, ``exp(mean) - 1``), with a bootstrap interval over devices
   (``confidence``) and a sign-flip permutation p-value (under no effect a
   device's change is as likely negative as positive).

A **finding** is raised when the interval's lower end is above ``min_effect``
(a regression worth acting on, not only a detectable one) and the p-value is
under ``1 - confidence``. Listening hours per day on each version are compared
the same way (paired, with an interval) and reported beside, not acted on.

``podpulse detect`` runs it on the store and keeps the findings
(``firmware_findings``, replaced whole each run); ``GET /v1/firmware/regressions``
serves them, and the API replicas export them as a gauge that an alert rule
watches. ``podpulse bench detect`` measures detection delay and false alarms
over seeds of the simulator's regressed firmware (``--regressed-firmware``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timezone

import numpy as np
import pyarrow as pa

from podpulse.privacy import MIN_K
from storage.config import StorageConfig
from storage.reader import ReaderPool, run_queries
from storage.router import insert_rows, migrate_for

__all__ = ["HOURS_SQL", "Finding", "detect", "detect_rows", "record", "recorded", "MIN_EFFECT", "CONFIDENCE"]

MIN_EFFECT = 0.05  # a finding needs its interval's lower end above +5% drain
CONFIDENCE = 0.99
MIN_EXPECTED_PCT = 10.0  # expected % drained on each version, per device, for the device to count
RESAMPLES = 2_000

HOURS_SQL = """
SELECT h.device_id, d.model, f.firmware, f.day,
       h.drain_playback_s / 3600.0 AS playback_h,
       coalesce(h.anc_s / nullif(h.in_ear_s, 0), 0) AS anc,
       coalesce(h.adaptive_s / nullif(h.in_ear_s, 0), 0) AS adaptive,
       coalesce(h.transparency_s / nullif(h.in_ear_s, 0), 0) AS transparency,
       coalesce(h.output_dba_sum / nullif(h.output_samples, 0), 0) AS output_dba,
       (h.drain_left_pct + h.drain_right_pct) / 2 AS drain_pct, h.listening_s / 3600.0 AS listening_h
FROM device_hourly h JOIN devices d ON d.device_id = h.device_id
JOIN (SELECT device_id, day, min(firmware) AS firmware FROM device_firmware_daily
      GROUP BY device_id, day HAVING count(*) = 1) f
  ON f.device_id = h.device_id AND f.day = CAST(h.hour + INTERVAL '10 hours' AS DATE)
WHERE h.drain_playback_s > 0 AND d.model IS NOT NULL
"""
COLUMNS = ("device_id", "model", "firmware", "day", "playback_h", "anc", "adaptive", "transparency", "output_dba",
           "drain_pct", "listening_h")


@dataclass(frozen=True)
class Finding:
    """One comparison of a firmware version with the one before it on a model."""

    model: str
    firmware: str
    baseline_firmware: str
    devices: int  # devices that ran both, with enough drain on each
    drain_change: float  # relative: 0.25 is 25% more drain per hour of the same use
    ci_low: float
    ci_high: float
    p_value: float
    listening_change_h: float  # listening hours per day, new minus old (paired, same devices)
    listening_ci: tuple[float, float]
    first_day: str  # the first day a device ran the new version
    regression: bool  # the finding: lower end over min_effect and p under 1 - confidence

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def _usage(rows: dict[str, np.ndarray], keep: np.ndarray) -> np.ndarray:
    """The usage-mix design of the hours ``keep``: playback hours, alone and times each mode share
    and the output level (drain per playback hour depends on them)."""
    play = rows["playback_h"][keep]
    return np.column_stack([np.ones(keep.sum()), play, play * rows["anc"][keep], play * rows["adaptive"][keep],
                            play * rows["transparency"][keep], play * (rows["output_dba"][keep] - 60.0)])


def _paired(values: np.ndarray, rng: np.random.Generator, confidence: float) -> tuple[float, float, float, float]:
    """Mean of ``values`` (one per device), its bootstrap interval and the sign-flip p-value (two-sided)."""
    mean = float(values.mean())
    boot = values[rng.integers(0, len(values), (RESAMPLES, len(values)))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(boot, [tail, 1 - tail])
    flips = (values * rng.choice((-1.0, 1.0), (RESAMPLES, len(values)))).mean(axis=1)
    p = (1 + int((np.abs(flips) >= abs(mean)).sum())) / (RESAMPLES + 1)
    return mean, float(low), float(high), p


def detect_rows(rows: dict[str, np.ndarray], *, min_k: int = MIN_K, min_effect: float = MIN_EFFECT,
                confidence: float = CONFIDENCE, until: date | None = None, seed: int = 0) -> list[Finding]:
    """:data:`HOURS_SQL`'s columns (numpy arrays) → a comparison per model and version that has a
    predecessor run by at least ``min_k`` of the same devices. ``until``: only the days up to it (what
    was known then: the benchmark's detection delay)."""
    if len(rows.get("device_id", ())) == 0:
        return []
    day = np.asarray(rows["day"]).astype("datetime64[D]")
    keep_all = day <= np.datetime64(until, "D") if until is not None else np.ones(len(day), dtype=bool)
    rng = np.random.default_rng(seed)
    findings = []
    models, firmwares, devices = (np.asarray(rows[c]).astype(str) for c in ("model", "firmware", "device_id"))
    for model in sorted(set(models[keep_all].tolist())):
        of_model = keep_all & (models == model)
        first_seen = {fw: day[of_model & (firmwares == fw)].min() for fw in set(firmwares[of_model].tolist())}
        order = sorted(first_seen, key=lambda fw: (first_seen[fw], fw))
        for old, new in zip(order, order[1:]):
            found = _compare(rows, devices, firmwares, day, of_model, old, new, rng, min_k, confidence)
            if found is not None:
                findings.append(Finding(model, new, old, **found, first_day=str(first_seen[new]),
                                        regression=found["ci_low"] > min_effect and found["p_value"] < 1 - confidence))
    return findings


def _compare(rows, devices, firmwares, day, of_model, old, new, rng, min_k, confidence) -> dict | None:
    """Finding's figures for ``new`` against ``old`` on the hours ``of_model``; None below ``min_k`` devices."""
    on_old, on_new = of_model & (firmwares == old), of_model & (firmwares == new)
    both = np.intersect1d(devices[on_old], devices[on_new])
    if len(both) < min_k:
        return None
    x_old = _usage(rows, on_old)
    beta, *_ = np.linalg.lstsq(x_old, rows["drain_pct"][on_old].astype(np.float64), rcond=None)
    per_side = []
    for side in (on_old, on_new):
        mine = side & np.isin(devices, both)
        index = np.searchsorted(both, devices[mine])
        expected = np.maximum(_usage(rows, mine) @ beta, 0.0)
        observed = rows["drain_pct"][mine].astype(np.float64)
        sums = [np.bincount(index, weights=w, minlength=len(both)) for w in (observed, expected)]
        device_days = np.unique(np.column_stack([index, day[mine].astype(np.int64)]), axis=0)
        days = np.bincount(device_days[:, 0], minlength=len(both)).astype(np.float64)
        listening = np.bincount(index, weights=rows["listening_h"][mine].astype(np.float64), minlength=len(both))
        per_side.append((sums[0], sums[1], listening / np.maximum(days, 1)))
    (obs_old, exp_old, listen_old), (obs_new, exp_new, listen_new) = per_side
    enough = (exp_old >= MIN_EXPECTED_PCT) & (exp_new >= MIN_EXPECTED_PCT)
    if enough.sum() < min_k:
        return None
    change = (np.log(np.maximum(obs_new[enough], 0.5) / exp_new[enough])
              - np.log(np.maximum(obs_old[enough], 0.5) / exp_old[enough]))
    mean, low, high, p = _paired(change, rng, confidence)
    listen, listen_low, listen_high, _ = _paired(listen_new[enough] - listen_old[enough], rng, confidence)
    return {"devices": int(enough.sum()), "drain_change": float(np.expm1(mean)), "ci_low": float(np.expm1(low)),
            "ci_high": float(np.expm1(high)), "p_value": p, "listening_change_h": listen,
            "listening_ci": (listen_low, listen_high)}


def read_hours(source: StorageConfig | ReaderPool) -> dict[str, np.ndarray]:
    rows = run_queries(source, {"h": HOURS_SQL}, kind="rollups")["h"]
    return {c: np.array(v) for c, v in zip(COLUMNS, zip(*rows))} if rows else {}


def detect(source: StorageConfig | ReaderPool, **options) -> list[Finding]:
    """:func:`detect_rows` on the store's device-hours."""
    return detect_rows(read_hours(source), **options)


FINDINGS_SCHEMA = pa.schema([
    ("detected_at", pa.timestamp("us", tz="UTC")), ("model", pa.string()), ("firmware", pa.string()),
    ("baseline_firmware", pa.string()), ("devices", pa.int64()), ("drain_change", pa.float64()),
    ("ci_low", pa.float64()), ("ci_high", pa.float64()), ("p_value", pa.float64()),
    ("listening_change_h", pa.float64()), ("first_day", pa.string()), ("regression", pa.bool_())])


def record(config: StorageConfig, findings: list[Finding]) -> datetime:
    """Append one detect run's ``findings`` to ``firmware_findings``, all with the run's time (returned):
    the latest run's are the current findings (:func:`recorded`), earlier runs stay as history."""
    now = datetime.now(timezone.utc)
    names = [f.name for f in FINDINGS_SCHEMA]
    rows = [{**f.as_dict(), "detected_at": now} for f in findings]
    table = pa.table({n: [r[n] for r in rows] for n in names}, schema=FINDINGS_SCHEMA)
    migrate_for(config, "anomalies")
    if findings:
        insert_rows(config, "anomalies", "firmware_findings", table)
    return now


def recorded(source: StorageConfig | ReaderPool) -> list[dict]:
    """The findings of the latest ``podpulse detect`` run, regressions first."""
    names = [f.name for f in FINDINGS_SCHEMA]
    rows = run_queries(source, {"f": f"SELECT {', '.join(names)} FROM firmware_findings "
                                      "WHERE detected_at = (SELECT max(detected_at) FROM firmware_findings) "
                                      "ORDER BY regression DESC, drain_change DESC, model, firmware"},
                       kind="anomalies")["f"]
    return [dict(zip(names, r)) for r in rows]
