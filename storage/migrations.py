"""Versioned, forward-only schema migrations for the relational backends.

A migration is a version, a description and the statements it runs for a
dialect. Applied versions are recorded in ``podpulse_schema_version``. Running
``migrate`` again applies nothing; two processes running it at once are
serialised by a lock, so one applies and the other finds nothing left to do:

- PostgreSQL: ``pg_advisory_xact_lock`` and one transaction (PostgreSQL DDL is
  transactional: a failed migration leaves nothing behind);
- DuckDB: the database file's own lock (one writer process at a time; others
  retry opening it) and one transaction;
- Oracle: a ``DBMS_LOCK`` session lock (DDL commits implicitly, so a
  transaction cannot hold it); each migration is recorded right after its
  statements. The user needs ``EXECUTE`` on ``DBMS_LOCK``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

from sqlalchemy import select
from sqlalchemy.dialects import oracle, postgresql
from sqlalchemy.schema import CreateTable

from podpulse.errors import StorageError
from podpulse.localtime import REPORT_UTC_OFFSET_H
from storage import schema
from storage.config import OracleOptions
from storage.rollups import DAILY_MERGE
from storage.schema import add_columns_ddl, create_table_ddl, table_as_of
from storage.sql import offset_minutes_sql

__all__ = ["Migration", "MIGRATIONS", "LATEST", "statements", "migrate_duckdb", "migrate_engine",
           "applied_versions"]


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    render: Callable[[str, OracleOptions], list[str]]


def _core(dialect: str, opts: OracleOptions) -> list[str]:
    tables = (schema.events, schema.device_hourly, schema.devices, schema.kafka_offsets)
    return [create_table_ddl(table_as_of(t, 1), dialect, opts) for t in tables]


def _anomalies(dialect: str, opts: OracleOptions) -> list[str]:
    return [create_table_ddl(schema.anomalies, dialect, opts)]


def _contract_v3(dialect: str, opts: OracleOptions) -> list[str]:
    return add_columns_ddl(schema.events, 3, dialect)


def _exposure_and_drain(dialect: str, opts: OracleOptions) -> list[str]:
    return add_columns_ddl(schema.device_hourly, 4, dialect) + add_columns_ddl(schema.devices, 4, dialect)


def _firmware_days(dialect: str, opts: OracleOptions) -> list[str]:
    """The firmware rollup, filled from the raw events already in this store (none when they
    live in Cassandra: adoption then starts with the events ingested after this migration)."""
    offset = REPORT_UTC_OFFSET_H
    day = (f"TRUNC(event_time + INTERVAL '{offset}' HOUR)" if dialect == "oracle"
           else f"CAST(event_time + INTERVAL '{offset} hours' AS DATE)")
    return [create_table_ddl(schema.device_firmware_daily, dialect, opts),
            f"INSERT INTO device_firmware_daily (device_id, day, firmware, events) "
            f"SELECT device_id, {day}, firmware, count(*) FROM events GROUP BY device_id, {day}, firmware"]


def _device_days(dialect: str, opts: OracleOptions) -> list[str]:
    """The daily rollup, summed from the hourly one already in this store."""
    offset, local = REPORT_UTC_OFFSET_H, offset_minutes_sql()
    if dialect == "oracle":  # Oracle keeps UTC TIMESTAMPs
        day = f"TRUNC(hour + INTERVAL '{offset}' HOUR)"
        local_hour = f"EXTRACT(HOUR FROM hour + NUMTODSINTERVAL({local}, 'MINUTE'))"
    else:  # in UTC, whatever the session's time zone
        day = f"CAST((hour AT TIME ZONE 'UTC') + INTERVAL '{offset} hours' AS DATE)"
        local_hour = f"extract(hour FROM (hour AT TIME ZONE 'UTC') + ({local}) * INTERVAL '1 minute')"
    sums = [f"sum({c})" for c in DAILY_MERGE if c != "local_hours"]
    # a device-day's hours are distinct, so the sum of their bits is their OR
    return [create_table_ddl(schema.device_daily, dialect, opts),
            f"INSERT INTO device_daily (device_id, day, state, urban, {', '.join(DAILY_MERGE)}) "
            f"SELECT device_id, {day}, state, urban, {', '.join(sums)}, sum(power(2, {local_hour})) "
            f"FROM device_hourly GROUP BY device_id, {day}, state, urban"]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "core tables: events, device_hourly, devices, kafka_offsets", _core),
    Migration(2, "anomalies", _anomalies),
    Migration(3, "event contract v3: events.spatial_audio", _contract_v3),
    Migration(4, "sound exposure and battery drain rollups; last sample per device", _exposure_and_drain),
    Migration(5, "model registry index", lambda dialect, opts: [
        create_table_ddl(schema.model_versions, dialect, opts)]),
    Migration(6, "firmware per device and day, so adoption needs no raw events", _firmware_days),
    Migration(7, "erased devices: tombstones that keep replays from bringing them back", lambda dialect, opts: [
        create_table_ddl(schema.erased_devices, dialect, opts)]),
    Migration(8, "saved cohorts: named filters over the devices", lambda dialect, opts: [
        create_table_ddl(schema.cohorts, dialect, opts)]),
    Migration(9, "firmware regression findings", lambda dialect, opts: [
        create_table_ddl(schema.firmware_findings, dialect, opts)]),
    Migration(10, "bud temperature and charge in the hourly rollups", lambda dialect, opts:
              add_columns_ddl(schema.device_hourly, 10, dialect)),
    Migration(11, "each device's day per region, summed from its hours: the reports' region-days and "
                  "device-weeks", _device_days),
    Migration(12, "privacy: each token's daily budget spent, the noisy answers released, the exact reads",
              lambda dialect, opts: [create_table_ddl(t, dialect, opts) for t in
                                     (schema.privacy_budget, schema.privacy_answers, schema.exact_reads)]),
)
LATEST = MIGRATIONS[-1].version


def statements(migration: Migration, dialect: str, opts: OracleOptions | None = None) -> list[str]:
    return migration.render(dialect, opts or OracleOptions())


def _pending(applied: set[int], target: int | None) -> list[Migration]:
    target = LATEST if target is None else target
    if not 0 <= target <= LATEST:
        raise StorageError(f"target version {target} does not exist (latest is {LATEST})")
    return [m for m in MIGRATIONS if m.version not in applied and m.version <= target]


def _record(m: Migration) -> dict:
    return {"version": m.version, "description": m.description, "applied_at": datetime.now(timezone.utc)}


# -- DuckDB ----------------------------------------------------------------------------
def migrate_duckdb(con, target: int | None = None) -> list[int]:
    """Apply pending migrations in one transaction on an open DuckDB connection."""
    con.begin()
    try:
        con.execute(create_table_ddl(schema.schema_version, "duckdb").replace(
            "CREATE TABLE", "CREATE TABLE IF NOT EXISTS", 1))
        applied = {v for (v,) in con.execute("SELECT version FROM podpulse_schema_version").fetchall()}
        done = []
        for m in _pending(applied, target):
            for sql in statements(m, "duckdb"):
                con.execute(sql)
            r = _record(m)
            con.execute("INSERT INTO podpulse_schema_version VALUES (?, ?, ?)",
                        [r["version"], r["description"], r["applied_at"]])
            done.append(m.version)
        con.commit()
        return done
    except BaseException:
        con.rollback()
        raise


# -- SQLAlchemy engines: PostgreSQL, Oracle -------------------------------------------
_LOCK_KEY = 0x706F64707573  # "podpus": the advisory lock id of PodPulse migrations


def applied_versions(conn) -> set[int]:
    if not conn.dialect.has_table(conn, "podpulse_schema_version"):
        return set()
    return set(conn.execute(select(schema.schema_version.c.version)).scalars())


def migrate_engine(engine, target: int | None = None, opts: OracleOptions | None = None,
                   lock_timeout_s: int = 600) -> list[int]:
    dialect = engine.dialect.name
    if dialect == "postgresql":
        with engine.begin() as conn:
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_LOCK_KEY})")
            conn.exec_driver_sql(str(CreateTable(schema.schema_version, if_not_exists=True).compile(
                dialect=postgresql.dialect())))
            return _apply(conn, "postgresql", target, opts, commit_each=False)
    if dialect == "oracle":
        with engine.connect() as conn:
            handle = _oracle_lock(conn, lock_timeout_s)
            try:
                if not conn.dialect.has_table(conn, "podpulse_schema_version"):
                    conn.exec_driver_sql(str(CreateTable(schema.schema_version).compile(
                        dialect=oracle.dialect())))
                return _apply(conn, "oracle", target, opts, commit_each=True)
            finally:
                conn.exec_driver_sql(
                    "DECLARE r INTEGER; BEGIN r := DBMS_LOCK.RELEASE(:h); END;", {"h": handle})
    raise StorageError(f"no migrations for {dialect!r}")


def _apply(conn, dialect: str, target, opts, commit_each: bool) -> list[int]:
    done = []
    for m in _pending(applied_versions(conn), target):
        for sql in statements(m, dialect, opts):
            conn.exec_driver_sql(sql)
        conn.execute(schema.schema_version.insert().values(**_record(m)))
        if commit_each:
            conn.commit()
        done.append(m.version)
    return done


def _oracle_lock(conn, timeout_s: int) -> str:
    """Take the PodPulse migration lock (a DBMS_LOCK session lock); return its handle."""
    raw = conn.connection.driver_connection
    cur = raw.cursor()
    handle = cur.var(str)
    status = cur.var(int)
    cur.execute("""
        BEGIN
          DBMS_LOCK.ALLOCATE_UNIQUE('PODPULSE_MIGRATIONS', :handle);
          :status := DBMS_LOCK.REQUEST(:handle, DBMS_LOCK.X_MODE, :timeout, FALSE);
        END;""", handle=handle, status=status, timeout=timeout_s)
    if status.getvalue() not in (0, 4):  # 0 granted, 4 already held by this session
        raise StorageError(f"could not take the migration lock (DBMS_LOCK status {status.getvalue()})")
    return handle.getvalue()
