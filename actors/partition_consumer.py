"""PartitionConsumer: reads a shard of a topic's partitions into the storage writer.

The commit path, in order, for every batch:

1. consume about ``batch_size`` events (or what arrives within ``linger_ms``): as
   many messages as that, divided by the events per message of the last batch
   (a device upload carries many);
2. decode, validate, upcast and enrich them as one batch (the event contract),
   and replace each device id by its pseudonym (``podpulse.pseudonyms``);
3. produce the rejects to the dead-letter topic and flush: durable before step 5;
4. hand the columnar batch and the next offsets to the StorageWriter, which
   stores both in one transaction;
5. only when the writer has returned, commit the offsets to Kafka (for lag
   monitors; the offsets stored with the data stay the source of truth).

At most ``max_in_flight`` batches wait at the writer; the consumer blocks on the
oldest before reading more, so memory stays bounded however large the backlog.
If a write or a dead-letter delivery fails for any reason (the writer died or
timed out, the store is down, the broker refused a dead letter, or the writer
refused a batch that does not follow the stored offsets because an earlier one
failed), the consumer drops what was in flight, waits for the writer and the
store (as long as it takes, retrying with capped backoff), and rewinds to the
offsets stored with the data. Each distinct root cause is logged once and
counted (``podpulse.failures``); nothing here exits or spins without bound.

Partitions come one of two ways (``IngestConfig.group_mode``):

- ``assign``: the supervisor hands each consumer a fixed shard (no group join);
- ``subscribe``: the consumers join one Kafka consumer group with cooperative-
  sticky rebalancing, so consumers can come and go. On every assignment the
  consumer seeks to the offsets stored with the data (never Kafka's committed
  ones); on a revocation it first waits for its in-flight writes, so the next
  owner starts from durable offsets. Were a write still landing, the writer's
  replay check would drop the overlap, so a rebalance never duplicates a row.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

import numpy as np
import pyarrow as pa
import ray
from confluent_kafka import OFFSET_BEGINNING, TIMESTAMP_NOT_AVAILABLE, Consumer, KafkaError, Message, TopicPartition
from ray.exceptions import RayError

from actors.config import CONSUMER_CPUS, IngestConfig
from podpulse import metrics
from podpulse.contract import decode_batch, uploads_of_each
from podpulse.dead_letters import DeadLetter, DeadLetterTopic
from podpulse.errors import BrokerError
from podpulse.failures import FailureLog
from podpulse.kafka import client_config

__all__ = ["PartitionConsumer", "ShardConsumer"]

log = logging.getLogger("podpulse.consumer")
WRITER_RETURN_TIMEOUT_S = 120.0
BACKOFF_S = (0.5, 30.0)  # first and longest wait between retries after a failure (doubling)


class ShardConsumer:
    def __init__(self, config: IngestConfig, partitions: list[int] | None, writer):
        """``partitions``: this consumer's shard; None in ``subscribe`` mode (the group assigns)."""
        self.config = config
        self.topic = config.topic
        self.subscribed = partitions is None
        self.partitions = sorted(partitions or [])
        self.writer = writer
        self.pseudonyms = config.storage.pseudonyms()
        group = {"partition.assignment.strategy": "cooperative-sticky"} if self.subscribed else {}
        self.consumer = Consumer({
            **client_config(config.bootstrap, config.kafka),
            **group,
            "group.id": config.group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,  # how --until-caught-up knows the end was reached
            "auto.offset.reset": "earliest",
            # Bounds the prefetch queue (librdkafka's default is 64 MB per consumer).
            "queued.max.messages.kbytes": 32 * 1024,
        })
        self.dlq = DeadLetterTopic(config.bootstrap, config.dead_letter_topic, config.kafka).sink()
        self.failures = FailureLog("consumer", log)
        self.backoff = BACKOFF_S[0]
        self.per_message = 50.0  # events per message in the last batch (uploads carry many; a guess until then)
        self.positions: dict[int, int] = {}  # next offset expected per partition
        self.inflight: deque = deque()
        self.at_end: set[int] = set()  # partitions whose end was reached, nothing newer seen
        self._stop = threading.Event()
        self._busy = threading.Lock()  # held while a consumed batch is on its way to the writer
        self.stats = {"consumed": 0, "acked": 0, "dead_lettered": 0, "batches": 0, "rewinds": 0,
                      "assigned": 0}

    # -- control ---------------------------------------------------------------
    def run(self) -> dict:
        """Consume until :meth:`stop`; returns the final stats."""
        if self.subscribed:
            self.consumer.subscribe([self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke,
                                    on_lost=self._on_lost)
        else:
            self._rewind()
        try:
            while not self._stop.is_set():
                with self._busy:
                    count = max(1, int(self.config.batch_size / self.per_message))
                    messages = self.consumer.consume(count, self.config.linger_ms / 1000)
                    if messages:
                        self._handle(messages)
                    self._settle(block=False)
            self._settle(block=True, limit=0)
        finally:
            self.consumer.close()
            self.dlq.close()
        return self.get_stats()

    def stop(self) -> None:
        self._stop.set()

    def caught_up(self) -> list[int] | None:
        """The partitions read to their end, when every batch is durable; None while writes are
        in flight or a partition of this consumer has more to read."""
        with self._busy:
            done = not self.inflight and self.at_end.issuperset(self.partitions)
            return sorted(self.partitions) if done else None

    def get_stats(self) -> dict:
        return {**self.stats, "partitions": list(self.partitions), "positions": dict(self.positions),
                "failures": dict(self.failures.counts)}

    # -- group mode: the group assigns and revokes partitions --------------------------
    def _on_assign(self, consumer: Consumer, assigned: list[TopicPartition]) -> None:
        """Start each new partition at the offset stored with the data."""
        stored = self._stored_offsets()
        for tp in assigned:
            tp.offset = stored.get(tp.partition, OFFSET_BEGINNING)
            if tp.partition in stored:
                self.positions[tp.partition] = stored[tp.partition]
        consumer.incremental_assign(assigned)
        self.partitions = sorted(set(self.partitions) | {tp.partition for tp in assigned})
        self.stats["assigned"] += len(assigned)
        log.info("assigned %s", [tp.partition for tp in assigned])

    def _on_revoke(self, consumer: Consumer, revoked: list[TopicPartition]) -> None:
        """Let every write in flight land first: the next owner starts from durable offsets."""
        self._settle(block=True, limit=0)
        self._forget(consumer, revoked)

    def _on_lost(self, consumer: Consumer, lost: list[TopicPartition]) -> None:
        """Already someone else's: nothing to wait for (the writer drops any overlap)."""
        self._forget(consumer, lost)

    def _forget(self, consumer: Consumer, gone: list[TopicPartition]) -> None:
        consumer.incremental_unassign(gone)
        ids = {tp.partition for tp in gone}
        self.partitions = [p for p in self.partitions if p not in ids]
        for p in ids:
            self.positions.pop(p, None)
        self.at_end -= ids
        log.info("revoked %s", sorted(ids))

    # -- the commit path ----------------------------------------------------------
    def _handle(self, messages: list[Message]) -> None:
        ended = self._track_ends(messages)
        if any(m.error() is not None for m in messages):
            for m in messages:
                e = m.error()
                if e is not None and e.fatal():
                    raise RuntimeError(f"fatal Kafka error: {e}")
                if e is not None and e.code() != KafkaError._PARTITION_EOF:
                    log.warning("Kafka: %s", e)
            messages = [m for m in messages if m.error() is None]
        partitions = np.fromiter(map(Message.partition, messages), np.int32, len(messages))
        offsets = np.fromiter(map(Message.offset, messages), np.int64, len(messages))
        fresh = self._not_seen(partitions, offsets)  # after a rewind, the fetch queue may lag
        if not fresh.all():
            messages = [m for m, ok in zip(messages, fresh) if ok]
            partitions, offsets = partitions[fresh], offsets[fresh]
        if not messages:
            self.at_end = ended
            return
        values = list(map(Message.value, messages))
        decoded = decode_batch(values, received_ms=_timestamps(messages), window=self.config.window)  # 2.
        self.per_message = max(1.0, len(decoded) / len(messages))
        if decoded.rejected:  # 3.
            try:
                self._dead_letter(messages, decoded.rejected)
            except BrokerError as e:  # not acknowledged: nothing of this batch may be stored
                self._failed("dead letters not delivered", e, partitions, offsets)
                return
        table = self.pseudonyms.table(decoded.table).append_column(
            "kafka_partition", pa.array(partitions[decoded.rows], pa.int32())).append_column(
            "kafka_offset", pa.array(offsets[decoded.rows], pa.int64()))
        next_offsets = {}
        for p in np.unique(partitions).tolist():
            next_offsets[p] = int(offsets[partitions == p].max()) + 1
        start_offsets = {p: self.positions.get(p) for p in next_offsets}  # None: the beginning
        self.positions.update(next_offsets)
        self.stats["consumed"] += len(messages)
        metrics.events_consumed(self.topic, metrics.partition_counts(partitions))
        ref = self.writer.commit.remote(self.topic, table, next_offsets, start_offsets)  # 4.
        self.inflight.append((ref, next_offsets, metrics.partition_counts(partitions[decoded.rows])))
        self.at_end = ended
        self._settle(block=True, limit=self.config.max_in_flight - 1)

    def _track_ends(self, messages: list[Message]) -> set[int]:
        """Partitions at their end after this batch: an end event with no message after it."""
        ended = set(self.at_end)
        eof = KafkaError._PARTITION_EOF
        for m in messages:
            e = m.error()
            if e is None:
                ended.discard(m.partition())
            elif e.code() == eof:
                ended.add(m.partition())
        return ended

    def _not_seen(self, partitions: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Messages of partitions this consumer owns, at or past its position in each."""
        size = int(partitions.max(initial=0)) + 1
        floor = np.array([self.positions.get(p, 0) for p in range(size)])
        owned = np.zeros(size, bool)
        owned[[p for p in self.partitions if p < size]] = True
        return owned[partitions] & (offsets >= floor[partitions])

    def _dead_letter(self, messages: list[Message], rejected) -> None:
        """Send the rejects and wait for the broker's acknowledgement (raises BrokerError otherwise)."""
        self.dlq.send([DeadLetter(m.key(), value, r.reason, "decode", self.topic, m.partition(), m.offset(), r.sample)
                       for r, value in zip(rejected, _rejected_values(messages, rejected))
                       for m in (messages[r.index],)])
        self.stats["dead_lettered"] += len(rejected)
        metrics.events_dead_lettered(self.topic, (messages[r.index].partition() for r in rejected))

    def _failed(self, what: str, error: BaseException, partitions: np.ndarray | None = None,
                offsets: np.ndarray | None = None) -> None:
        """Say why (once per cause), wait (capped backoff), rewind to the offsets stored with the data."""
        where = ""
        if partitions is not None and len(partitions):
            where = ", ".join(f"{self.topic}[{p}] {offsets[partitions == p].min()}..{offsets[partitions == p].max()}"
                              for p in np.unique(partitions).tolist()[:4])
        self.failures.record(what, error, where)
        self._stop.wait(self.backoff)
        self.backoff = min(self.backoff * 2, BACKOFF_S[1])
        self.stats["rewinds"] += 1
        self._rewind()

    def _settle(self, block: bool, limit: int = 0) -> None:
        """Collect finished writes (5.); with ``block``, wait until at most ``limit`` remain."""
        while self.inflight:
            ref, next_offsets, stored = self.inflight[0]
            if not block or len(self.inflight) <= limit:
                ready, _ = ray.wait([ref], timeout=0)
                if not ready:
                    return
            try:
                result = ray.get(ref, timeout=WRITER_RETURN_TIMEOUT_S)
            except RayError as e:  # died, timed out, refused (OffsetGap) or failed: not stored
                self._failed("write failed", e)
                return
            self.backoff = BACKOFF_S[0]
            self.inflight.popleft()
            self.stats["acked"] += result["rows"]
            self.stats["batches"] += 1
            metrics.events_stored(self.topic, stored)
            self.consumer.commit(offsets=[TopicPartition(self.topic, p, o) for p, o in next_offsets.items()],
                                 asynchronous=True)

    def _stored_offsets(self) -> dict[int, int]:
        """The offsets stored with the data, waiting as long as the writer restarts or the store is
        down (saying why once per cause); only :meth:`stop` ends the wait."""
        wait = BACKOFF_S[0]
        while True:
            try:
                return ray.get(self.writer.committed_offsets.remote(self.topic), timeout=30)
            except RayError as e:  # the writer is restarting, or cannot reach the store
                self.failures.record("waiting for the store", e)
                if self._stop.wait(wait):
                    raise RuntimeError("stopped while waiting for the store") from e
                wait = min(wait * 2, BACKOFF_S[1])

    def _rewind(self) -> None:
        """Start (again) from the offsets stored with the data, waiting for the writer."""
        self.inflight.clear()
        stored = self._stored_offsets()
        self.positions = {p: stored[p] for p in self.partitions if p in stored}
        self.at_end = set()
        start = [TopicPartition(self.topic, p, stored.get(p, OFFSET_BEGINNING)) for p in self.partitions]
        if self.subscribed:  # keep the group's assignment, move its positions
            current = [TopicPartition(self.topic, p) for p in self.partitions]
            if current:
                self.consumer.incremental_unassign(current)
                self.consumer.incremental_assign(start)
        else:
            self.consumer.assign(start)


def _rejected_values(messages: list[Message], rejected) -> list[bytes | None]:
    """Each reject's dead-letter value: the message as read, or for one sample of an upload, the
    upload cut down to that sample (each upload parsed once, however many of its samples failed)."""
    samples: dict[int, list[int]] = {}
    for r in rejected:
        if r.sample is not None:
            samples.setdefault(r.index, []).append(r.sample)
    cut = {i: iter(uploads_of_each(messages[i].value(), [[k] for k in ks])) for i, ks in samples.items()}
    return [messages[r.index].value() if r.sample is None else next(cut[r.index]) for r in rejected]


def _timestamps(messages: list[Message]) -> np.ndarray:
    """When each message reached Kafka (ms; 0 when the broker gives none): the event-time window's anchor."""
    return np.fromiter((ts if kind != TIMESTAMP_NOT_AVAILABLE else 0
                        for kind, ts in map(Message.timestamp, messages)), np.int64, len(messages))


# The actor wraps the plain class, so Ray pickles the class by reference (its Kafka
# client types are C types that cannot be pickled by value) and the logic stays testable.
PartitionConsumer = ray.remote(num_cpus=CONSUMER_CPUS, max_concurrency=2)(ShardConsumer)
