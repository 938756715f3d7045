"""The exactly-once commit, written once: the steps every relational backend runs in one transaction.

A backend supplies a :class:`Transaction` (how to read and write inside its own
open transaction) and :meth:`TransactionalStore.transaction` (how to open,
commit or roll it back, and which of its errors mean "this value is refused");
:func:`commit_batch` does the rest, in this order:

1. read the stored offsets of the topic (the batch's partitions locked against another writer, and
   against an erasure);
2. refuse a batch that starts past them (``OffsetGap``: an earlier one is missing);
3. drop rows whose offsets are stored: a replay;
4. drop rows of erased devices (one lookup of the batch's devices in ``erased_devices``);
5. read the registry's last sample of the batch's devices;
6. drop events already stored or repeated in the batch, by ``(device_id, seq)``;
7. insert the raw events, when this store keeps them;
8. merge the hourly rollups, 9. the daily ones (summed from 8's rows), 10. the device registry,
   11. the daily firmware rows;
12. store the new offsets.

Rollups are computed only from the rows that survive 3, 4 and 6, so a redelivered or
re-sent event is never counted twice, and an erased device never comes back; the
offsets are stored in the same transaction as what they cover.

Erasure (:meth:`TransactionalStore.erase`) is the same kind of template: one
transaction that shuts commits out, deletes the devices' rows from every
device-keyed table and records their tombstones.
"""

from __future__ import annotations

from abc import abstractmethod
from contextlib import AbstractContextManager
from datetime import datetime, timezone
from typing import Iterable, Mapping, Protocol

import pyarrow as pa
import pyarrow.compute as pc

from storage.base import CommitResult, RelationalStore
from storage.rollups import (
    DAILY_KEY,
    DAILY_MERGE,
    DEVICE_KEY,
    DEVICE_MERGE,
    FIRMWARE_KEY,
    FIRMWARE_MERGE,
    HOURLY_KEY,
    HOURLY_MERGE,
    check_follows,
    daily_rollup,
    device_updates,
    drop_erased,
    drop_replayed,
    firmware_days,
    first_sightings,
    hourly_rollup,
)
from storage.schema import ERASED_FROM, metadata

__all__ = ["Transaction", "TransactionalStore", "commit_batch", "ERASED_KEY", "ERASED_MERGE", "tombstones"]

ERASED_KEY = ("device_id",)
ERASED_MERGE = {"erased_at": "keep"}  # an insert that keeps an existing tombstone: the first erasure's time


class Transaction(Protocol):
    """What :func:`commit_batch` needs from a backend inside one open transaction."""

    def read_offsets(self, topic: str, partitions: list[int] | None = None) -> dict[int, int]:
        """The stored next offset per partition, locked until the transaction ends: against another
        commit to any of ``partitions`` (a backend may lock the whole topic), and against
        :meth:`lock_out_commits`."""

    def lock_out_commits(self) -> None:
        """Erasure: hold off every commit, of every topic, until the transaction ends (and wait for
        the ones running): the lock :meth:`read_offsets` takes, taken for all of them."""

    def erased(self, device_ids: list[str]) -> list[str]:
        """Which of these devices are erased (have a row in ``erased_devices``)."""

    def device_spans(self, device_ids: list[str]) -> dict[str, tuple[datetime, datetime]]:
        """The registry's first and last event time of each of these devices it holds."""

    def delete_devices(self, table: str, device_ids: list[str]) -> int:
        """Erasure: DELETE the rows of these devices from ``table``; how many went."""

    def last_samples(self, device_ids: list[str]) -> pa.Table:
        """The registry's latest sample of these devices (``storage.rollups.LAST_SAMPLE``)."""

    def stored_keys(self, rows: pa.Table) -> list[tuple[str, int]]:
        """The ``(device_id, seq)`` of ``rows`` already in the raw events table."""

    def insert_events(self, rows: pa.Table) -> None:
        """Insert raw events (new ones: step 5 dropped the rest)."""

    def merge(self, table: str, key: tuple[str, ...], rules: dict[str, str], rows: pa.Table) -> None:
        """Upsert ``rows`` into ``table``, merging into existing keys by ``rules``."""

    def store_offsets(self, topic: str, next_offsets: dict[int, int]) -> None:
        """Upsert the next offsets (never moving one back)."""

    def delete_before(self, table: str, cutoff: datetime) -> int:
        """Retention: DELETE the rows of ``table`` older than ``cutoff``; how many went."""

    def drop_partitions_before(self, table: str, cutoff: datetime) -> list[str]:
        """Retention on a partitioned table: drop the partitions wholly older than ``cutoff``."""

    def insert(self, table: str, rows: pa.Table) -> None:
        """Append ``rows`` to ``table`` (their columns, by name): the registry's and anomalies' writes."""


