"""The router: which backend keeps which kind of record, and the order a batch is written in.

Configuration is a small YAML file (the AirPodsDataStream custom resource will
carry the same structure)::

    backends:
      core: {type: postgresql, url: "postgresql://podpulse@db:5432/podpulse", password_env: PG_PASSWORD}
      raw:  {type: cassandra, hosts: [cass-1, cass-2], keyspace: podpulse, consistency: LOCAL_QUORUM}
    routes:
      raw_events: raw
      devices: core
      rollups: core
      offsets: core
      anomalies: core

Backend types: ``duckdb`` (``path``), ``postgresql`` and ``oracle`` (``url`` without
a password; ``password_env`` or ``password_file``; Oracle also ``inmemory``,
``memcompress``, ``priority``, ``interval_days``) and ``cassandra`` (raw events
only; see ``storage.cassandra_store.CassandraSettings``). Devices, rollups and
offsets must share one relational backend: they are written in one transaction.
Credentials never sit in the file itself. An optional ``retention`` maps
``raw_events``, ``rollups`` and ``anomalies`` to days kept (``storage.retention``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import pyarrow as pa
import pyarrow.compute as pc

from podpulse.config import DEFAULT_DUCKDB_PATH, KINDS, StorageConfig
from storage.base import CommitResult, RelationalStore, StorageError, TimeSeriesStore
from storage.cassandra_store import CassandraSettings, CassandraStore
from storage.duckdb_store import DuckDBStore
from storage.oracle_store import OracleStore
from storage.postgres_store import PostgresStore
from storage.rollups import drop_replayed, first_sightings
from storage.schema import OracleOptions

__all__ = ["StorageConfig", "Storage", "open_storage", "insert_rows", "KINDS", "DEFAULT_DUCKDB_PATH"]


def password(spec: Mapping) -> str | None:
    """The password of a backend, from its ``password_env`` variable or ``password_file``."""
    if spec.get("password_env"):
        value = os.environ.get(spec["password_env"])
        if value is None:
            raise StorageError(f"environment variable {spec['password_env']} is not set")
        return value
    if spec.get("password_file"):
        try:
            return Path(spec["password_file"]).read_text().strip()
        except OSError as e:
            raise StorageError(f"cannot read password file {spec['password_file']}: {e.strerror}") from e
    return None


def open_backend(spec: Mapping, raw_events_days: int | None = None):
    """The store of one backend; ``raw_events_days``: the raw events' retention, for a store that
    applies it as it writes (Cassandra's TTL per row)."""
    kind = spec["type"]
    if kind == "duckdb":
        return DuckDBStore(spec.get("path", DEFAULT_DUCKDB_PATH))
    if kind == "postgresql":
        return PostgresStore(spec["url"], password(spec))
    if kind == "oracle":
        opts = OracleOptions(**{k: spec[k] for k in ("interval_days", "inmemory", "memcompress", "priority")
                                if k in spec})
        return OracleStore(spec["url"], password(spec), opts)
    settings = {k: (tuple(v) if k == "hosts" else dict(v) if isinstance(v, Mapping) else v)
                for k, v in spec.items() if k != "type"}
    return CassandraStore(CassandraSettings(**settings), retention_days=raw_events_days)


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

    def commit(self, topic: str, events: pa.Table, next_offsets: dict[int, int],
               start_offsets: dict[int, int | None] | None = None, dry_run: bool = False) -> CommitResult:
        """``dry_run``: roll the relational transaction back. With a separate time-series store,
        a dry run writes the raw events only after the relational store took them (an idempotent
        upsert of rows about to be committed), so a row it refuses is never stored raw."""
        if self._shared or not events.num_rows:
            return self.relational.commit(topic, events, next_offsets, with_raw_events=self._shared,
                                          start_offsets=start_offsets, dry_run=dry_run)
        fresh, replayed = drop_replayed(events, self.relational.committed_offsets(topic))
        new = fresh
        if fresh.num_rows:
            last = self.relational.last_samples(pc.unique(fresh["device_id"]).to_pylist())
            new = first_sightings(fresh, last, self.timeseries.stored_elsewhere)
        expired_before = self._expired()
        if new.num_rows and not dry_run:
            self.timeseries.write_events(new)
        result = self.relational.commit(topic, new, next_offsets, start_offsets=start_offsets, dry_run=dry_run)
        if new.num_rows and dry_run:
            self.timeseries.write_events(new)
        return CommitResult(applied=result.applied, replayed=replayed + result.replayed,
                            repeated=fresh.num_rows - new.num_rows + result.repeated,
                            expired=self._expired() - expired_before)

    def _expired(self) -> int:
        """Raw events the time-series store left unwritten as already past their retention."""
        return getattr(self.timeseries, "expired_on_write", 0)

    def close(self) -> None:
        self.relational.close()
        if not self._shared:
            self.timeseries.close()


def insert_rows(config: StorageConfig, kind: str, table: str, rows: pa.Table) -> None:
    """Append ``rows`` to ``table`` on the relational backend that keeps ``kind`` (migrated first):
    the model registry and the anomalies a training run flags."""
    store = open_backend(config.backends[config.routes[kind]])
    try:
        store.setup()
        with store.transaction() as tx:
            tx.insert(table, rows)
    finally:
        store.close()


def open_storage(config: StorageConfig) -> Storage:
    opened = {}
    for kind in ("offsets", "raw_events"):
        name = config.routes[kind]
        if name not in opened:
            days = config.retention.get("raw_events") if kind == "raw_events" else None
            opened[name] = open_backend(config.backends[name], days)
    return Storage(opened[config.routes["raw_events"]], opened[config.routes["offsets"]])
