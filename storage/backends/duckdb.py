"""The embedded default: one DuckDB file plays both roles.

Why DuckDB and not SQLite for the relational role: it takes pyarrow batches
without converting rows (``INSERT ... SELECT * FROM arrow_table``), and its
columnar engine answers the regional reports over tens of millions of events in
well under a second, which SQLite's row store cannot. It is used through its
own Python API rather than SQLAlchemy for the same reason: SQLAlchemy would bind
parameters row by row. (The PostgreSQL and Oracle backends use SQLAlchemy Core.)

With both roles in one file, the raw events, rollups, device registry and
offsets of a batch are written in a single transaction: exactly-once by
construction.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator

import duckdb
import pyarrow as pa

from storage.base import Backend, Reader, RefusedRows, StorageError, TimeSeriesStore
from storage.commit import DryRun, TransactionalStore
from storage.config import DuckDBSettings
from storage.migrations import migrate_duckdb
from storage.rollups import LAST_SAMPLE_QUERY
from storage.schema import EVENT_COLUMNS, expiry_bound
from storage.sql import COUNT_EVENTS, merge_into_sql

__all__ = ["DuckDBStore", "DuckDBReader", "BACKEND", "open_for_writing"]

OFFSETS_UPSERT = ("INSERT INTO kafka_offsets (topic, kafka_partition, next_offset, updated_at) "
                  "VALUES (?, ?, ?, now()) ON CONFLICT (topic, kafka_partition) DO UPDATE SET "
                  "next_offset = greatest(kafka_offsets.next_offset, excluded.next_offset), "
                  "updated_at = excluded.updated_at")
EVENT_NAMES = ", ".join(EVENT_COLUMNS)
# No key on DuckDB's raw events (storage.schema; a key measured a third slower): the offset check
# drops replays, and first_sightings drops events a producer sent again before they are inserted.
EVENTS_INSERT = f"INSERT INTO events ({EVENT_NAMES}) SELECT {EVENT_NAMES} FROM _events"
# What DuckDB says when a value cannot be stored: the same rows would fail again.
DATA_ERRORS = (duckdb.ConstraintException, duckdb.ConversionException, duckdb.OutOfRangeException,
               duckdb.InvalidInputException, duckdb.TypeMismatchException, pa.ArrowInvalid, pa.ArrowTypeError)



@contextmanager
def open_for_writing(path: str, wait_s: float) -> Iterator[duckdb.DuckDBPyConnection]:
    """The file opened for writing, waiting up to ``wait_s`` while another process holds its lock."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            con = duckdb.connect(path)
            break
        except duckdb.IOException as e:
            if "lock" not in str(e).lower() or time.monotonic() > deadline:
                raise StorageError(f"cannot open {path}: {str(e).splitlines()[0]}") from e
            time.sleep(0.05)
    try:
        yield con
    finally:
        con.close()

