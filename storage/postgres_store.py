"""PostgreSQL backend (psycopg 3 through SQLAlchemy): both roles, or the relational one.

A batch goes in with ``COPY`` (pyarrow writes the CSV in C++) into temporary
staging tables, then one ``INSERT ... ON CONFLICT`` per table merges it, all in
one transaction with the offsets. ``events`` and ``device_hourly`` are
range-partitioned by month; a month's partition is created the first time a
batch reaches it.
"""

from __future__ import annotations

import io
from contextlib import contextmanager

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.engine import make_url

from storage.base import CommitResult, RefusedRows, RelationalStore, StorageError, TimeSeriesStore
from storage.migrations import migrate_engine
from storage.rollups import (DEVICE_KEY, DEVICE_MERGE, FIRMWARE_KEY, FIRMWARE_MERGE, HOURLY_KEY, HOURLY_MERGE,
                             LAST_SAMPLE_QUERY, check_follows, device_updates, drop_replayed, firmware_days,
                             first_sightings, hourly_rollup, last_sample_table)
from storage.schema import EVENT_COLUMNS, postgres_month_partition_ddl
from storage.sql import OFFSETS_KEY, OFFSETS_MERGE, upsert_sql

__all__ = ["PostgresStore", "engine_url"]

EVENT_KEY = ("device_id", "seq", "event_time")
_CSV = pacsv.WriteOptions(include_header=False)
# PostgreSQL's classes 22 (data exception) and 23 (integrity constraint): the same rows fail again.
# Raised by SQLAlchemy (wrapped) or by psycopg itself (COPY and the cursor are used directly).
DATA_ERRORS = (DataError, IntegrityError, psycopg.DataError, psycopg.IntegrityError, pa.ArrowInvalid,
               pa.ArrowTypeError)
STORED_KEYS = ("SELECT DISTINCT e.device_id, e.seq FROM events e JOIN unnest(%s::text[], %s::bigint[]) "
               "AS k(device_id, seq) ON e.device_id = k.device_id AND e.seq = k.seq")


class _DryRun(Exception):
    """Raised at the end of a dry run to roll its transaction back."""


def engine_url(url: str, password: str | None = None):
    """``postgresql://user@host/db`` → a SQLAlchemy URL on psycopg 3, password added from outside."""
    u = make_url(url)
    if u.password:
        raise StorageError("put no password in a database URL: use an environment variable or a file")
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return u.set(password=password) if password else u


def _first_line(e: Exception) -> str:
    """The server's message without SQLAlchemy's statement dump and background link."""
    orig = getattr(e, "orig", None) or e
    return str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__


def _stored_keys(cur, keys: pa.Table) -> list[tuple[str, int]]:
    cur.execute(STORED_KEYS, [keys["device_id"].to_pylist(), keys["seq"].to_pylist()])
    return cur.fetchall()


