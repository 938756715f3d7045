"""Driver side of the ingest pipeline: start Ray, run the supervisor, report progress."""

from __future__ import annotations

import time
from typing import Callable

import ray
from confluent_kafka import Consumer, KafkaError, TopicPartition

from actors.supervisor import IngestSupervisor
from podpulse.config import IngestConfig
from podpulse.kafka import client_config
from podpulse.runtime import init_ray

__all__ = ["run_ingest", "dead_letters"]


def run_ingest(config: IngestConfig, *, until_caught_up: bool,
               on_status: Callable[[dict], None] | None = None, poll_s: float = 1.0) -> dict:
    """Run the pipeline; returns the supervisor's final summary. Ctrl-C stops it cleanly."""
    config = config.with_pseudonym_key()  # a missing or bad key fails here, before Ray starts
    init_ray()
    supervisor = IngestSupervisor.remote(config)
    done = supervisor.run.remote(until_caught_up=until_caught_up)
    try:
        while True:
            ready, _ = ray.wait([done], timeout=poll_s)
            if ready:
                return ray.get(done)
            if on_status:
                on_status(ray.get(supervisor.status.remote()))
    except KeyboardInterrupt:
        ray.get(supervisor.stop.remote())
        return ray.get(done)
    finally:
        ray.kill(supervisor)


def dead_letters(bootstrap: str, topic: str, settings: dict | None = None,
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
                h = {k: v.decode() for k, v in (m.headers() or [])}
                letters.append({"reason": h.get("podpulse.reason"), "stage": h.get("podpulse.stage"),
                                "partition": int(h.get("podpulse.source.partition", -1)),
                                "offset": int(h.get("podpulse.source.offset", -1)),
                                "sample": int(h["podpulse.source.sample"]) if "podpulse.source.sample" in h else None,
                                "original_size": int(h.get("podpulse.original.size", len(m.value() or b""))),
                                "value": m.value()})
        return letters
    finally:
        consumer.close()
