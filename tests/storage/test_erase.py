"""Erasing a device on DuckDB, a real PostgreSQL and a real Cassandra: no row of it is left in any
table, its tombstone is recorded, the rollups still equal a recomputation from the raw events left,
and a backfill of its old events under fresh offsets does not bring it back."""

from __future__ import annotations

import os
import threading
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from podpulse.contract import decode_batch
from podpulse.simulator import FleetSpec, simulate
from storage.backends.postgres import PostgresStore
from storage.base import StorageError
from storage.config import StorageConfig
from storage.reader import run_queries
from storage.rollups import report_days
from storage.router import erase_devices, insert_rows, open_storage
from storage.schema import ERASED_FROM

START = datetime(2026, 10, 30, 6, tzinfo=timezone.utc)  # 30 hours: two UTC days of Cassandra partitions
HELD_BACK = START + timedelta(hours=24)  # the other devices' events from here on arrive only with the backfill
UNKNOWN = "ap-never-seen-0001"
DEVICES = 12
# Cassandra tells an event sent again by the (partition, offset) it is stored from, not the topic:
# the backfill's offsets differ from the first ingest's
BACKFILL_FROM = 1_000_000


@pytest.fixture(scope="module")
def fleet():
    """(every event, the victim's id, the rows first ingested, the rows held back for the backfill)."""
    spec = FleetSpec(devices=DEVICES, hours=30, seed=5, start=START)
    events = decode_batch([v for c in simulate(spec) for v in c.values], window=None).table
    counts = events.group_by("device_id").aggregate([("seq", "count")]).sort_by([("seq_count", "descending")])
    victim = counts["device_id"][0].as_py()
    held = pc.and_(pc.not_equal(events["device_id"], victim),
                   pc.greater_equal(events["event_time"], pa.scalar(HELD_BACK, events["event_time"].type)))
    return events, victim, events.filter(pc.invert(held)), events.filter(held)


def offsets(rows: pa.Table, start: int = 0) -> pa.Table:
    """``rows`` as partition 0 of a topic from offset ``start``."""
    return rows.append_column("kafka_partition", pa.array(np.zeros(rows.num_rows, np.int32))).append_column(
        "kafka_offset", pa.array(np.arange(start, start + rows.num_rows), pa.int64()))


