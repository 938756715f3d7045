"""The router: which backend plays which role, and the order a batch is written in.

Today the only backend is the embedded DuckDB, playing both roles in one file.
The roles are separate so the Cassandra (time-series), PostgreSQL and Oracle
(relational) backends plug in by configuration.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from storage.base import CommitResult, RelationalStore, TimeSeriesStore

__all__ = ["StorageConfig", "Storage", "open_storage"]

DEFAULT_DUCKDB_PATH = "podpulse-data/podpulse.duckdb"


@dataclass(frozen=True, kw_only=True)
class StorageConfig:
    duckdb_path: str = DEFAULT_DUCKDB_PATH  # the embedded default, both roles


class Storage:
    """Writes a batch in the order that keeps it exactly-once.

    1. raw events to the time-series store (an idempotent upsert), unless the
       relational store holds them too;
    2. one relational transaction: skip offsets already stored, apply devices
       and rollups (plus raw events when it holds them), store the new offsets.

    Only after both return is the batch durable and may its offsets be committed
    to Kafka.
    """

    def __init__(self, timeseries: TimeSeriesStore, relational: RelationalStore):
        self.timeseries = timeseries
        self.relational = relational
        self._shared = timeseries is relational

    def setup(self) -> None:
        self.relational.setup()
        if not self._shared:
            self.timeseries.setup()

    def committed_offsets(self, topic: str) -> dict[int, int]:
        return self.relational.committed_offsets(topic)

    def commit(self, topic: str, events: pa.Table, next_offsets: dict[int, int]) -> CommitResult:
        if not self._shared and events.num_rows:
            self.timeseries.write_events(events)
        return self.relational.commit(topic, events, next_offsets, with_raw_events=self._shared)

    def close(self) -> None:
        self.relational.close()
        if not self._shared:
            self.timeseries.close()


def open_storage(config: StorageConfig) -> Storage:
    from storage.duckdb_store import DuckDBStore

    store = DuckDBStore(config.duckdb_path)
    return Storage(store, store)