class PostgresStore(TimeSeriesStore, RelationalStore):
    def __init__(self, url: str, password: str | None = None):
        self.url = engine_url(url, password)
        self.engine = create_engine(self.url, pool_size=2, pool_pre_ping=True)
        self._partitions: set[tuple[str, int, int]] = set()  # created and committed
        self._new_partitions: set[tuple[str, int, int]] = set()  # created in the open transaction

    def setup(self) -> None:
        migrate_engine(self.engine)

    def committed_offsets(self, topic: str) -> dict[int, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(text("SELECT kafka_partition, next_offset FROM kafka_offsets "
                                     "WHERE topic = :t"), {"t": topic}).all()
        return {p: o for p, o in rows}

    def last_samples(self, device_ids: list[str]) -> pa.Table:
        with self.engine.connect() as conn:
            cur = conn.connection.driver_connection.cursor()
            cur.execute(f"{LAST_SAMPLE_QUERY} WHERE device_id = ANY(%s)", [device_ids])
            return last_sample_table(cur.fetchall())

    def write_events(self, events: pa.Table) -> None:
        with self._transaction() as conn:
            self._insert_events(conn.connection.driver_connection.cursor(), events)

    def commit(self, topic: str, events: pa.Table, next_offsets: dict[int, int],
               *, with_raw_events: bool = False,
               start_offsets: dict[int, int | None] | None = None, dry_run: bool = False) -> CommitResult:
        try:
            with self._transaction() as conn:
                cur = conn.connection.driver_connection.cursor()
                cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [topic])  # one writer per topic
                cur.execute("SELECT kafka_partition, next_offset FROM kafka_offsets WHERE topic = %s", [topic])
                stored = dict(cur.fetchall())
                check_follows(stored, start_offsets)
                fresh, replayed = drop_replayed(events, stored)
                new = fresh
                if fresh.num_rows:
                    cur.execute(f"{LAST_SAMPLE_QUERY} WHERE device_id = ANY(%s)",
                                [pc.unique(fresh["device_id"]).to_pylist()])
                    last = last_sample_table(cur.fetchall())
                    new = first_sightings(fresh, last, (lambda keys: _stored_keys(cur, keys)) if with_raw_events
                                          else (lambda keys: []))
                if new.num_rows:
                    if with_raw_events:
                        self._insert_events(cur, new)
                    hourly = hourly_rollup(new, last)
                    self._ensure_partitions(cur, "device_hourly", hourly["hour"])
                    self._merge(cur, "device_hourly", HOURLY_KEY, HOURLY_MERGE, hourly)
                    self._merge(cur, "devices", DEVICE_KEY, DEVICE_MERGE, device_updates(new))
                    self._merge(cur, "device_firmware_daily", FIRMWARE_KEY, FIRMWARE_MERGE, firmware_days(new))
                cur.executemany(
                    upsert_sql("kafka_offsets", OFFSETS_KEY, OFFSETS_MERGE,
                               "(SELECT %s AS topic, %s AS kafka_partition, %s AS next_offset, "
                               "now() AS updated_at) AS o"),
                    [(topic, int(p), int(o)) for p, o in sorted(next_offsets.items())])
                if dry_run:
                    raise _DryRun
        except _DryRun:
            pass
        return CommitResult(applied=new.num_rows, replayed=replayed, repeated=fresh.num_rows - new.num_rows)

    def close(self) -> None:
        self.engine.dispose()

    # -- internals ---------------------------------------------------------------------
    @contextmanager
    def _transaction(self):
        """engine.begin(), remembering the partitions it created only once it committed."""
        self._new_partitions = set()
        try:
            with self.engine.begin() as conn:
                yield conn
        except _DryRun:
            self._new_partitions = set()  # rolled back
            raise
        except Exception as e:
            self._new_partitions = set()
            if isinstance(e, StorageError):
                raise
            if isinstance(e, DATA_ERRORS):
                raise RefusedRows(f"PostgreSQL refused the batch: {_first_line(e)}") from e
            raise StorageError(f"PostgreSQL write failed: {_first_line(e)}") from e
        self._partitions |= self._new_partitions
        self._new_partitions = set()

    def _insert_events(self, cur, events: pa.Table) -> None:
        self._ensure_partitions(cur, "events", events["event_time"])
        self._merge(cur, "events", EVENT_KEY, {c: "keep" for c in EVENT_COLUMNS if c not in EVENT_KEY},
                    events.select(EVENT_COLUMNS))

    def _merge(self, cur, table: str, key: tuple[str, ...], merge: dict[str, str], rows: pa.Table) -> None:
        """COPY ``rows`` into a temporary twin of ``table``, then upsert them by the merge rules."""
        stage = f"_stage_{table}"
        cur.execute(f"CREATE TEMP TABLE IF NOT EXISTS {stage} (LIKE {table}) ON COMMIT DELETE ROWS")
        columns = [*key, *merge]
        buffer = io.BytesIO()
        pacsv.write_csv(rows.select(columns), buffer, _CSV)
        with cur.copy(f"COPY {stage} ({', '.join(columns)}) FROM STDIN WITH (FORMAT csv)") as copy:
            copy.write(buffer.getbuffer())
        cur.execute(upsert_sql(table, key, merge, stage))

    def _ensure_partitions(self, cur, table: str, times: pa.ChunkedArray) -> None:
        months = pa.table({"y": pc.year(times), "m": pc.month(times)}).group_by(["y", "m"]).aggregate([])
        for y, m in zip(months["y"].to_pylist(), months["m"].to_pylist()):
            if (table, y, m) not in self._partitions | self._new_partitions:
                cur.execute(postgres_month_partition_ddl(table, y, m))
                self._new_partitions.add((table, y, m))
