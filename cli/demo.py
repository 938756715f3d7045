"""The main job on one machine, as a function: embedded broker → simulate → ingest → report → models → Serve.

:func:`run_demo` does the work and tells a :class:`DemoProgress` how it goes;
``podpulse demo`` renders that with progress bars and prints the summary this
returns (or, with ``--json``, prints the summary alone).

The embedded broker is memory-only, so with the embedded store the DuckDB file
is recreated on every run. With a storage configuration the store is kept:
each run then simulates new devices (a new seed) into a new topic, so runs add
up instead of colliding.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import requests

from actors.config import IngestConfig
from analytics.queries import report_for
from analytics.report_html import write_html
from analytics.summary import store_summary
from jobs.ingest import run_ingest
from jobs.train import train_battery_anomaly, train_usage_forecast
from podpulse.broker import EmbeddedBroker
from podpulse.dead_letters import read_dead_letters
from podpulse.errors import ConfigError
from podpulse.simulator import Fleet, FleetSpec, Summary, simulate
from podpulse.sink import open_sink
from storage.config import StorageConfig

__all__ = ["DemoOptions", "DemoProgress", "run_demo"]


@dataclass(frozen=True, kw_only=True)
class DemoOptions:
    devices: int = 2000
    hours: float = 24.0 * 29  # the usage forecast needs 28 complete days
    partitions: int = 8
    malformed: float = 0.002  # share of corrupted records
    db: Path = Path("podpulse-data/demo.duckdb")
    storage_file: Path | None = None  # a storage configuration instead of the embedded DuckDB
    seed: int | None = None  # default 7; with a storage configuration, a new one per run
    models: bool = True  # train both models and start Ray Serve on them
    port: int = 8000

    def place(self) -> Path:
        """Where the demo's report, models and log go: beside the embedded store, else podpulse-data."""
        return self.db.resolve().parent if self.storage_file is None else Path("podpulse-data")


class DemoProgress(Protocol):
    def step(self, text: str) -> None:
        """A stage begins or ends: one line for the reader."""

    def simulated(self, intervals: int, of: int, events: int) -> None:
        """The simulator reached interval ``intervals`` of ``of``."""

    def ingesting(self, status: dict) -> None:
        """The supervisor's status (lag, restarts), about once a second."""


def run_demo(opts: DemoOptions, progress: DemoProgress) -> dict:
    """Run the demo; returns its summary (stored events, dead letters, report, models, Serve)."""
    storage = StorageConfig.load(opts.storage_file) if opts.storage_file else StorageConfig.embedded(opts.db.resolve())
    if opts.storage_file is None:
        for stale in (opts.db.resolve(), opts.db.resolve().with_name(opts.db.name + ".wal")):
            stale.unlink(missing_ok=True)
    seed = opts.seed if opts.seed is not None else (7 if opts.storage_file is None else int(time.time()))
    topic = "podpulse.telemetry" if opts.storage_file is None else f"podpulse.telemetry.{seed}"
    spec = FleetSpec(devices=opts.devices, hours=opts.hours, malformed_rate=opts.malformed, seed=seed)
    fleet = Fleet.build(spec)
    simulated = Summary(fleet)
    with EmbeddedBroker() as broker:
        progress.step(f"embedded broker on {broker.bootstrap} (memory-only)")
        broker.create_topic(topic, opts.partitions)
        with open_sink(f"kafka://{broker.bootstrap}/{topic}") as sink:
            for chunk in simulate(spec, fleet):
                sink.write(chunk)
                simulated.add(chunk)
                progress.simulated(chunk.step + 1, spec.steps, simulated.events)
        config = IngestConfig(bootstrap=broker.bootstrap, topic=topic, storage=storage)
        result = run_ingest(config, until_caught_up=True, on_status=progress.ingesting)
        letters = read_dead_letters(broker.bootstrap, config.dead_letter_topic)
    place = opts.place()
    summary = store_summary(storage) | {
        "events_produced": simulated.events, "malformed_injected": simulated.malformed,
        "dead_lettered": len({(d["partition"], d["offset"]) for d in letters}),
        "first_dead_letter": letters[0]["reason"] if letters else None,
        "ingested": result["writer"]["applied"], "seed": seed, "failures": result.get("failures", {}),
        "consumers": result["consumers"], "partitions": result["partitions"],
        "store": str(opts.storage_file) if opts.storage_file else str(opts.db.resolve()),
        "report": str(write_html(report_for(storage), place / "report"))}
    if opts.models:
        truth = storage.pseudonyms().keys({t["device_id"]: t["fault"] for t in fleet.truth()})
        summary |= _models(storage, place / "models", truth, opts.port, progress)
    return summary


def _models(storage: StorageConfig, registry: Path, truth: dict[str, str], port: int,
            progress: DemoProgress) -> dict:
    """Train both models on the demo store, serve them, ask the API about the worst device."""
    from deployments.app import run_local  # lazy: Serve and FastAPI take 2 s to import; --no-models never needs them

    progress.step("training the battery anomaly model (Ray Data reads the rollups) ...")
    battery = train_battery_anomaly(storage, registry=registry, truth=truth)
    progress.step(f"battery-anomaly {battery['version']}: ROC AUC {battery['auc']:.3f} against the injected "
                  f"faults (IsolationForest {battery['baseline_auc']:.3f})" if battery["auc"] is not None else
                  f"battery-anomaly {battery['version']}: no injected faults to score against")
    try:
        forecast = train_usage_forecast(storage, registry=registry)
        progress.step(f"usage-forecast {forecast['version']}: MAPE {forecast['mape']:.1f}% on the held-out "
                      f"week (seasonal naive {forecast['baseline_mape']:.1f}%)")
    except ConfigError as e:  # a short demo fleet: say why, keep going
        forecast = {"skipped": str(e)}
        progress.step(f"usage-forecast skipped: {e}")
    token = os.environ.get("PODPULSE_API_TOKEN") or secrets.token_urlsafe(32)
    kept = registry.parent / "api-token"  # 0600: the token is never printed, nor passed in Ray's logs
    url = run_local(storage.as_dict(), str(registry), token, port=port, token_file=kept)
    shown = "$PODPULSE_API_TOKEN" if "PODPULSE_API_TOKEN" in os.environ else f'"$(cat {kept.resolve()})"'
    worst = battery["most_anomalous"][0]["device_id"]
    health = requests.get(f"{url}/v1/devices/{worst}/battery-health",
                          headers={"Authorization": f"Bearer {token}"}, timeout=60)
    health.raise_for_status()
    return {"battery_anomaly": battery, "usage_forecast": forecast,
            "serve": {"url": url, "console": f"{url}/", "docs": f"{url}/docs", "token_shown": shown, "worst_device": worst,
                      "checked": health.json()}}
