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
from contextlib import contextmanager
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Iterable, Mapping

import pyarrow as pa
import pyarrow.compute as pc

from podpulse.config import DEFAULT_DUCKDB_PATH, KINDS, StorageConfig
from storage.base import CommitResult, RelationalStore, StorageError, TimeSeriesStore
from storage.cassandra_store import CassandraSettings, CassandraStore
from storage.commit import TransactionalStore
from storage.duckdb_store import DuckDBStore
from storage.oracle_store import OracleStore
from storage.postgres_store import PostgresStore
from storage.rollups import drop_erased, drop_replayed, first_sightings
from storage.schema import OracleOptions, erased_devices

__all__ = ["StorageConfig", "Storage", "open_storage", "opened", "insert_rows", "erase_devices", "KINDS",
           "DEFAULT_DUCKDB_PATH"]

DEVICE_ID_LENGTH = erased_devices.c.device_id.type.length  # the longest id a store keeps


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
        return DuckDBStore(spec.get("path", DEFAULT_DUCKDB_PATH),
                           **({"memory_limit": spec["memory_limit"]} if "memory_limit" in spec else {}))
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
       relational store holds them too; never those of an erased device;
    2. one relational transaction: skip offsets already stored and erased devices,
       apply devices and rollups (plus raw events when it holds them), store the new offsets.

    Only after both return is the batch durable and may its offsets be committed
    to Kafka. :meth:`erase` removes devices from both stores.
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
        new, erased = fresh, 0
        if fresh.num_rows:
            gone, last = self.relational.lookup(pc.unique(fresh["device_id"]).to_pylist())
            if gone:  # erased: not written; what an attempt cut short by a crash wrote goes too
                fresh, dropped = drop_erased(fresh, gone)
                erased = dropped.num_rows
                if not dry_run:
                    self._erase_raw(dropped)
            new = first_sightings(fresh, last, self.timeseries.stored_elsewhere)
        repeated = fresh.num_rows - new.num_rows
        expired_before = self._expired()
        if new.num_rows and not dry_run:
            self.timeseries.write_events(new)
        result = self.relational.commit(topic, new, next_offsets, start_offsets=start_offsets, dry_run=dry_run)
        if result.erased:  # a device was erased between the lookup and the commit, which dropped its rows
            late, _ = self.relational.lookup(pc.unique(new["device_id"]).to_pylist())
            new, dropped = drop_erased(new, late)
            if not dry_run:
                self._erase_raw(dropped)  # just written above
        if new.num_rows and dry_run:
            self.timeseries.write_events(new)
        return CommitResult(applied=result.applied, replayed=replayed + result.replayed,
                            repeated=repeated + result.repeated,
                            expired=self._expired() - expired_before, erased=erased + result.erased)

    def erase(self, device_ids: Iterable[str]) -> dict[str, dict[str, int]]:
        """Erase devices (ids as stored) from both stores; rows removed per store and table.

        One store: one transaction (``TransactionalStore.erase``). A separate time-series store
        (Cassandra): first the tombstones are recorded and the registry's span of each device read
        (``mark_erased``: from then on no commit applies, and no :meth:`commit` writes, a row of
        theirs), then its raw events of those days are deleted, then the relational rows, registry
        last. A crash at any point leaves the tombstones recorded and the span readable: nothing comes
        back, and running the erasure again finishes it."""
        ids = sorted(set(device_ids))
        if self._shared:
            return {"relational": self.relational.erase(ids)}
        spans = self.relational.mark_erased(ids)
        raw = self._erase_raw_days({d: utc_days(first, last) for d, (first, last) in spans.items()}, ids)
        return {"raw": raw, "relational": self.relational.erase(ids)}

    def _erase_raw(self, rows: pa.Table) -> dict[str, int]:
        """Delete the raw events these rows' devices have on these rows' UTC days."""
        if not rows.num_rows:
            return {}
        days = pc.cast(rows["event_time"], pa.timestamp("ms", tz="UTC")).cast(pa.date32())
        pairs = pa.table({"d": rows["device_id"], "day": days}).group_by(["d", "day"]).aggregate([])
        by_device: dict[str, set[date]] = {}
        for device, day in zip(pairs["d"].to_pylist(), pairs["day"].to_pylist()):
            by_device.setdefault(device, set()).add(day)
        return self._erase_raw_days(by_device, list(by_device))

    def _erase_raw_days(self, days: Mapping[str, Iterable[date]], ids: list[str]) -> dict[str, int]:
        if isinstance(self.timeseries, TransactionalStore):  # a relational backend keeping raw events alone
            return self.timeseries.erase(ids)
        return self.timeseries.erase_events(days)

    def _expired(self) -> int:
        """Raw events the time-series store left unwritten as already past their retention."""
        return getattr(self.timeseries, "expired_on_write", 0)

    def close(self) -> None:
        self.relational.close()
        if not self._shared:
            self.timeseries.close()


