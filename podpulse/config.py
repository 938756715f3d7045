"""Settings of the ingest pipeline: one frozen object, passed to every actor."""

from __future__ import annotations

from dataclasses import dataclass, field

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
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        checks = [
            (self.consumers >= 0, "consumers must be 0 (one per CPU) or more"),
            (self.batch_size >= 1, "batch size must be at least 1"),
            (self.linger_ms >= 0, "linger must not be negative"),
            (self.max_in_flight >= 1, "max in-flight batches must be at least 1"),
            (bool(self.topic), "a topic is required"),
            (self.group_mode in GROUP_MODES, f"group mode must be one of {', '.join(GROUP_MODES)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def dead_letter_topic(self) -> str:
        return self.dlq_topic or f"{self.topic}.dlq"
