"""Reading the store for training: a query on the relational store, read by Ray Data, as one numpy
array per column."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray

from analytics.battery_model import FEATURE_SQL
from analytics.forecast_model import USAGE_SQL
from podpulse.errors import ConfigError
from podpulse.runtime import init_ray
from storage.config import StorageConfig
from storage.reader import open_reader

__all__ = ["read_sql", "read_features", "read_usage"]


def read_sql(config: StorageConfig, sql: str) -> dict[str, np.ndarray]:
    """Rows of a query on the relational store, read by Ray Data, as one numpy array per column."""
    init_ray()
    with open_reader(config) as reader:  # Ray Data opens its own connections from the factory
        ds = ray.data.read_sql(reader.render(sql), reader.connection_factory())
    tables = ray.get(ds.to_arrow_refs())
    if not tables:
        return {}
    table = pa.concat_tables(tables)
    return {c: table[c].to_numpy(zero_copy_only=False) for c in table.column_names}


def _non_empty(rows: dict[str, np.ndarray], what: str) -> dict[str, np.ndarray]:
    if not rows or len(next(iter(rows.values()))) == 0:
        raise ConfigError(f"no {what} in the store: ingest some telemetry first")
    return rows


def read_features(config: StorageConfig) -> dict[str, np.ndarray]:
    """The battery model's feature rows (:data:`FEATURE_SQL`)."""
    return _non_empty(read_sql(config, FEATURE_SQL), "device-hours with battery drain")


def read_usage(config: StorageConfig) -> dict[str, np.ndarray]:
    """Listening hours per region-day (:data:`USAGE_SQL`)."""
    return _non_empty(read_sql(config, USAGE_SQL), "device-hours")
