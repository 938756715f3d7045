"""Simulated messages for a topic, produced with every acknowledgement awaited, and read back.

    for keys, values, events in first_events(1_000_000, shape="upload"): ...
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Iterator

import msgspec
import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

from podpulse.kafka import client_config, ensure_topic, producer_config
from podpulse.simulator import Fleet, FleetSpec, simulate
from podpulse.sink import open_sink

__all__ = ["EVENTS_PER_DEVICE_DAY", "first_events", "first_records", "produce", "produce_fleet", "Traffic",
           "read_topic"]

EVENTS_PER_DEVICE_DAY = 35  # what the simulator emits, on average over a week


def first_events(events: int, shape: str = "event", seed: int = 7) -> Iterator[tuple[list, list, np.ndarray]]:
    """The messages holding the first ``events`` events of a simulated week (for uploads: the whole uploads
    that reach ``events``), chunk by chunk: their keys, their values, and the events in each. The fleet has
    a device per ``EVENTS_PER_DEVICE_DAY`` events (at least 100), no faults: every event valid, each a
    distinct ``(device_id, seq)``. Raises ``RuntimeError`` if the week holds fewer."""
    spec = FleetSpec(devices=max(100, events // EVENTS_PER_DEVICE_DAY), hours=24 * 7, seed=seed, fault_share=0.0,
                     shape=shape)
    total = 0
    for chunk in simulate(spec, Fleet.build(spec)):
        per = np.ones(len(chunk.values), np.int64) if chunk.samples is None else np.asarray(chunk.samples)
        take = int(np.searchsorted(np.cumsum(per), events - total)) + 1  # the message that reaches `events`
        yield chunk.keys[:take], chunk.values[:take], per[:take]
        total += int(per[:take].sum())
        if total >= events:
            return
    raise RuntimeError(f"the simulated week holds {total} events, fewer than {events}")


def first_records(events: int, seed: int = 7) -> list[tuple[bytes, bytes]]:
    """(key, value) of the first ``events`` single-event messages of :func:`first_events`."""
    return [(key, value) for keys, values, _ in first_events(events, seed=seed) for key, value in zip(keys, values)]


def produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]], partitions: int) -> dict[int, int]:
    """Produce to ``topic`` (created with ``partitions`` if it is not there) and wait for every
    acknowledgement; returns the next offset per partition it wrote. RuntimeError if any was refused."""
    ensure_topic(client_config(bootstrap), topic, partitions)
    producer = Producer({**producer_config(bootstrap), "message.max.bytes": 2_000_000})
    ends: dict[int, int] = {}
    errors: list[str] = []

    def acked(err, msg) -> None:
        if err is not None:
            errors.append(str(err))
        else:
            ends[msg.partition()] = max(ends.get(msg.partition(), 0), msg.offset() + 1)

    for key, value in records:
        while True:
            try:
                producer.produce(topic, value, key, on_delivery=acked)
                break
            except BufferError:
                producer.poll(0.5)
        producer.poll(0)
    left = producer.flush(120)
    if errors or left:
        raise RuntimeError(f"{topic}: {len(errors)} records refused, {left} unacknowledged; first: "
                           f"{errors[:1]}")
    return ends


def produce_fleet(bootstrap: str, topic: str, spec: FleetSpec) -> dict:
    """Simulate ``spec`` into ``topic``: ``{"valid": [...], "malformed": [...], "malformed_samples": N}``,
    the values produced, those with a corrupted event or sample apart."""
    valid, malformed, samples = [], [], 0
    with open_sink(f"kafka://{bootstrap}/{topic}") as sink:
        for chunk in simulate(spec, Fleet.build(spec)):
            sink.write(chunk)
            for value, bad in zip(chunk.values, chunk.malformed.tolist()):
                (malformed if bad else valid).append(value)
                samples += bad
    return {"valid": valid, "malformed": malformed, "malformed_samples": samples}


@dataclass
class Traffic:
    """What a topic holds, read back from it."""

    topic: str
    ends: dict[int, int]  # next offset per partition
    valid: set = field(default_factory=set)  # distinct (device_id, seq) of the valid records
    valid_records: int = 0
    poison: dict = field(default_factory=dict)  # (partition, offset) → the kind its key names

    @property
    def total(self) -> int:
        return sum(self.ends.values())


def read_topic(bootstrap: str, topic: str, ends: dict[int, int], timeout_s: float = 120.0) -> Traffic:
    """Read every record up to ``ends`` back: the valid records' identities, and by offset those whose
    key is ``poison/KIND/...`` (records made to be refused)."""
    partitions = sorted(ends)
    consumer = Consumer({**client_config(bootstrap), "group.id": f"testbed-{uuid.uuid4().hex[:8]}",
                         "enable.auto.commit": False, "enable.partition.eof": True})
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    traffic = Traffic(topic, {p: 0 for p in partitions})
    deadline = time.monotonic() + timeout_s
    try:
        while any(traffic.ends[p] < ends[p] for p in partitions):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{topic}: read back {traffic.ends} of {ends} within {timeout_s:.0f}s")
            for m in consumer.consume(10_000, 1.0):
                if m.error():
                    if m.error().code() != KafkaError._PARTITION_EOF:
                        raise RuntimeError(f"{topic}: {m.error()}")
                    continue
                p, o = m.partition(), m.offset()
                traffic.ends[p] = max(traffic.ends[p], o + 1)
                key = m.key() or b""
                if key.startswith(b"poison/"):
                    traffic.poison[(p, o)] = key.split(b"/")[1].decode()
                    continue
                record = msgspec.json.decode(m.value())
                traffic.valid.add((record["device_id"], record["seq"]))
                traffic.valid_records += 1
    finally:
        consumer.close()
    return traffic
