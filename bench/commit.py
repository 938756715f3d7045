"""The storage writer's commit path alone, one core: what the store costs per event, without Kafka or Ray.

The same simulated events are decoded once into batches (the consumer's work,
not timed), then committed as the StorageWriter commits them: raw events,
hourly rollups, device registry, firmware days and offsets in one transaction
per batch (``storage.commit``). Baseline, same run, into a second empty store:
only the raw events, as the time-series role writes them on its own
(``write_events``: one statement a batch, new ``(device_id, seq)`` only), the
floor of what storing the events at all costs there.

    podpulse bench commit --events 1000000 --batch-size 20000 [--storage-config FILE] --json
"""

from __future__ import annotations

import tempfile
import time

import numpy as np
import pyarrow as pa

from bench.ingest import bench_storage
from podpulse.contract import decode_batch
from storage.router import open_storage
from testbed.topics import first_events

TOPIC = "bench-commit"


def batches(events: int, batch_size: int, seed: int = 7) -> list[tuple[pa.Table, dict, dict]]:
    """Decoded batches of the first ``events`` simulated events, with offsets on partition 0."""
    values = [v for _, chunk, _ in first_events(events, seed=seed) for v in chunk]
    out = []
    for start in range(0, min(events, len(values)), batch_size):
        table = decode_batch(values[start:start + batch_size], window=None).table
        n = table.num_rows
        table = table.append_column("kafka_partition", pa.array(np.zeros(n, np.int32))).append_column(
            "kafka_offset", pa.array(np.arange(start, start + n, dtype=np.int64)))
        out.append((table, {0: start + n}, {0: start or None}))
    return out


def _timed(storage_file, work) -> float:
    with tempfile.TemporaryDirectory(prefix="podpulse-bench-") as tmp, bench_storage(storage_file, tmp) as config:
        storage = open_storage(config)
        try:
            storage.setup()
            started = time.perf_counter()
            work(storage)
            return time.perf_counter() - started
        finally:
            storage.close()


def run(events: int = 1_000_000, batch_size: int = 20_000, storage_file: str | None = None) -> dict:
    todo = batches(events, batch_size)
    total = sum(t.num_rows for t, _, _ in todo)

    def commit(storage) -> None:
        for table, next_offsets, start_offsets in todo:
            storage.commit(TOPIC, table, next_offsets, start_offsets)

    def insert_only(storage) -> None:
        for table, _, _ in todo:
            storage.timeseries.write_events(table)

    seconds = _timed(storage_file, commit)
    raw = _timed(storage_file, insert_only)
    return {"events": total, "batch_size": batch_size, "commits": len(todo),
            "events_per_s": round(total / seconds), "raw_insert_events_per_s": round(total / raw),
            "ratio": round(raw / seconds, 3), "store": "embedded DuckDB" if storage_file is None else str(storage_file)}
