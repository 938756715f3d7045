"""The PodPulse Ray Serve application: FastAPI ingress, battery scoring, forecasts, analytics.

    serve run deployments.serve-config.yaml        # or: podpulse serve

Every endpoint but ``/healthz`` needs ``Authorization: Bearer TOKEN`` of a token with the
route's scope (``deployments.tokens``: ``$PODPULSE_API_TOKENS_FILE``, re-read when it changes, and
``$PODPULSE_API_TOKEN``, every scope; with neither, every call is refused). :class:`Guard` checks
it from the headers, before any of the body is read (401, or 403 naming the scope), and bounds
the body while it is read (``max_body_bytes``: 413). ``/docs``, ``/redoc`` and ``/openapi.json`` are off unless ``docs`` is set.
A malformed request gets 422 naming the field; no input gets a 5xx.
Models come from the registry, whose source of truth is the ``model_versions`` table
(``podpulse.registry.latest``); what a version's files mean is its model module's
business (``podpulse.battery_model.load``, ``podpulse.forecast_model.week_ahead``).
A new version is picked up without downtime by changing the deployment's
``user_config`` (``model_path``), which Serve applies with ``reconfigure`` on the
running replicas; ``user_config`` also tunes the scoring batches (:func:`parse_user_config`).

The deployments are thin: the logic is ``podpulse.battery_model``,
``podpulse.analytics``, ``podpulse.contract`` and ``podpulse.kafka``.
"""


# No `from __future__ import annotations` here: FastAPI reads the annotations of the
# class-based routes at runtime to tell bodies from query parameters.
import asyncio
import json
import logging
import math
import random
import re
import time
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Annotated, Callable

# The module, not its Producer: serve.ingress cloudpickles the app, and Producer's __module__
# ('cimpl') cannot be imported by name, so cloudpickle would try to copy the class by value.
import confluent_kafka
import msgspec
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import AfterValidator, BaseModel, Field
from ray import serve
from ray.serve.exceptions import RayServeException
from starlette.middleware.body_limit import RequestBodyLimitResponder

from deployments.tokens import Tokens, allows, required_scope
from podpulse import analytics, battery_model, forecast_model, metrics, regressions, web
from podpulse import cohort as cohorts
from podpulse.cohort import Cohort
from podpulse.config import MIN_K, StorageConfig
from podpulse.contract import DEVICE_ID, decode_batch, upload_with
from podpulse.errors import BrokerError, ConfigError
from podpulse.kafka import deliver, producer_config
from podpulse.drift import served_drift
from podpulse.registry import flagged_devices_by_region, flagged_share_by_region, latest
from storage.base import StorageError
from storage.reader import ReaderPool
from storage.router import erase_devices

__all__ = ["app", "api", "build", "run_local", "PodPulseAPI", "UserConfig", "parse_user_config"]

MAX_ROWS = 1000
REGION = re.compile(r"[A-Z]{2,3}-(urban|rural)")
LABEL = re.compile(r"[^\x00-\x1f\x7f-\x9f\ud800-\udfff]{1,64}")  # as the contract's: no controls, lone surrogates
MAX_EVENTS = 5000
# A full batch of MAX_EVENTS events is ~2 MB of JSON (~400 B an event); the default leaves room for
# newer versions' fields. A longer body is refused with 413 before FastAPI parses any of it.
MAX_BODY_BYTES = 4 * 1024 * 1024
# Analytics dates (from, to) outside these days are a 422 naming the parameter: the store holds
# nothing there, and date arithmetic near year 9999 overflows.
FIRST_DAY, LAST_DAY = date(2000, 1, 1), date(2100, 12, 31)
MAX_K = 1000
# The console's page and script hold no data (everything comes from the API, with a token).
OPEN_PATHS = frozenset({"/healthz", "/"} | {f"/console/{name}" for name in web.ASSETS})
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
UNGUARDED = OPEN_PATHS | DOCS_PATHS  # DOCS_PATHS: only when user_config docs is set
MAX_ECHO_CHARS = 200  # a 422 repeats the refused input only when it is short and JSON-safe
# POST /v1/telemetry answers 202 only once Kafka acknowledged every accepted event. librdkafka
# gives up on an event after DELIVERY_TIMEOUT_S (message.timeout.ms), so an event the request
# answered 503 for is not delivered later behind the client's retry; the request itself waits
# a little longer, for those expiry reports (librdkafka scans for expired messages each second).
DELIVERY_TIMEOUT_S = 10.0
DELIVERY_WAIT_S = DELIVERY_TIMEOUT_S + 2.0
RETRY_AFTER_S = 5
DRIFT_INTERVAL_S = 3600.0  # how often a replica computes the served version's feature drift (user_config)
# Requests in flight on one replica at most (see the deployment's options), so also the largest batch.
MAX_ONGOING_REQUESTS = 256
# Scoring batches (user_config score_batch_size, score_batch_wait_s): concurrent scoring requests
# are scored in one model call of at most this many requests, gathered for at most this long
# after the first one arrives. A lone request waits the whole wait: keep it to milliseconds.
# 0: a batch takes the requests already queued and waits for no more. bench.serve.run at 200 req/s,
# alternating runs: p50 4.3 and 4.7 ms against 6.1 and 5.2 ms with 1 ms; batch scoring about the
# same; `podpulse bench serve` once on 0 afterwards: 5.38 ms (README, Performance).
SCORE_BATCH_SIZE = 64
SCORE_BATCH_WAIT_S = 0.0
MAX_SCORE_BATCH_WAIT_S = 1.0
# Read connections a replica holds at most (per backend): a burst of analytics reads queues for
# them, and answers 503 after READ_WAIT_S, instead of taking the connections the writer needs.
READ_CONNECTIONS = 4
READ_WAIT_S = 10.0

