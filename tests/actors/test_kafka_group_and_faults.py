"""On Apache Kafka only: consumer-group mode with consumers added and removed mid-stream, a broker
restart mid-ingest, lag from the broker's real high watermarks, and raw events into a real
Cassandra across a consumer kill.

Tansu's group join takes ~20 s and its watermarks under-read, so these run on the real broker.
"""

import time
from collections import Counter

import pytest
import ray
from confluent_kafka import Consumer, TopicPartition

from actors.config import IngestConfig
from actors.storage_writer import StorageWriter
from actors.supervisor import IngestSupervisor, Supervisor
from podpulse.contract import decode_batch
from podpulse.simulator import FleetSpec
from storage.config import StorageConfig
from storage.reader import run_queries
from testbed.cassandra import cassandra_events


@pytest.fixture(scope="module")
def broker(kafka):
    return kafka


@pytest.fixture
def pg_store(pg_url):
    return StorageConfig(backends={"pg": {"type": "postgresql", "url": pg_url}})


def stored_total(supervisor, topic) -> int:
    writer = ray.get(supervisor.handles.remote())["writer"]
    return 0 if writer is None else sum(ray.get(writer.committed_offsets.remote(topic)).values())


def wait_for_share(supervisor, topic, total, share, timeout=120):
    deadline = time.monotonic() + timeout
    while (stored := stored_total(supervisor, topic)) < total * share:
        assert time.monotonic() < deadline, f"no progress: {stored} of {total} stored"
        time.sleep(0.05)
    return stored


def assert_stored_once(storage, valid_values, assert_rollups_match_raw):
    sent = storage.pseudonyms().table(decode_batch(valid_values).table)
    expected = Counter((r["device_id"], r["seq"]) for r in sent.select(["device_id", "seq"]).to_pylist())
    raw = storage.backends[storage.routes["raw_events"]]
    if raw["type"] == "cassandra":
        stored = Counter(cassandra_events(raw).execute("SELECT device_id, seq FROM events").fetchall())
    else:
        stored = Counter(run_queries(storage, {"events": "SELECT device_id, seq FROM events"})["events"])
    assert max(stored.values()) == 1, "duplicated rows"
    assert stored == expected, f"lost {len(expected - stored)}, unexpected {len(stored - expected)}"
    assert_rollups_match_raw(storage)


def test_consumers_join_and_leave_the_group_mid_stream_and_every_event_is_stored_once(
        ray_local, kafka, new_topic, produce_fleet, pg_store, assert_rollups_match_raw):
    topic = new_topic(6)
    produced = produce_fleet(topic, FleetSpec(devices=3000, hours=12, seed=31))
    total = len(produced["valid"])
    supervisor = IngestSupervisor.remote(IngestConfig(
        bootstrap=kafka.bootstrap, topic=topic, consumers=1, storage=pg_store, group_mode="subscribe",
        group_id=f"{topic}-group", batch_size=300, linger_ms=50, max_in_flight=1))
    done = supervisor.run.remote(until_caught_up=True)
    wait_for_share(supervisor, topic, total, 0.1)
    assert ray.get(supervisor.scale.remote(3)) == 3  # two join: the group rebalances
    at_remove = wait_for_share(supervisor, topic, total, 0.35)
    assert at_remove < total * 0.8, "the pipeline outran the test: nothing left to move"
    assert ray.get(supervisor.scale.remote(2)) == 2  # one leaves after its writes land
    summary = ray.get(done, timeout=300)
    ray.kill(supervisor)
    # 6 partitions were handed out at least three times: at the start, to the joiners, from the leaver
    assert summary["assigned"] > 6
    assert summary["consumed"] >= total
    assert_stored_once(pg_store, produced["valid"], assert_rollups_match_raw)


def test_a_broker_restart_mid_ingest_is_waited_for_and_loses_and_duplicates_nothing(
        ray_local, kafka, new_topic, produce_fleet, pg_store, assert_rollups_match_raw):
    """The broker stops while batches are being stored and comes back on the same log directory;
    what was produced before and after is stored exactly once, without restarting the pipeline."""
    topic = new_topic(4)
    before = produce_fleet(topic, FleetSpec(devices=2000, hours=12, seed=32))
    supervisor = IngestSupervisor.remote(IngestConfig(
        bootstrap=kafka.bootstrap, topic=topic, consumers=2, storage=pg_store, batch_size=300,
        linger_ms=50, max_in_flight=1))
    done = supervisor.run.remote()  # until stopped: an end reached while the broker is away is no end
    wait_for_share(supervisor, topic, len(before["valid"]), 0.2)
    kafka.stop()
    time.sleep(3)  # consumers and the supervisor find the broker gone
    kafka.start()
    after = produce_fleet(topic, FleetSpec(devices=2000, hours=12, seed=132))
    wait_for_share(supervisor, topic, len(before["valid"]) + len(after["valid"]), 1.0)
    ray.get(supervisor.stop.remote())
    summary = ray.get(done, timeout=300)
    ray.kill(supervisor)
    assert summary["restarts"] == 0  # waited for, not crashed
    assert summary["lag"] == {p: 0 for p in range(4)}
    assert_stored_once(pg_store, before["valid"] + after["valid"], assert_rollups_match_raw)


