"""One device: its battery health by the model, its timeline hour by hour, its erasure."""

import time
from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query

from analytics import battery_model
from analytics.queries import device_timeline
from deployments.errors import log
from deployments.guard import needs
from deployments.schemas import Day, DeviceId
from deployments.service import Api
from deployments.settings import TIMELINE_DAYS
from deployments.tokens import Scope
from podpulse import metrics
from podpulse.errors import ConfigError
from storage.router import erase_devices

router = APIRouter()
KEEP = ("model", "firmware", "playback_h", "anc", "adaptive", "transparency", "output_dba", "drain_left_pct",
        "drain_right_pct")  # what a device-day's row gives the model


def _device_days(reader, device_id: str, days: int) -> list[dict]:
    return [dict(zip(battery_model.FEATURE_COLUMNS, row))
            for row in reader.rows(battery_model.device_days_sql(device_id, days))]


@router.get("/v1/devices/{device_id}/battery-health", dependencies=[needs(Scope.read_devices)])
async def battery_health(api: Api, device_id: DeviceId, days: Annotated[int, Query(ge=1, le=90)] = 7) -> dict:
    rows = await api.read(_device_days, device_id, days)
    if not rows:
        raise HTTPException(status_code=404, detail=f"no battery data for device {device_id!r}")
    started = time.perf_counter()
    scored = await api.score((api.models.pick(), [{k: (row[k] or 0.0) for k in KEEP} for row in rows]))
    metrics.scoring_latency("/v1/devices/{device_id}/battery-health", time.perf_counter() - started)
    per_day: dict[str, list] = {}
    for row, s in zip(rows, scored["scores"]):
        per_day.setdefault(str(row["day"]), []).append(s)
    return {"device_id": device_id, "model_version": scored["version"], "days": [
        {"day": d, "departure": max(x["departure"] for x in v), "imbalance": max(x["imbalance"] for x in v)}
        for d, v in per_day.items()]}


@router.get("/v1/devices/{device_id}/timeline", dependencies=[needs(Scope.read_devices)])
def timeline(api: Api, device_id: DeviceId, start: Annotated[Day | None, Query(alias="from")] = None,
             end: Annotated[Day | None, Query(alias="to")] = None) -> dict:
    """One device hour by hour (``analytics.queries.device_timeline``): AEST days ``from`` to ``to``,
    both included, at most 92 (default: its last 30 days of data)."""
    if start and end and end < start:
        raise HTTPException(status_code=422, detail=f"'to' ({end}) is before 'from' ({start})")
    stop = end + timedelta(days=1) if end else (start + timedelta(days=TIMELINE_DAYS) if start else None)
    try:
        with api.readers.reader() as reader:
            found = device_timeline(reader, device_id, start, stop)
    except ConfigError as e:  # the range: said in words, as the console shows it
        raise HTTPException(status_code=422, detail=str(e)) from None
    if found is None:
        raise HTTPException(status_code=404, detail=f"no device {device_id!r} in the store")
    return found


@router.delete("/v1/devices/{device_id}", dependencies=[needs(Scope.admin)])
def erase_device(api: Api, device_id: DeviceId) -> dict:
    """Erase the device (its id as stored) from every store, with a tombstone that keeps replays
    and backfills from bringing it back (``storage.router.erase_devices``); ``admin`` only. The
    replica opens the store for this one write and closes it: erasures are rare."""
    with api.readers.writing():  # the embedded store: after the reads in flight
        result = erase_devices(api.storage, [device_id])
    log.warning("erased device %s (rows removed per backend: %s)", device_id, result["backends"])
    return result
