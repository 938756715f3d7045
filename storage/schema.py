"""One definition of the relational tables (SQLAlchemy Core), rendered per dialect.

The same :data:`metadata` gives the DDL for PostgreSQL, Oracle and the embedded
DuckDB (which takes PostgreSQL's rendering, minus partitioning). Dialect
extras are applied by :func:`create_table_ddl`:

- PostgreSQL: ``events`` and ``device_hourly`` are range-partitioned by time
  (``PARTITION BY RANGE``), one partition per month, created on demand by the
  store (:func:`postgres_month_partition_ddl`).
- Oracle: the same two tables use INTERVAL range partitioning (one partition
  per ``interval_days``) and, when enabled, the In-Memory column store
  (``INMEMORY MEMCOMPRESS ... PRIORITY ...``). Oracle keeps times as UTC
  ``TIMESTAMP``: interval partitioning cannot key on TIMESTAMP WITH TIME ZONE.
"""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta, timezone

import pyarrow as pa
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    Double,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    SmallInteger,
    String,
    Table,
    Text,
)
from sqlalchemy.dialects import oracle, postgresql
from sqlalchemy.schema import CreateColumn, CreateTable

from podpulse.contract import ARROW_SCHEMA
from podpulse.localtime import REPORT_UTC_OFFSET_H
from storage.config import OracleOptions
from storage.rollups import (
    DAILY_KEY,
    DAILY_MERGE,
    DEVICE_MERGE,
    FIRMWARE_KEY,
    HOURLY_MERGE,
    KAFKA_COLUMNS,
    SINCE_MIGRATION_4,
    SINCE_MIGRATION_10,
)

__all__ = ["metadata", "events", "device_hourly", "device_daily", "device_firmware_daily", "devices", "kafka_offsets", "anomalies",
           "schema_version", "model_versions", "erased_devices", "firmware_findings", "ERASED_FROM", "create_table_ddl",
           "table_as_of", "add_columns_ddl", "postgres_month_partition_ddl", "postgres_month_partition", "month_end",
           "EXPIRING_TABLES", "expiry_bound", "EVENT_COLUMNS"]

metadata = MetaData()

# UTC instants: WITH TIME ZONE where the engine handles it well, plain UTC TIMESTAMP on Oracle.
UtcTime = DateTime(timezone=True).with_variant(oracle.TIMESTAMP(), "oracle")

_LENGTH = {"device_id": 64, "model": 64, "firmware": 64, "host_device": 64, "postcode": 4,
           "charging": 8, "noise_mode": 16, "state": 3, "extras": 4000, "topic": 249}


def _sql_type(name: str, arrow_type: pa.DataType):
    if pa.types.is_string(arrow_type):
        return String(_LENGTH[name])
    if pa.types.is_timestamp(arrow_type):
        return UtcTime
    return {pa.int8(): SmallInteger(), pa.int16(): SmallInteger(), pa.int32(): Integer(),
            pa.int64(): BigInteger(), pa.float64(): Double(), pa.bool_(): Boolean()}[arrow_type]


EVENT_COLUMNS: list[str] = [f.name for f in ARROW_SCHEMA] + [n for n, _ in KAFKA_COLUMNS]
_NOT_NULL = {"device_id", "seq", "event_time"}

events = Table(
    "events", metadata,
    *(Column(f.name, _sql_type(f.name, f.type), nullable=f.name not in _NOT_NULL)
      for f in [*ARROW_SCHEMA, *(pa.field(n, t) for n, t in KAFKA_COLUMNS)]),
    PrimaryKeyConstraint("device_id", "seq", "event_time"),
    # DuckDB keeps raw events without a key: the offsets stored in the same transaction make
    # them exactly-once, and an index would halve the ingest rate (measured).
    info={"partition_by": "event_time", "duckdb_without_key": True, "expire_by": "event_time"},
)
events.c.spatial_audio.info["since_migration"] = 3  # event contract v3


