"""Stores of a simulated fleet, written straight through the commit path (no Kafka, no Ray)."""

from __future__ import annotations

import uuid
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa

from podpulse.contract import decode_batch
from podpulse.pseudonyms import Pseudonyms
from podpulse.simulator import Fleet, FleetSpec, simulate
from storage.config import StorageConfig
from storage.router import open_storage

__all__ = ["build_store", "postgres_store"]

COMMIT_EVENTS = 100_000  # events per transaction


def build_store(path: Path | StorageConfig, devices: int, days: int, seed: int = 7,
                start: datetime | None = None, **fleet) -> int:
    """A store of a simulated fleet (a DuckDB file, or any storage configuration), written straight
    to the store (not through Kafka, so no event-time window applies), device ids hashed with the
    store's pseudonym key as ingest does; returns the events written. ``start``: the simulator's
    default, unless given; ``fleet``: more of :class:`FleetSpec` (``fault_share``, ``fault_mix``)."""
    spec = FleetSpec(devices=devices, hours=24 * days, seed=seed, start=start, **fleet)
    config = path if isinstance(path, StorageConfig) else StorageConfig.embedded(path)
    pseudonyms = config.pseudonyms(create=True)
    storage = open_storage(config)
    storage.setup()
    offset, pending = 0, []
    try:
        for chunk in simulate(spec, Fleet.build(spec)):
            pending.extend(chunk.values)
            if len(pending) >= COMMIT_EVENTS:
                offset, pending = _commit(storage, pseudonyms, pending, offset), []
        if pending:
            offset = _commit(storage, pseudonyms, pending, offset)
    finally:
        storage.close()
    return offset


def _commit(storage, pseudonyms: Pseudonyms, values: list[bytes], offset: int) -> int:
    table = pseudonyms.table(decode_batch(values, window=None).table)
    n = table.num_rows
    table = table.append_column("kafka_partition", pa.array(np.zeros(n, np.int32))).append_column(
        "kafka_offset", pa.array(np.arange(offset, offset + n), pa.int64()))
    storage.commit("bench-report", table, {0: offset + n})
    return offset + n


def postgres_store(cluster, name: str = "t") -> StorageConfig:
    """A storage configuration on a fresh schema of a test PostgreSQL cluster (``testbed.postgres``),
    every kind of record in it; the URL selects the schema by ``search_path``."""
    schema = f"{name.replace('-', '_')}_{uuid.uuid4().hex[:12]}"
    cluster.psql(f"CREATE SCHEMA {schema}")
    return StorageConfig(backends={"pg": {"type": "postgresql",
                                          "url": f"{cluster.url}?options=-csearch_path%3D{schema}"}})