def test_lag_is_read_from_the_real_high_watermarks(ray_local, kafka, new_topic, produce_fleet, tmp_path):
    """Lag per partition is exactly the records not stored yet, counted by reading them."""
    topic = new_topic(3)
    storage = StorageConfig.embedded(tmp_path / "lag.duckdb")
    produce_fleet(topic, FleetSpec(devices=400, hours=6, seed=33))
    assert measure_lag(kafka, topic, storage) == count_from(kafka, topic, {p: 0 for p in range(3)})
    run = IngestSupervisor.remote(IngestConfig(bootstrap=kafka.bootstrap, topic=topic, consumers=1,
                                               storage=storage))
    assert ray.get(run.run.remote(until_caught_up=True), timeout=120)["lag"] == {0: 0, 1: 0, 2: 0}
    ray.kill(run)
    produce_fleet(topic, FleetSpec(devices=150, hours=3, seed=34))  # more arrives, not stored
    stored = run_queries(storage, {"o": "SELECT kafka_partition, next_offset FROM kafka_offsets"})["o"]
    lag = measure_lag(kafka, topic, storage)
    assert lag == count_from(kafka, topic, dict(stored)) and all(lag.values())


def measure_lag(kafka, topic, storage) -> dict[int, int]:
    """What the supervisor reports (and exports as podpulse_consumer_lag) for this store."""
    sup = Supervisor(IngestConfig(bootstrap=kafka.bootstrap, topic=topic, storage=storage))
    sup.partitions = 3
    writer = StorageWriter.remote(storage)
    sup.writers = [writer]
    try:
        return sup.lag()
    finally:
        ray.get(writer.close.remote())
        ray.kill(writer)
        sup._watermarks.close()


def count_from(broker, topic, start: dict[int, int]) -> dict[int, int]:
    """Records per partition from ``start`` to the end, by reading them."""
    c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "count", "enable.partition.eof": True})
    c.assign([TopicPartition(topic, p, o) for p, o in start.items()])
    counts, done = dict.fromkeys(start, 0), set()
    while len(done) < len(start):
        for m in c.consume(10_000, 5):
            if m.error():
                done.add(m.partition())
            else:
                counts[m.partition()] += 1
    c.close()
    return counts


def test_raw_events_in_cassandra_are_stored_once_across_a_consumer_kill(
        ray_local, kafka, cassandra, new_topic, produce_fleet, pg_url, assert_rollups_match_raw):
    """Cassandra has no transactions: redelivered events after the kill are idempotent upserts,
    and the rollups and offsets in PostgreSQL are applied once."""
    topic = new_topic(4)
    storage = StorageConfig(backends={
        "pg": {"type": "postgresql", "url": pg_url},
        "raw": {"type": "cassandra", "hosts": [cassandra.hosts], "port": cassandra.port,
                "keyspace": f"k_{topic.replace('-', '_')[:40].lower()}"}},
        routes={"raw_events": "raw", "devices": "pg", "rollups": "pg", "offsets": "pg", "anomalies": "pg"})
    produced = produce_fleet(topic, FleetSpec(devices=600, hours=8, seed=35))
    total = len(produced["valid"])
    supervisor = IngestSupervisor.remote(IngestConfig(
        bootstrap=kafka.bootstrap, topic=topic, consumers=2, storage=storage, batch_size=300,
        linger_ms=50, max_in_flight=1))
    done = supervisor.run.remote(until_caught_up=True)
    at_kill = wait_for_share(supervisor, topic, total, 0.2)
    ray.kill(ray.get(supervisor.handles.remote())["consumers"][0])
    summary = ray.get(done, timeout=300)
    ray.kill(supervisor)
    assert at_kill < total and summary["restarts"] >= 1
    assert_stored_once(storage, produced["valid"], assert_rollups_match_raw)
