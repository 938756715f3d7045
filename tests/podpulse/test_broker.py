"""Round trips through the real brokers (Tansu, Apache Kafka) with confluent-kafka."""

from collections import Counter

from confluent_kafka import Consumer, KafkaError, TopicPartition

from podpulse.broker import EmbeddedBroker
from podpulse.simulator import Fleet, FleetSpec, simulate
from podpulse.sink import open_sink


def murmur2(data: bytes) -> int:
    """Kafka's (Java client's) murmur2, which librdkafka's murmur2_random reproduces."""
    m, length = 0x5BD1E995, len(data)
    h = (0x9747B28C ^ length) & 0xFFFFFFFF
    for i in range(0, length - length % 4, 4):
        k = int.from_bytes(data[i:i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> 24
        k = (k * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    tail = data[length - length % 4:]
    if len(tail) >= 3:
        h ^= tail[2] << 16
    if len(tail) >= 2:
        h ^= tail[1] << 8
    if tail:
        h ^= tail[0]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h


def consume_all(bootstrap: str, topic: str, partitions: int, expected: int):
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "roundtrip",
                         "enable.auto.commit": False, "enable.partition.eof": True})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    got, at_eof = [], set()
    while len(at_eof) < partitions:
        for msg in consumer.consume(10_000, timeout=5.0):
            if msg.error():
                assert msg.error().code() == KafkaError._PARTITION_EOF, msg.error()
                at_eof.add(msg.partition())
            else:
                got.append((msg.partition(), msg.key(), msg.value()))
    consumer.close()
    assert len(got) >= expected
    return got


def test_simulated_fleet_arrives_exactly_once_on_its_device_partition(broker, new_topic):
    topic = new_topic(4)
    spec = FleetSpec(devices=1500, hours=12, seed=3)
    fleet = Fleet.build(spec)
    produced = []
    with open_sink(f"kafka://{broker.bootstrap}/{topic}") as sink:
        for chunk in simulate(spec, fleet):
            sink.write(chunk)
            produced.extend(zip(chunk.keys, chunk.values))

    got = consume_all(broker.bootstrap, topic, 4, len(produced))
    assert Counter((k, v) for _, k, v in got) == Counter(produced)  # each exactly once
    assert len(got) == len(produced) > 20_000
    for partition, key, _ in got:
        assert partition == (murmur2(key) & 0x7FFFFFFF) % 4


def test_broker_starts_on_a_free_port_and_stops_cleanly():
    b = EmbeddedBroker().start()
    try:
        assert b.running
        b.create_topic("x", 3)
        b.create_topic("x", 3)  # creating again is harmless
    finally:
        b.stop()
    assert not b.running


def test_producers_are_idempotent_on_apache_kafka(kafka):
    """Every batch the simulator's producer wrote carries a producer id and gap-free sequences:
    the broker would drop a batch that a retry sent twice."""
    topic = "idempotence"
    kafka.create_topic(topic, 2)
    spec = FleetSpec(devices=300, hours=6, seed=5)
    with open_sink(f"kafka://{kafka.bootstrap}/{topic}") as sink:
        for chunk in simulate(spec):
            sink.write(chunk)
    for partition in range(2):
        batches = kafka.log_batches(topic, partition)
        assert batches and {b["producerId"] for b in batches} != {-1}
        assert len({b["producerId"] for b in batches}) == 1
        expected = 0
        for b in batches:
            assert (b["baseSequence"], b["lastSequence"]) == (expected, expected + b["count"] - 1)
            expected += b["count"]


def test_kafka_formats_a_cluster_id_that_starts_with_a_dash(tmp_path):
    """A random KRaft id starts with "-" one time in 64; the storage tool must not take it for an option."""
    from testbed.kafka import KafkaBroker

    broker = KafkaBroker(root=tmp_path, cluster_id="-Zq3vH1cTfG0nB2w4xY5aA")
    broker.prepare()
    meta = (tmp_path / "log" / "meta.properties").read_text()
    assert "cluster.id=-Zq3vH1cTfG0nB2w4xY5aA" in meta


def test_free_ports_are_outside_the_ephemeral_range_and_never_given_twice():
    """A port from the kernel's ephemeral range may become an outgoing connection's source before its
    server binds it (a one-node cluster's registry failed so)."""
    from podpulse.broker import _ephemeral, free_port

    low, high = _ephemeral()
    ports = [free_port() for _ in range(500)]
    assert len(set(ports)) == len(ports)
    assert not any(low <= p <= high for p in ports)
