"""The simulated messages the benchmarks feed: the first events of a week of a fleet sized to hold them.

    for keys, values, events in first_events(1_000_000, shape="upload"): ...
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from podpulse.simulator import Fleet, FleetSpec, simulate

__all__ = ["EVENTS_PER_DEVICE_DAY", "first_events"]

EVENTS_PER_DEVICE_DAY = 35  # what the simulator emits, on average over a week


def first_events(events: int, shape: str = "event", seed: int = 7) -> Iterator[tuple[list, list, np.ndarray]]:
    """The messages holding the first ``events`` events of a simulated week (for uploads: the whole uploads
    that reach ``events``), chunk by chunk: their keys, their values, and the events in each. The fleet has
    a device per ``EVENTS_PER_DEVICE_DAY`` events (at least 100), no faults: every event valid, each a
    distinct ``(device_id, seq)``. Raises ``RuntimeError`` if the week holds fewer."""
    spec = FleetSpec(devices=max(100, events // EVENTS_PER_DEVICE_DAY), hours=24 * 7, seed=seed, fault_share=0.0,
                     shape=shape)
    total = 0
    for chunk in simulate(spec, Fleet.build(spec)):
        per = np.ones(len(chunk.values), np.int64) if chunk.samples is None else np.asarray(chunk.samples)
        take = int(np.searchsorted(np.cumsum(per), events - total)) + 1  # the message that reaches `events`
        yield chunk.keys[:take], chunk.values[:take], per[:take]
        total += int(per[:take].sum())
        if total >= events:
            return
    raise RuntimeError(f"the simulated week holds {total} events, fewer than {events}")
