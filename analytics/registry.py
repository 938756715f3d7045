"""The model registry: versioned artefacts in a directory, indexed in the relational store.

A version is a directory ``<root>/<name>/<version>/`` holding the model
(``model.keras``) and ``metadata.json`` (version, data window, metrics, feature
schema, parameters). The ``model_versions`` table is the registry's source of
truth: a version exists once it is registered there (:func:`register`, after its
directory is complete), and :func:`latest` is what Serve answers with. Nothing
scans the directories. What a version's metadata means is its model module's
business (:func:`analytics.battery_model.metadata`, :func:`analytics.forecast_model.week_ahead`).
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa

from podpulse.errors import ConfigError
from podpulse.localtime import REPORT_UTC_OFFSET_H
from podpulse.privacy import MIN_K
from storage.config import StorageConfig
from storage.reader import ReaderPool, config_of, run_queries
from storage.router import insert_rows

__all__ = ["new_version", "register", "versions", "latest", "record_anomalies", "flagged_devices_by_region"]

_VERSION = re.compile(r"^[0-9A-Za-z._-]{1,32}$")  # new_version()'s, and anything safe to quote in SQL


def new_version() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")


def register(config: StorageConfig, name: str, version: str, path: Path, metrics: dict, metadata: dict) -> None:
    """Index a saved version in the relational store (migrated first if needed)."""
    row = pa.table({"name": [name], "version": [version], "path": [str(path)],
                    "created_at": pa.array([datetime.now(timezone.utc)], pa.timestamp("us", tz="UTC")),
                    "metrics": [json.dumps(metrics)], "metadata": [json.dumps(metadata, default=str)]})
    insert_rows(config, "anomalies", "model_versions", row)


def record_anomalies(config: StorageConfig, version: str, flagged: dict[str, np.ndarray]) -> int:
    """Write a model version's flagged device-days to ``anomalies``; returns how many.

    ``flagged``: equal-length arrays ``device_id``, ``day`` (the AEST day, a date or
    ``YYYY-MM-DD``), ``score`` and ``reason``; every row is written with ``flagged`` true.
    """
    n = len(flagged["device_id"])
    if n == 0:
        return 0
    starts = (np.asarray(flagged["day"]).astype("datetime64[D]").astype("datetime64[us]")
              - np.timedelta64(REPORT_UTC_OFFSET_H, "h"))  # the AEST day's first instant, in UTC
    table = pa.table({
        "device_id": pa.array(np.asarray(flagged["device_id"]).astype(str), pa.string()),
        "day": pa.array(starts, pa.timestamp("us", tz="UTC")),
        "model_version": pa.array([version] * n, pa.string()),
        "score": pa.array(np.asarray(flagged["score"], dtype=np.float64), pa.float64()),
        "flagged": pa.array([True] * n, pa.bool_()),
        "reason": pa.array(np.asarray(flagged["reason"]).astype(str), pa.string()),
    })
    insert_rows(config, "anomalies", "anomalies", table)
    return n


def flagged_devices_by_region(source: StorageConfig | ReaderPool, version: str, k: int = MIN_K) -> dict[str, int]:
    """Distinct devices a battery-anomaly version flagged, per region (``NSW-urban``, ``WA-rural``;
    ``unknown-...`` for devices without a state): one query joining ``anomalies`` to ``devices``.

    Counts only, no device ids. A small flagged count is the point (where faults cluster), but a
    region with fewer than ``k`` devices in all is left out, as the reports leave it out."""
    if not _VERSION.fullmatch(version):
        raise ValueError(f"not a model version: {version!r}")
    routes = config_of(source).routes
    if routes["anomalies"] != routes["devices"]:
        raise ConfigError("anomalies and devices are routed to different backends: "
                          "the flagged devices cannot be joined to their regions")
    rows = run_queries(source, {"r": f"""
        WITH regions AS (SELECT coalesce(state, '?') AS state, urban FROM devices
                         GROUP BY coalesce(state, '?'), urban HAVING count(*) >= {int(k)})
        SELECT d.state, d.urban, count(DISTINCT a.device_id)
        FROM anomalies a JOIN devices d ON d.device_id = a.device_id
        JOIN regions r ON r.state = coalesce(d.state, '?') AND r.urban = d.urban
        WHERE a.model_version = '{version}' AND a.flagged
        GROUP BY d.state, d.urban"""}, kind="anomalies")["r"]
    counts: dict[str, int] = {}
    for state, urban, n in rows:
        region = f"{state or 'unknown'}-{'urban' if urban else 'rural'}"
        counts[region] = counts.get(region, 0) + int(n)
    return counts


def flagged_share_by_region(source: StorageConfig | ReaderPool, version: str, k: int = MIN_K) -> list[dict]:
    """Per region of at least ``k`` devices (the regions :func:`flagged_devices_by_region` counts):
    its devices, the distinct devices ``version`` flagged there (the same count as the metric's) and
    their share. Regions under ``k`` devices are left out whole."""
    if not _VERSION.fullmatch(version):
        raise ValueError(f"not a model version: {version!r}")
    rows = run_queries(source, {"r": f"""
        SELECT coalesce(state, '?') AS state, urban, count(*) AS devices FROM devices
        GROUP BY coalesce(state, '?'), urban HAVING count(*) >= {int(k)} ORDER BY 1, 2 DESC"""},
                       kind="devices")["r"]
    flagged = flagged_devices_by_region(source, version, k)
    out = []
    for state, urban, devices in rows:
        region = f"{'unknown' if state == '?' else state}-{'urban' if urban else 'rural'}"
        n = flagged.get(region, 0)
        out.append({"region": region, "devices": int(devices), "flagged_devices": n, "share": n / int(devices)})
    return out


def _model_name(name: str) -> str:
    if not name.replace("-", "").isalpha():
        raise ValueError(f"not a model name: {name!r}")
    return name


def versions(config: StorageConfig, name: str) -> list[dict]:
    sql = f"SELECT version, path, metrics FROM model_versions WHERE name = '{_model_name(name)}' ORDER BY version"
    rows = run_queries(config, {"v": sql}, kind="anomalies")["v"]
    return [{"version": v, "path": p, "metrics": json.loads(m)} for v, p, m in rows]


def latest(source: StorageConfig | ReaderPool, name: str) -> dict | None:
    """The version of ``name`` registered last (``created_at``; the version breaks a tie), or None
    when none is: ``{"version", "path", "metrics", "metadata"}``, the JSON columns parsed.

    One query on the backend that keeps ``anomalies`` (on a reader of its own, or one of ``source``'s
    pool); a store that cannot be read raises
    (the driver's error, or :class:`~storage.base.StorageError`), never answers None."""
    sql = (f"SELECT version, path, metrics, metadata FROM model_versions WHERE name = '{_model_name(name)}' "
           "ORDER BY created_at DESC, version DESC LIMIT 1")
    rows = run_queries(source, {"v": sql}, kind="anomalies")["v"]
    if not rows:
        return None
    version, path, metrics, metadata = rows[0]
    return {"version": version, "path": path, "metrics": json.loads(metrics) if metrics else {},
            "metadata": json.loads(metadata) if metadata else {}}
