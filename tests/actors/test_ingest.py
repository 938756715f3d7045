"""The ingest pipeline for real: Tansu and Apache Kafka, local Ray, DuckDB and PostgreSQL; crashes included."""

import json
import time
from collections import Counter

import pytest
import ray
from confluent_kafka import Consumer, TopicPartition

from actors.config import IngestConfig
from actors.supervisor import IngestSupervisor, shards
from jobs.ingest import run_ingest
from podpulse.contract import decode_batch, upload_with
from podpulse.dead_letters import read_dead_letters
from podpulse.errors import ConfigError
from podpulse.simulator import FleetSpec
from storage.config import StorageConfig
from storage.reader import run_queries


@pytest.fixture(scope="module", params=["tansu", "kafka"])
def broker(request):
    """Every test here runs on the embedded Tansu and on Apache Kafka."""
    return request.getfixturevalue(request.param)


def config(broker, topic, storage: StorageConfig, **kw) -> IngestConfig:
    return IngestConfig(bootstrap=broker.bootstrap, topic=topic, consumers=2, storage=storage, **kw)


def end_offsets(broker, topic, partitions):
    """Last offset + 1 per partition, by reading the topic (the broker's watermark is not exact)."""
    c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "ends", "enable.partition.eof": True})
    c.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    ends, done = {}, set()
    while len(done) < partitions:
        for m in c.consume(10_000, 5):
            if m.error():
                done.add(m.partition())
            else:
                ends[m.partition()] = m.offset() + 1
    c.close()
    return ends


def assert_exactly_once(storage, valid_values, assert_rollups_match_raw):
    expected = storage.pseudonyms().table(decode_batch(valid_values).table).select(["device_id", "seq"]).to_pylist()
    expected = Counter((r["device_id"], r["seq"]) for r in expected)
    r = run_queries(storage, {"events": "SELECT device_id, seq FROM events",
                                   "devices": "SELECT sum(events) FROM devices",
                                   "offsets": "SELECT kafka_partition, next_offset FROM kafka_offsets"})
    stored = Counter(r["events"])
    assert max(stored.values()) == 1, "duplicated rows"
    assert stored == expected, f"lost {len(expected - stored)}, unexpected {len(stored - expected)}"
    assert_rollups_match_raw(storage)
    assert int(r["devices"][0][0]) == sum(expected.values())
    return dict(r["offsets"])


def test_shards_are_stable_and_cover_every_partition_once():
    assert shards(8, 3) == [[0, 3, 6], [1, 4, 7], [2, 5]]
    assert shards(2, 5) == [[0], [1]]
    assert sorted(p for s in shards(12, 4) for p in s) == list(range(12))


def test_duckdb_takes_one_writer():
    with pytest.raises(ConfigError, match="DuckDB .* takes one writer"):
        IngestConfig(bootstrap="127.0.0.1:9092", topic="t", writers=2, storage=StorageConfig.embedded("x.duckdb"))


def test_a_consumer_that_keeps_dying_is_restarted_with_growing_waits_never_in_a_spin():
    from actors.supervisor import RESTART_BACKOFF_S, Supervisor

    sup = Supervisor(IngestConfig(bootstrap="127.0.0.1:1", topic="t"))
    try:
        waits = [sup._restart_wait(0) for _ in range(9)]
        assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0] and RESTART_BACKOFF_S[1] == 60.0
        assert sup._restart_wait(1) == 1.0  # another slot has its own
    finally:
        sup._watermarks.close()


# Each broker and each store once per test, crossed (half the runs of the full cross: the suite's time).
# DuckDB takes one writer; on PostgreSQL a pool of two, each with its own consumer's partitions.
@pytest.mark.parametrize("broker, store_config, writers", [("tansu", "duckdb", 1), ("kafka", "postgresql", 2)],
                         indirect=["broker", "store_config"])
