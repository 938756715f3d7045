"""Simulator throughput: events generated and JSON-encoded per second on one core.

Baseline, same run: JSON-encoding the same number of ready-made events alone,
the floor of what producing one message costs in Python.

    podpulse bench simulate --devices 10000 --hours 24 --json
"""

from __future__ import annotations

import time

import msgspec

from podpulse.contract import Event, encoder
from podpulse.simulator import Fleet, FleetSpec, simulate


def run(devices: int = 10_000, hours: float = 24.0, seed: int = 7) -> dict:
    spec = FleetSpec(devices=devices, hours=hours, seed=seed)
    started = time.perf_counter()
    fleet = Fleet.build(spec)
    events = sum(len(chunk.values) for chunk in simulate(spec, fleet))
    elapsed = time.perf_counter() - started

    sample = next(c for c in simulate(spec, fleet) if c.values).values[0]
    ready = [Event(**_fields(sample))] * events
    started = time.perf_counter()
    for e in ready:
        encoder.encode(e)
    encode_elapsed = time.perf_counter() - started
    return {
        "devices": devices,
        "hours": hours,
        "events": events,
        "seconds": round(elapsed, 3),
        "events_per_s": round(events / elapsed),
        "encode_only_events_per_s": round(events / encode_elapsed),
    }


def _fields(value: bytes) -> dict:
    return msgspec.json.decode(value)
