"""The PodPulse Ray Serve application: FastAPI ingress, battery scoring, forecasts, analytics.

    serve run deployments.serve-config.yaml        # or: podpulse serve

Every endpoint but ``/healthz`` needs ``Authorization: Bearer $PODPULSE_API_TOKEN``
(read from the replicas' environment; with no token set, every call is refused).
Bodies are bounded; a malformed body gets 422 naming the field (FastAPI).
Models load from the registry; a new version is picked up without downtime by
changing the deployment's ``user_config`` (``model_path``), which Serve applies with
``reconfigure`` on the running replicas.

The deployments are thin: the logic is ``podpulse.battery_model``,
``podpulse.analytics``, ``podpulse.contract`` and ``podpulse.kafka``.
"""


# No `from __future__ import annotations` here: FastAPI reads the annotations of the
# class-based routes at runtime to tell bodies from query parameters.
import asyncio
import json
import logging
import os
import random
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, Header, HTTPException, Query
from fastapi import Path as PathParam
from pydantic import BaseModel, Field
from ray import serve

from podpulse import metrics

__all__ = ["app", "api", "build", "run_local", "PodPulseAPI", "latest_version"]

MAX_ROWS = 1000
DEVICE_ID = r"^[A-Za-z0-9._:-]{1,64}$"  # pseudonymous ids; anything else is a 422, never SQL
MAX_EVENTS = 5000
# POST /v1/telemetry answers 202 only once Kafka acknowledged every accepted event. librdkafka
# gives up on an event after DELIVERY_TIMEOUT_S (message.timeout.ms), so an event the request
# answered 503 for is not delivered later behind the client's retry; the request itself waits
# a little longer, for those expiry reports (librdkafka scans for expired messages each second).
DELIVERY_TIMEOUT_S = 10.0
DELIVERY_WAIT_S = DELIVERY_TIMEOUT_S + 2.0
RETRY_AFTER_S = 5

log = logging.getLogger("ray.serve")  # Serve's logger: lines land in the replica's log

app = FastAPI(title="PodPulse", description="AirPods Pro fleet telemetry: ingest, scoring, forecasts, analytics.",
              version="0.1.0")


def latest_version(registry: str | Path, name: str) -> Path | None:
    root = Path(registry) / name
    versions = sorted(p for p in root.iterdir() if (p / "metadata.json").exists()) if root.exists() else []
    return versions[-1] if versions else None


# async: FastAPI runs a plain-def dependency in a thread pool, a thread hop per request.
async def require_token(authorization: Annotated[str | None, Header()] = None) -> None:
    token = os.environ.get("PODPULSE_API_TOKEN")
    if not token or authorization != f"Bearer {token}":
        raise HTTPException(status_code=401, detail="missing or wrong bearer token",
                            headers={"WWW-Authenticate": "Bearer"})


Auth = Depends(require_token)


class ScoreRow(BaseModel):
    """One device-hour: its context and the drain observed over its paired samples."""

    model: str = Field(min_length=1, max_length=64)
    firmware: str = Field(min_length=1, max_length=64)
    playback_h: float = Field(ge=0, le=1)
    anc: float = Field(ge=0, le=1)
    adaptive: float = Field(ge=0, le=1)
    transparency: float = Field(ge=0, le=1)
    output_dba: float = Field(ge=0, le=140)
    drain_left_pct: float = Field(ge=0, le=100)
    drain_right_pct: float = Field(ge=0, le=100)


class ScoreRequest(BaseModel):
    rows: list[ScoreRow] = Field(min_length=1, max_length=MAX_ROWS)


class TelemetryRequest(BaseModel):
    events: list[dict] = Field(min_length=1, max_length=MAX_EVENTS)


def load_battery_model(path):
    from podpulse.battery_model import load

    return load(path)