def table_as_of(table: Table, migration: int) -> Table:
    """``table`` as the migration ``migration`` created it: without columns added later."""
    cols = [c._copy() for c in table.columns if c.info.get("since_migration", 1) <= migration]
    pk = [c.name for c in table.primary_key.columns]
    return Table(table.name, MetaData(), *cols, PrimaryKeyConstraint(*pk), info=dict(table.info))

_HOURLY_TYPES = {"state": String(3), "urban": Boolean(), "events": BigInteger(),
                 "output_samples": BigInteger(), "ambient_samples": BigInteger(),
                 "battery_left_min": SmallInteger(), "battery_right_min": SmallInteger(),
                 "battery_case_min": SmallInteger(), "temp_samples": BigInteger()}
device_hourly = Table(
    "device_hourly", metadata,
    Column("device_id", String(64), nullable=False),
    Column("hour", UtcTime, nullable=False),
    *(Column(c, _HOURLY_TYPES.get(c, Double())) for c in HOURLY_MERGE),
    PrimaryKeyConstraint("device_id", "hour"),
    info={"partition_by": "hour", "expire_by": "hour"},
)

_DEVICE_TYPES = {"model": String(64), "firmware": String(64), "postcode": String(4), "state": String(3),
                 "urban": Boolean(), "host_device": String(64), "schema_version": SmallInteger(),
                 "first_seen": UtcTime, "last_seen": UtcTime, "events": BigInteger(),
                 "last_seq": BigInteger(), "last_battery_left": SmallInteger(),
                 "last_battery_right": SmallInteger(), "last_battery_case": SmallInteger(),
                 "last_in_ear_left": Boolean(), "last_in_ear_right": Boolean(), "last_charging": String(8)}
devices = Table(
    "devices", metadata,
    Column("device_id", String(64), primary_key=True),
    *(Column(c, _DEVICE_TYPES[c]) for c in DEVICE_MERGE),
)

for _table in (device_hourly, devices):
    for _name in SINCE_MIGRATION_4:
        if _name in _table.c:
            _table.c[_name].info["since_migration"] = 4
for _name in SINCE_MIGRATION_10:
    device_hourly.c[_name].info["since_migration"] = 10


def add_columns_ddl(table: Table, migration: int, dialect: str) -> list[str]:
    """ALTER TABLE ... ADD for the columns ``migration`` introduced."""
    d = {"oracle": oracle.dialect()}.get(dialect, postgresql.dialect())
    cols = [str(CreateColumn(c).compile(dialect=d)) for c in table.columns
            if c.info.get("since_migration") == migration]
    if not cols:
        return []
    if dialect == "oracle":
        return [f"ALTER TABLE {table.name} ADD ({', '.join(cols)})"]
    return [f"ALTER TABLE {table.name} ADD COLUMN {c}" for c in cols]


device_firmware_daily = Table(
    "device_firmware_daily", metadata,
    Column("device_id", String(64), nullable=False),
    Column("day", Date, nullable=False),  # AEST (podpulse.localtime.REPORT_UTC_OFFSET_H)
    Column("firmware", String(64), nullable=False),
    Column("events", BigInteger),
    PrimaryKeyConstraint(*FIRMWARE_KEY),
    info={"expire_by": "day"},
)

# Each device's AEST day per state and urban class, summed from its hours (storage.rollups.DAILY_KEY;
# since migration 11): what the reports count distinct devices per region-day and device-weeks from.
device_daily = Table(
    "device_daily", metadata,
    Column("device_id", String(64), nullable=False),
    Column("day", Date, nullable=False),  # AEST
    Column("state", String(3), nullable=False),
    Column("urban", Boolean, nullable=False),
    *(Column(c, BigInteger() if c in ("events", "local_hours") else Double()) for c in DAILY_MERGE),
    PrimaryKeyConstraint(*DAILY_KEY),
    info={"expire_by": "day"},
)