def utc_days(first: datetime, last: datetime) -> list[date]:
    """Every UTC date from ``first``'s to ``last``'s (naive times are UTC): the time buckets of the
    raw events between them."""
    start, end = (_utc(t).date() for t in (first, last))
    return [start + timedelta(days=i) for i in range((end - start).days + 1)]


def _utc(t: datetime) -> datetime:
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)


def insert_rows(config: StorageConfig, kind: str, table: str, rows: pa.Table) -> None:
    """Append ``rows`` to ``table`` on the relational backend that keeps ``kind`` (migrated first):
    the model registry and the anomalies a training run flags."""
    with opened(open_backend(config.backends[config.routes[kind]])) as store, store.transaction() as tx:
        tx.insert(table, rows)


def migrate_for(config: StorageConfig, kind: str) -> None:
    """Migrate the relational backend that keeps ``kind`` to the latest schema (a no-op when it is)."""
    with opened(open_backend(config.backends[config.routes[kind]])):
        pass


@contextmanager
def opened(store):
    """``store`` (a backend's store, or a :class:`Storage`) migrated for use, and closed after."""
    try:
        store.setup()
        yield store
    finally:
        store.close()


def erase_devices(config: StorageConfig, device_ids: Iterable[str]) -> dict:
    """Erase devices (ids as stored) from every backend of ``config``: ``Storage.erase`` on the raw
    events and the relational core (tombstones there), then the flagged device-days where
    ``anomalies`` are routed elsewhere. Rows removed per backend and table."""
    ids = sorted(set(device_ids))
    bad = [d for d in ids if not isinstance(d, str) or not 1 <= len(d) <= DEVICE_ID_LENGTH]
    if not ids or bad:
        raise StorageError(f"erase: name devices by their stored ids (1 to {DEVICE_ID_LENGTH} characters), "
                           f"got {bad[0] if bad else 'none'!r}")
    routes = config.routes
    with opened(open_storage(config)) as storage:
        removed = storage.erase(ids)
    core = routes["offsets"]
    backends = {core: {"type": config.backends[core]["type"], "tables": removed["relational"],
                       "tombstones": len(ids)}}
    if "raw" in removed:
        raw, tables = routes["raw_events"], dict(removed["raw"])
        partitions = tables.pop("partitions", None)  # Cassandra: the (device, day) partitions deleted
        backends[raw] = {"type": config.backends[raw]["type"], "tables": tables,
                         **({"partitions": partitions} if partitions is not None else {})}
    if routes["anomalies"] not in backends:
        with opened(open_backend(config.backends[routes["anomalies"]])) as store:
            tables = store.erase(ids)
        backends[routes["anomalies"]] = {"type": config.backends[routes["anomalies"]]["type"], "tables": tables}
    return {"devices": ids, "backends": backends}


def open_storage(config: StorageConfig) -> Storage:
    opened = {}
    for kind in ("offsets", "raw_events"):
        name = config.routes[kind]
        if name not in opened:
            days = config.retention.get("raw_events") if kind == "raw_events" else None
            opened[name] = open_backend(config.backends[name], days)
    return Storage(opened[config.routes["raw_events"]], opened[config.routes["offsets"]])
