"""Oracle backend (python-oracledb, thin mode, through SQLAlchemy): the analytics core.

Rollups, devices and offsets are merged with ``MERGE`` statements run by
``executemany`` with input sizes set, in one transaction with the offsets
(rows of the topic locked ``FOR UPDATE``). Raw events, when Oracle keeps them
too, go in with an insert-only ``MERGE`` (idempotent by primary key). Tables
are INTERVAL-partitioned by time and, when configured, in the In-Memory column
store (see ``storage.schema``); retention drops whole interval partitions
(:meth:`OracleStore.expire`). Needs Oracle Database 23ai (BOOLEAN columns);
Oracle Database Free is enough.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Callable, Iterable

import pyarrow as pa
import sqlglot
from sqlalchemy import Boolean, Date, DateTime, String, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DataError, IntegrityError
from sqlglot import exp

from storage.backends.server import ServerReader, pooled_engine
from storage.base import QUERY_DIALECT, Backend, RefusedRows, StorageError, TimeSeriesStore
from storage.commit import ERASED_KEY, ERASED_MERGE, DryRun, TransactionalStore
from storage.config import OracleOptions, OracleSettings
from storage.migrations import migrate_engine
from storage.rollups import (
    DAILY_KEY,
    DAILY_MERGE,
    DEVICE_KEY,
    DEVICE_MERGE,
    FIRMWARE_KEY,
    FIRMWARE_MERGE,
    HOURLY_KEY,
    HOURLY_MERGE,
    LAST_SAMPLE_QUERY,
    last_sample_table,
)
from storage.schema import EVENT_COLUMNS, expiry_bound, metadata
from storage.sql import COUNT_EVENTS_ORACLE, OFFSETS_KEY, OFFSETS_MERGE, oracle_merge_sql

__all__ = ["OracleStore", "OracleReader", "render_for_oracle", "BACKEND", "oracle_url", "input_sizes", "EVENTS_MERGE", "HOURLY_MERGE_SQL", "FIRMWARE_MERGE_SQL", "DAILY_MERGE_SQL", "DEVICES_MERGE_SQL",
           "OFFSETS_MERGE_SQL", "PARTITIONS_SQL", "DDL_LOCK_WAIT", "partition_high_value", "partitions_before",
           "drop_partition_sql", "delete_before_sql", "ERASED_MERGE_SQL", "ERASURE_LOCK", "ERASED_SQL", "SPANS_SQL",
           "delete_devices_sql", "in_list_sql"]

EVENT_KEY = ("device_id", "seq", "event_time")
EVENTS_MERGE = oracle_merge_sql("events", EVENT_KEY, {c: "keep" for c in EVENT_COLUMNS if c not in EVENT_KEY})
HOURLY_MERGE_SQL = oracle_merge_sql("device_hourly", HOURLY_KEY, HOURLY_MERGE)
FIRMWARE_MERGE_SQL = oracle_merge_sql("device_firmware_daily", FIRMWARE_KEY, FIRMWARE_MERGE)
DAILY_MERGE_SQL = oracle_merge_sql("device_daily", DAILY_KEY, DAILY_MERGE)
DEVICES_MERGE_SQL = oracle_merge_sql("devices", DEVICE_KEY, DEVICE_MERGE)
OFFSETS_MERGE_SQL = oracle_merge_sql("kafka_offsets", OFFSETS_KEY, OFFSETS_MERGE)
ERASED_MERGE_SQL = oracle_merge_sql("erased_devices", ERASED_KEY, ERASED_MERGE)  # insert-only: keeps the first
# Erasure: a commit locks its topic's offsets rows (SELECT ... FOR UPDATE, which also takes the table's
# row-exclusive lock); EXCLUSIVE mode waits for those commits and holds off new ones until the erasure ends.
ERASURE_LOCK = "LOCK TABLE kafka_offsets IN EXCLUSIVE MODE"
# Oracle's refusals of a value (the same rows fail again): unique key, NULL into NOT NULL, value
# too large for its column, number over its precision, check constraint, bind too long.
DATA_CODES = ("ORA-00001", "ORA-01400", "ORA-12899", "ORA-01438", "ORA-02290", "ORA-01461")
KEY_CHUNK = 500  # (device_id, seq) pairs, or device ids, per lookup
MERGES = {"device_hourly": HOURLY_MERGE_SQL, "devices": DEVICES_MERGE_SQL, "device_firmware_daily": FIRMWARE_MERGE_SQL,
          "device_daily": DAILY_MERGE_SQL, "events": EVENTS_MERGE, "erased_devices": ERASED_MERGE_SQL}
# Retention: the interval partitions of a table with their upper bounds (a LONG: read as text);
# the range section's own partition (p_first, INTERVAL = 'NO') stays, as Oracle requires.
PARTITIONS_SQL = ("SELECT partition_name, high_value FROM user_tab_partitions "
                  "WHERE table_name = :t AND interval = 'YES' ORDER BY partition_position")
DDL_LOCK_WAIT = "ALTER SESSION SET ddl_lock_timeout = 60"  # wait for ingest's DML, not ORA-00054 at once
_HIGH_VALUE = re.compile(r"(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2})")
OFFSETS_MERGE_NOW = OFFSETS_MERGE_SQL.replace(":updated_at", "SYS_EXTRACT_UTC(SYSTIMESTAMP)")


def stored_keys_sql(pairs: int) -> str:
    """The (device_id, seq) pairs of a list that the events table holds already."""
    binds = ", ".join(f"(:{2 * i + 1}, :{2 * i + 2})" for i in range(pairs))
    return f"SELECT DISTINCT device_id, seq FROM events WHERE (device_id, seq) IN ({binds})"


def in_list_sql(sql: str, n: int) -> str:
    """``sql`` with ``IN ({ids})`` bound to ``n`` positional values (at most :data:`KEY_CHUNK`)."""
    return sql.format(ids=", ".join(f":{j + 1}" for j in range(n)))


ERASED_SQL = "SELECT device_id FROM erased_devices WHERE device_id IN ({ids})"
SPANS_SQL = "SELECT device_id, first_seen, last_seen FROM devices WHERE device_id IN ({ids})"


def delete_devices_sql(table: str) -> str:
    return f"DELETE FROM {table} WHERE device_id IN ({{ids}})"


def partition_high_value(text: str) -> datetime:
    """``TIMESTAMP' 2026-11-02 00:00:00'`` (or ``TO_DATE(' 2026-11-02 00:00:00', ...)``), as
    USER_TAB_PARTITIONS shows an upper bound → that UTC instant (Oracle keeps UTC TIMESTAMPs)."""
    m = _HIGH_VALUE.search(text)
    if not m:
        raise StorageError(f"unexpected Oracle partition bound {text!r}")
    return datetime.fromisoformat(m.group(1)).replace(tzinfo=timezone.utc)


def partitions_before(rows: Iterable[tuple[str, str]], cutoff: datetime) -> list[str]:
    """Of (partition name, high value) rows, the partitions that end by ``cutoff``: wholly older."""
    return [name for name, high in rows if partition_high_value(high) <= cutoff]


def drop_partition_sql(table: str, partition: str) -> str:
    """Drop one partition, keeping the global primary-key index usable for the ingest meanwhile."""
    return f'ALTER TABLE {table} DROP PARTITION "{partition}" UPDATE GLOBAL INDEXES'


def delete_before_sql(table: str, column: str) -> str:
    return f"DELETE FROM {table} WHERE {column} < :bound"


def oracle_url(url: str, password: str | None = None):
    """``oracle://user@host:1521/?service_name=X`` → a SQLAlchemy URL on python-oracledb (thin)."""
    u = make_url(url)
    if u.password:
        raise StorageError("put no password in a database URL: use an environment variable or a file")
    if u.drivername == "oracle":
        u = u.set(drivername="oracle+oracledb")
    return u.set(password=password) if password else u


