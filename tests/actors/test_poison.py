"""Nothing stops the pipeline: values a store refuses, events sent twice, oversized rejects, a dead database."""

import asyncio
import os
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
import ray
from confluent_kafka import Producer

from actors.config import IngestConfig
from actors.storage_writer import Writer
from actors.supervisor import IngestSupervisor
from podpulse.contract import decode_batch
from podpulse.dead_letters import MAX_VALUE_BYTES, DeadLetterTopic, read_dead_letters
from podpulse.simulator import Fleet, FleetSpec, simulate
from storage.base import StorageError
from storage.config import StorageConfig
from storage.reader import run_queries
from storage.router import open_storage


def fleet_values(devices=200, hours=6, seed=7) -> list[bytes]:
    spec = FleetSpec(devices=devices, hours=hours, seed=seed)
    return [v for c in simulate(spec, Fleet.build(spec)) for v in c.values]


def batch(values: list[bytes], partition: int, first_offset: int) -> pa.Table:
    table = decode_batch(values).table
    n = table.num_rows
    return table.append_column("kafka_partition", pa.array(np.full(n, partition, np.int32))).append_column(
        "kafka_offset", pa.array(np.arange(first_offset, first_offset + n), pa.int64()))


def stored_identities(storage: StorageConfig) -> Counter:
    return Counter(run_queries(storage, {"e": "SELECT device_id, seq FROM events"})["e"])


def test_the_writer_dead_letters_exactly_the_rows_the_store_refuses_and_stores_the_rest(
        store_config, broker, new_topic, assert_rollups_match_raw):
    """Two consumers' batches are coalesced into one transaction; two rows of one of them carry a
    value the store refuses (NULL firmware). Only those two are dead-lettered, with the store's
    own message; everything else, and both batches' offsets, is stored."""
    topic = new_topic(2)
    values = fleet_values()
    half = len(values) // 2
    a, b = batch(values[:half], 0, 0), batch(values[half:], 1, 0)
    firmware = a["firmware"].to_pylist()
    firmware[5] = firmware[17] = None
    a = a.set_column(a.column_names.index("firmware"), "firmware", pa.array(firmware, pa.string()))
    target = DeadLetterTopic(broker.bootstrap, f"{topic}.dlq")

    async def scenario():
        writer = Writer(store_config, dead_letters=target)
        results = await asyncio.gather(writer.commit(topic, a, {0: a.num_rows}, {0: None}),
                                       writer.commit(topic, b, {1: b.num_rows}, {1: None}))
        offsets = await writer.committed_offsets(topic)
        stats = writer.get_stats()
        await writer.close()
        return results, offsets, stats

    results, offsets, stats = asyncio.run(scenario())
    assert offsets == {0: a.num_rows, 1: b.num_rows}
    assert stats["refused"] == 2 and sum(r["refused"] for r in results) >= 2
    letters = read_dead_letters(broker.bootstrap, f"{topic}.dlq")
    assert sorted((d["partition"], d["offset"]) for d in letters) == [(0, 5), (0, 17)]
    assert all(d["stage"] == "store" for d in letters)
    assert all("null" in d["reason"].lower() and "firmware" in d["reason"] for d in letters), letters[0]["reason"]
    assert b'"firmware":null' in letters[0]["value"]
    stored = stored_identities(store_config)
    assert sum(stored.values()) == a.num_rows + b.num_rows - 2 and max(stored.values()) == 1
    assert_rollups_match_raw(store_config)


