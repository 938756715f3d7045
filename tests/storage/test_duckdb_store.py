"""The embedded store on real DuckDB: replays, late events, rollups against a recomputation."""

import numpy as np
import pyarrow as pa
import pytest

from podpulse.contract import decode_batch
from podpulse.simulator import FleetSpec, simulate
from storage.duckdb_store import DuckDBStore
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
    import storage.duckdb_store as module

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