log = logging.getLogger("ray.serve")  # Serve's logger: lines land in the replica's log

app = FastAPI(title="PodPulse", description="AirPods Pro fleet telemetry: ingest, scoring, forecasts, analytics.",
              version="0.1.0")


@dataclass(frozen=True)
class UserConfig:
    """The ``user_config`` of :class:`PodPulseAPI`, checked (:func:`parse_user_config`)."""

    model_path: str | None = None  # the stable battery-anomaly version; None: the registry's latest
    canary_model_path: str | None = None  # a second version, answering canary_percent of scoring requests
    canary_percent: float = 0.0
    score_batch_size: int = SCORE_BATCH_SIZE
    score_batch_wait_s: float = SCORE_BATCH_WAIT_S
    max_body_bytes: int = MAX_BODY_BYTES  # a longer request body: 413
    docs: bool = False  # serve /docs, /redoc and /openapi.json, without the token
    min_k: int = MIN_K  # the privacy floor: analytics refuse a lower k
    drift_interval_s: float = DRIFT_INTERVAL_S  # feature drift of the served version, this often; 0: never


USER_CONFIG_KEYS = tuple(UserConfig.__dataclass_fields__)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_user_config(config) -> UserConfig:
    """``user_config`` (a mapping; null or a missing key: its default) → :class:`UserConfig`, or a
    ValueError naming every refused key, what it must be and what it got."""
    config = {} if config is None else config
    if not isinstance(config, dict):
        raise ValueError(f"refused user_config: it must be a mapping of {', '.join(USER_CONFIG_KEYS)}, "
                         f"got {type(config).__name__}")
    problems = []
    unknown = sorted(set(config) - set(USER_CONFIG_KEYS), key=str)
    if unknown:
        problems.append(f"unknown key(s) {', '.join(map(repr, unknown))} (known: {', '.join(USER_CONFIG_KEYS)})")
    paths = {}
    for key in ("model_path", "canary_model_path"):
        value = config.get(key)
        if value is not None and not (isinstance(value, str) and value.strip()):
            problems.append(f"{key} must be a version directory (a non-empty string) or null, got {value!r}")
            value = None
        paths[key] = value
    percent = config.get("canary_percent")
    try:  # a numeric string too, as before
        percent = 0.0 if percent is None else float(percent)
    except (TypeError, ValueError):
        percent = math.nan
    if isinstance(config.get("canary_percent"), bool) or not 0 <= percent <= 100:
        problems.append(f"canary_percent must be within 0..100, got {config.get('canary_percent')!r}")
    size = config.get("score_batch_size")
    size = SCORE_BATCH_SIZE if size is None else size
    if not (_number(size) and float(size).is_integer() and 1 <= size <= MAX_ONGOING_REQUESTS):
        problems.append(f"score_batch_size must be a whole number from 1 to {MAX_ONGOING_REQUESTS} (scoring "
                        f"requests scored in one model call; no more are ever in flight on a replica), got {size!r}")
    wait = config.get("score_batch_wait_s")
    wait = SCORE_BATCH_WAIT_S if wait is None else wait
    if not (_number(wait) and 0 <= wait <= MAX_SCORE_BATCH_WAIT_S):
        problems.append(f"score_batch_wait_s must be seconds from 0 to {MAX_SCORE_BATCH_WAIT_S:g} (how long a "
                        f"batch waits for more requests; default {SCORE_BATCH_WAIT_S:g}), got {wait!r}")
    guards = _guards(config, problems)
    drift = config.get("drift_interval_s")
    drift = DRIFT_INTERVAL_S if drift is None else drift
    if not (_number(drift) and (drift == 0 or 1 <= drift <= 7 * 86_400)):
        problems.append(f"drift_interval_s must be 0 (never) or seconds from 1 to {7 * 86_400} (how often a replica "
                        f"computes the served version's feature drift), got {drift!r}")
        drift = DRIFT_INTERVAL_S
    if problems:
        raise ValueError("refused user_config: " + "; ".join(problems))
    return UserConfig(paths["model_path"], paths["canary_model_path"], percent, int(size), float(wait), **guards,
                      drift_interval_s=float(drift))


def _guards(config: dict, problems: list[str]) -> dict:
    """The request guards of ``user_config`` (max_body_bytes, docs, min_k), checked into ``problems``."""
    out = {}
    for key, lo, hi, what in (("max_body_bytes", 1024, 1024**3, "bytes a request body may take"),
                              ("min_k", 2, MAX_K, "the lowest k an analytics request may ask for")):
        value = config.get(key)
        value = getattr(UserConfig, key) if value is None else value
        if not (_number(value) and float(value).is_integer() and lo <= value <= hi):
            problems.append(f"{key} must be a whole number from {lo} to {hi} ({what}), got {value!r}")
        out[key] = int(value) if _number(value) and float(value).is_integer() else getattr(UserConfig, key)
    docs = config.get("docs")
    if docs is not None and not isinstance(docs, bool):
        problems.append(f"docs must be true or false (serve /docs, /redoc and /openapi.json), got {docs!r}")
    out["docs"] = docs is True
    return out


def replica_config() -> UserConfig:
    """The checked user_config of the replica serving this request; the defaults outside Serve."""
    try:
        servable = serve.get_replica_context().servable_object
    except RayServeException:
        return UserConfig()
    return getattr(servable, "config", None) or UserConfig()


