"""The router: which backend keeps which kind of record (``storage.config``), the order a batch is
written in, and what the callers above storage need of the stores as a whole: erasure, rows a
job appends, a scratch store for benchmarks and tests, counts of what was stored."""

from __future__ import annotations

import re
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from datetime import date, datetime, timedelta, timezone
from typing import Iterable, Iterator, Mapping

import pyarrow as pa
import pyarrow.compute as pc

from storage import backends
from storage.base import CommitResult, RelationalStore, StorageError, TimeSeriesStore
from storage.commit import TransactionalStore
from storage.config import StorageConfig
from storage.rollups import drop_erased, drop_replayed, first_sightings
from storage.schema import erased_devices

__all__ = ["Storage", "open_storage", "open_backend", "opened", "insert_rows", "migrate_for", "erase_devices",
           "scratch", "count_events"]

DEVICE_ID_LENGTH = erased_devices.c.device_id.type.length  # the longest id a store keeps


def open_backend(config: StorageConfig, name: str, raw_events_days: int | None = None):
    """The store of the backend called ``name``; ``raw_events_days``: the raw events' retention, for a
    store that applies it as it writes (Cassandra's TTL per row)."""
    return backends.open_store(config.settings(name), raw_events_days)


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
    with opened(open_backend(config, config.routes[kind])) as store, store.transaction() as tx:
        tx.insert(table, rows)


def migrate_for(config: StorageConfig, kind: str) -> None:
    """Migrate the relational backend that keeps ``kind`` to the latest schema (a no-op when it is)."""
    with opened(open_backend(config, config.routes[kind])):
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
    out = {core: {"type": config.settings(core).type, "tables": removed["relational"], "tombstones": len(ids)}}
    if "raw" in removed:
        raw, tables = routes["raw_events"], dict(removed["raw"])
        partitions = tables.pop("partitions", None)  # Cassandra: the (device, day) partitions deleted
        out[raw] = {"type": config.settings(raw).type, "tables": tables,
                    **({"partitions": partitions} if partitions is not None else {})}
    if routes["anomalies"] not in out:
        with opened(open_backend(config, routes["anomalies"])) as store:
            tables = store.erase(ids)
        out[routes["anomalies"]] = {"type": config.settings(routes["anomalies"]).type, "tables": tables}
    return {"devices": ids, "backends": out}


def open_storage(config: StorageConfig) -> Storage:
    stores = {}
    for kind in ("offsets", "raw_events"):
        name = config.routes[kind]
        if name not in stores:
            stores[name] = open_backend(config, name, config.retention.get("raw_events") if kind == "raw_events"
                                        else None)
    return Storage(stores[config.routes["raw_events"]], stores[config.routes["offsets"]])


@contextmanager
def scratch(config: StorageConfig, directory: str, prefix: str = "podpulse_scratch") -> Iterator[StorageConfig]:
    """``config`` with each backend replaced by an empty namespace on the same server (a DuckDB file in
    ``directory``, a PostgreSQL schema, a Cassandra keyspace), the routes as they were; every namespace
    is dropped at the end. Where benchmarks and tests write without touching a store's data."""
    stamp = int(time.time() * 1000)
    with ExitStack() as stack:
        made = {backend: stack.enter_context(backends.scratch(config.settings(backend),
                                                              f"{prefix}_{_identifier(backend)}_{stamp}", directory))
                for backend in config.backends}
        yield config.with_backends({backend: {"type": s.type, **asdict(s)} for backend, s in made.items()})


def _identifier(name: str) -> str:
    """A backend's name as part of a schema, keyspace or file name: a-z, 0-9 and _, at most 12."""
    return re.sub(r"[^a-z0-9_]", "_", name.lower())[:12]


def count_events(config: StorageConfig) -> tuple[int, int]:
    """Raw event rows in the time-series store, and distinct ``(device_id, seq)`` among them (a full scan)."""
    with opened(open_backend(config, config.routes["raw_events"])) as store:
        return store.count_events()