def test_an_event_sent_again_at_a_new_offset_is_stored_and_counted_once(store_config, assert_rollups_match_raw):
    """A producer retry or a phone uploading twice: the same (device_id, seq) at new offsets, in a later
    batch and twice within one batch. Stored once, counted once; late first-time events still count."""
    values = fleet_values(devices=100, hours=12, seed=8)
    first, second = values[: len(values) // 2], values[len(values) // 2:]
    again = first[::7]  # sent again, long after they were stored
    late = second[:40]  # first sent after newer events of their devices: they count
    rest = second[40:] + again + late + late[::2]  # half of the late ones twice in this batch
    storage = open_storage(store_config)
    storage.setup()
    try:
        r1 = storage.commit("t", batch(first, 0, 0), {0: len(first)}, {0: None})
        r2 = storage.commit("t", batch(rest, 0, len(first)), {0: len(first) + len(rest)}, {0: len(first)})
    finally:
        storage.close()
    assert r1.repeated == 0 and r1.applied == len(first)
    assert r2.repeated == len(again) + len(late[::2]) and r2.applied == len(second)
    stored = stored_identities(store_config)
    assert max(stored.values()) == 1 and sum(stored.values()) == len(values)
    devices = run_queries(store_config, {"d": "SELECT sum(events) FROM devices"})["d"][0][0]
    assert int(devices) == len(values)
    assert_rollups_match_raw(store_config, in_order=False)


def test_in_the_cassandra_layout_an_event_sent_again_is_counted_once_and_a_crash_replay_still_counts(
        cassandra, tmp_path, assert_rollups_match_raw):
    """Raw events in Cassandra, rollups in another store: a re-sent event is found by a point read
    (stored from another offset) and counted once; rows written raw before a crash, whose relational
    commit never happened, are this record's own and still count when replayed."""

    keyspace = f"podpulse_resend_{os.getpid()}"
    config = StorageConfig(
        backends={"raw": {"type": "cassandra", "hosts": [cassandra.hosts], "port": cassandra.port,
                          "keyspace": keyspace},
                  "core": {"type": "duckdb", "path": str(tmp_path / "core.duckdb")}},
        routes={"raw_events": "raw", "devices": "core", "rollups": "core", "offsets": "core",
                "anomalies": "core"})
    values = fleet_values(devices=80, hours=12, seed=10)
    third = len(values) // 3
    first, second, last = values[:third], values[third:2 * third], values[2 * third:]
    again, late = first[::7], second[:40]
    rest = second[40:] + again + late + late[::2]
    storage = open_storage(config)
    storage.setup()
    session = storage.timeseries._session
    try:
        r1 = storage.commit("t", batch(first, 0, 0), {0: len(first)}, {0: None})
        r2 = storage.commit("t", batch(rest, 0, len(first)), {0: len(first) + len(rest)}, {0: len(first)})
        start = len(first) + len(rest)
        crashed = batch(last, 0, start)
        storage.timeseries.write_events(crashed)  # raw written, then the writer died before the commit
        r3 = storage.commit("t", crashed, {0: start + len(last)}, {0: start})
        raw = session.execute(f"SELECT count(*) AS n FROM {keyspace}.events").one()["n"]
        assert (r1.applied, r1.repeated) == (len(first), 0)
        assert (r2.applied, r2.repeated) == (len(second), len(again) + len(late[::2]))
        assert (r3.applied, r3.repeated) == (len(last), 0)
        assert raw == len(values)
        storage.relational.close()  # DuckDB: one configuration per file in a process
        devices = run_queries(config, {"d": "SELECT sum(events) FROM devices"})["d"][0][0]
        assert int(devices) == len(values)
        assert_rollups_match_raw(config, in_order=False)
    finally:
        session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}")
        storage.timeseries.close()


def test_the_writer_counts_the_rows_of_erased_devices_it_dropped(tmp_path):
    from storage.router import erase_devices

    config = StorageConfig.embedded(tmp_path / "s.duckdb")
    rows = batch(fleet_values(devices=20, hours=2), 0, 0)
    erased = rows["device_id"][0].as_py()
    erase_devices(config, [erased])  # before any of its events arrive

    async def scenario():
        writer = Writer(config)
        result = await writer.commit("t", rows, {0: rows.num_rows}, {0: None})
        stats = writer.get_stats()
        await writer.close()
        return result, stats

    result, stats = asyncio.run(scenario())
    mine = rows["device_id"].to_pylist().count(erased)
    assert stats["erased"] == mine > 0 and result["applied"] == stats["applied"] == rows.num_rows - mine


def test_the_writer_never_touches_the_database_in_its_constructor(tmp_path):
    """Ray never restarts an actor whose constructor raised: the writer connects on first use."""
    from podpulse.broker import free_port

    down = StorageConfig(backends={"pg": {"type": "postgresql", "url": f"postgresql://x@127.0.0.1:{free_port()}/x"}})
    writer = Writer(down)  # nothing listens there: no error yet
    started = time.monotonic()
    with pytest.raises(StorageError, match="cannot open the store"):
        asyncio.run(writer.committed_offsets("t"))
    assert time.monotonic() - started < 10
    assert "reading offsets failed" in " ".join(writer.get_stats()["failures"])


def test_a_closed_writer_never_reopens_its_store(tmp_path):
    """A lag poll racing the shutdown must not reopen the DuckDB file (its lock would outlive the run)."""
    import duckdb

    path = tmp_path / "closed.duckdb"
    writer = Writer(StorageConfig.embedded(path))

    async def scenario():
        assert await writer.committed_offsets("t") == {}
        await writer.close()
        with pytest.raises(StorageError, match="closed"):
            await writer.committed_offsets("t")

    asyncio.run(scenario())
    duckdb.connect(str(path)).close()  # the file is free: nobody holds its lock


