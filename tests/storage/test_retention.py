"""Retention on DuckDB and a real PostgreSQL: old records go, the registry and offsets stay,
and the analytics over the days kept give the same figures as before."""

from __future__ import annotations

import math
from datetime import date, datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pytest

from analytics.queries import report_for
from podpulse.contract import decode_batch
from podpulse.simulator import FleetSpec, simulate
from storage.backends.postgres import PostgresStore
from storage.base import RefusedRows, StorageError
from storage.config import StorageConfig
from storage.reader import run_queries
from storage.retention import apply_retention, cutoffs
from storage.router import insert_rows
from testbed.stores import build_store

UTC = timezone.utc
START = datetime(2026, 10, 29, 14, tzinfo=UTC)  # Friday 30 October 2026, 00:00 AEST: the store crosses a month
DAYS, DEVICES = 5, 40  # AEST days 30 October to 3 November
CUTOFF = datetime(2026, 11, 1, 14, tzinfo=UTC)  # Monday 2 November, 00:00 AEST: in the middle
KEPT = (date(2026, 11, 2), date(2026, 11, 3))  # the AEST days after the cutoff
KEEP_DAYS = 10
NOW = CUTOFF + timedelta(days=KEEP_DAYS)
EVERY_KIND = {"raw_events": KEEP_DAYS, "rollups": KEEP_DAYS, "anomalies": KEEP_DAYS}
MONTH = datetime(2026, 11, 1, tzinfo=UTC)  # where PostgreSQL's November partitions begin

OLDEST = {"events": "SELECT min(event_time) FROM events", "device_hourly": "SELECT min(hour) FROM device_hourly",
          "device_daily": "SELECT min(day) FROM device_daily",
          "device_firmware_daily": "SELECT min(day) FROM device_firmware_daily",
          "anomalies": "SELECT min(day) FROM anomalies"}
KEPT_FOREVER = {"devices": "SELECT count(*), min(first_seen), sum(events) FROM devices",
                "offsets": "SELECT topic, kafka_partition, next_offset FROM kafka_offsets ORDER BY 1, 2"}


def anomalies() -> pa.Table:
    """One flagged device-day per AEST day of the store (as a training run records them)."""
    days = [START + timedelta(days=i) for i in range(DAYS)]
    return pa.table({"device_id": [f"dev-{i}" for i in range(DAYS)],
                     "day": pa.array(days, pa.timestamp("us", tz="UTC")),
                     "model_version": ["v1"] * DAYS, "score": [0.9] * DAYS, "flagged": [True] * DAYS,
                     "reason": ["drain"] * DAYS})


@pytest.fixture
def store(store_config):
    build_store(store_config, DEVICES, DAYS, seed=3, start=START)
    insert_rows(store_config, "anomalies", "anomalies", anomalies())
    return store_config


def _utc(value):
    if isinstance(value, datetime):
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    return value


def oldest(config) -> dict:
    return {table: _utc(rows[0][0]) for table, rows in run_queries(config, OLDEST).items()}


def rounded(value):
    """Figures as equal as two engines' float sums in another order can be."""
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    if isinstance(value, float) and math.isfinite(value) and value:
        return round(value, 9 - int(math.floor(math.log10(abs(value)))))
    return value


def test_retention_removes_what_is_older_and_the_kept_days_report_the_same(store):
    is_pg = next(iter(store.backends.values()))["type"] == "postgresql"
    before, forever = report_for(store, *KEPT), run_queries(store, KEPT_FOREVER)
    assert before["events_covered"] > 0 and before["usage_trend"]["rows"]  # figures to compare
    assert oldest(store)["events"] < MONTH  # October is in the store

    result = apply_retention(store.with_retention(EVERY_KIND), NOW)

    tables = next(iter(result["backends"].values()))["tables"]
    assert {t: r["cutoff"] for t, r in tables.items()} == dict.fromkeys(OLDEST, CUTOFF.isoformat())
    left = oldest(store)
    assert left["device_firmware_daily"] == left["device_daily"] == KEPT[0]  # report days go once wholly older
    assert left["anomalies"] >= CUTOFF and tables["anomalies"]["rows"] == 3
    if is_pg:  # whole months: October went, November's rows before the cutoff wait for all of it
        assert tables["events"] == {"cutoff": CUTOFF.isoformat(), "by": "partition", "partitions": ["events_2026_10"]}
        assert tables["device_hourly"]["partitions"] == ["device_hourly_2026_10"]
        assert MONTH <= left["events"] < CUTOFF and MONTH <= left["device_hourly"] < CUTOFF
    else:
        assert tables["events"]["by"] == "delete" and tables["events"]["rows"] > 0
        assert left["events"] >= CUTOFF and left["device_hourly"] >= CUTOFF
    assert run_queries(store, KEPT_FOREVER) == forever  # the registry and offsets never expire
    assert rounded(report_for(store, *KEPT)) == rounded(before)

    again = next(iter(apply_retention(store.with_retention(EVERY_KIND), NOW)["backends"].values()))["tables"]
    assert all(r.get("rows", 0) == 0 and r.get("partitions", []) == [] for r in again.values())  # idempotent


