"""The storage roles, as small abstract classes, and the batch they receive.

A batch is a pyarrow table of decoded events (``podpulse.contract.ARROW_SCHEMA``
plus ``kafka_partition`` and ``kafka_offset``) with the next offset to consume
per partition (covering rejected records too).

Delivery contract (see ``shared/DESIGN.md``):

- :class:`TimeSeriesStore` keeps raw events. It may have no transactions, so
  ``write_events`` must be an idempotent upsert by ``(device_id, seq)``:
  writing the same events twice leaves one copy.
- :class:`RelationalStore` keeps the device registry, the hourly rollups and the
  consumed offsets. ``commit`` runs in ONE transaction: read the stored offsets,
  drop rows already applied, apply the rest (rollups are additive), store the
  new offsets. The stored offsets are the source of truth on restart, so a
  redelivered batch is never counted twice.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Callable, Iterable, Mapping

import pyarrow as pa

from podpulse.errors import StorageError

__all__ = ["StorageError", "OffsetGap", "RefusedRows", "TimeSeriesStore", "RelationalStore", "CommitResult", "Reader",
           "Backend", "QUERY_DIALECT"]

QUERY_DIALECT = "postgres"  # what PodPulse's SQL is written in (sqlglot's name)


class OffsetGap(StorageError):
    """A batch starts past the stored offset: an earlier batch never arrived. Rewind and resend."""


class RefusedRows(StorageError):
    """The store refused a value of the batch (a data error, not a lost connection): the same rows
    would fail again, so retrying does not help. The writer finds those rows and dead-letters them."""


@dataclass(frozen=True, slots=True)
class CommitResult:
    applied: int  # rows newly stored
    replayed: int  # rows dropped because their offsets were already stored
    repeated: int = 0  # rows dropped because their (device_id, seq) was already stored: sent again
    expired: int = 0  # raw events older than the retention, not written by a store that applies it on write
    erased: int = 0  # rows dropped because their device is erased (storage.schema.erased_devices)


class TimeSeriesStore(ABC):
    """Raw events by device and time."""

    @abstractmethod
    def setup(self) -> None:
        """Create what is missing (idempotent)."""

    @abstractmethod
    def write_events(self, events: pa.Table) -> None:
        """Upsert raw events by (device_id, seq); durable when it returns."""

    def stored_elsewhere(self, rows: pa.Table) -> list[tuple[str, int]]:
        """The ``(device_id, seq)`` of ``rows`` stored already from another Kafka record (another
        partition or offset): events sent again. Asked before :meth:`write_events`, for the few
        rows ``storage.rollups.first_sightings`` suspects. A store that cannot tell answers []."""
        return []

    @abstractmethod
    def count_events(self) -> tuple[int, int]:
        """Raw event rows, and distinct ``(device_id, seq)`` among them: what a benchmark or a test
        compares with what it produced (a full scan)."""

    def erase_events(self, days: Mapping[str, Iterable[date]]) -> dict[str, int]:
        """Erasure: delete the raw events of each device on these UTC days (its time buckets);
        ``{"events": rows removed, "partitions": buckets deleted}``. Implemented by a store that keeps
        raw events alone (Cassandra); a relational store erases with ``TransactionalStore.erase``."""
        raise NotImplementedError(f"{type(self).__name__} erases raw events with erase()")

    def close(self) -> None:
        """Release connections. Not guaranteed to be called (a process may die)."""


class RelationalStore(ABC):
    """Devices, rollups and consumed offsets, written transactionally."""

    @abstractmethod
    def setup(self) -> None:
        """Create what is missing (idempotent)."""

    @abstractmethod
    def committed_offsets(self, topic: str) -> dict[int, int]:
        """Next offset to consume per partition, as stored with the data."""

    @abstractmethod
    def last_samples(self, device_ids: list[str]) -> pa.Table:
        """The registry's latest sample of each of these devices (``storage.rollups.LAST_SAMPLE``)."""

    @abstractmethod
    def commit(self, topic: str, events: pa.Table, next_offsets: dict[int, int],
               *, with_raw_events: bool = False,
               start_offsets: dict[int, int | None] | None = None, dry_run: bool = False) -> CommitResult:
        """One transaction: check the batch follows the stored offsets, skip stored offsets,
        apply the rest, store the new offsets.

        Only events seen for the first time count in the rollups: a row whose offset is
        stored is a replay, and a row whose ``(device_id, seq)`` is stored already (or
        repeats within the batch) is an event its producer sent again.
        ``dry_run`` does all of it and rolls back: how the writer finds the rows a store
        refuses (:class:`RefusedRows`) without storing anything.

        ``start_offsets``: where the batch starts per partition (the consumer's
        position before it; None: the partition's beginning). A start past the
        stored offset raises :class:`OffsetGap` (see ``storage.rollups.check_follows``).
        ``with_raw_events`` asks the store to insert the raw events in the same
        transaction (when it also plays the time-series role).
        """

    @abstractmethod
    def lookup(self, device_ids: list[str]) -> tuple[list[str], pa.Table]:
        """Which of these devices are erased, and the latest sample of the others (one transaction):
        what the router asks before it writes raw events to a separate time-series store."""

    @abstractmethod
    def erase(self, device_ids: Iterable[str]) -> dict[str, int]:
        """Delete these devices' rows from every device-keyed table and record their tombstones, in one
        transaction beside no commit; rows removed per table (``storage.commit.TransactionalStore.erase``)."""

    @abstractmethod
    def mark_erased(self, device_ids: Iterable[str]) -> dict[str, tuple[datetime, datetime]]:
        """Record these devices' tombstones and return the registry's (first, last) event time of each:
        the first step of an erasure whose raw events live in another store."""

    def close(self) -> None:
        """Release connections. Not guaranteed to be called (a process may die)."""


class Reader(ABC):
    """Read-only SQL on one relational backend, session time zone UTC."""

    dialect = QUERY_DIALECT  # sqlglot's name for the backend's dialect

    def render(self, sql: str) -> str:
        """``sql`` (PostgreSQL's dialect) as this backend reads it."""
        return sql

    @abstractmethod
    def rows(self, sql: str) -> list[tuple]:
        """Run one query (PostgreSQL's dialect); all its rows."""

    @abstractmethod
    def connection_factory(self) -> Callable[[], Any]:
        """DB-API connections in UTC for Ray Data's ``read_sql`` (give it :meth:`render`'s SQL)."""

    def close(self) -> None:
        """Release the connection."""

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class Backend:
    """What a backend module registers (its ``BACKEND``), looked up by its settings' ``type``
    (``storage.backends``): nothing else branches on which backend a configuration names.

    ``store(settings, raw_events_days)``: its store (both roles, or the time-series role alone);
    ``raw_events_days`` is the raw events' retention, for a store that applies it as it writes.
    ``reader(settings, engine)``: a :class:`Reader` of a relational backend; ``engine``: a pooled
    connection source from ``engine(settings, size, wait_s)``, or None for one of its own.
    ``scratch(settings, name, directory)``: a context manager giving the settings of an empty
    namespace named ``name`` on the same server (a schema, a keyspace, a file in ``directory``),
    dropped at its end: where benchmarks and tests write without touching what is there.
    """

    settings: type
    store: Callable[[Any, int | None], TimeSeriesStore | RelationalStore]
    scratch: Callable[[Any, str, str], AbstractContextManager] | None = None
    reader: Callable[[Any, Any], Reader] | None = None
    engine: Callable[[Any, int, float], Any] | None = None