def serving(model, storage) -> None:
    """Export which battery-anomaly version this replica serves (the drift alert keys on it) and how
    many devices that version flagged per region (one query on the store; the training job wrote the
    flagged device-days). A store that cannot be read is logged: the replica serves on regardless."""
    from podpulse.registry import flagged_devices_by_region

    version = str(model.version)
    metrics.model_version("battery-anomaly", version)
    try:
        counts = flagged_devices_by_region(storage, version)
    except Exception:  # any driver's error: the gauge is worth less than serving
        log.warning("cannot count the devices battery-anomaly %s flagged; "
                    "ray_podpulse_anomalous_devices is not set for it", version, exc_info=True)
        counts = {}  # still zero the replaced version's series: they no longer describe what is served
    metrics.anomalous_devices("battery-anomaly", version, counts)


@serve.deployment(
    ray_actor_options={"num_cpus": 0.5},
    # Serve's default (5) makes the proxy back off and retry (25 ms, 50 ms, ...) as soon as
    # five requests are in flight: at 200 req/s that capped the app at ~6 req/s with idle
    # CPUs. Requests here are short and mostly wait on the batcher, so admit many; beyond
    # max_queued_requests the proxy answers 503 instead of queueing without bound.
    max_ongoing_requests=256,
    max_queued_requests=1024,
    # A log line per request cost more than the scoring itself; errors are still logged.
    logging_config={"enable_access_log": False},
)
@serve.ingress(app)
class PodPulseAPI:
    """The whole HTTP API in one deployment: scoring in-process saves a replica hop per request.

    ``user_config = {"model_path": DIR}`` swaps the battery-anomaly model live; with no
    path, the latest registered version, looked up when a request first needs it.
    """

    def __init__(self, storage: dict | None = None, bootstrap: str | None = None, topic: str | None = None,
                 registry: str = "podpulse-data/models"):
        from storage.router import StorageConfig

        self.storage = StorageConfig(**storage) if storage else StorageConfig()
        self.registry = registry
        self.topic = topic
        self.model = self.canary = None
        self.canary_percent = 0.0
        self.producer = None
        if bootstrap and topic:
            from confluent_kafka import Producer

            from podpulse.kafka import producer_config

            self.producer = Producer(producer_config(
                bootstrap, {"message.timeout.ms": int(DELIVERY_TIMEOUT_S * 1000)}))

    def reconfigure(self, config: dict) -> None:
        """``model_path``: the stable version (null: the registry's latest). ``canary_model_path``
        and ``canary_percent``: a second version answering that share of scoring requests."""
        config = config or {}
        percent = float(config.get("canary_percent") or 0)
        if not 0 <= percent <= 100:
            raise ValueError(f"canary_percent must be within 0..100, got {percent}")
        canary = config.get("canary_model_path")
        # Loaded first, then swapped in: a request never sees half a model.
        stable = load_battery_model(config["model_path"]) if config.get("model_path") else None
        canary_model = load_battery_model(canary) if canary and percent > 0 else None
        self.model, self.canary, self.canary_percent = stable, canary_model, percent
        if stable is not None:
            serving(stable, self.storage)

    def battery_model(self):
        if self.model is None:
            path = latest_version(self.registry, "battery-anomaly")
            if path is None:
                raise HTTPException(status_code=503, detail="no battery-anomaly model in the registry "
                                                            "(train one: podpulse train --model battery-anomaly)")
            self.model = load_battery_model(path)
            serving(self.model, self.storage)
        return self.model

    def pick(self) -> str:
        """Which version answers this request: the canary for ``canary_percent`` of them."""
        return "canary" if self.canary is not None and random.random() * 100 < self.canary_percent else "stable"

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.001)
    async def score(self, requests: list[tuple[str, list[dict]]]) -> list[dict]:
        """Concurrent requests' rows, scored in one model call per version."""
        from podpulse.battery_model import score_rows

        out: list[dict] = [{}] * len(requests)
        stable = self.battery_model()
        # A canary withdrawn between pick() and this batch: its requests go to the stable version.
        for arm, model in (("stable", stable), ("canary", self.canary or stable)):
            mine = [i for i, (a, _) in enumerate(requests) if a == arm]
            if not mine:
                continue
            scored = score_rows(model, [r for i in mine for r in requests[i][1]])
            at = 0
            for i in mine:
                n = len(requests[i][1])
                out[i] = {"version": model.version, "scores": scored[at:at + n]}
                at += n
        return out

    @app.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok"}

    # A plain def: FastAPI runs it in a thread, so waiting for Kafka's acknowledgements
    # does not hold up the replica's event loop.
    @app.post("/v1/telemetry", status_code=202, dependencies=[Auth])
    def telemetry(self, body: TelemetryRequest) -> dict:
        """Validate with the event contract, produce the valid events to Kafka; 202 once Kafka
        acknowledged every one of them, else 503 with ``Retry-After`` and Kafka's reason."""
        import msgspec

        from podpulse.contract import decode_batch
        from podpulse.errors import BrokerError
        from podpulse.kafka import deliver

        if self.producer is None:
            raise HTTPException(status_code=503, detail="HTTP ingest is not configured (no Kafka topic)")
        values = [msgspec.json.encode(e) for e in body.events]
        decoded = decode_batch(values)
        keys = decoded.table["device_id"].to_pylist()
        if keys:
            try:
                deliver(self.producer, self.topic,
                        [(k.encode(), values[i], None) for k, i in zip(keys, decoded.rows)], DELIVERY_WAIT_S)
            except BrokerError as e:
                log.warning("POST /v1/telemetry: Kafka did not take %d events: %s", len(keys), e)
                raise HTTPException(status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)},
                                    detail=f"Kafka did not acknowledge the events; send the whole request "
                                           f"again later: {e}") from None
        return {"accepted": decoded.table.num_rows, "rejected": len(decoded.rejected),
                "reasons": [{"index": r.index, "reason": r.reason} for r in decoded.rejected]}

    @app.post("/v1/battery/score", dependencies=[Auth])
    async def battery_score(self, body: ScoreRequest) -> dict:
        started = time.perf_counter()
        scored = await self.score((self.pick(), [r.model_dump() for r in body.rows]))
        metrics.scoring_latency("/v1/battery/score", time.perf_counter() - started)
        return scored

    @app.get("/v1/devices/{device_id}/battery-health", dependencies=[Auth])
    async def battery_health(self, device_id: Annotated[str, PathParam(pattern=DEVICE_ID)],
                             days: Annotated[int, Query(ge=1, le=90)] = 7) -> dict:
        from storage.reader import open_reader
        from podpulse.battery_model import FEATURE_SQL

        def read() -> list[dict]:  # in a thread: the query must not hold up the event loop
            with open_reader(self.storage) as r:
                columns = ["device_id", "day", "model", "firmware", "playback_h", "anc", "adaptive",
                           "transparency", "output_dba", "drain_left_pct", "drain_right_pct"]
                return [dict(zip(columns, row)) for row in r.rows(  # device_id: checked by DEVICE_ID
                    f"SELECT * FROM ({FEATURE_SQL}) f WHERE device_id = '{device_id}' "
                    f"AND day >= (SELECT max(day) FROM ({FEATURE_SQL}) g) - {days} ORDER BY day")]

        rows = await asyncio.to_thread(read)
        if not rows:
            raise HTTPException(status_code=404, detail=f"no battery data for device {device_id!r}")
        keep = ("model", "firmware", "playback_h", "anc", "adaptive", "transparency", "output_dba",
                "drain_left_pct", "drain_right_pct")
        started = time.perf_counter()
        scored = await self.score((self.pick(), [{k: (row[k] or 0.0) for k in keep} for row in rows]))
        metrics.scoring_latency("/v1/devices/{device_id}/battery-health", time.perf_counter() - started)
        per_day: dict[str, list] = {}
        for row, s in zip(rows, scored["scores"]):
            per_day.setdefault(str(row["day"]), []).append(s)
        return {"device_id": device_id, "model_version": scored["version"], "days": [
            {"day": d, "departure": max(x["departure"] for x in v), "imbalance": max(x["imbalance"] for x in v)}
            for d, v in per_day.items()]}

    @app.get("/v1/forecast/usage", dependencies=[Auth])
    def forecast(self, region: Annotated[str, Query(pattern=r"^[A-Z]{2,3}-(urban|rural)$",
                                                    description="STATE-urban or STATE-rural, e.g. NSW-urban")]):
        version = latest_version(self.registry, "usage-forecast")
        if version is None:
            raise HTTPException(status_code=503, detail="no usage-forecast model in the registry")
        meta = json.loads((version / "metadata.json").read_text())
        state, cls = region.split("-")
        week = meta["next_week"]
        match = [r for r in week["regions"] if r["state"] == state and bool(r["urban"]) == (cls == "urban")]
        if not match:
            raise HTTPException(status_code=404, detail=f"no forecast for {region} (unknown, or fewer than "
                                                        f"{week['k']} devices)")
        start = date.fromisoformat(week["from"])
        return {"region": region, "model_version": meta["version"], "days": [
            {"day": (start + timedelta(days=i)).isoformat(), "listening_hours": h}
            for i, h in enumerate(match[0]["hours"])]}

    @app.get("/v1/analytics/{query}", dependencies=[Auth])
    def analytics(self, query: str, start: Annotated[date | None, Query(alias="from")] = None,
                  end: Annotated[date | None, Query(alias="to")] = None,
                  k: Annotated[int, Query(ge=1, le=1000)] = 10) -> dict:
        from podpulse import analytics
        from storage.reader import open_reader

        if query not in analytics.QUERIES:
            raise HTTPException(status_code=404, detail=f"no query {query!r}; try {', '.join(analytics.QUERIES)}")
        with open_reader(self.storage) as r:
            covered = analytics.data_range(r)
            if covered is None:
                raise HTTPException(status_code=404, detail="the store holds no rollups yet")
            first = start or covered[0]
            stop = end + timedelta(days=1) if end else covered[1]
            return analytics.QUERIES[query](r, first, stop, k).as_dict()


