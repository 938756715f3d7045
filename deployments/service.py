"""One replica of the Serve application: what its routes share (:class:`Service`), and how a route
reaches it (:data:`Api`, a dependency). The deployment (``deployments.app.PodPulseAPI``) is this
class with Serve's options and the FastAPI ingress."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Callable

# The module, not its Producer: serve.ingress cloudpickles the app, and Producer's __module__
# ('cimpl') cannot be imported by name, so cloudpickle would try to copy the class by value.
import confluent_kafka
from fastapi import Depends
from ray import serve

from analytics import battery_model
from deployments.lifecycle import Models, serving
from deployments.settings import (
    DELIVERY_TIMEOUT_S,
    READ_CONNECTIONS,
    READ_WAIT_S,
    SCORE_BATCH_SIZE,
    SCORE_BATCH_WAIT_S,
    UserConfig,
    parse_user_config,
)
from podpulse.kafka import producer_config
from storage.config import StorageConfig
from storage.ledger import Ledger
from storage.reader import ReaderPool

__all__ = ["Service", "Api", "current"]


class Service:
    """The replica's store (a bounded read pool), its Kafka producer for HTTP ingest, its models
    (:class:`deployments.lifecycle.Models`) and its scoring batches.

    ``user_config`` (``deployments.settings.UserConfig``, applied by :meth:`reconfigure`):
    ``model_path`` swaps the battery-anomaly model live (null: the latest version registered in
    ``model_versions``, looked up when a request first needs it); ``canary_model_path`` and
    ``canary_percent`` run a canary beside it; ``score_batch_size`` and ``score_batch_wait_s`` tune the
    scoring batches; the guards and the privacy floor.

    ``registry`` (the artefacts' directory) is kept for the callers that pass it (``podpulse serve``,
    the serve config, the RayService's volume): which versions exist and where each one's directory
    is, the ``model_versions`` table says.
    """

    def __init__(self, storage: dict | None = None, bootstrap: str | None = None, topic: str | None = None,
                 registry: str = "podpulse-data/models"):
        self.storage = StorageConfig(**storage) if storage else StorageConfig()
        self.readers = ReaderPool(self.storage, size=READ_CONNECTIONS, wait_s=READ_WAIT_S)
        self.registry = registry
        self.topic = topic
        self.models = Models(self.readers)
        self._ledger = None
        self._watch = None  # the drift and firmware gauges' schedule, started by the first reconfigure
        self.producer = None
        if bootstrap and topic:
            self.producer = confluent_kafka.Producer(producer_config(
                bootstrap, {"message.timeout.ms": int(DELIVERY_TIMEOUT_S * 1000)}))

    @property
    def ledger(self) -> Ledger:
        """The privacy ledger of the store (``storage.ledger``), opened at its first use."""
        if self._ledger is None:
            self._ledger = Ledger(self.storage)
        return self._ledger

    @property
    def config(self) -> UserConfig:
        """The replica's checked user_config."""
        return self.models.config

    async def reconfigure(self, config: dict) -> None:
        """Apply ``user_config``: checked whole first (a refused one changes nothing and raises
        ValueError naming the keys); then the models it names are loaded and swapped in with the batch
        settings at once. A model that cannot be loaded fails the reconfigure (Serve reports the update
        failed and replaces the replica)."""
        settings = parse_user_config(config)
        await self.models.apply(settings)
        self.score.set_max_batch_size(settings.score_batch_size)
        self.score.set_batch_wait_timeout_s(settings.score_batch_wait_s)
        if self.models.model is not None:
            await asyncio.to_thread(serving, self.models.model, self.readers, settings.min_k)
        if self._watch is None:  # Serve calls reconfigure first from the replica's event loop
            self._watch = asyncio.get_running_loop().create_task(
                self.models.watch(lambda: self.config.drift_interval_s))

    def check_health(self) -> None:
        """Serve's periodic health check (``health_check_period_s``): raising marks the replica
        unhealthy and Serve replaces it; only when it cannot serve its user_config (``Models.check``).
        Cheap on purpose: it runs every period on the replica's event loop."""
        self.models.check()

    async def read(self, query: Callable[..., Any], *args, kind: str = "rollups"):
        """``query(reader, *args)`` on one of the pool's readers, in a thread: a read never holds up the
        event loop. (A route that is a plain ``def`` runs in FastAPI's threads already.)"""
        def run():
            with self.readers.reader(kind) as reader:
                return query(reader, *args)
        return await asyncio.to_thread(run)

    # Defaults; reconfigure() sets both from user_config (score_batch_size, score_batch_wait_s).
    @serve.batch(max_batch_size=SCORE_BATCH_SIZE, batch_wait_timeout_s=SCORE_BATCH_WAIT_S)
    async def score(self, requests: list[tuple[str, list[dict]]]) -> list[dict]:
        """Concurrent requests' rows (each with the arm that answers it: ``Models.pick``), scored in one
        model call per version."""
        out: list[dict] = [{}] * len(requests)
        stable = await self.models.battery_model()
        # A canary withdrawn between pick() and this batch: its requests go to the stable version.
        for arm, model in (("stable", stable), ("canary", self.models.canary or stable)):
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


async def current() -> Service:
    """The replica serving this request (async: resolved on the event loop, no thread hop)."""
    return serve.get_replica_context().servable_object


Api = Annotated[Service, Depends(current)]