def load(config: StorageConfig, rows: pa.Table, victim: str, other: str) -> None:
    """Ingest ``rows`` in three batches, and flag a device-day of ``victim`` and of ``other``."""
    rows = offsets(rows)
    storage = open_storage(config)
    storage.setup()
    try:
        for start in range(0, rows.num_rows, rows.num_rows // 3 + 1):
            piece = rows.slice(start, rows.num_rows // 3 + 1)
            storage.commit("live", piece, {0: start + piece.num_rows})
    finally:
        storage.close()
    insert_rows(config, "anomalies", "anomalies", pa.table({
        "device_id": [victim, other], "day": pa.array([START, START], pa.timestamp("us", tz="UTC")),
        "model_version": ["v1", "v1"], "score": [0.9, 0.8], "flagged": [True, True], "reason": ["drain", "drain"]}))


def left_of(config: StorageConfig, device: str) -> dict[str, int]:
    """Rows of ``device`` in each device-keyed table of the relational core."""
    rows = run_queries(config, {t: f"SELECT count(*) FROM {t} WHERE device_id = '{device}'" for t in ERASED_FROM})
    return {t: r[0][0] for t, r in rows.items()}


def tombstones(config: StorageConfig) -> dict[str, datetime]:
    return dict(run_queries(config, {"t": "SELECT device_id, erased_at FROM erased_devices"})["t"])


def erase_and_backfill(config: StorageConfig, fleet, assert_rollups_match_raw, raw_left=None) -> dict:
    """The whole story on one configuration; ``raw_left(device)``: the device's raw events where a
    separate time-series store keeps them. Returns the first erasure's result."""
    events, victim, first, held = fleet
    other = first.filter(pc.not_equal(first["device_id"], victim))["device_id"][0].as_py()
    load(config, first, victim, other)
    mine = events.filter(pc.equal(events["device_id"], victim))
    hours = len(set(pc.floor_temporal(mine["event_time"], unit="hour").to_pylist()))
    days = len(set(report_days(mine["event_time"]).to_pylist()))  # a simulated device stays in its region
    assert left_of(config, victim)["devices"] == 1
    if raw_left:
        assert raw_left(victim) == mine.num_rows

    result = erase_devices(config, [victim, UNKNOWN, victim])
    assert result["devices"] == sorted([victim, UNKNOWN])
    removed = {t: n for backend in result["backends"].values() for t, n in backend["tables"].items() if n}
    assert removed == {"events": mine.num_rows, "device_hourly": hours, "device_daily": days, "devices": 1,
                       "anomalies": 1, "device_firmware_daily": removed["device_firmware_daily"]}
    assert set(left_of(config, victim).values()) == {0} and left_of(config, other)["anomalies"] == 1
    if raw_left:
        assert raw_left(victim) == 0 and raw_left(other) > 0
    erased_at = tombstones(config)
    assert set(erased_at) == {victim, UNKNOWN}
    assert_rollups_match_raw(config)
    devices = run_queries(config, {"n": "SELECT count(*), sum(events) FROM devices"})["n"][0]
    assert tuple(devices) == (DEVICES - 1, first.num_rows - mine.num_rows)

    again = erase_devices(config, [victim])  # idempotent: nothing more goes, the first tombstone stays
    assert not any(n for backend in again["backends"].values() for n in backend["tables"].values())
    assert tombstones(config) == erased_at

    storage = open_storage(config)  # a backfill: every event again, under fresh offsets of another topic
    storage.setup()
    try:
        backfill = offsets(events, BACKFILL_FROM)
        done = storage.commit("backfill", backfill, {0: BACKFILL_FROM + backfill.num_rows})
    finally:
        storage.close()
    assert (done.erased, done.applied, done.repeated) == (mine.num_rows, held.num_rows,
                                                          events.num_rows - mine.num_rows - held.num_rows)
    assert set(left_of(config, victim).values()) == {0}
    if raw_left:
        assert raw_left(victim) == 0
    assert_rollups_match_raw(config)
    devices = run_queries(config, {"n": "SELECT count(*), sum(events) FROM devices"})["n"][0]
    assert tuple(devices) == (DEVICES - 1, events.num_rows - mine.num_rows)
    return result


def test_erasure_on_duckdb_and_postgresql(store_config, fleet, assert_rollups_match_raw):
    result = erase_and_backfill(store_config, fleet, assert_rollups_match_raw)
    (backend,) = result["backends"].values()
    assert backend["tombstones"] == 2


def test_erasure_with_raw_events_in_cassandra(cassandra, tmp_path, fleet, assert_rollups_match_raw):
    from testbed.cassandra import cassandra_events

    raw = {"type": "cassandra", "hosts": [cassandra.hosts], "port": cassandra.port,
           "keyspace": f"podpulse_erase_{os.getpid()}"}
    config = StorageConfig(backends={"core": {"type": "duckdb", "path": str(tmp_path / "core.duckdb")}, "raw": raw},
                           routes={"raw_events": "raw", "devices": "core", "rollups": "core", "offsets": "core",
                                   "anomalies": "core"})

    def raw_left(device: str) -> int:
        return cassandra_events(raw).execute("SELECT count(*) FROM events WHERE device_id = ?", [device]).fetchone()[0]

    try:
        result = erase_and_backfill(config, fleet, assert_rollups_match_raw, raw_left)
    finally:
        storage = open_storage(config)
        storage.setup()
        storage.timeseries._session.execute(f"DROP KEYSPACE IF EXISTS {raw['keyspace']}")
        storage.close()
    events, victim, _, _ = fleet  # the victim's partitions: every UTC day from its first event to its last
    times = events.filter(pc.equal(events["device_id"], victim))["event_time"]
    days = (pc.max(times).as_py().date() - pc.min(times).as_py().date()).days + 1
    assert days > 1 and result["backends"]["raw"]["partitions"] == days


def test_an_erasure_cut_short_lets_nothing_back_and_running_it_again_finishes(tmp_path, fleet):
    """Raw events in a store of their own (here a second DuckDB file): the tombstones are recorded
    first, so a replay after a crash right then writes nothing of the device (and deletes what an
    earlier attempt wrote); a second erasure deletes the rest. A device erased while a batch was on
    its way: the commit drops its rows, and the router deletes the raw events it had just written."""
    events, victim, first, held = fleet
    config = StorageConfig(backends={"raw": {"type": "duckdb", "path": str(tmp_path / "raw.duckdb")},
                                     "core": {"type": "duckdb", "path": str(tmp_path / "core.duckdb")}},
                           routes={"raw_events": "raw", "devices": "core", "rollups": "core", "offsets": "core",
                                   "anomalies": "core"})
    late = held["device_id"][0].as_py()  # a device erased between the router's lookup and its commit
    load(config, first, victim, late)
    mine = events.filter(pc.equal(events["device_id"], victim))
    storage = open_storage(config)
    storage.setup()

    def raw(device: str) -> int:
        return storage.timeseries.con.execute("SELECT count(*) FROM events WHERE device_id = ?",
                                              [device]).fetchall()[0][0]

    try:
        assert storage.relational.mark_erased([victim])[victim][0] == pc.min(mine["event_time"]).as_py()
        # the process dies here: tombstone recorded, nothing deleted yet; then a replay comes
        replay = storage.commit("replay", offsets(mine), {0: mine.num_rows})
        assert (replay.erased, replay.applied, raw(victim)) == (mine.num_rows, 0, 0)
        assert storage.relational.con.execute(
            "SELECT count(*) FROM devices WHERE device_id = ?", [victim]).fetchall() == [(1,)]  # still to delete

        storage.relational.mark_erased([late])
        lookup, calls = storage.relational.lookup, []

        def before_the_erasure(ids):  # the router's first lookup ran before the tombstone was recorded
            calls.append(ids)
            return ([], lookup(ids)[1]) if len(calls) == 1 else lookup(ids)

        storage.relational.lookup = before_the_erasure
        batch = offsets(held.filter(pc.equal(held["device_id"], late)))
        done = storage.commit("late", batch, {0: batch.num_rows})
        assert (done.erased, done.applied, len(calls)) == (batch.num_rows, 0, 2) and raw(late) == 0
    finally:
        storage.close()
    finished = erase_devices(config, [victim, late])
    assert finished["backends"]["core"]["tables"]["devices"] == 2
    assert set(left_of(config, victim).values()) == set(left_of(config, late).values()) == {0}


def test_an_erasure_waits_for_a_running_commit_on_postgresql(pg_url):
    """The commit's lock is shared with every other commit but not with an erasure."""
    writer, admin = PostgresStore(pg_url), PostgresStore(pg_url)
    writer.setup()
    erased = threading.Event()
    try:
        with writer.transaction() as tx:
            tx.read_offsets("live")  # a commit in flight
            other = PostgresStore(pg_url)
            with other.transaction() as tx2:
                tx2.read_offsets("another-topic")  # commits of other topics are not held up by it
            other.close()
            thread = threading.Thread(target=lambda: (admin.erase(["ap-x-000001"]), erased.set()))
            thread.start()
            assert not erased.wait(0.5)
        assert erased.wait(10)
        thread.join()
    finally:
        writer.close()
        admin.close()


def test_commits_to_other_partitions_of_a_topic_run_beside_each_other_on_postgresql(pg_url):
    """A writer pool: a commit locks its batch's partitions, not its topic; a shared one waits."""
    first, second = PostgresStore(pg_url), PostgresStore(pg_url)
    first.setup()
    locked = threading.Event()

    def commit_to(partitions):
        with second.transaction() as tx:
            tx.read_offsets("pool", partitions)
            locked.set()

    try:
        with first.transaction() as tx:
            tx.read_offsets("pool", [0, 2])
            commit_to([1, 3])  # other partitions: at once
            assert locked.is_set()
            locked.clear()
            thread = threading.Thread(target=commit_to, args=([2, 5],))
            thread.start()
            assert not locked.wait(0.5)  # partition 2 is taken
        assert locked.wait(10)
        thread.join()
    finally:
        first.close()
        second.close()


def test_only_stored_ids_are_taken(tmp_path):
    config = StorageConfig.embedded(tmp_path / "s.duckdb")
    for bad in ([], ["x" * 65], [""]):
        with pytest.raises(StorageError, match="stored ids"):
            erase_devices(config, bad)


def test_flagged_device_days_routed_to_another_backend_go_too(tmp_path):
    dbs = {name: {"type": "duckdb", "path": str(tmp_path / f"{name}.duckdb")} for name in ("core", "models")}
    config = StorageConfig(backends=dbs, routes={"raw_events": "core", "devices": "core", "rollups": "core",
                                                 "offsets": "core", "anomalies": "models"})
    insert_rows(config, "anomalies", "anomalies", pa.table({
        "device_id": ["ap-a-000001", "ap-b-000001"], "day": pa.array([START] * 2, pa.timestamp("us", tz="UTC")),
        "model_version": ["v1"] * 2, "score": [0.9] * 2, "flagged": [True] * 2, "reason": ["drain"] * 2}))
    result = erase_devices(config, ["ap-a-000001"])
    assert result["backends"]["models"]["tables"]["anomalies"] == 1 and result["backends"]["core"]["tombstones"] == 1
    left = run_queries(config, {"a": "SELECT device_id FROM anomalies"}, kind="anomalies")["a"]
    assert left == [("ap-b-000001",)]