TOKENS = Tokens()  # this replica's: the environment's token and the tokens file


def caller_scopes(headers: list[tuple[bytes, bytes]]) -> frozenset[str] | None:
    """The scopes of the one ``Authorization`` header's token; None without exactly one known token."""
    given = [value for name, value in headers if name.lower() == b"authorization"]
    return TOKENS.scopes(given[0]) if len(given) == 1 else None


def route_path(scope: dict) -> str:
    """The path the app routes on: without the application's route prefix (``root_path``)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The declared body length; -1 when it is not one non-negative whole number; None when absent."""
    given = [value for name, value in headers if name.lower() == b"content-length"]
    if not given:
        return None
    return int(given[0]) if len(set(given)) == 1 and given[0].isdigit() else -1


class Guard:
    """Pure ASGI middleware: what the headers can settle is settled before any of the body is read.

    ``/healthz`` is open; the docs paths are served openly when ``docs`` is set, else 404; every
    other path needs the bearer token (401). A declared ``Content-Length`` over ``max_body_bytes``
    gets 413 at once, and a body that grows past it while being read gets 413 before it is parsed
    (Starlette's ``RequestBodyLimitResponder``). ``settings`` gives the replica's current user_config.
    """

    def __init__(self, app, settings: Callable[[], UserConfig] = replica_config):
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        config = self.settings()
        refusal = self.refusal(scope, config)
        if refusal is not None:
            return await refusal(scope, receive, send)
        await RequestBodyLimitResponder(self.app, config.max_body_bytes)(scope, receive, send)

    @staticmethod
    def refusal(scope: dict, config: UserConfig) -> JSONResponse | None:
        path, headers = route_path(scope), scope["headers"]
        if path in DOCS_PATHS and not config.docs:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        if path not in UNGUARDED:
            scopes = caller_scopes(headers)
            if scopes is None:
                return JSONResponse({"detail": "missing or wrong bearer token"}, status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
            need = required_scope(path, scope.get("method", "GET"))
            if not allows(scopes, need):
                return JSONResponse({"detail": f"this token lacks the scope {need!r}"}, status_code=403,
                                    headers={"WWW-Authenticate": f'Bearer scope="{need}"'})
            scope.setdefault("state", {})["scopes"] = scopes
        length = content_length(headers)
        if length == -1:
            return JSONResponse({"detail": "Content-Length must be one whole number of bytes"}, status_code=400)
        if length is not None and length > config.max_body_bytes:
            return JSONResponse({"detail": f"the body takes {length} bytes, over the limit of "
                                           f"{config.max_body_bytes} (max_body_bytes)"}, status_code=413)
        return None


app.add_middleware(Guard)


def _echo(value):
    """``value`` made JSON (as FastAPI would) when it is short and strict JSON (finite numbers,
    text UTF-8 can write), else None: a 422 never fails on, or floods with, what it refused."""
    try:
        value = jsonable_encoder(value)
        text = json.dumps(value, allow_nan=False, ensure_ascii=False)
        text.encode()
    except (TypeError, ValueError, RecursionError):  # UnicodeEncodeError is a ValueError
        return None
    return value if len(text) <= MAX_ECHO_CHARS else None


def _text(value) -> str:
    """``value`` as text UTF-8 can write (a lone surrogate becomes its escape)."""
    return str(value).encode("utf-8", "backslashreplace").decode()


def refused_detail(errors) -> list[dict]:
    """FastAPI's 422 detail, made safe to send: ``loc`` and ``msg`` as writable text, ``input`` and
    ``ctx`` only where :func:`_echo` keeps them."""
    out = []
    for error in errors:
        item = {"type": _text(error.get("type")),
                "loc": [x if isinstance(x, int) else _text(x) for x in error.get("loc", ())],
                "msg": _text(error.get("msg"))}
        for key in ("input", "ctx"):
            kept = _echo(error.get(key)) if key in error else None
            if kept is not None:
                item[key] = kept
        out.append(item)
    return out


@app.exception_handler(StorageError)
async def store_unavailable(request: Request, exc: StorageError) -> JSONResponse:
    """A store that cannot be read now (down, or every read connection busy): 503, try again later."""
    log.warning("%s %s: %s", request.method, request.url.path, exc)
    return JSONResponse({"detail": f"the store cannot be read now: {exc}"}, status_code=503,
                        headers={"Retry-After": str(RETRY_AFTER_S)})


@app.exception_handler(RequestValidationError)
async def refused(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming the field, as FastAPI's own handler, but never a 500 for what the request held."""
    return JSONResponse({"detail": refused_detail(exc.errors())}, status_code=422)


def refusal(where: str, e: ConfigError) -> RequestValidationError:
    """A 422 for a :class:`ConfigError` whose message starts with the field it is about."""
    field = str(e).split(":", 1)[0]
    return RequestValidationError([{"loc": (where, field), "msg": str(e), "type": "value_error"}])


def _matching(pattern: re.Pattern, what: str) -> AfterValidator:
    """A validator refusing a value ``pattern`` does not match whole (``fullmatch``: no trailing newline)."""
    def check(value: str) -> str:
        if not pattern.fullmatch(value):
            raise ValueError(f"must be {what}")
        return value
    return AfterValidator(check)


DeviceId = Annotated[str, PathParam(), _matching(DEVICE_ID, "1 to 64 of A-Z a-z 0-9 . _ : -")]
Label = Annotated[str, _matching(LABEL, "1 to 64 printable characters")]
Day = Annotated[date, Field(ge=FIRST_DAY, le=LAST_DAY)]
CohortText = Annotated[str | None, Query(description="as devices send it, e.g. AirPods Pro 2 or 7A305")]
Region = Annotated[str, Query(description="STATE-urban or STATE-rural, e.g. NSW-urban"),
                   _matching(REGION, "STATE-urban or STATE-rural, e.g. NSW-urban")]


class ScoreRow(BaseModel):
    """One device-hour: its context and the drain observed over its paired samples."""

    model: Label
    firmware: Label
    playback_h: float = Field(ge=0, le=1)
    anc: float = Field(ge=0, le=1)
    adaptive: float = Field(ge=0, le=1)
    transparency: float = Field(ge=0, le=1)
    output_dba: float = Field(ge=0, le=140)
    drain_left_pct: float = Field(ge=0, le=100)
    drain_right_pct: float = Field(ge=0, le=100)


class ScoreRequest(BaseModel):
    rows: list[ScoreRow] = Field(min_length=1, max_length=MAX_ROWS)


class CohortRequest(BaseModel):
    """A cohort to save: its name and its fields (``podpulse.cohort.Cohort``)."""

    name: Annotated[str, _matching(cohorts.NAME, "1 to 64 of letters, digits, spaces and ._+()-")]
    cohort: dict[str, str | int | bool | None] = Field(max_length=len(cohorts.COHORT_FIELDS))


class TelemetryRequest(BaseModel):
    """Messages as the topic takes them: events, device uploads (``{..., "samples": [...]}``) or both."""

    events: list[dict] = Field(min_length=1, max_length=MAX_EVENTS)


def encoded(events: list[dict]) -> tuple[list[bytes | None], dict[int, str]]:
    """Each event as JSON bytes for the contract's decoder; an event JSON cannot carry (a lone
    surrogate in a string) is None there, with its reason by index."""
    values, unwritable = [], {}
    for i, event in enumerate(events):
        try:
            values.append(msgspec.json.encode(event))
        except (TypeError, ValueError, OverflowError) as e:  # UnicodeEncodeError is a ValueError
            values.append(None)
            unwritable[i] = f"not writable as UTF-8 JSON ({type(e).__name__}: {_text(e)[:200]}) - at `$`"
    return values, unwritable


def accepted_records(values: list[bytes | None], decoded) -> list[tuple[bytes, bytes, None]]:
    """(key, value, no headers) per message with an accepted event: an event as sent, an upload as sent
    or cut down to its accepted samples."""
    ids = decoded.table["device_id"].to_pylist()
    kept: dict[int, tuple[str, list[int]]] = {}
    for row, (i, k) in enumerate(zip(decoded.rows.tolist(), decoded.samples.tolist())):
        kept.setdefault(i, (ids[row], []))[1].append(k)
    cut = {r.index for r in decoded.rejected if r.sample is not None}
    return [(key.encode(), upload_with(values[i], samples) if i in cut else values[i], None)
            for i, (key, samples) in kept.items()]


def serving(model, storage, min_k: int = MIN_K) -> None:
    """Export which battery-anomaly version this replica serves (the drift alert keys on it) and how
    many devices that version flagged per region (one query on the store; the training job wrote the
    flagged device-days), for regions of at least ``min_k`` devices. A store that cannot be read is
    logged: the replica serves on regardless."""
    version = str(model.version)
    metrics.model_version("battery-anomaly", version)
    try:
        counts = flagged_devices_by_region(storage, version, min_k)
    except Exception:  # any driver's error: the gauge is worth less than serving
        log.warning("cannot count the devices battery-anomaly %s flagged; "
                    "ray_podpulse_anomalous_devices is not set for it", version, exc_info=True)
        counts = {}  # still zero the replaced version's series: they no longer describe what is served
    metrics.anomalous_devices("battery-anomaly", version, counts)


# serve.ingress copies the app, these routes included, when it decorates the class: what the
# routes call must be defined above this line.
@serve.deployment(
    ray_actor_options={"num_cpus": 0.5},
    # Serve's default (5) makes the proxy back off and retry (25 ms, 50 ms, ...) as soon as
    # five requests are in flight: at 200 req/s that capped the app at ~6 req/s with idle
    # CPUs. Requests here are short and mostly wait on the batcher, so admit many; beyond
    # max_queued_requests the proxy answers 503 instead of queueing without bound.
    max_ongoing_requests=MAX_ONGOING_REQUESTS,
    max_queued_requests=1024,
    # A log line per request cost more than the scoring itself; errors are still logged.
    logging_config={"enable_access_log": False},
)
@serve.ingress(app)
class PodPulseAPI:
    """The whole HTTP API in one deployment: scoring in-process saves a replica hop per request.

    ``user_config`` (:func:`parse_user_config`): ``model_path`` swaps the battery-anomaly model
    live (null: the latest version registered in ``model_versions``, looked up when a request
    first needs it); ``canary_model_path`` and ``canary_percent`` run a canary beside it;
    ``score_batch_size`` and ``score_batch_wait_s`` tune the scoring batches.

    ``registry`` (the artefacts' directory) is kept for the callers that pass it
    (``podpulse serve``, the serve config, the RayService's volume): which versions exist and
    where each one's directory is, the ``model_versions`` table says.
    """

    def __init__(self, storage: dict | None = None, bootstrap: str | None = None, topic: str | None = None,
                 registry: str = "podpulse-data/models"):
        self.storage = StorageConfig(**storage) if storage else StorageConfig()
        self.readers = ReaderPool(self.storage, size=READ_CONNECTIONS, wait_s=READ_WAIT_S)
        self.registry = registry
        self.topic = topic
        self.config = UserConfig()
        self.model = self.canary = None
        self.failure: str | None = None  # why the models user_config names could not be loaded
        self.generation = 0  # counts reconfigures: a registry lookup begun before one does not apply after it
        self._forecast = None  # ((version, path), WeekAhead, evaluation) of the latest usage-forecast, read once per version
        self._drift_task = None  # the feature drift schedule, started by the first reconfigure
        self.producer = None
        if bootstrap and topic:
            self.producer = confluent_kafka.Producer(producer_config(
                bootstrap, {"message.timeout.ms": int(DELIVERY_TIMEOUT_S * 1000)}))

    async def reconfigure(self, config: dict) -> None:
        """Apply ``user_config``: checked whole first (a refused one changes nothing and raises
        ValueError naming the keys); then the models it names are loaded, off the event loop,
        and swapped in with the batch settings at once: a request never sees half of it.

        A model that cannot be loaded fails the reconfigure (Serve reports the update failed
        and replaces the replica) and leaves the replica without models, unhealthy
        (:meth:`check_health`): it must not go on answering with the version it was told to
        replace."""
        settings = parse_user_config(config)
        self.generation += 1
        try:
            stable, canary = await asyncio.to_thread(self._load_configured, settings)
        except Exception as e:
            self.config, self.model, self.canary, self.failure = settings, None, None, str(e)
            log.error("reconfigure: %s", e)
            raise
        self.config, self.model, self.canary, self.failure = settings, stable, canary, None
        self.score.set_max_batch_size(settings.score_batch_size)
        self.score.set_batch_wait_timeout_s(settings.score_batch_wait_s)
        if stable is not None:
            await asyncio.to_thread(serving, stable, self.readers, settings.min_k)
        if self._drift_task is None:  # Serve calls reconfigure first from the replica's event loop
            self._drift_task = asyncio.get_running_loop().create_task(self._drift_schedule())

    async def _drift_schedule(self) -> None:
        """Every ``drift_interval_s`` (the first at once), off the event loop: :meth:`export_drift` and
        the latest firmware findings' gauge. A failure is logged and tried again at the next interval:
        the gauges are worth less than serving."""
        while True:
            interval = self.config.drift_interval_s
            if interval > 0:
                for what, export in (("feature drift of the served battery-anomaly version", self.export_drift),
                                     ("firmware regressions", self.export_regressions)):
                    try:
                        await asyncio.to_thread(export)
                    except Exception:  # any driver's error, a version without a window, too little data
                        log.warning("%s not exported; trying again in %g s", what, interval, exc_info=True)
            await asyncio.sleep(interval or 60)  # 0: look again in a minute whether it was switched on

    def export_regressions(self) -> list[dict]:
        """The store's latest firmware findings on the ``ray_podpulse_firmware_regression`` gauge."""
        findings = regressions.recorded(self.readers)
        metrics.firmware_regressions(findings)
        return findings

    def export_drift(self) -> dict | None:
        """The served battery-anomaly version's feature drift (:func:`podpulse.drift.served_drift`: PSI
        per feature of its newest days against its training window), set on the drift gauge; None when
        no version is registered."""
        if self.config.model_path:
            meta = battery_model.metadata(self.config.model_path)
        else:
            entry = latest(self.readers, "battery-anomaly")
            if entry is None:
                return None
            meta = entry["metadata"]
        report = served_drift(self.readers, meta)
        metrics.feature_drift("battery-anomaly", meta["version"], report["features"])
        return report | {"version": meta["version"]}

    @staticmethod
    def _load_configured(settings: UserConfig) -> tuple:
        def load(key: str, path: str):
            try:
                return battery_model.load(path)
            except Exception as e:
                raise RuntimeError(f"user_config {key} {path!r} could not be loaded as a battery-anomaly "
                                   f"version: {type(e).__name__}: {e}") from e

        stable = load("model_path", settings.model_path) if settings.model_path else None
        canary = (load("canary_model_path", settings.canary_model_path)
                  if settings.canary_model_path and settings.canary_percent > 0 else None)
        return stable, canary

    def check_health(self) -> None:
        """Serve's periodic health check (``health_check_period_s``): raising marks the replica
        unhealthy and Serve replaces it. Unhealthy only when the replica cannot serve what its
        ``user_config`` asks: a model it names failed to load (:meth:`reconfigure`).

        Not unhealthy, because a new replica would fare no better and would drop what works
        meanwhile (ingest, analytics, scoring from the model in memory): the store or the
        model registry unreadable, Kafka unreachable, no model registered yet. The requests
        that need those answer 503 with the reason, and the replica tries again per request.
        Cheap on purpose: no I/O, it runs every period on the replica's event loop."""
        if self.failure is not None:
            raise RuntimeError(f"this replica cannot serve its user_config: {self.failure}")

    def registered(self, name: str, required: bool = True) -> dict | None:
        """The latest version of ``name`` in ``model_versions`` (:func:`podpulse.registry.latest`);
        503 when the registry cannot be read, and when none is registered (None if not ``required``)."""
        try:
            entry = latest(self.readers, name)
        except Exception as e:  # any driver's error
            log.warning("cannot read the model registry (model_versions) for %s", name, exc_info=True)
            raise HTTPException(status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)},
                                detail=f"the model registry (model_versions) cannot be read "
                                       f"({type(e).__name__}; the replica's log has the cause)") from None
        if entry is None and required:
            raise HTTPException(status_code=503, detail=f"no {name} model in the registry (model_versions "
                                                        f"has none; train one: podpulse train --model {name})")
        return entry

    def _load_registered(self):
        """The latest registered battery-anomaly version, loaded (in a thread: store, disk, TensorFlow)."""
        entry = self.registered("battery-anomaly")
        try:
            model = battery_model.load(entry["path"])
        except Exception as e:
            log.warning("cannot load battery-anomaly %s from %s", entry["version"], entry["path"], exc_info=True)
            raise HTTPException(status_code=503, detail=f"battery-anomaly {entry['version']}, the registry's latest, "
                                                        f"cannot be loaded from {entry['path']}: {e}") from None
        serving(model, self.readers, self.config.min_k)
        return model

    async def battery_model(self):
        """The stable version: ``model_path``'s, else the registry's latest (looked up on first need)."""
        if self.model is not None:
            return self.model
        if self.failure is not None:
            raise HTTPException(status_code=503, detail=self.failure)
        generation = self.generation
        model = await asyncio.to_thread(self._load_registered)
        if generation == self.generation and self.model is None:
            self.model = model
        return model

    def privacy_floor(self, k: int | None) -> int:
        """The k an analytics request runs with: its own, never below ``min_k`` (422 naming ``k``)."""
        floor = self.config.min_k
        if k is not None and k < floor:
            raise RequestValidationError([{
                "type": "greater_than_equal", "loc": ("query", "k"), "input": k, "ctx": {"ge": floor},
                "msg": f"Input should be greater than or equal to {floor} (the privacy floor, min_k)"}])
        return floor if k is None else k

    def pick(self) -> str:
        """Which version answers this request: the canary for ``canary_percent`` of them."""
        return "canary" if self.canary is not None and random.random() * 100 < self.config.canary_percent else "stable"

    # Defaults; reconfigure() sets both from user_config (score_batch_size, score_batch_wait_s).
    @serve.batch(max_batch_size=SCORE_BATCH_SIZE, batch_wait_timeout_s=SCORE_BATCH_WAIT_S)
    async def score(self, requests: list[tuple[str, list[dict]]]) -> list[dict]:
        """Concurrent requests' rows, scored in one model call per version."""
        out: list[dict] = [{}] * len(requests)
        stable = await self.battery_model()
        # A canary withdrawn between pick() and this batch: its requests go to the stable version.
        for arm, model in (("stable", stable), ("canary", self.canary or stable)):
            mine = [i for i, (a, _) in enumerate(requests) if a == arm]
            if not mine:
                continue
            scored = battery_model.score_rows(model, [r for i in mine for r in requests[i][1]])
            at = 0
            for i in mine:
                n = len(requests[i][1])
                out[i] = {"version": model.version, "scores": scored[at:at + n]}
                at += n
        return out

    @app.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/", include_in_schema=False)
    def console(self) -> Response:
        """The fleet console (``podpulse.web``): sign in with a token; the views live in the URL."""
        body, media = web.asset(None)
        return Response(body, media_type=media, headers={"Content-Security-Policy": web.CONTENT_SECURITY_POLICY,
                                                          "Cache-Control": "no-cache"})

    @app.get("/console/{name}", include_in_schema=False)
    def console_asset(self, name: str) -> Response:
        if name not in web.ASSETS:
            raise HTTPException(status_code=404, detail=f"no console file {name!r}")
        body, media = web.asset(name)
        return Response(body, media_type=media, headers={"Cache-Control": "max-age=3600",
                                                          "X-Content-Type-Options": "nosniff"})

    # A plain def: FastAPI runs it in a thread, so waiting for Kafka's acknowledgements
    # does not hold up the replica's event loop.
    @app.post("/v1/telemetry", status_code=202)
    def telemetry(self, body: TelemetryRequest) -> dict:
        """Validate with the event contract, produce the valid events to Kafka; 202 once Kafka
        acknowledged every one of them, else 503 with ``Retry-After`` and Kafka's reason."""
        if self.producer is None:
            raise HTTPException(status_code=503, detail="HTTP ingest is not configured (no Kafka topic)")
        values, unwritable = encoded(body.events)
        decoded = decode_batch(values)
        records = accepted_records(values, decoded)
        if records:
            try:
                deliver(self.producer, self.topic, records, DELIVERY_WAIT_S)
            except BrokerError as e:
                log.warning("POST /v1/telemetry: Kafka did not take %d messages: %s", len(records), e)
                raise HTTPException(status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)},
                                    detail=f"Kafka did not acknowledge the events; send the whole request "
                                           f"again later: {e}") from None
        return {"accepted": decoded.table.num_rows, "rejected": len(decoded.rejected),
                "reasons": [{"index": r.index, "reason": unwritable.get(r.index, r.reason)}
                            | ({} if r.sample is None else {"sample": r.sample}) for r in decoded.rejected]}

    @app.post("/v1/battery/score")
    async def battery_score(self, body: ScoreRequest) -> dict:
        started = time.perf_counter()
        scored = await self.score((self.pick(), [r.model_dump() for r in body.rows]))
        metrics.scoring_latency("/v1/battery/score", time.perf_counter() - started)
        return scored

    @app.get("/v1/devices/{device_id}/battery-health")
    async def battery_health(self, device_id: DeviceId,
                             days: Annotated[int, Query(ge=1, le=90)] = 7) -> dict:
        def read() -> list[dict]:  # in a thread: the query must not hold up the event loop
            with self.readers.reader() as r:
                return [dict(zip(battery_model.FEATURE_COLUMNS, row))
                        for row in r.rows(battery_model.device_days_sql(device_id, days))]

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

    @app.get("/v1/devices/{device_id}/timeline")
    async def timeline(self, device_id: DeviceId, start: Annotated[Day | None, Query(alias="from")] = None,
                       end: Annotated[Day | None, Query(alias="to")] = None) -> dict:
        """One device hour by hour (``podpulse.analytics.device_timeline``): AEST days ``from`` to ``to``,
        both included, at most 92 (default: its last 30 days of data)."""
        if start and end and end < start:
            raise HTTPException(status_code=422, detail=f"'to' ({end}) is before 'from' ({start})")

        def read() -> dict | None:  # in a thread: the queries must not hold up the event loop
            with self.readers.reader() as r:
                stop = end + timedelta(days=1) if end else None
                return analytics.device_timeline(r, device_id, start, stop or (start + timedelta(days=30)
                                                                                if start else None))

        try:
            found = await asyncio.to_thread(read)
        except ConfigError as e:
            raise HTTPException(status_code=422, detail=str(e)) from None
        if found is None:
            raise HTTPException(status_code=404, detail=f"no device {device_id!r} in the store")
        return found

    @app.delete("/v1/devices/{device_id}")
    async def erase_device(self, device_id: DeviceId) -> dict:
        """Erase the device (its id as stored) from every store, with a tombstone that keeps replays
        and backfills from bringing it back (``storage.router.erase_devices``); ``admin`` only. The
        replica opens the store for this one write and closes it: erasures are rare."""
        result = await asyncio.to_thread(erase_devices, self.storage, [device_id])
        log.warning("erased device %s (rows removed per backend: %s)", device_id, result["backends"])
        return result

    @app.get("/v1/forecast/usage")
    def forecast(self, region: Region):
        week, evaluation = self.week_ahead()
        state, cls = region.split("-")
        days = week.days(state, cls == "urban")
        if days is None:
            raise HTTPException(status_code=404, detail=f"no forecast for {region} (unknown, or fewer than "
                                                        f"{week.k} devices)")
        return {"region": region, "model_version": week.version,
                "days": [{"day": day, "listening_hours": hours} for day, hours in days],
                "evaluation": evaluation}

    def week_ahead(self) -> tuple:
        """The forecast the latest registered usage-forecast version publishes, and how that version
        did on its held-out week: the registry is asked per request (a new version is served at
        once), its metadata read once per version."""
        entry = self.registered("usage-forecast")
        key = (entry["version"], entry["path"])
        cached = self._forecast
        if cached is None or cached[0] != key:
            # how the version did on its held-out week, beside seasonal naive (podpulse train's figures)
            evaluation = {k: entry["metrics"].get(k) for k in ("mape", "baseline_mape", "baseline", "held_out")}
            try:
                cached = (key, forecast_model.week_ahead(entry["path"]), evaluation)
            except Exception as e:
                log.warning("cannot read usage-forecast %s at %s", *key, exc_info=True)
                raise HTTPException(status_code=503, detail=f"usage-forecast {entry['version']}, the registry's "
                                                            f"latest, cannot be read: {e}") from None
            self._forecast = cached
        return cached[1], cached[2]

    @app.get("/v1/anomalies/regions")
    def anomalies_by_region(self) -> dict:
        """Per region of at least ``min_k`` devices: the devices the latest battery-anomaly version
        flagged, and their share (what the ``ray_podpulse_anomalous_devices`` gauge counts)."""
        entry, k = self.registered("battery-anomaly", required=False), self.config.min_k
        if entry is None:
            return {"model_version": None, "k": k, "regions": [],
                    "note": "no battery-anomaly model is registered: nothing is flagged yet"}
        return {"model_version": entry["version"], "k": k,
                "regions": flagged_share_by_region(self.readers, entry["version"], k)}

    @app.get("/v1/segments")
    def segments(self) -> dict:
        """The latest listening-segments version: its segments (names, shares, cancelling share per
        ambient band), segment shares per region (regions of at least k devices) and its evaluation."""
        entry = self.registered("listening-segments", required=False)
        if entry is None:
            return {"version": None, "segments": [], "by_region": [],
                    "note": "no listening-segments model is registered: podpulse train --model listening-segments"}
        meta = entry["metadata"]
        return {"version": entry["version"], **meta.get("summary", {}), "evaluation": entry["metrics"],
                "data_window": meta.get("data_window")}

    @app.get("/v1/firmware/regressions")
    def firmware_regressions(self) -> dict:
        """The latest ``podpulse detect`` run's comparisons of each firmware version with the one before
        it on a model (:mod:`podpulse.regressions`), regressions first. Counts and effects only."""
        findings = regressions.recorded(self.readers)
        return {"detected_at": findings[0]["detected_at"] if findings else None, "findings": findings,
                **({} if findings else {"note": "no findings: run podpulse detect on the store"})}

    @app.get("/v1/cohorts")
    def list_cohorts(self) -> dict:
        """The saved cohorts, oldest first: each name, its fields and its label."""
        found = cohorts.saved(self.readers)
        return {"cohorts": [{"name": n, "cohort": c.as_dict(), "label": c.label()} for n, c in found.items()]}

    @app.post("/v1/cohorts", status_code=201)
    def save_cohort(self, body: CohortRequest) -> dict:
        """Save a cohort under a new name (409 when the name is taken); then ``?cohort=NAME`` on every
        analytics query. The replica opens the store for this one write."""
        try:
            cohort = Cohort.parse(body.cohort)
        except ConfigError as e:
            raise refusal("body", e) from None
        try:
            cohorts.save(self.storage, body.name, cohort)
        except ConfigError as e:
            if "saved already" in str(e):
                raise HTTPException(status_code=409, detail=str(e)) from None
            raise refusal("body", e) from None
        return {"name": body.name, "cohort": cohort.as_dict(), "label": cohort.label()}

    @app.get("/v1/analytics/{query}")
    def analytics(self, request: Request, query: str, start: Annotated[Day | None, Query(alias="from")] = None,
                  end: Annotated[Day | None, Query(alias="to")] = None,
                  k: Annotated[int | None, Query(ge=1, le=MAX_K)] = None,
                  model: CohortText = None, firmware: CohortText = None, host_device: CohortText = None,
                  state: Annotated[str | None, Query(description="a state's code, e.g. QLD")] = None,
                  urban: Annotated[bool | None, Query(description="true: urban devices, false: rural")] = None,
                  schema_version: Annotated[int | None, Query(ge=1, le=99)] = None,
                  first_seen_from: Day | None = None, first_seen_to: Day | None = None,
                  saved_name: Annotated[str | None, Query(alias="cohort", description="a saved cohort's name "
                                                          "(GET /v1/cohorts), instead of the fields")] = None) -> dict:
        """Days from ``from`` to ``to`` (both included, 2000-01-01..2100-12-31; default: what the
        store covers); cells under ``k`` devices suppressed. ``k`` defaults to the privacy floor
        ``min_k`` (user_config) and may raise it, never lower it: a lower ``k`` is a 422 naming ``k``.
        The cohort fields (``model`` ... ``first_seen_to``, ``podpulse.cohort``) narrow the devices
        counted, by what each device last reported; every cell still needs ``k`` devices.
        Device ids (battery_health's outliers) only for a token with ``read:devices``."""
        k = self.privacy_floor(k)
        if query not in analytics.QUERIES:
            raise HTTPException(status_code=404, detail=f"no query {query!r}; try {', '.join(analytics.QUERIES)}")
        try:
            cohort = Cohort(model=model, firmware=firmware, host_device=host_device, state=state, urban=urban,
                            schema_version=schema_version, first_seen_from=first_seen_from,
                            first_seen_to=first_seen_to)
            if saved_name is not None:
                if cohort:
                    raise ConfigError("cohort: give a saved cohort's name or the cohort's fields, not both")
                cohort = cohorts.named(self.readers, saved_name)
        except ConfigError as e:
            raise refusal("query", e) from None
        with self.readers.reader() as r:
            covered = analytics.data_range(r)
            if covered is None:
                raise HTTPException(status_code=404, detail="the store holds no rollups yet")
            first = start or covered[0]
            stop = end + timedelta(days=1) if end else covered[1]
            result = analytics.QUERIES[query](r, first, stop, k, cohort).as_dict()
        result["range"] = {"from": first.isoformat(), "to": (stop - timedelta(days=1)).isoformat()}
        result["cohort"] = cohort.as_dict() | {"label": cohort.label()}
        if "outliers" in result["extra"] and not allows(request.state.scopes, "read:devices"):
            result["extra"]["outliers"] = []
            result["notes"].append("device ids (outliers) need a token with the read:devices scope")
        return result