def test_an_oversized_reject_is_dead_lettered_truncated_and_ingest_goes_on(
        ray_local, broker, new_topic, tmp_path):
    """A ~1 MB record the source topic accepted would not fit the dead-letter topic: it goes there cut to
    MAX_VALUE_BYTES, with its original size in a header, and no consumer crash-loops."""
    topic = new_topic(2)
    good = fleet_values(devices=50, hours=2, seed=9)
    big = b"x" * 900_000
    producer = Producer({"bootstrap.servers": broker.bootstrap, "message.max.bytes": 2_000_000})
    for i, v in enumerate(good[:100]):
        producer.produce(topic, v, str(i).encode(), partition=i % 2)
    producer.produce(topic, big, b"big", partition=0)
    for i, v in enumerate(good[100:200]):
        producer.produce(topic, v, str(i).encode(), partition=i % 2)
    assert producer.flush(30) == 0
    storage = StorageConfig.embedded(tmp_path / "big.duckdb")
    supervisor = IngestSupervisor.remote(IngestConfig(bootstrap=broker.bootstrap, topic=topic, consumers=1,
                                                      storage=storage))
    summary = ray.get(supervisor.run.remote(until_caught_up=True), timeout=180)
    ray.kill(supervisor)
    assert summary["restarts"] == 0 and summary["dead_lettered"] == 1
    (letter,) = read_dead_letters(broker.bootstrap, f"{topic}.dlq")
    assert letter["original_size"] == len(big) and len(letter["value"]) == MAX_VALUE_BYTES
    assert letter["reason"] and letter["stage"] == "decode"
    assert sum(stored_identities(storage).values()) == 200


def _consumer_stats(supervisor) -> list[dict]:
    return ray.get([c.get_stats.remote() for c in ray.get(supervisor.handles.remote())["consumers"] if c is not None])


def _writer_stats(supervisor) -> dict:
    writer = ray.get(supervisor.handles.remote())["writer"]
    try:
        return {} if writer is None else ray.get(writer.get_stats.remote(), timeout=30)
    except ray.exceptions.RayError:  # being replaced: ask again
        return {}


def _wait_for(condition, what: str, deadline_s: float = 180) -> None:
    end = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < end, f"no {what} within {deadline_s} s"
        time.sleep(0.5)


def test_ingest_started_while_the_database_is_down_waits_and_survives_a_restart(
        ray_local, broker, new_topic, produce_fleet, postgres, pg_url, assert_rollups_match_raw):
    """PostgreSQL is down when ingest starts: it waits, saying why, and proceeds when the database
    comes up; the database restarts mid-stream: ingest resumes by itself. Nothing lost or duplicated."""
    topic = new_topic(2)
    produced = produce_fleet(topic, FleetSpec(devices=1000, hours=12, seed=61))
    storage = StorageConfig(backends={"pg": {"type": "postgresql", "url": pg_url}})
    postgres.stop()
    try:
        supervisor = IngestSupervisor.remote(IngestConfig(bootstrap=broker.bootstrap, topic=topic, consumers=2,
                                                          storage=storage, batch_size=500, linger_ms=20,
                                                          max_in_flight=1))
        done = supervisor.run.remote(until_caught_up=True)
        # consumers find the store down and wait, saying so (polled: actor start-up is slow on CI)
        _wait_for(lambda: any("waiting for the store" in " ".join(s["failures"])
                              for s in _consumer_stats(supervisor)), "a consumer waiting for the store")
        assert not ray.wait([done], timeout=0)[0], "ingest ended while the database was down"
    finally:
        postgres.start()
    _wait_for(lambda: ray.wait([done], timeout=0)[0] or _writer_stats(supervisor).get("applied", 0) > 0,
              "a first write after the database came up")
    postgres.restart()  # mid-stream (or just after: either way it must not matter)
    summary = ray.get(done, timeout=240)
    ray.kill(supervisor)
    assert summary["restarts"] == 0
    causes = " ".join(summary["failures"])
    assert "waiting for the store" in causes and "cannot open the store" in causes, summary["failures"]
    sent = storage.pseudonyms().table(decode_batch(produced["valid"]).table)
    expected = Counter((r["device_id"], r["seq"]) for r in sent.select(["device_id", "seq"]).to_pylist())
    assert stored_identities(storage) == expected
    assert_rollups_match_raw(storage)