class _Transaction:
    """storage.commit.Transaction on DuckDB: pyarrow tables registered as views, read in place."""

    def __init__(self, con):
        self.con = con
        self.views: set[str] = set()

    def _view(self, name: str, table: pa.Table) -> str:
        self.con.register(name, table)
        self.views.add(name)
        return name

    def read_offsets(self, topic: str, partitions: list[int] | None = None) -> dict[int, int]:
        return dict(self.con.execute(
            "SELECT kafka_partition, next_offset FROM kafka_offsets WHERE topic = ?", [topic]).fetchall())

    def _ids(self, device_ids: list[str]) -> str:
        return self._view("_ids", pa.table({"device_id": pa.array(device_ids, pa.string())}))

    def last_samples(self, device_ids: list[str]) -> pa.Table:
        return self.con.sql(f"{LAST_SAMPLE_QUERY} JOIN {self._ids(device_ids)} USING (device_id)").to_arrow_table()

    def lock_out_commits(self) -> None:
        pass  # one process writes a DuckDB file (its lock), through one connection: no commit runs beside

    def erased(self, device_ids: list[str]) -> list[str]:
        return [d for (d,) in self.con.execute(
            f"SELECT device_id FROM erased_devices JOIN {self._ids(device_ids)} USING (device_id)").fetchall()]

    def device_spans(self, device_ids: list[str]) -> dict:
        return {d: (first, last) for d, first, last in self.con.execute(
            f"SELECT device_id, first_seen, last_seen FROM devices JOIN {self._ids(device_ids)} USING (device_id)"
        ).fetchall()}

    def delete_devices(self, table: str, device_ids: list[str]) -> int:
        ((rows,),) = self.con.execute(f"DELETE FROM {table} WHERE device_id IN "
                                      f"(SELECT device_id FROM {self._ids(device_ids)})").fetchall()
        return int(rows)

    def stored_keys(self, rows: pa.Table) -> list[tuple[str, int]]:
        self._view("_keys", rows)
        return self.con.execute("SELECT DISTINCT e.device_id, e.seq FROM events e "
                                "JOIN _keys k ON e.device_id = k.device_id AND e.seq = k.seq").fetchall()

    def insert_events(self, rows: pa.Table) -> None:
        self._view("_events", rows)
        self.con.execute(EVENTS_INSERT)

    def merge(self, table: str, key: tuple[str, ...], rules: dict[str, str], rows: pa.Table) -> None:
        self.con.execute(merge_into_sql(table, key, rules, self._view(f"_stage_{table}", rows)))

    def store_offsets(self, topic: str, next_offsets: dict[int, int]) -> None:
        self.con.executemany(OFFSETS_UPSERT, [(topic, int(p), int(o)) for p, o in sorted(next_offsets.items())])

    def insert(self, table: str, rows: pa.Table) -> None:
        columns = ", ".join(rows.column_names)
        self.con.execute(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM {self._view('_insert', rows)}")

    def delete_before(self, table: str, cutoff: datetime) -> int:
        column, bound = expiry_bound(table, cutoff)
        (rows,) = self.con.execute(f"DELETE FROM {table} WHERE {column} < ?", [bound]).fetchone()
        return int(rows)

    def drop_partitions_before(self, table: str, cutoff: datetime) -> list[str]:
        raise NotImplementedError("DuckDB has no partitions: expire() deletes rows")

    def close(self) -> None:
        for name in self.views:
            try:
                self.con.unregister(name)
            except duckdb.Error:  # the connection died with the transaction
                pass


class DuckDBStore(TimeSeriesStore, TransactionalStore):
    """Both roles in one DuckDB file.

    Tuned for one writer sharing a small machine with the consumers: one DuckDB
    thread, and a checkpoint only every 256 MB of WAL (measured: a checkpoint per
    20k-event commit halved the write rate). Commits stay durable through the WAL.
    """

    partitioned = False  # expire() deletes row by row: DuckDB has no partitions to drop

    def __init__(self, path: str | Path, *, threads: int = 1, checkpoint_threshold: str = "256MB",
                 memory_limit: str = "256MB"):
        self.path, self.memory_limit = str(path), memory_limit
        try:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self.con = duckdb.connect(self.path, config={
                "threads": threads, "checkpoint_threshold": checkpoint_threshold,
                "memory_limit": memory_limit})
        except (duckdb.Error, OSError) as e:
            raise StorageError(f"cannot open DuckDB at {self.path}: {e}") from e

    def setup(self) -> None:
        """Apply pending schema migrations (``storage.migrations``)."""
        migrate_duckdb(self.con)

    def committed_offsets(self, topic: str) -> dict[int, int]:
        rows = self.con.execute(
            "SELECT kafka_partition, next_offset FROM kafka_offsets WHERE topic = ?", [topic]).fetchall()
        return dict(rows)

    def count_events(self) -> tuple[int, int]:
        rows, distinct = self.con.execute(COUNT_EVENTS).fetchone()
        return int(rows), int(distinct)

    def write_events(self, events: pa.Table) -> None:
        """Time-series role on its own: insert the (device_id, seq) pairs not stored yet."""
        con = self.con
        con.register("_events", events)
        try:
            con.execute(f"INSERT INTO events ({EVENT_NAMES}) SELECT {EVENT_NAMES} FROM (SELECT * FROM _events "
                        "QUALIFY row_number() OVER (PARTITION BY device_id, seq) = 1) AS b "
                        "WHERE NOT EXISTS (SELECT 1 FROM events e "
                        "WHERE e.device_id = b.device_id AND e.seq = b.seq)")
        finally:
            con.unregister("_events")

    @contextmanager
    def transaction(self):
        con = self.con
        con.begin()
        tx = _Transaction(con)
        try:
            yield tx
            con.commit()
        except BaseException as e:
            try:
                con.rollback()
            except duckdb.Error:  # after a fatal error (a full disk) the connection is gone anyway
                pass
            if isinstance(e, DryRun):
                return
            if isinstance(e, DATA_ERRORS):
                raise RefusedRows(f"DuckDB refused the batch: {e}") from e
            if isinstance(e, duckdb.OutOfMemoryException):
                raise StorageError(f"DuckDB needs more than its memory_limit ({self.memory_limit}): the rollups' "
                                   f"key indexes grow with the fleet; raise memory_limit of this duckdb backend "
                                   f"in the storage config: {str(e).splitlines()[0]}") from e
            if isinstance(e, duckdb.Error):
                raise StorageError(f"DuckDB write failed: {e}") from e
            raise
        finally:
            tx.close()

    def close(self) -> None:
        self.con.close()


class DuckDBReader(Reader):
    dialect = "duckdb"

    def __init__(self, path: str):
        self.path = path
        try:
            self._con = self.connection_factory()()
        except duckdb.Error as e:
            raise StorageError(f"cannot read DuckDB at {path}: {e}") from e

    def rows(self, sql: str) -> list[tuple]:
        return self._con.execute(sql).fetchall()

    def connection_factory(self) -> Callable[[], Any]:
        path = self.path

        def connect():
            con = duckdb.connect(path, read_only=True)
            con.execute("SET TimeZone = 'UTC'")
            return con

        return connect

    def close(self) -> None:
        self._con.close()


@contextmanager
def scratch(settings: DuckDBSettings, name: str, directory: str) -> Iterator[DuckDBSettings]:
    """A new file ``name.duckdb`` in ``directory``, with these settings otherwise (removed with the directory)."""
    yield replace(settings, path=str(Path(directory) / f"{name}.duckdb"))


BACKEND = Backend(settings=DuckDBSettings,
                  store=lambda s, raw_events_days: DuckDBStore(s.path, memory_limit=s.memory_limit),
                  reader=lambda s, engine: DuckDBReader(s.path), scratch=scratch)
