"""Retention: remove the records older than the storage config keeps them (``podpulse retention apply``).

``retention`` in the storage config gives the days kept per kind of record;
a kind it does not name is kept forever, and the device registry and the
offsets never expire (``storage.config.EXPIRING``). A run takes each expiring
table's cutoff (now − its kind's days) to the backend that keeps the kind:

=================  ===========================================  =====================================
backend            how                                          granularity
=================  ===========================================  =====================================
PostgreSQL         ``events``, ``device_hourly``: DETACH and    a month: the partition the cutoff
                   DROP monthly partitions; the others: DELETE  falls in stays until all of it is old
Oracle             ``events``, ``device_hourly``: DROP interval  ``interval_days`` (a day by default)
                   partitions; the others: DELETE
DuckDB             DELETE                                       a row
Cassandra          a TTL per row, set at insert from its event  a row; rows written before retention
                   time (nothing to run: the run reports it)    was set keep the TTL they got then
=================  ===========================================  =====================================

Report days (``device_daily.day``, ``device_firmware_daily.day``, AEST) go once the whole day is older
than the cutoff. A run is idempotent, and safe beside a running ingest: each
table is expired in its own short transaction and the registry and offsets are
never touched. (A DuckDB file has one writer: run it while ingest is stopped.)
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from podpulse.errors import ConfigError
from storage.config import StorageConfig
from storage.router import open_backend, opened

__all__ = ["KIND_TABLES", "cutoffs", "apply_retention", "parse_keep"]

KIND_TABLES = {"raw_events": ("events",), "rollups": ("device_hourly", "device_daily", "device_firmware_daily"),
               "anomalies": ("anomalies",)}


def cutoffs(config: StorageConfig, now: datetime) -> dict[str, dict[str, datetime]]:
    """Backend name → table → the instant before which its records go."""
    out: dict[str, dict[str, datetime]] = {}
    for kind, days in config.retention.items():
        for table in KIND_TABLES[kind]:
            out.setdefault(config.routes[kind], {})[table] = now - timedelta(days=days)
    return out


def apply_retention(config: StorageConfig, now: datetime | None = None) -> dict:
    """Expire every backend's old records; what each removed, per table (rows or partitions).

    ``now``: the instant the retention counts back from (default: now; naive means UTC)."""
    now = _utc(now or datetime.now(timezone.utc))
    backends = {name: {"type": config.settings(name).type, "tables": _expire(config, name, tables)}
                for name, tables in cutoffs(config, now).items()}
    return {"now": now.isoformat(), "retention": dict(config.retention), "backends": backends}


def _expire(config: StorageConfig, name: str, tables: dict[str, datetime]) -> dict[str, dict]:
    if config.settings(name).expires_on_write:  # each row carries its TTL already (Cassandra)
        return {t: {"cutoff": cutoff.isoformat(), "by": "ttl"} for t, cutoff in tables.items()}
    with opened(open_backend(config, name)) as store:
        removed = store.expire(tables)
    return {t: {"cutoff": cutoff.isoformat(), "by": "partition" if "partitions" in removed[t] else "delete",
                **removed[t]} for t, cutoff in tables.items()}


def parse_keep(pairs: list[str]) -> dict[str, int | str]:
    """``["raw_events=30"]`` → ``{"raw_events": 30}``; the storage config judges kinds and days."""
    out: dict[str, int | str] = {}
    for pair in pairs:
        kind, eq, days = pair.partition("=")
        if not eq or not kind:
            raise ConfigError(f"--keep takes KIND=DAYS (e.g. raw_events=30), got {pair!r}")
        out[kind.strip()] = int(days) if days.strip().lstrip("-").isdigit() else days
    return out


def _utc(now: datetime) -> datetime:
    if not isinstance(now, datetime):
        raise ConfigError(f"retention: now must be a date and time, got {now!r}")
    return now.replace(tzinfo=timezone.utc) if now.tzinfo is None else now.astimezone(timezone.utc)
