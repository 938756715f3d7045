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

A value over :data:`MAX_VALUE_BYTES` is cut to that size (a topic may accept
records that the dead-letter topic, or the producer, would refuse as too large).
:meth:`DeadLetterSink.send` returns only when the broker acknowledged every
letter, and raises otherwise: a batch's offsets are stored only after that.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from confluent_kafka import Producer

from podpulse.kafka import deliver, producer_config

__all__ = ["DeadLetter", "DeadLetterSink", "DeadLetterTopic", "MAX_VALUE_BYTES", "headers"]

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