def build(storage: dict | None = None, bootstrap: str | None = None, topic: str | None = None,
          registry: str = "podpulse-data/models", model_path: str | None = None, env: dict | None = None,
          canary_model_path: str | None = None, canary_percent: float = 0, score_batch_size: int | None = None,
          score_batch_wait_s: float | None = None, max_body_bytes: int | None = None, docs: bool | None = None,
          min_k: int | None = None, drift_interval_s: float | None = None):
    """The application graph, for ``serve.run`` and ``podpulse serve``.

    ``env``: environment variables for the API replicas (``PODPULSE_API_TOKEN``),
    when they should not come from the nodes' own environment. The user_config keys
    (:func:`parse_user_config`; batch settings and guards None: the defaults) are checked
    here, so a bad value is refused before anything is deployed.
    """
    user_config = {"model_path": model_path, "canary_model_path": canary_model_path, "canary_percent": canary_percent}
    optional = {"score_batch_size": score_batch_size, "score_batch_wait_s": score_batch_wait_s,
                "max_body_bytes": max_body_bytes, "docs": docs, "min_k": min_k, "drift_interval_s": drift_interval_s}
    user_config |= {k: v for k, v in optional.items() if v is not None}
    parse_user_config(user_config)
    options = {"user_config": user_config}
    if env:
        options["ray_actor_options"] = {"num_cpus": 0.5, "runtime_env": {"env_vars": env}}
    return PodPulseAPI.options(**options).bind(storage, bootstrap, topic, registry)


def api(args: dict):
    """Application builder for ``serve run`` / ``serve deploy`` / a RayService (``import_path: deployments.app:api``)."""
    return build(**args)


def run_local(storage: dict, registry: str, token: str | None, *, host: str = "127.0.0.1", port: int = 8000,
              bootstrap: str | None = None, topic: str | None = None, model_path: str | None = None,
              name: str = "podpulse", docs: bool = True, tokens_file: str | None = None) -> str:
    """Start the application on the connected Ray (``podpulse serve``, the demo, the benchmark);
    returns its base URL. ``token``: an admin token; ``tokens_file``: scoped ones (deployments.tokens).
    A local server publishes its OpenAPI docs unless ``docs`` is False."""
    env = {k: v for k, v in (("PODPULSE_API_TOKEN", token), ("PODPULSE_API_TOKENS_FILE", tokens_file)) if v}
    serve.start(http_options={"host": host, "port": port})
    serve.run(build(storage, bootstrap, topic, registry, model_path, env=env, docs=docs), name=name, route_prefix="/")
    return f"http://{host}:{port}"
