"""Simulating a fleet into Kafka or a JSON-lines file, with the ground truth of its injected faults."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from podpulse.errors import ConfigError
from podpulse.simulator import Fleet, FleetSpec, Summary, simulate
from podpulse.sink import open_sink

__all__ = ["fleet_spec", "simulate_to"]


def fleet_spec(**options) -> FleetSpec:
    """:class:`FleetSpec` of ``options``; a ConfigError naming what is wrong."""
    try:
        return FleetSpec(**options)
    except ValueError as e:
        raise ConfigError(f"--fault-mix: {e}" if "fault mix" in str(e) else str(e)) from None


def simulate_to(to: str, spec: FleetSpec, *, partitions: int = 8, kafka: dict | None = None,
                truth: Path | None = None, progress: Callable[[int, int], None] = lambda step, events: None) -> dict:
    """Simulate ``spec`` into ``to`` (``kafka://HOST:PORT/TOPIC``, the topic made with ``partitions`` if
    missing, or a ``FILE.jsonl``); write the injected faults as JSON to ``truth`` (default: beside a
    file output). ``progress(intervals done, events so far)`` after each interval. Returns the
    summary: devices and events by state, class and schema, malformed records, faulty devices."""
    fleet = Fleet.build(spec)
    summary = Summary(fleet)
    with open_sink(to, partitions, kafka) as sink:
        for chunk in simulate(spec, fleet):
            sink.write(chunk)
            summary.add(chunk)
            progress(chunk.step + 1, summary.events)
    truth_path = truth or (sink.path.with_suffix(".truth.json") if sink.path else None)
    if truth_path:
        truth_path.write_text(json.dumps(fleet.truth(), indent=1))
    return summary.as_dict() | {"to": to, "truth": str(truth_path) if truth_path else None}
