"""Settings of the ingest pipeline: one frozen object, passed to every actor."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

from podpulse.contract import EventWindow
from podpulse.errors import ConfigError
from storage.router import StorageConfig

__all__ = ["IngestConfig", "GROUP_MODES"]

GROUP_MODES = ("assign", "subscribe")


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
    batch_size: int = 20_000  # most messages decoded and written as one batch
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
        checks = [
            (self.consumers >= 0, "consumers must be 0 (one per CPU) or more"),
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

    @property
    def dead_letter_topic(self) -> str:
        return self.dlq_topic or f"{self.topic}.dlq"

    @property
    def window(self) -> EventWindow:
        """The event-time window the consumers decode with."""
        return EventWindow(max_age_s=self.max_event_age_s, max_future_skew_s=self.max_future_skew_s)


def _positive(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and value > 0
