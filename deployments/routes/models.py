"""What the models say: battery scoring, the usage forecast, flagged devices by region, listening
segments, firmware findings.

Scoring answers about the rows the caller sends. The rest are exact figures of the fleet, which have
no differentially private release yet: they need an ``admin`` token (a ``read:aggregates`` token reads
the private analytics, ``deployments.routes.analytics``)."""

import time

from fastapi import APIRouter, HTTPException

from analytics import regressions
from analytics.registry import flagged_share_by_region
from deployments.guard import needs
from deployments.schemas import Region, ScoreRequest
from deployments.service import Api
from deployments.tokens import Scope
from podpulse import metrics

router = APIRouter()


@router.post("/v1/battery/score", dependencies=[needs(Scope.read_aggregates)])
async def battery_score(api: Api, body: ScoreRequest) -> dict:
    started = time.perf_counter()
    scored = await api.score((api.models.pick(), [r.model_dump() for r in body.rows]))
    metrics.scoring_latency("/v1/battery/score", time.perf_counter() - started)
    return scored


@router.get("/v1/forecast/usage", dependencies=[needs(Scope.admin)])
def forecast(api: Api, region: Region) -> dict:
    week, evaluation = api.models.week_ahead()
    state, cls = region.split("-")
    days = week.days(state, cls == "urban")
    if days is None:
        raise HTTPException(status_code=404, detail=f"no forecast for {region} (unknown, or fewer than "
                                                    f"{week.k} devices)")
    return {"region": region, "model_version": week.version,
            "days": [{"day": day, "listening_hours": hours} for day, hours in days],
            "evaluation": evaluation}


@router.get("/v1/anomalies/regions", dependencies=[needs(Scope.admin)])
def anomalies_by_region(api: Api) -> dict:
    """Per region of at least ``min_k`` devices: the devices the latest battery-anomaly version
    flagged, and their share (what the ``ray_podpulse_anomalous_devices`` gauge counts)."""
    entry, k = api.models.registered("battery-anomaly", required=False), api.config.min_k
    if entry is None:
        return {"model_version": None, "k": k, "regions": [],
                "note": "no battery-anomaly model is registered: nothing is flagged yet"}
    return {"model_version": entry["version"], "k": k,
            "regions": flagged_share_by_region(api.readers, entry["version"], k)}


@router.get("/v1/segments", dependencies=[needs(Scope.admin)])
def segments(api: Api) -> dict:
    """The latest listening-segments version: its segments (names, shares, cancelling share per
    ambient band), segment shares per region (regions of at least k devices) and its evaluation."""
    entry = api.models.registered("listening-segments", required=False)
    if entry is None:
        return {"version": None, "segments": [], "by_region": [],
                "note": "no listening-segments model is registered: podpulse train --model listening-segments"}
    meta = entry["metadata"]
    return {"version": entry["version"], **meta.get("summary", {}), "evaluation": entry["metrics"],
            "data_window": meta.get("data_window")}


@router.get("/v1/firmware/regressions", dependencies=[needs(Scope.admin)])
def firmware_regressions(api: Api) -> dict:
    """The latest ``podpulse detect`` run's comparisons of each firmware version with the one before
    it on a model (:mod:`analytics.regressions`), regressions first. Counts and effects only."""
    findings = regressions.recorded(api.readers)
    return {"detected_at": findings[0]["detected_at"] if findings else None, "findings": findings,
            **({} if findings else {"note": "no findings: run podpulse detect on the store"})}