kafka_offsets = Table(
    "kafka_offsets", metadata,
    Column("topic", String(249), nullable=False),  # Kafka's longest topic name
    Column("kafka_partition", Integer, nullable=False),
    Column("next_offset", BigInteger, nullable=False),
    Column("updated_at", UtcTime),
    PrimaryKeyConstraint("topic", "kafka_partition"),
)

anomalies = Table(
    "anomalies", metadata,
    Column("device_id", String(64), nullable=False),
    Column("day", UtcTime, nullable=False),
    Column("model_version", String(64), nullable=False),
    Column("score", Double),
    Column("flagged", Boolean),
    Column("reason", String(200)),
    PrimaryKeyConstraint("device_id", "day", "model_version"),
    info={"expire_by": "day"},
)

model_versions = Table(
    "model_versions", metadata,
    Column("name", String(64), nullable=False),
    Column("version", String(32), nullable=False),
    Column("path", String(1000), nullable=False),  # directory or object-store URL of the artefacts
    Column("created_at", UtcTime, nullable=False),
    Column("metrics", String(4000)),  # JSON
    Column("metadata", String(4000)),  # JSON: data window, feature schema, parameters
    PrimaryKeyConstraint("name", "version"),
)

# Tombstones of erased devices (since migration 7): a commit drops every row of a device listed
# here, so a replay or a backfill of old offsets never brings an erased device back.
erased_devices = Table(
    "erased_devices", metadata,
    Column("device_id", String(64), primary_key=True),
    Column("erased_at", UtcTime, nullable=False),
)

# Saved cohorts (since migration 8): a name for a filter over the devices (analytics.cohort), JSON.
cohorts = Table(
    "cohorts", metadata,
    Column("name", String(64), primary_key=True),
    Column("definition", String(2000), nullable=False),
    Column("created_at", UtcTime, nullable=False),
)

# Firmware regression findings (since migration 9): one row per model and version compared with its
# predecessor, per `podpulse detect` run (analytics.regressions); the latest run's are the current ones.
firmware_findings = Table(
    "firmware_findings", metadata,
    Column("detected_at", UtcTime, nullable=False),
    Column("model", String(64), nullable=False),
    Column("firmware", String(64), nullable=False),
    Column("baseline_firmware", String(64), nullable=False),
    Column("devices", BigInteger, nullable=False),
    Column("drain_change", Double, nullable=False),
    Column("ci_low", Double, nullable=False),
    Column("ci_high", Double, nullable=False),
    Column("p_value", Double, nullable=False),
    Column("listening_change_h", Double, nullable=False),
    Column("first_day", String(10), nullable=False),
    Column("regression", Boolean, nullable=False),
    PrimaryKeyConstraint("detected_at", "model", "firmware"),
)

# Differential privacy (since migration 12; analytics.private, storage.ledger): the ε each token spent
# per UTC day, in millionths (sums stay exact), the answers released (the same question on the same day
# gets the same noisy answer and spends nothing), and every exact read: who, what, when.
privacy_budget = Table(
    "privacy_budget", metadata,
    Column("token", String(64), nullable=False),
    Column("day", Date, nullable=False),
    Column("spent_micro", BigInteger, nullable=False),
    PrimaryKeyConstraint("token", "day"),
)

privacy_answers = Table(
    "privacy_answers", metadata,
    Column("day", Date, nullable=False),
    Column("question", String(64), nullable=False),  # SHA-256 of the question, canonical JSON
    Column("answer", Text, nullable=False),  # JSON
    Column("released_at", UtcTime, nullable=False),
    PrimaryKeyConstraint("day", "question"),
)

exact_reads = Table(
    "exact_reads", metadata,
    Column("read_at", UtcTime, nullable=False),
    Column("who", String(64), nullable=False),
    Column("what", String(1000), nullable=False),
)

schema_version = Table(
    "podpulse_schema_version", metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("description", String(200), nullable=False),
    Column("applied_at", UtcTime, nullable=False),
)