def build(storage: dict | None = None, bootstrap: str | None = None, topic: str | None = None,
          registry: str = "podpulse-data/models", model_path: str | None = None, env: dict | None = None,
          canary_model_path: str | None = None, canary_percent: float = 0):
    """The application graph, for ``serve.run`` and ``podpulse serve``.

    ``env``: environment variables for the API replicas (``PODPULSE_API_TOKEN``),
    when they should not come from the nodes' own environment.
    """
    options = {"user_config": {"model_path": model_path, "canary_model_path": canary_model_path,
                               "canary_percent": canary_percent}}
    if env:
        options["ray_actor_options"] = {"num_cpus": 0.5, "runtime_env": {"env_vars": env}}
    return PodPulseAPI.options(**options).bind(storage, bootstrap, topic, registry)


def api(args: dict):
    """Application builder for ``serve run`` / ``serve deploy`` / a RayService (``import_path: deployments.app:api``)."""
    return build(**args)


def run_local(storage: dict, registry: str, token: str, *, host: str = "127.0.0.1", port: int = 8000,
              bootstrap: str | None = None, topic: str | None = None, model_path: str | None = None,
              name: str = "podpulse") -> str:
    """Start the application on the connected Ray (``podpulse serve``, the demo, the benchmark);
    returns its base URL."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(build(storage, bootstrap, topic, registry, model_path, env={"PODPULSE_API_TOKEN": token}),
              name=name, route_prefix="/")
    return f"http://{host}:{port}"
