"""How a topic is ingested (:class:`IngestConfig`): the settings of the ingest actors, frozen and
picklable, passed to every actor. The one set of ingest defaults (:data:`INGEST_DEFAULTS`) is read
by the command line's options, the operator and (held equal by a test) the CRD's schema."""

from __future__ import annotations

import numbers
from dataclasses import MISSING, dataclass, field, fields, replace
from enum import Enum

from podpulse.contract import EventWindow
from podpulse.errors import ConfigError
from storage.config import StorageConfig

__all__ = ["IngestConfig", "INGEST_DEFAULTS", "GroupMode", "GROUP_MODES", "CONSUMER_CPUS", "WRITER_CPUS"]


class GroupMode(str, Enum):
    """How ingest consumers get their partitions."""

    assign = "assign"  # fixed shards of partitions, no group join
    subscribe = "subscribe"  # one Kafka consumer group, cooperative-sticky rebalancing


GROUP_MODES = tuple(m.value for m in GroupMode)
# Ray resources of the ingest actors: the actors request them, the operator sizes its workers by them.
CONSUMER_CPUS, WRITER_CPUS = 0.5, 0.25


@dataclass(frozen=True, kw_only=True)
class IngestConfig:
    """How to read a topic and where to store it.

    ``kafka`` holds plain librdkafka settings (SASL, TLS, ...), applied to every
    consumer and producer the pipeline creates.
    """

    bootstrap: str
    topic: str
    kafka: dict[str, str] = field(default_factory=dict)
    consumers: int = 0  # PartitionConsumer actors; 0 → the number of CPUs in the Ray cluster
    writers: int = 1  # StorageWriter actors, each with its own consumers' partitions (DuckDB: 1)
    batch_size: int = 20_000  # events decoded and written as one batch (a device upload counts its samples)
    linger_ms: int = 200  # longest wait to fill a batch
    max_in_flight: int = 2  # batches a consumer may have at the writer: the back-pressure bound
    group_id: str = "podpulse-ingest"  # offsets are also committed to Kafka under this group
    group_mode: str = "assign"  # "assign": fixed shards, no group join; "subscribe": a consumer group
    dlq_topic: str = ""  # "" → "<topic>.dlq"
    dlq_partitions: int = 0  # when the dead-letter topic is created: 0 → as many as the topic
    dlq_replication: int = -1  # when it is created: -1 → the broker's default.replication.factor
    storage: StorageConfig = field(default_factory=StorageConfig)
    # the event-time window, around each record's Kafka timestamp: older or further ahead → dead letter
    max_event_age_s: float = 60 * 86400
    max_future_skew_s: float = 86400

    def __post_init__(self) -> None:
        if isinstance(self.group_mode, GroupMode):
            object.__setattr__(self, "group_mode", self.group_mode.value)
        checks = [
            (self.consumers >= 0, "consumers must be 0 (one per CPU) or more"),
            (self.writers >= 1, "writers must be at least 1"),
            (self.writers == 1 or not self.storage.embedded_backends(),
             f"writers: DuckDB ({', '.join(self.storage.embedded_backends())}) takes one writer; "
             f"more than one needs server backends (PostgreSQL, Oracle, Cassandra)"),
            (self.batch_size >= 1, "batch size must be at least 1"),
            (self.linger_ms >= 0, "linger must not be negative"),
            (self.max_in_flight >= 1, "max in-flight batches must be at least 1"),
            (bool(self.topic), "a topic is required"),
            (self.dlq_partitions >= 0, "dead-letter partitions must be 0 (as many as the topic) or more"),
            (self.dlq_replication == -1 or self.dlq_replication >= 1,
             "dead-letter replication must be -1 (the broker's default) or at least 1"),
            (self.group_mode in GROUP_MODES, f"group mode must be one of {', '.join(GROUP_MODES)}"),
            (_positive(self.max_event_age_s),
             f"max event age must be a positive number of seconds, got {self.max_event_age_s!r}"),
            (_positive(self.max_future_skew_s),
             f"max future skew must be a positive number of seconds, got {self.max_future_skew_s!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def with_pseudonym_key(self) -> "IngestConfig":
        """This configuration naming the storage's pseudonym key by absolute path, the key made
        first if there is none yet (the first ingest of a store makes it)."""
        storage = self.storage.with_key_file()
        storage.pseudonyms(create=True)
        return replace(self, storage=storage)

    @property
    def dead_letter_topic(self) -> str:
        return self.dlq_topic or f"{self.topic}.dlq"

    @property
    def window(self) -> EventWindow:
        """The event-time window the consumers decode with."""
        return EventWindow(max_age_s=self.max_event_age_s, max_future_skew_s=self.max_future_skew_s)


def _positive(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and value > 0


INGEST_DEFAULTS = {f.name: f.default for f in fields(IngestConfig) if f.default is not MISSING}