def create_table_ddl(table: Table, dialect: str, oracle_options: OracleOptions | None = None) -> str:
    """CREATE TABLE for ``dialect`` ("postgresql", "oracle" or "duckdb"), with its partitioning."""
    partition_by = table.info.get("partition_by")
    if dialect == "duckdb":  # PostgreSQL's rendering, no partitioning
        if table.info.get("duckdb_without_key"):
            table = Table(table.name, MetaData(),
                          *(Column(c.name, c.type, nullable=c.nullable) for c in table.columns))
        return str(CreateTable(table).compile(dialect=postgresql.dialect())).strip()
    if dialect == "postgresql":
        ddl = str(CreateTable(table).compile(dialect=postgresql.dialect())).strip()
        return f"{ddl} PARTITION BY RANGE ({partition_by})" if partition_by else ddl
    if dialect == "oracle":
        opts = oracle_options or OracleOptions()
        ddl = str(CreateTable(table).compile(dialect=oracle.dialect())).strip()
        if partition_by:
            ddl += (f" PARTITION BY RANGE ({partition_by})"
                    f" INTERVAL (NUMTODSINTERVAL({opts.interval_days}, 'DAY'))"
                    f" (PARTITION p_first VALUES LESS THAN (TIMESTAMP '2019-10-01 00:00:00'))")
            if opts.inmemory:
                ddl += f" INMEMORY MEMCOMPRESS {opts.memcompress} PRIORITY {opts.priority}"
                if opts.memcompress == "NO MEMCOMPRESS":
                    ddl = ddl.replace("MEMCOMPRESS NO MEMCOMPRESS", "NO MEMCOMPRESS")
        return ddl
    raise ValueError(f"no DDL for dialect {dialect!r}")


def postgres_month_partition_ddl(table: str, year: int, month: int) -> str:
    """The monthly partition of a partitioned PostgreSQL table (idempotent)."""
    ny, nm = (year + 1, 1) if month == 12 else (year, month + 1)
    return (f"CREATE TABLE IF NOT EXISTS {table}_{year:04d}_{month:02d} PARTITION OF {table} "
            f"FOR VALUES FROM ('{year:04d}-{month:02d}-01 00:00:00+00') "
            f"TO ('{ny:04d}-{nm:02d}-01 00:00:00+00')")


_MONTH_PARTITION = re.compile(r"(\w+)_(\d{4})_(\d{2})")


def postgres_month_partition(name: str) -> tuple[str, int, int] | None:
    """``events_2026_10`` → ("events", 2026, 10), as :func:`postgres_month_partition_ddl` names it;
    None for another name."""
    m = _MONTH_PARTITION.fullmatch(name)
    return (m.group(1), int(m.group(2)), int(m.group(3))) if m else None


def month_end(year: int, month: int) -> datetime:
    """Where a monthly partition ends (exclusive): the next month's first instant, UTC."""
    return datetime(year + 1, 1, 1, tzinfo=timezone.utc) if month == 12 else \
        datetime(year, month + 1, 1, tzinfo=timezone.utc)


# What erasing a device deletes: every table keyed by device (its raw events, rollups, registry
# entry and flagged device-days). Training reads these same tables: it keeps no training table.
ERASED_FROM = tuple(t.name for t in metadata.sorted_tables if "device_id" in t.c and t is not erased_devices)

# The tables retention may expire, each by its time column (``info["expire_by"]``).
EXPIRING_TABLES = {t.name: t.info["expire_by"] for t in metadata.sorted_tables if "expire_by" in t.info}


def expiry_bound(table: str, cutoff: datetime) -> tuple[str, date | datetime]:
    """The column and the value a row of ``table`` older than ``cutoff`` lies strictly below.

    A DATE column holds report days (AEST): a day is older than the cutoff when it ended by
    then, so the bound is the AEST date the cutoff falls on. A time column takes the cutoff."""
    column = EXPIRING_TABLES[table]
    if isinstance(metadata.tables[table].c[column].type, Date):
        return column, (cutoff + timedelta(hours=REPORT_UTC_OFFSET_H)).date()
    return column, cutoff