def _rows(table: pa.Table, columns: Iterable[str]) -> list[tuple]:
    """Positional bind rows; times become naive UTC (Oracle keeps UTC TIMESTAMPs)."""
    cols = []
    for name in columns:
        col = table[name]
        if pa.types.is_timestamp(col.type):
            col = col.cast(pa.timestamp("us"))
        cols.append(col.to_pylist())
    return list(zip(*cols))


def _input_sizes(cursor, table_name: str, columns: list[str]) -> None:
    import oracledb  # lazy: only an Oracle store loads its driver

    cursor.setinputsizes(*input_sizes(table_name, columns, oracledb))


def input_sizes(table_name: str, columns: list[str], oracledb) -> list:
    """Bind types from the table definition: string lengths, TIMESTAMP, BOOLEAN, NUMBER."""
    sizes = []
    for name in columns:
        sql_type = metadata.tables[table_name].c[name].type
        if isinstance(sql_type, String):
            sizes.append(sql_type.length)
        elif isinstance(sql_type, DateTime):
            sizes.append(oracledb.DB_TYPE_TIMESTAMP)
        elif isinstance(sql_type, Date):
            sizes.append(oracledb.DB_TYPE_DATE)
        elif isinstance(sql_type, Boolean):
            sizes.append(oracledb.DB_TYPE_BOOLEAN)
        else:
            sizes.append(oracledb.DB_TYPE_NUMBER)
    return sizes


