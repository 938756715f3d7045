"""The dead-letter topic: what a rejected record looks like there, and sending it so that it is never lost.

A record goes to ``<topic>.dlq`` when the decoder rejects it or a store refuses
one of its values. Its value is the original bytes (for a store refusal: the
decoded row as JSON, since the original bytes were valid), its key the
original key, and its headers say why and where it came from:

===========================  ===============================================
``podpulse.reason``          why, in words (the decoder's or the store's)
``podpulse.stage``           ``decode`` or ``store``
``podpulse.source.topic``    the topic it was read from
``podpulse.source.partition``, ``podpulse.source.offset``: where
``podpulse.source.sample``   only for one sample of a device upload: its index
``podpulse.original.size``   only when truncated: the value's size in bytes
===========================  ===============================================

For one refused sample of a device upload, the value is that upload cut down to
its envelope and the one sample, verbatim (``contract.upload_with``): each
refused sample is a letter of its own, and sent back it is an upload again.

:func:`read_dead_letters` reads a dead-letter topic back, headers parsed (:func:`parse_headers`).

A value over :data:`MAX_VALUE_BYTES` is cut to that size (a topic may accept
records that the dead-letter topic, or the producer, would refuse as too large).
:meth:`DeadLetterSink.send` returns only when the broker acknowledged every
letter, and raises otherwise: a batch's offsets are stored only after that.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from podpulse.kafka import client_config, deliver, producer_config

__all__ = ["DeadLetter", "DeadLetterSink", "DeadLetterTopic", "MAX_VALUE_BYTES", "headers", "parse_headers",
           "read_dead_letters"]

MAX_VALUE_BYTES = 100_000  # far below Kafka's default 1 MB message limit


@dataclass(frozen=True, slots=True)
class DeadLetter:
    key: bytes | None
    value: bytes | None
    reason: str
    stage: str  # decode | store
    topic: str
    partition: int
    offset: int
    sample: int | None = None  # one sample of a device upload: its index


def headers(letter: DeadLetter) -> list[tuple[str, bytes]]:
    out = [("podpulse.reason", letter.reason.encode("utf-8", "replace")),
           ("podpulse.stage", letter.stage.encode()),
           ("podpulse.source.topic", letter.topic.encode()),
           ("podpulse.source.partition", str(letter.partition).encode()),
           ("podpulse.source.offset", str(letter.offset).encode())]
    if letter.sample is not None:
        out.append(("podpulse.source.sample", str(letter.sample).encode()))
    if letter.value is not None and len(letter.value) > MAX_VALUE_BYTES:
        out.append(("podpulse.original.size", str(len(letter.value)).encode()))
    return out


def parse_headers(pairs: list[tuple[str, bytes]] | None, value: bytes | None) -> dict:
    """A dead letter's headers (:func:`headers`) as a dict: reason, stage, source partition, offset and
    sample, and the original size (that of ``value`` when it was not cut)."""
    h = {k: v.decode() for k, v in (pairs or [])}
    return {"reason": h.get("podpulse.reason"), "stage": h.get("podpulse.stage"),
            "partition": int(h.get("podpulse.source.partition", -1)),
            "offset": int(h.get("podpulse.source.offset", -1)),
            "sample": int(h["podpulse.source.sample"]) if "podpulse.source.sample" in h else None,
            "original_size": int(h.get("podpulse.original.size", len(value or b"")))}


@dataclass(frozen=True)
class DeadLetterTopic:
    """Where dead letters go: picklable, so Ray can ship it to every actor."""

    bootstrap: str
    topic: str
    settings: dict = field(default_factory=dict)

    def sink(self) -> "DeadLetterSink":
        return DeadLetterSink(self)


class DeadLetterSink:
    def __init__(self, target: DeadLetterTopic):
        self.topic = target.topic
        self.producer = Producer(producer_config(target.bootstrap, target.settings))

    def send(self, letters: list[DeadLetter], timeout: float = 30.0) -> None:
        """Durable when it returns; raises :class:`podpulse.errors.BrokerError` with Kafka's reason."""
        deliver(self.producer, self.topic,
                ((d.key, d.value[:MAX_VALUE_BYTES] if d.value else d.value, headers(d)) for d in letters), timeout)

    def close(self) -> None:
        self.producer.flush(5)


def read_dead_letters(bootstrap: str, topic: str, settings: dict | None = None,
                      timeout_s: float = 30.0) -> list[dict]:
    """Read a dead-letter topic to its end: reason, source and original bytes of each record."""
    consumer = Consumer({**client_config(bootstrap, settings), "group.id": "podpulse-dlq-reader",
                         "enable.auto.commit": False, "enable.partition.eof": True})
    try:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None:
            return []
        consumer.assign([TopicPartition(topic, p, 0) for p in meta.partitions])
        at_end, letters = set(), []
        deadline = time.monotonic() + timeout_s
        while len(at_end) < len(meta.partitions) and time.monotonic() < deadline:
            for m in consumer.consume(10_000, 1.0):
                if m.error():
                    if m.error().code() == KafkaError._PARTITION_EOF:
                        at_end.add(m.partition())
                    continue
                letters.append(parse_headers(m.headers(), m.value()) | {"value": m.value()})
        return letters
    finally:
        consumer.close()