def test_every_event_is_stored_exactly_once_with_offsets_at_the_end(
        ray_local, broker, new_topic, produce_fleet, store_config, assert_rollups_match_raw, writers):
    topic = new_topic(4)
    produced = produce_fleet(topic, FleetSpec(devices=800, hours=12, seed=21))
    result = run_ingest(config(broker, topic, store_config, batch_size=3000, writers=writers), until_caught_up=True)
    assert result["restarts"] == 0 and result["dead_lettered"] == 0
    assert len(result["writers"]) == writers and all(w["applied"] > 0 for w in result["writers"])
    assert result["writer"]["applied"] == sum(w["applied"] for w in result["writers"])
    offsets = assert_exactly_once(store_config, produced["valid"], assert_rollups_match_raw)
    assert offsets == end_offsets(broker, topic, 4)

    # A second run over the same topic and store finds nothing new to store.
    again = run_ingest(config(broker, topic, store_config, writers=writers), until_caught_up=True)
    assert again["writer"]["applied"] == 0
    assert_exactly_once(store_config, produced["valid"], assert_rollups_match_raw)


# Each broker and each store once; single events on one, device uploads on the other.
@pytest.mark.parametrize("broker, store_config, shape", [("tansu", "postgresql", "event"), ("kafka", "duckdb", "upload")],
                         indirect=["broker", "store_config"])
def test_malformed_records_go_to_the_dead_letter_topic_with_reason_bytes_and_source(
        ray_local, broker, new_topic, produce_fleet, store_config, assert_rollups_match_raw, shape):
    topic = new_topic(4)
    produced = produce_fleet(topic, FleetSpec(devices=800, hours=12, seed=22, malformed_rate=0.01, shape=shape,
                                              upload_size=20))
    assert produced["malformed_samples"] > 50
    cfg = config(broker, topic, store_config, batch_size=2000)
    result = run_ingest(cfg, until_caught_up=True)
    letters = read_dead_letters(broker.bootstrap, cfg.dead_letter_topic)
    assert all(d["reason"] and " " in d["reason"] for d in letters)
    if shape == "event":
        assert Counter(d["value"] for d in letters) == Counter(produced["malformed"])
        assert all(d["sample"] is None for d in letters)
        assert len({(d["partition"], d["offset"]) for d in letters}) == len(letters)
    else:  # a letter per bad sample: its upload's envelope and that one sample, as sent
        assert len(letters) == produced["malformed_samples"]
        assert len({(d["partition"], d["offset"], d["sample"]) for d in letters}) == len(letters)
        for d in letters:
            letter = json.loads(d["value"])
            assert len(letter["samples"]) == 1
            assert letter["samples"][0]["battery_left"] == 250 or letter["samples"][0]["seq"] == "seven"
            assert f"$.samples[{d['sample']}]." in d["reason"]
    # each letter names where its original bytes sit in the source topic
    c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "check"})
    for d in letters[:20]:
        c.assign([TopicPartition(topic, d["partition"], d["offset"])])
        msg = c.consume(1, 10)[0]
        sent = msg.value() if d["sample"] is None else upload_with(msg.value(), [d["sample"]])
        assert (msg.partition(), msg.offset(), sent) == (d["partition"], d["offset"], d["value"])
    c.close()
    assert result["dead_lettered"] == len(letters)
    # every good sample of an upload with a bad one is stored too
    assert_exactly_once(store_config, produced["valid"] + produced["malformed"], assert_rollups_match_raw)


def run_and_kill(broker, topic, storage, victim: str, total: int):
    """Start the pipeline, kill one actor once a fifth to a half of the events is stored, let it finish.

    Progress is read from the offsets stored with the data (the embedded broker's
    watermark, hence its lag, under-reads). Returns the stored share at the kill.
    """
    supervisor = IngestSupervisor.remote(config(broker, topic, storage, batch_size=300, linger_ms=50,
                                                max_in_flight=1))
    done = supervisor.run.remote(until_caught_up=True)
    deadline = time.monotonic() + 120
    while True:
        assert time.monotonic() < deadline, "no progress"
        handles = ray.get(supervisor.handles.remote())
        if handles["writer"] is not None:
            stored = sum(ray.get(handles["writer"].committed_offsets.remote(topic)).values())
            if total * 0.2 < stored < total * 0.5:
                break
            assert stored < total * 0.5, "the pipeline outran the test: nothing left to interrupt"
        time.sleep(0.02)
    if victim == "consumer":
        ray.kill(handles["consumers"][0])
    else:
        ray.kill(handles["writer"], no_restart=False)
    summary = ray.get(done, timeout=300)
    ray.kill(supervisor)
    return stored / total, summary