class _Transaction:
    """storage.commit.Transaction on one python-oracledb cursor: MERGE statements by executemany."""

    def __init__(self, cur):
        self.cur = cur

    def read_offsets(self, topic: str, partitions: list[int] | None = None) -> dict[int, int]:
        self.cur.execute("SELECT kafka_partition, next_offset FROM kafka_offsets WHERE topic = :t FOR UPDATE",
                         t=topic)
        return {int(p): int(o) for p, o in self.cur.fetchall()}

    def _by_ids(self, sql: str, device_ids: list[str], fetch: bool = True) -> list | int:
        """``sql`` (with ``IN ({ids})``) run per chunk of ids: every row fetched, or the rows it changed."""
        rows, changed = [], 0
        for i in range(0, len(device_ids), KEY_CHUNK):
            part = device_ids[i:i + KEY_CHUNK]
            self.cur.execute(in_list_sql(sql, len(part)), part)
            if fetch:
                rows.extend(self.cur.fetchall())
            else:
                changed += self.cur.rowcount
        return rows if fetch else changed

    def last_samples(self, device_ids: list[str]) -> pa.Table:
        return last_sample_table(self._by_ids(f"{LAST_SAMPLE_QUERY} WHERE device_id IN ({{ids}})", device_ids))

    def lock_out_commits(self) -> None:
        self.cur.execute(ERASURE_LOCK)

    def erased(self, device_ids: list[str]) -> list[str]:
        return [d for (d,) in self._by_ids(ERASED_SQL, device_ids)]

    def device_spans(self, device_ids: list[str]) -> dict:
        return {d: (first, last) for d, first, last in self._by_ids(SPANS_SQL, device_ids)}

    def delete_devices(self, table: str, device_ids: list[str]) -> int:
        return self._by_ids(delete_devices_sql(table), device_ids, fetch=False)

    def stored_keys(self, rows: pa.Table) -> list[tuple[str, int]]:
        pairs = list(zip(rows["device_id"].to_pylist(), rows["seq"].to_pylist()))
        found = []
        for i in range(0, len(pairs), KEY_CHUNK):
            part = pairs[i:i + KEY_CHUNK]
            self.cur.execute(stored_keys_sql(len(part)), [v for pair in part for v in pair])
            found.extend((d, int(q)) for d, q in self.cur.fetchall())
        return found

    def insert_events(self, rows: pa.Table) -> None:
        self._execute("events", EVENTS_MERGE, EVENT_COLUMNS, rows)

    def merge(self, table: str, key: tuple[str, ...], rules: dict[str, str], rows: pa.Table) -> None:
        self._execute(table, MERGES[table], [*key, *rules], rows)

    def store_offsets(self, topic: str, next_offsets: dict[int, int]) -> None:
        offsets = pa.table({"topic": [topic] * len(next_offsets),
                            "kafka_partition": pa.array(list(next_offsets), pa.int32()),
                            "next_offset": pa.array(list(next_offsets.values()), pa.int64())})
        self._execute("kafka_offsets", OFFSETS_MERGE_NOW, ["topic", "kafka_partition", "next_offset"], offsets)

    def insert(self, table: str, rows: pa.Table) -> None:
        columns = rows.column_names
        self._execute(table, f"INSERT INTO {table} ({', '.join(columns)}) "
                             f"VALUES ({', '.join(f':{i + 1}' for i in range(len(columns)))})", columns, rows)

    def drop_partitions_before(self, table: str, cutoff: datetime) -> list[str]:
        """Drop the interval partitions of ``table`` that end by ``cutoff``; gone already is fine
        (ORA-02149: a second run got there first)."""
        self.cur.execute(DDL_LOCK_WAIT)
        self.cur.execute(PARTITIONS_SQL, t=table.upper())
        dropped = []
        for name in partitions_before(self.cur.fetchall(), cutoff):
            try:
                self.cur.execute(drop_partition_sql(table, name))
                dropped.append(name)
            except Exception as e:  # python-oracledb's DatabaseError
                if "ORA-02149" not in str(e):
                    raise
        return dropped

    def delete_before(self, table: str, cutoff: datetime) -> int:
        column, bound = expiry_bound(table, cutoff)
        if isinstance(bound, datetime):
            bound = bound.astimezone(timezone.utc).replace(tzinfo=None)
        self.cur.execute(delete_before_sql(table, column), bound=bound)
        return self.cur.rowcount

    def _execute(self, table_name: str, sql: str, columns: list[str], rows: pa.Table) -> None:
        _input_sizes(self.cur, table_name, columns)
        self.cur.executemany(sql, _rows(rows, columns), batcherrors=False)


