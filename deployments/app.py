"""The PodPulse Ray Serve application: HTTP ingest, battery scoring, forecasts, analytics, the console.

    serve run deployments/serve-config.yaml        # or: podpulse serve

One deployment (:class:`PodPulseAPI`) behind a FastAPI ingress built from one router per concern
(``deployments.routes``). Every route declares its scope (``deployments.guard``): the token is
checked from the headers before any of the body is read (401, or 403 naming the scope), and the
body is bounded while it is read (``max_body_bytes``: 413). ``/docs``, ``/redoc`` and
``/openapi.json`` are off unless ``docs`` is set. A malformed request gets 422 naming the field;
no input gets a 5xx (``deployments.errors``). The replica's state and its scoring batches are
``deployments.service``; its models, canary and drift ``deployments.lifecycle``; ``user_config``
``deployments.settings``.

The deployments are thin: the logic is ``analytics``, ``podpulse.contract`` and ``podpulse.kafka``.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time
from pathlib import Path

from fastapi import FastAPI
from ray import serve

from deployments import errors
from deployments.guard import Guard, declared_scopes
from deployments.routes import ROUTERS
from deployments.service import Service
from deployments.settings import MAX_ONGOING_REQUESTS, parse_user_config
from deployments.tokens import write_token_file
from podpulse.errors import ConfigError
from podpulse.runtime import init_ray
from storage.config import StorageConfig

__all__ = ["app", "api", "build", "run_local", "serve_from_environment", "serve_until_interrupted", "PodPulseAPI"]

app = FastAPI(title="PodPulse", description="AirPods Pro fleet telemetry: ingest, scoring, forecasts, analytics.",
              version="0.1.0")
for router in ROUTERS:
    app.include_router(router)
declared_scopes(app.routes)  # a route without a declared scope stops the application here
errors.install(app)
app.add_middleware(Guard)


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
class PodPulseAPI(Service):
    """The whole HTTP API in one deployment: scoring in-process saves a replica hop per request."""


def build(storage: dict | None = None, bootstrap: str | None = None, topic: str | None = None,
          registry: str = "podpulse-data/models", model_path: str | None = None, env: dict | None = None,
          canary_model_path: str | None = None, canary_percent: float = 0, score_batch_size: int | None = None,
          score_batch_wait_s: float | None = None, max_body_bytes: int | None = None, docs: bool | None = None,
          min_k: int | None = None, drift_interval_s: float | None = None):
    """The application graph, for ``serve.run`` and ``podpulse serve``.

    ``env``: environment variables for the API replicas (``PODPULSE_API_TOKEN``),
    when they should not come from the nodes' own environment. The user_config keys
    (``deployments.settings.parse_user_config``; batch settings and guards None: the defaults) are
    checked here, so a bad value is refused before anything is deployed.
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
              name: str = "podpulse", docs: bool = True, tokens_file: str | None = None,
              token_file: Path | None = None) -> str:
    """Start the application on the connected Ray (``podpulse serve``, the demo, the benchmark);
    returns its base URL. ``token``: an admin token; ``tokens_file``: scoped ones (deployments.tokens).
    A local server publishes its OpenAPI docs unless ``docs`` is False.

    The token reaches the replicas as a file (``token_file``, else one in a private temporary folder,
    removed at exit) named by ``$PODPULSE_API_TOKEN_FILE``: a ``runtime_env``'s variables are written to
    Ray's logs, which every user of the machine may read."""
    env = {"PODPULSE_API_TOKENS_FILE": tokens_file} if tokens_file else {}
    if token:
        if token_file is None:
            folder = Path(tempfile.mkdtemp(prefix="podpulse-api-"))  # 0700
            atexit.register(shutil.rmtree, folder, True)
            token_file = folder / "token"
        env["PODPULSE_API_TOKEN_FILE"] = str(write_token_file(token, Path(token_file)).resolve())
    serve.start(http_options={"host": host, "port": port})
    serve.run(build(storage, bootstrap, topic, registry, model_path, env=env, docs=docs), name=name, route_prefix="/")
    return f"http://{host}:{port}"


def serve_from_environment(storage: StorageConfig, registry: Path, *, host: str = "127.0.0.1", port: int = 8000,
                           bootstrap: str | None = None, topic: str | None = None) -> str:
    """``podpulse serve``: the application on the cluster of ``RAY_ADDRESS``, else on a local Ray, with
    the tokens of this process's environment (``$PODPULSE_API_TOKEN``, ``$PODPULSE_API_TOKENS_FILE``);
    returns its base URL. A ConfigError when neither is set: every route but the open ones needs a token."""
    token, tokens_file = os.environ.get("PODPULSE_API_TOKEN"), os.environ.get("PODPULSE_API_TOKENS_FILE")
    if not (token or tokens_file):
        raise ConfigError("set PODPULSE_API_TOKENS_FILE or PODPULSE_API_TOKEN: every endpoint but /healthz "
                          "requires a bearer token")
    init_ray()
    return run_local(storage.as_dict(), str(Path(registry).resolve()), token, host=host, port=port,
                     bootstrap=bootstrap, topic=topic,
                     tokens_file=str(Path(tokens_file).resolve()) if tokens_file else None)


def serve_until_interrupted() -> None:
    """Keep this process (and the Serve application it started) alive until Ctrl-C, then shut Serve down."""
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        serve.shutdown()