def commit_batch(tx: Transaction, topic: str, events: pa.Table, next_offsets: dict[int, int],
                 start_offsets: dict[int, int | None] | None, with_raw_events: bool) -> CommitResult:
    stored = tx.read_offsets(topic, sorted(next_offsets))  # 1.
    check_follows(stored, start_offsets)  # 2.
    fresh, replayed = drop_replayed(events, stored)  # 3.
    erased = 0
    if fresh.num_rows:
        devices = pc.unique(fresh["device_id"]).to_pylist()
        gone = tx.erased(devices)  # 4.
        if gone:
            fresh, dropped = drop_erased(fresh, gone)
            erased, devices = dropped.num_rows, sorted(set(devices) - set(gone))
    new = fresh
    if fresh.num_rows:
        last = tx.last_samples(devices)  # 5.
        new = first_sightings(fresh, last, tx.stored_keys if with_raw_events else _nothing)  # 6.
    if new.num_rows:
        if with_raw_events:
            tx.insert_events(new)  # 7.
        hourly = hourly_rollup(new, last)
        tx.merge("device_hourly", HOURLY_KEY, HOURLY_MERGE, hourly)  # 8.
        tx.merge("device_daily", DAILY_KEY, DAILY_MERGE, daily_rollup(hourly))  # 9.
        tx.merge("devices", DEVICE_KEY, DEVICE_MERGE, device_updates(new))  # 10.
        tx.merge("device_firmware_daily", FIRMWARE_KEY, FIRMWARE_MERGE, firmware_days(new))  # 11.
    tx.store_offsets(topic, next_offsets)  # 12.
    return CommitResult(applied=new.num_rows, replayed=replayed, repeated=fresh.num_rows - new.num_rows,
                        erased=erased)


def tombstones(device_ids: list[str], at: datetime | None = None) -> pa.Table:
    """The ``erased_devices`` rows of these devices, erased ``at`` (default: now)."""
    at = at or datetime.now(timezone.utc)
    return pa.table({"device_id": pa.array(device_ids, pa.string()),
                     "erased_at": pa.array([at] * len(device_ids), pa.timestamp("us", tz="UTC"))})


def _nothing(_rows: pa.Table) -> list:
    return []  # the raw events live in another store (storage.router looks them up there)


class DryRun(Exception):
    """Raised inside a transaction to roll it back: the end of a dry run."""


class TransactionalStore(RelationalStore):
    """A relational store whose ``commit`` is :func:`commit_batch` in one of its transactions."""

    @abstractmethod
    def transaction(self) -> AbstractContextManager[Transaction]:
        """Open a transaction; commit it when the block ends, roll it back if the block raises
        (:class:`DryRun` included, which it swallows). Raise ``RefusedRows`` for a refused value,
        ``StorageError`` for anything else the database says."""

    def commit(self, topic: str, events: pa.Table, next_offsets: dict[int, int],
               *, with_raw_events: bool = False,
               start_offsets: dict[int, int | None] | None = None, dry_run: bool = False) -> CommitResult:
        with self.transaction() as tx:
            result = commit_batch(tx, topic, events, next_offsets, start_offsets, with_raw_events)
            if dry_run:
                raise DryRun
        return result

    def last_samples(self, device_ids: list[str]) -> pa.Table:
        with self.transaction() as tx:
            return tx.last_samples(device_ids)

    def lookup(self, device_ids: list[str]) -> tuple[list[str], pa.Table]:
        with self.transaction() as tx:
            gone = tx.erased(device_ids) if device_ids else []
            last = tx.last_samples(sorted(set(device_ids) - set(gone)) if gone else device_ids)
        return gone, last

    def erase(self, device_ids: Iterable[str]) -> dict[str, int]:
        """Erase devices (ids as stored), in ONE transaction that no commit runs beside
        (:meth:`Transaction.lock_out_commits`): delete their rows from every device-keyed table
        (``storage.schema.ERASED_FROM``: raw events, hourly and daily rollups, the registry, flagged
        device-days) and record their tombstones, so a replay or a backfill never brings them back.
        Rollups are per device, so fleet figures (computed from them at query time) equal a
        recomputation from the raw events that remain. Idempotent: erasing again deletes nothing
        more and keeps the first tombstone; an unknown id gets its tombstone too. Rows removed per table."""
        ids = sorted(set(device_ids))
        with self.transaction() as tx:
            tx.lock_out_commits()
            removed = {table: tx.delete_devices(table, ids) for table in ERASED_FROM}
            tx.merge("erased_devices", ERASED_KEY, ERASED_MERGE, tombstones(ids))
        return removed

    def mark_erased(self, device_ids: Iterable[str]) -> dict[str, tuple[datetime, datetime]]:
        """The first step of erasing devices whose raw events live in another store: record their
        tombstones (from then on no commit applies a row of theirs; the router writes none to the
        other store) and read the span of event times the registry knows of each, to find those raw
        events by. Deletes nothing: :meth:`erase` does, last, so an erasure cut short can be run
        again and still finds the spans."""
        ids = sorted(set(device_ids))
        with self.transaction() as tx:
            tx.lock_out_commits()
            tx.merge("erased_devices", ERASED_KEY, ERASED_MERGE, tombstones(ids))
            spans = tx.device_spans(ids)
        return spans

    partitioned = True  # its partitioned tables (schema: partition_by) lose whole partitions

    def expire(self, cutoffs: Mapping[str, datetime]) -> dict[str, dict]:
        """Remove what is older than each table's cutoff, one short transaction per table (never the
        registry or the offsets, so ingest may run meanwhile). A partitioned table loses whole
        partitions only: rows of the partition the cutoff falls in stay until all of it is old."""
        removed = {}
        for table, cutoff in cutoffs.items():
            with self.transaction() as tx:
                if self.partitioned and "partition_by" in metadata.tables[table].info:
                    removed[table] = {"partitions": tx.drop_partitions_before(table, cutoff)}
                else:
                    removed[table] = {"rows": tx.delete_before(table, cutoff)}
            self.expired(removed[table].get("partitions", []))
        return removed

    def expired(self, partitions: list[str]) -> None:
        """After :meth:`expire` dropped ``partitions`` (committed): forget what the store knew of them."""