class OracleStore(TimeSeriesStore, TransactionalStore):
    """Expiry (``expire``) drops whole interval partitions (``interval_days`` each); each DROP commits by itself."""

    def __init__(self, url: str, password: str | None = None, options: OracleOptions | None = None):
        self.options = options or OracleOptions()
        self.engine = create_engine(oracle_url(url, password), pool_size=2, pool_pre_ping=True)

    def setup(self) -> None:
        migrate_engine(self.engine, opts=self.options)

    def committed_offsets(self, topic: str) -> dict[int, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(text("SELECT kafka_partition, next_offset FROM kafka_offsets "
                                     "WHERE topic = :t"), {"t": topic}).all()
        return {int(p): int(o) for p, o in rows}

    def count_events(self) -> tuple[int, int]:
        with self.engine.connect() as conn:
            rows, distinct = conn.exec_driver_sql(COUNT_EVENTS_ORACLE).one()
        return int(rows), int(distinct)

    def write_events(self, events: pa.Table) -> None:
        with self.transaction() as tx:
            tx.insert_events(events)

    @contextmanager
    def transaction(self):
        try:
            with self.engine.begin() as conn:
                yield _Transaction(conn.connection.driver_connection.cursor())
        except DryRun:
            return
        except StorageError:
            raise
        except Exception as e:  # SQLAlchemy's wrappers, or python-oracledb's own from the raw cursor
            orig = getattr(e, "orig", None) or e
            if isinstance(e, (DataError, IntegrityError)) or any(code in str(orig) for code in DATA_CODES):
                raise RefusedRows(f"Oracle refused the batch: {orig}") from e
            raise StorageError(f"Oracle write failed: {orig}") from e

    def close(self) -> None:
        self.engine.dispose()


def render_for_oracle(sql: str) -> str:
    """sqlglot's transpilation, plus what Oracle needs beyond it: GROUP BY names its expressions
    (no positions) and interval units are singular (``INTERVAL '10' HOUR``). Parsed in the tests,
    never run here (no Oracle server)."""
    tree = sqlglot.parse_one(sql, read=QUERY_DIALECT)
    for select in tree.find_all(exp.Select):
        group = select.args.get("group")
        if group is not None:
            group.set("expressions", [
                select.expressions[int(e.name) - 1].unalias().copy() if isinstance(e, exp.Literal) and e.is_int
                else e for e in group.expressions])
    for interval in tree.find_all(exp.Interval):
        unit = interval.args.get("unit")
        if unit is not None and unit.name.upper().endswith("S"):
            interval.set("unit", exp.var(unit.name.upper()[:-1]))
    return tree.sql(dialect="oracle")


class OracleReader(ServerReader):
    dialect = "oracle"
    SESSION_UTC = "ALTER SESSION SET TIME_ZONE = 'UTC'"

    def render(self, sql: str) -> str:
        return render_for_oracle(sql)

    def connection_factory(self) -> Callable[[], Any]:
        url, session = self.url, self.SESSION_UTC
        params = dict(user=url.username, password=url.password, host=url.host, port=url.port or 1521,
                      service_name=url.query.get("service_name") or url.database)

        def connect():
            import oracledb  # lazy: only an Oracle store loads its driver

            con = oracledb.connect(**params)
            con.cursor().execute(session)
            return con

        return connect


def url_of(settings: OracleSettings):
    """SQLAlchemy's URL of the backend, its password included."""
    return oracle_url(settings.url, settings.password())


# No scratch namespace: a schema is a user in Oracle, which PodPulse does not create.
BACKEND = Backend(settings=OracleSettings,
                  store=lambda s, raw_events_days: OracleStore(s.url, s.password(), s),
                  reader=lambda s, engine: OracleReader(None if engine else url_of(s), engine),  # a pool's engine has it
                  engine=lambda s, size, wait_s: pooled_engine(url_of(s), size, wait_s))
