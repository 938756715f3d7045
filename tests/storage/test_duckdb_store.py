"""The embedded store on real DuckDB: replays, late events, rollups against a recomputation."""

import numpy as np
import pyarrow as pa
import pytest

from podpulse.contract import decode_batch
from podpulse.simulator import FleetSpec, simulate
from storage.backends.duckdb import DuckDBStore
from storage.router import Storage


@pytest.fixture(scope="module")
def batch():
    values = [v for c in simulate(FleetSpec(devices=300, hours=30, seed=4)) for v in c.values]
    table = decode_batch(values).table
    n = table.num_rows
    return table.append_column("kafka_partition", pa.array(np.arange(n) % 3, pa.int32())).append_column(
        "kafka_offset", pa.array(np.arange(n) // 3, pa.int64()))


def next_offsets(t):
    parts, offs = t["kafka_partition"].to_numpy(), t["kafka_offset"].to_numpy()
    return {int(p): int(offs[parts == p].max()) + 1 for p in np.unique(parts)}


@pytest.fixture
def store(tmp_path):
    s = DuckDBStore(tmp_path / "s.duckdb")
    s.setup()
    yield Storage(s, s)
    s.close()


def test_batches_in_any_split_give_rollups_equal_to_a_recomputation(store, batch, assert_rollups_match_raw):
    for start in range(0, batch.num_rows, 997):
        piece = batch.slice(start, 997)
        store.commit("t", piece, next_offsets(piece))
    con = store.relational.con
    assert con.execute("SELECT count(*) FROM events").fetchone()[0] == batch.num_rows
    assert_rollups_match_raw(con)
    assert con.execute("SELECT sum(events) FROM devices").fetchone()[0] == batch.num_rows
    assert store.committed_offsets("t") == next_offsets(batch)


def test_redelivered_batches_are_skipped_by_their_offsets(store, batch, assert_rollups_match_raw):
    first, second = batch.slice(0, 5000), batch.slice(5000, 5000)
    assert store.commit("t", first, next_offsets(first)).applied == 5000
    again = store.commit("t", batch.slice(2500, 7500), next_offsets(batch.slice(2500, 7500)))
    assert (again.applied, again.replayed) == (5000, 2500)
    con = store.relational.con
    assert con.execute("SELECT count(*), count(DISTINCT (device_id, seq)) FROM events").fetchone() == (10000, 10000)
    assert_rollups_match_raw(con)
    assert store.commit("t", second, next_offsets(second)).applied == 0


def test_late_events_update_their_hour_and_devices_keep_latest_attributes(store, batch, assert_rollups_match_raw):
    by_time = batch.sort_by("event_time")
    early, late = by_time.slice(0, 6000), by_time.slice(6000)
    # the late part arrives first, the early part (older events) afterwards
    late = late.set_column(late.schema.get_field_index("kafka_offset"), "kafka_offset",
                           pa.array(np.arange(late.num_rows), pa.int64()))
    late = late.set_column(late.schema.get_field_index("kafka_partition"), "kafka_partition",
                           pa.array(np.zeros(late.num_rows, np.int32)))
    early = early.set_column(early.schema.get_field_index("kafka_offset"), "kafka_offset",
                             pa.array(np.arange(late.num_rows, late.num_rows + 6000), pa.int64()))
    early = early.set_column(early.schema.get_field_index("kafka_partition"), "kafka_partition",
                             pa.array(np.zeros(6000, np.int32)))
    store.commit("t", late, next_offsets(late))
    store.commit("t", early, next_offsets(early))
    con = store.relational.con
    assert_rollups_match_raw(con, in_order=False)
    wrong = con.execute("""
        SELECT count(*) FROM devices d JOIN (
            SELECT device_id, arg_max(firmware, event_time) AS firmware, max(event_time) AS last_seen,
                   min(event_time) AS first_seen FROM events GROUP BY device_id) e USING (device_id)
        WHERE d.firmware <> e.firmware OR d.last_seen <> e.last_seen OR d.first_seen <> e.first_seen
    """).fetchone()[0]
    assert wrong == 0


def test_a_failed_commit_leaves_nothing_behind(store, batch, monkeypatch):
    import storage.commit as module

    def fail(_):  # after the raw events and the hourly rollups were written
        raise RuntimeError("disk on fire")

    piece = batch.slice(0, 1000)
    with monkeypatch.context() as m:
        m.setattr(module, "device_updates", fail)
        with pytest.raises(RuntimeError, match="disk on fire"):
            store.commit("t", piece, next_offsets(piece))
    con = store.relational.con
    assert con.execute("SELECT count(*) FROM device_hourly").fetchone()[0] == 0
    assert con.execute("SELECT count(*) FROM events").fetchone()[0] == 0
    assert store.committed_offsets("t") == {}
    assert store.commit("t", piece, next_offsets(piece)).applied == 1000


def test_time_series_role_alone_is_idempotent_by_device_and_seq(tmp_path, batch):
    s = DuckDBStore(tmp_path / "ts.duckdb")
    s.setup()
    s.write_events(batch.slice(0, 3000))
    s.write_events(batch.slice(1000, 3000))
    assert s.con.execute("SELECT count(*), count(DISTINCT (device_id, seq)) FROM events").fetchone() == (4000, 4000)
    s.close()


def test_a_batch_that_skips_past_the_stored_offset_is_refused(store, batch):
    from storage.base import OffsetGap

    first, second, third = batch.slice(0, 3000), batch.slice(3000, 3000), batch.slice(6000, 3000)
    store.commit("t", first, next_offsets(first), start_offsets={p: None for p in next_offsets(first)})
    stored = store.committed_offsets("t")
    with pytest.raises(OffsetGap, match="an earlier batch is missing"):  # `second` never arrived
        store.commit("t", third, next_offsets(third), start_offsets=next_offsets(second))
    assert store.committed_offsets("t") == stored
    store.commit("t", second, next_offsets(second), start_offsets=stored)
    assert store.commit("t", third, next_offsets(third), start_offsets=next_offsets(second)).applied == 3000


def test_a_device_that_moves_within_an_hour_gets_one_rollup_row(store, batch, assert_rollups_match_raw):
    import pyarrow.compute as pc

    piece = batch.slice(0, 4000)
    flipped = pc.invert(piece["urban"])  # every other event of a device claims the other class
    mixed = pc.if_else(pa.array(np.arange(piece.num_rows) % 2 == 0), piece["urban"], flipped)
    piece = piece.set_column(piece.schema.get_field_index("urban"), "urban", mixed)
    store.commit("t", piece, next_offsets(piece))
    con = store.relational.con
    assert con.execute("SELECT count(*) FROM device_hourly").fetchone()[0] == con.execute(
        "SELECT count(DISTINCT (device_id, date_trunc('hour', event_time))) FROM events").fetchone()[0]
    assert_rollups_match_raw(con)


def test_drain_pairs_with_the_registrys_last_sample_even_after_a_late_event():
    from storage.rollups import hourly_rollup, last_sample_table

    base = dict(schema_version=2, device_id="ap-x", model="m", firmware="f", battery_case=50,
                charging="none", in_ear_left=True, in_ear_right=True, noise_mode="anc", playback_s=200.0,
                output_dba=70.0, ambient_dba=60.0, postcode="2000", host_device="iphone", interval_s=300,
                temp_left_c=None, temp_right_c=None, conversation_awareness=False, spatial_audio=None,
                extras=None, state="NSW", urban=True)
    import datetime as dt

    t0 = dt.datetime(2026, 11, 2, tzinfo=dt.timezone.utc)
    rows = [dict(base, seq=8, event_time=t0, battery_left=95, battery_right=95),  # late
            dict(base, seq=11, event_time=t0 + dt.timedelta(minutes=15), battery_left=80, battery_right=81)]
    events = pa.Table.from_pylist(rows)
    last = last_sample_table([("ap-x", 10, 84, 84, 50, True, True, "none"),
                              ("ap-old", None, None, None, None, None, None, None)])  # pre-migration row
    assert last.num_rows == 1
    hourly = hourly_rollup(events, last).to_pylist()
    assert [(h["drain_left_pct"], h["drain_right_pct"]) for h in hourly] == [(4.0, 3.0)]  # 10 → 11 only


def test_the_memory_limit_comes_from_the_storage_config_and_running_out_of_it_names_it(tmp_path, batch):
    import duckdb

    from storage.base import StorageError
    from storage.config import StorageConfig
    from storage.router import open_backend

    config = StorageConfig(backends={"db": {"type": "duckdb", "path": str(tmp_path / "m.duckdb"), "memory_limit": "300MB"}})
    store = open_backend(config, "db")
    with duckdb.connect(config={"memory_limit": "300MB"}) as plain:
        want = plain.execute("SELECT current_setting('memory_limit')").fetchone()
    assert store.con.execute("SELECT current_setting('memory_limit')").fetchone() == want
    store.setup()
    store.con.execute("SET memory_limit = '1MB'")  # what a grown fleet's indexes do to 256 MB
    with pytest.raises(StorageError, match="raise memory_limit of this duckdb backend"):
        store.commit("t", batch, next_offsets(batch))
    store.con.execute("SET memory_limit = '300MB'")
    store.commit("t", batch, next_offsets(batch))  # nothing half-written stands in the way
    assert store.con.execute("SELECT sum(events) FROM devices").fetchone()[0] == batch.num_rows
    store.close()
