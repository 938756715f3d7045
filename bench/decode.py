"""The event contract's decoder, one core: events/s for each message shape.

The same simulated samples are decoded as single events and as 50-sample device
uploads, in 20,000-event batches (the pipeline's default), by ``decode_batch``
(parse, validate, upcast, enrich into one Arrow table). Baseline, same run:
msgspec parsing the same bytes into plain Python objects with no checks, the
floor of what reading the JSON costs.

    podpulse bench decode --events 1000000 --json
"""

from __future__ import annotations

import time

import msgspec

from podpulse.contract import decode_batch
from testbed.topics import first_events

BATCH_EVENTS = 20_000


def _messages(shape: str, events: int, seed: int) -> tuple[list[list[bytes]], int]:
    """The first ``events`` samples of a week-long fleet, as batches of about BATCH_EVENTS events."""
    batches, batch, in_batch, total = [], [], 0, 0
    for _, values, sizes in first_events(events, shape, seed):
        for value, size in zip(values, sizes.tolist()):
            batch.append(value)
            in_batch += size
            total += size
            if in_batch >= BATCH_EVENTS:
                batches.append(batch)
                batch, in_batch = [], 0
    if batch:
        batches.append(batch)
    return batches, total


def _seconds(batches: list[list[bytes]], decode) -> float:
    started = time.perf_counter()
    for batch in batches:
        decode(batch)
    return time.perf_counter() - started


def run(events: int = 1_000_000, seed: int = 7) -> dict:
    out = {}
    for shape in ("event", "upload"):
        batches, total = _messages(shape, events, seed)
        rows = []
        decoded = _seconds(batches, lambda b: rows.append(decode_batch(b, window=None).table.num_rows))
        raw = _seconds(batches, lambda b: list(map(msgspec.json.decode, b)))
        out[shape] = {"events": total, "rows": sum(rows), "messages": sum(map(len, batches)),
                      "events_per_s": round(total / decoded),
                      "raw_parse_events_per_s": round(total / raw), "ratio": round(raw / decoded, 3)}
    return out
