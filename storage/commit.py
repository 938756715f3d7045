"""The exactly-once commit, written once: the steps every relational backend runs in one transaction.

A backend supplies a :class:`Transaction` (how to read and write inside its own
open transaction) and :meth:`TransactionalStore.transaction` (how to open,
commit or roll it back, and which of its errors mean "this value is refused");
:func:`commit_batch` does the rest, in this order:

1. read the stored offsets of the topic (locked against a second writer);
2. refuse a batch that starts past them (``OffsetGap``: an earlier one is missing);
3. drop rows whose offsets are stored: a replay;
4. read the registry's last sample of the batch's devices;
5. drop events already stored or repeated in the batch, by ``(device_id, seq)``;
6. insert the raw events, when this store keeps them;
7. merge the hourly rollups, 8. the device registry, 9. the daily firmware rows;
10. store the new offsets.

Rollups are computed only from the rows that survive 3 and 5, so a redelivered or
re-sent event is never counted twice; the offsets are stored in the same
transaction as what they cover.
"""

from __future__ import annotations

from abc import abstractmethod
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Mapping, Protocol

import pyarrow as pa
import pyarrow.compute as pc

from storage.base import CommitResult, RelationalStore
from storage.schema import metadata
from storage.rollups import (DEVICE_KEY, DEVICE_MERGE, FIRMWARE_KEY, FIRMWARE_MERGE, HOURLY_KEY, HOURLY_MERGE,
                             check_follows, device_updates, drop_replayed, firmware_days, first_sightings,
                             hourly_rollup)

__all__ = ["Transaction", "TransactionalStore", "commit_batch"]


class Transaction(Protocol):
    """What :func:`commit_batch` needs from a backend inside one open transaction."""

    def read_offsets(self, topic: str) -> dict[int, int]:
        """The stored next offset per partition, locked until the transaction ends."""

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
    stored = tx.read_offsets(topic)  # 1.
    check_follows(stored, start_offsets)  # 2.
    fresh, replayed = drop_replayed(events, stored)  # 3.
    new = fresh
    if fresh.num_rows:
        last = tx.last_samples(pc.unique(fresh["device_id"]).to_pylist())  # 4.
        new = first_sightings(fresh, last, tx.stored_keys if with_raw_events else _nothing)  # 5.
    if new.num_rows:
        if with_raw_events:
            tx.insert_events(new)  # 6.
        tx.merge("device_hourly", HOURLY_KEY, HOURLY_MERGE, hourly_rollup(new, last))  # 7.
        tx.merge("devices", DEVICE_KEY, DEVICE_MERGE, device_updates(new))  # 8.
        tx.merge("device_firmware_daily", FIRMWARE_KEY, FIRMWARE_MERGE, firmware_days(new))  # 9.
    tx.store_offsets(topic, next_offsets)  # 10.
    return CommitResult(applied=new.num_rows, replayed=replayed, repeated=fresh.num_rows - new.num_rows)


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