# Each victim once, each broker and each store once: the consumer on Kafka with DuckDB, the writer on
# Tansu with PostgreSQL (bench/faults.py kills both, many times, on any broker and store).
@pytest.mark.parametrize("broker, store_config, victim", [("kafka", "duckdb", "consumer"),
                                                          ("tansu", "postgresql", "writer")],
                         indirect=["broker", "store_config"])
def test_killing_an_actor_mid_stream_loses_and_duplicates_nothing(
        ray_local, broker, new_topic, produce_fleet, store_config, assert_rollups_match_raw, victim):
    # consumer: the supervisor starts a new consumer for its partitions;
    # writer: Ray restarts the writer, and consumers with a write in flight rewind
    seed = {"consumer": 23, "writer": 24}[victim]
    topic = new_topic(4)
    produced = produce_fleet(topic, FleetSpec(devices=3000, hours=12, seed=seed))
    stored_at_kill, summary = run_and_kill(broker, topic, store_config, victim, len(produced["valid"]))
    assert stored_at_kill < 0.5
    if victim == "consumer":
        assert summary["restarts"] >= 1
    else:  # the writer that finished is a new one: it applied only what came after the kill
        assert summary["writer"]["applied"] < len(produced["valid"])
    offsets = assert_exactly_once(store_config, produced["valid"], assert_rollups_match_raw)
    assert offsets == end_offsets(broker, topic, 4)


def test_a_missing_topic_is_a_clear_error(ray_local, broker, tmp_path):
    from podpulse.errors import BrokerError

    with pytest.raises(Exception, match="not found") as info:
        run_ingest(config(broker, "no-such-topic", StorageConfig.embedded(tmp_path / "x.duckdb")),
                   until_caught_up=True)
    assert isinstance(info.value, BrokerError) or "BrokerError" in str(info.value)


def test_a_failed_batch_is_never_skipped_by_the_next_one(tmp_path):
    """The writer refuses a batch whose predecessor failed, so its consumer rewinds instead."""
    import asyncio

    import numpy as np
    import pyarrow as pa

    from actors.storage_writer import Writer
    from storage.base import OffsetGap

    values = [v for c in simulate_values() for v in c]
    table = decode_batch(values).table
    n = table.num_rows
    table = table.append_column("kafka_partition", pa.array(np.zeros(n, np.int32))).append_column(
        "kafka_offset", pa.array(np.arange(n), pa.int64()))
    a, b = table.slice(0, n // 2), table.slice(n // 2)
    broken = a.drop_columns(["noise_mode"])  # the write of `a` fails

    async def scenario():
        writer = Writer(StorageConfig.embedded(tmp_path / "w.duckdb"), max_rows=1)  # one batch a transaction
        first = asyncio.ensure_future(writer.commit("t", broken, {0: n // 2}, {0: None}))
        second = asyncio.ensure_future(writer.commit("t", b, {0: n}, {0: n // 2}))
        outcomes = await asyncio.gather(first, second, return_exceptions=True)
        offsets = await writer.committed_offsets("t")
        await writer.close()
        return outcomes, offsets

    (first, second), offsets = asyncio.run(scenario())
    assert isinstance(first, Exception) and isinstance(second, OffsetGap)
    assert offsets == {}


def simulate_values():
    from podpulse.simulator import simulate

    return (c.values for c in simulate(FleetSpec(devices=100, hours=6, seed=3)))


def test_coalescing_refuses_a_group_with_a_hole():
    import pyarrow as pa

    from actors.storage_writer import coalesce
    from storage.base import OffsetGap

    empty = pa.table({"kafka_partition": pa.array([], pa.int32()), "kafka_offset": pa.array([], pa.int64())})
    with pytest.raises(OffsetGap):
        coalesce([(empty, {0: 200}, {0: 100}), (empty, {0: 400}, {0: 300})])
    _, reached, starts = coalesce([(empty, {0: 200}, {0: 100}), (empty, {0: 300, 1: 9}, {0: 200, 1: None})])
    assert reached == {0: 300, 1: 9} and starts == {0: 100, 1: None}
