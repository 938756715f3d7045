"""Where simulated events go: a Kafka topic or a JSON-lines file."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from confluent_kafka import Producer

from podpulse.errors import ConfigError
from podpulse.kafka import client_config, ensure_topic, flush, parse_kafka_url, produce, producer_config
from podpulse.simulator import Chunk

__all__ = ["Sink", "open_sink"]


class Sink:
    def __init__(self, write: Callable[[Chunk], None], path: Path | None = None):
        self.write = write
        self.path = path  # the file written, for a file sink


def _closed(chunk: Chunk) -> None:
    raise RuntimeError("the sink is closed")


@contextmanager
def open_sink(to: str, partitions: int = 8, settings: dict | None = None) -> Iterator[Sink]:
    """``kafka://HOST:PORT/TOPIC`` → produce (creating the topic if missing); else a file."""
    if to.startswith("kafka://"):
        target = parse_kafka_url(to)
        ensure_topic(client_config(target.bootstrap, settings), target.topic, partitions)
        producer = Producer(producer_config(target.bootstrap, settings))
        sink = Sink(lambda chunk: produce(producer, target.topic, chunk.keys, chunk.values))
        yield sink
        flush(producer)
        # Let go of the producer: while one is alive, librdkafka keeps reconnecting (and logging)
        # to a broker that may be gone, such as the demo's embedded one.
        sink.write = _closed
        return
    if "://" in to:
        raise ConfigError(f"--to must be kafka://HOST:PORT/TOPIC or a file path, got {to!r}")
    path = Path(to)
    if path.parent and not path.parent.exists():
        raise ConfigError(f"directory {path.parent} does not exist")
    with open(path, "wb") as f:
        yield Sink(lambda chunk: f.write(b"".join(v + b"\n" for v in chunk.values)), path)