def test_only_the_kinds_given_expire(store):
    result = apply_retention(store.with_retention({"anomalies": KEEP_DAYS}), NOW)
    assert list(next(iter(result["backends"].values()))["tables"]) == ["anomalies"]
    left = oldest(store)
    assert left["events"] < MONTH and left["device_hourly"] < MONTH and left["device_firmware_daily"] < KEPT[0]
    assert apply_retention(store, NOW)["backends"] == {}  # no retention: keep everything


def test_cutoffs_go_to_the_backend_of_each_kind():
    config = StorageConfig(backends={"core": {"type": "postgresql", "url": "postgresql://u@h/db"},
                                     "raw": {"type": "cassandra", "hosts": ["h"]}},
                           routes={"raw_events": "raw", "devices": "core", "rollups": "core", "offsets": "core",
                                   "anomalies": "core"},
                           retention={"raw_events": 30, "rollups": 400})
    assert cutoffs(config, NOW) == {"raw": {"events": NOW - timedelta(days=30)},
                                    "core": {"device_hourly": NOW - timedelta(days=400),
                                             "device_daily": NOW - timedelta(days=400),
                                             "device_firmware_daily": NOW - timedelta(days=400)}}
    raw_only = StorageConfig(**{**config.as_dict(), "retention": {"raw_events": 30}})
    result = apply_retention(raw_only, NOW)  # Cassandra is not even opened: its rows carry their TTL
    assert result["backends"] == {"raw": {"type": "cassandra", "tables": {
        "events": {"cutoff": (NOW - timedelta(days=30)).isoformat(), "by": "ttl"}}}}


def test_a_naive_now_is_utc_and_a_bad_one_is_refused(tmp_path):
    config = StorageConfig.embedded(tmp_path / "s.duckdb").with_retention({"anomalies": 1})
    assert apply_retention(config, datetime(2026, 11, 12))["now"] == "2026-11-12T00:00:00+00:00"
    with pytest.raises(Exception, match="now must be a date and time"):
        apply_retention(config, "yesterday")


def test_an_ingest_store_writes_again_into_a_month_retention_dropped(pg_url):
    """A writer remembers the partitions it created; once retention drops one, its next write there
    fails as retryable (never as a refused row to dead-letter) and the retry recreates it."""
    config = StorageConfig(backends={"pg": {"type": "postgresql", "url": pg_url}})
    ingest = PostgresStore(pg_url)
    ingest.setup()
    late = _events(datetime(2026, 10, 20, tzinfo=UTC), seq=1)
    ingest.write_events(late)  # creates (and remembers) events_2026_10
    tables = apply_retention(config.with_retention({"raw_events": 1}), MONTH + timedelta(days=1))
    assert next(iter(tables["backends"].values()))["tables"]["events"]["partitions"] == ["events_2026_10"]
    with pytest.raises(StorageError) as e:
        ingest.write_events(_events(datetime(2026, 10, 21, tzinfo=UTC), seq=2))
    assert not isinstance(e.value, RefusedRows)
    ingest.write_events(_events(datetime(2026, 10, 21, tzinfo=UTC), seq=2))  # the retry
    assert run_queries(config, {"n": "SELECT count(*) FROM events"})["n"] == [(1,)]
    ingest.close()


def _events(when: datetime, seq: int) -> pa.Table:
    """One raw event at ``when`` (decoded from the simulator, then moved in time)."""
    values = [v for c in simulate(FleetSpec(devices=1, hours=1, seed=5, start=when)) for v in c.values][:1]
    table = decode_batch(values, window=None).table
    table = table.set_column(table.schema.get_field_index("seq"), "seq", pa.array([seq], pa.int64()))
    return table.append_column("kafka_partition", pa.array(np.zeros(1, np.int32))).append_column(
        "kafka_offset", pa.array([seq], pa.int64()))
