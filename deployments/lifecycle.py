"""The models a replica serves, through their lifecycle: loaded from ``user_config`` or the registry,
a canary beside the stable version, swapped live, and watched (feature drift, firmware findings).

The registry's source of truth is the ``model_versions`` table (``analytics.registry.latest``); what a
version's files mean is its model module's business (``analytics.battery_model.load``,
``analytics.forecast_model.week_ahead``). A new version is picked up without downtime by changing the
deployment's ``user_config`` (``model_path``), which Serve applies with ``reconfigure`` on the running
replicas (:meth:`Models.apply`).
"""

from __future__ import annotations

import asyncio
import random
from typing import Callable

from fastapi import HTTPException

from analytics import battery_model, forecast_model, regressions
from analytics.registry import flagged_devices_by_region, latest
from deployments.errors import log
from deployments.settings import RETRY_AFTER_S, UserConfig
from jobs.drift import served_drift
from podpulse import metrics
from podpulse.privacy import MIN_K

__all__ = ["Models", "serving"]


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


def _load(key: str, path: str):
    try:
        return battery_model.load(path)
    except Exception as e:
        raise RuntimeError(f"user_config {key} {path!r} could not be loaded as a battery-anomaly "
                           f"version: {type(e).__name__}: {e}") from e


class Models:
    """One replica's models: the stable battery-anomaly version, its canary, the latest usage forecast.

    ``readers``: the replica's read pool (the registry, the flagged counts, drift's recent days).
    """

    def __init__(self, readers):
        self.readers = readers
        self.config = UserConfig()
        self.model = self.canary = None
        self.failure: str | None = None  # why the models user_config names could not be loaded
        self.generation = 0  # counts reconfigures: a registry lookup begun before one does not apply after it
        self._forecast = None  # ((version, path), WeekAhead, evaluation) of the latest usage-forecast, read once per version

    async def apply(self, settings: UserConfig) -> None:
        """Load the models ``settings`` names, off the event loop, then swap them in with ``settings``
        in one step (no await between: a request never sees half of it; the caller applies the batch
        settings before it awaits anything). A model that cannot be loaded raises and leaves the
        replica without models, unhealthy (:meth:`check`): it must not go on answering with the
        version it was told to replace."""
        self.generation += 1
        try:
            stable, canary = await asyncio.to_thread(self._load_configured, settings)
        except Exception as e:
            self.config, self.model, self.canary, self.failure = settings, None, None, str(e)
            log.error("reconfigure: %s", e)
            raise
        self.config, self.model, self.canary, self.failure = settings, stable, canary, None

    @staticmethod
    def _load_configured(settings: UserConfig) -> tuple:
        stable = _load("model_path", settings.model_path) if settings.model_path else None
        canary = (_load("canary_model_path", settings.canary_model_path)
                  if settings.canary_model_path and settings.canary_percent > 0 else None)
        return stable, canary

    def check(self) -> None:
        """Raise when this replica cannot serve what its ``user_config`` asks: a model it names failed to
        load. Not when the store or the registry is unreadable, Kafka unreachable or no model registered
        yet: a new replica would fare no better, and the requests that need those answer 503 with the
        reason. Cheap on purpose: no I/O."""
        if self.failure is not None:
            raise RuntimeError(f"this replica cannot serve its user_config: {self.failure}")

    def registered(self, name: str, required: bool = True) -> dict | None:
        """The latest version of ``name`` in ``model_versions`` (:func:`analytics.registry.latest`);
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

    def pick(self) -> str:
        """Which version answers this request: the canary for ``canary_percent`` of them."""
        return "canary" if self.canary is not None and random.random() * 100 < self.config.canary_percent else "stable"

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

    def export_regressions(self) -> list[dict]:
        """The store's latest firmware findings on the ``ray_podpulse_firmware_regression`` gauge."""
        findings = regressions.recorded(self.readers)
        metrics.firmware_regressions(findings)
        return findings

    def export_drift(self) -> dict | None:
        """The served battery-anomaly version's feature drift (:func:`jobs.drift.served_drift`: PSI
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

    async def watch(self, interval: Callable[[], float]) -> None:
        """Every ``interval()`` seconds (the first at once), off the event loop: :meth:`export_drift` and
        the latest firmware findings' gauge. A failure is logged and tried again at the next interval:
        the gauges are worth less than serving. 0: look again in a minute whether it was switched on."""
        while True:
            every = interval()
            if every > 0:
                for what, export in (("feature drift of the served battery-anomaly version", self.export_drift),
                                     ("firmware regressions", self.export_regressions)):
                    try:
                        await asyncio.to_thread(export)
                    except Exception:  # any driver's error, a version without a window, too little data
                        log.warning("%s not exported; trying again in %g s", what, every, exc_info=True)
            await asyncio.sleep(every or 60)
