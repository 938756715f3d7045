"""PodPulse's settings: where records are stored (:class:`StorageConfig`) and how a topic is ingested
(:class:`IngestConfig`). Frozen, picklable objects, passed to every actor; the storage layer reads
them, nothing here imports it."""

from __future__ import annotations

import numbers
import os
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

import yaml

from podpulse.contract import EventWindow
from podpulse.errors import ConfigError, StorageError
from podpulse.pseudonyms import KEY_ENV, Pseudonyms

__all__ = ["MIN_K", "IngestConfig", "INGEST_DEFAULTS", "GROUP_MODES", "StorageConfig", "KINDS", "EXPIRING",
           "CASSANDRA_MAX_TTL_DAYS", "DEFAULT_DUCKDB_PATH", "CONSUMER_CPUS", "WRITER_CPUS"]

GROUP_MODES = ("assign", "subscribe")
# Ray resources of the ingest actors: the actors request them, the operator sizes its workers by them.
CONSUMER_CPUS, WRITER_CPUS = 0.5, 0.25
# The privacy floor: no published cell (report, API, metric) describes fewer devices than this.
MIN_K = 10
DEFAULT_DUCKDB_PATH = "podpulse-data/podpulse.duckdb"
KINDS = ("raw_events", "devices", "rollups", "offsets", "anomalies")
TRANSACTIONAL = ("devices", "rollups", "offsets")
# The kinds that may expire (``retention``). The registry and the offsets never do: they keep
# first-seen dates and exactly-once.
EXPIRING = ("raw_events", "rollups", "anomalies")
RELATIONAL_TYPES = ("duckdb", "postgresql", "oracle")
TYPES = (*RELATIONAL_TYPES, "cassandra")
CASSANDRA_MAX_TTL_DAYS = 7300  # Cassandra caps a TTL at 20 years
_SECRET_KEYS = {"password", "passwd", "secret", "token"}


def _frozen(d: Mapping) -> Mapping:
    return MappingProxyType({k: _frozen(v) if isinstance(v, Mapping) else v for k, v in d.items()})


def _thawed(d: Mapping) -> dict:
    return {k: _thawed(v) if isinstance(v, Mapping) else v for k, v in d.items()}


@dataclass(frozen=True, kw_only=True)
class StorageConfig:
    backends: Mapping[str, Mapping] = field(default_factory=dict)
    routes: Mapping[str, str] = field(default_factory=dict)
    retention: Mapping[str, int] = field(default_factory=dict)  # days kept per kind; absent: forever
    pseudonym_key_file: str = ""  # "" → $PODPULSE_PSEUDONYM_KEY_FILE, else beside the embedded database

    def __post_init__(self) -> None:
        if not self.backends:  # the embedded default
            object.__setattr__(self, "backends", {"embedded": {"type": "duckdb", "path": DEFAULT_DUCKDB_PATH}})
        if not self.routes:
            only = next(iter(self.backends))
            object.__setattr__(self, "routes", {kind: only for kind in KINDS})
        for name, spec in self.backends.items():
            kind = spec.get("type")
            if kind not in TYPES:
                raise StorageError(f"backend {name!r}: type must be one of {', '.join(TYPES)}, got {kind!r}")
            if _SECRET_KEYS & set(spec):
                raise StorageError(f"backend {name!r}: credentials come from password_env or "
                                   "password_file, never from the configuration itself")
        unknown = set(self.routes) - set(KINDS)
        if unknown:
            raise StorageError(f"unknown record kind(s) {sorted(unknown)}; kinds are {', '.join(KINDS)}")
        missing = [k for k in KINDS if k not in self.routes]
        if missing:
            raise StorageError(f"routes: no backend for {', '.join(missing)}")
        for kind, name in self.routes.items():
            if name not in self.backends:
                raise StorageError(f"routes.{kind}: no backend named {name!r}")
            if kind != "raw_events" and self.backends[name]["type"] not in RELATIONAL_TYPES:
                raise StorageError(f"routes.{kind}: {name!r} is not a relational backend")
        if len({self.routes[k] for k in TRANSACTIONAL}) != 1:
            raise StorageError("devices, rollups and offsets must route to the same backend "
                               "(they are written in one transaction)")
        _check_retention(self.retention)
        raw_store = self.backends[self.routes["raw_events"]]["type"]
        if raw_store == "cassandra" and self.retention.get("raw_events", 0) > CASSANDRA_MAX_TTL_DAYS:
            raise StorageError(f"retention.raw_events: Cassandra keeps a row at most {CASSANDRA_MAX_TTL_DAYS} "
                               "days (its TTL cap)")
        object.__setattr__(self, "backends", _frozen(self.backends))
        object.__setattr__(self, "routes", _frozen(self.routes))
        object.__setattr__(self, "retention", _frozen(self.retention))

    @classmethod
    def embedded(cls, path: str | Path = DEFAULT_DUCKDB_PATH) -> "StorageConfig":
        return cls(backends={"embedded": {"type": "duckdb", "path": str(path)}})

    @classmethod
    def from_options(cls, config_file: Path | None, db: Path) -> "StorageConfig":
        """``--storage-config FILE`` if given, else the embedded DuckDB at ``--db``."""
        return cls.load(config_file) if config_file else cls.embedded(Path(db).resolve())

    @classmethod
    def load(cls, path: str | Path) -> "StorageConfig":
        try:
            doc = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as e:
            raise StorageError(f"cannot read storage config {path}: {e.strerror}") from e
        except yaml.YAMLError as e:
            raise StorageError(f"storage config {path} is not valid YAML: {e}") from e
        if not isinstance(doc, dict) or set(doc) - {"backends", "routes", "retention", "pseudonym_key_file"}:
            raise StorageError(f"storage config {path}: expected the keys 'backends', 'routes' "
                               "and (optional) 'retention' and 'pseudonym_key_file'")
        return cls(backends=doc.get("backends") or {}, routes=doc.get("routes") or {},
                   retention=doc.get("retention") or {}, pseudonym_key_file=doc.get("pseudonym_key_file") or "")

    def with_retention(self, days: Mapping[str, int]) -> "StorageConfig":
        """This configuration with ``days`` replacing the retention of the kinds it names."""
        return StorageConfig(**{**self.as_dict(), "retention": {**self.retention, **days}})

    def key_file(self) -> Path:
        """Where the pseudonym key is: ``pseudonym_key_file``, else ``$PODPULSE_PSEUDONYM_KEY_FILE``,
        else ``pseudonym.key`` beside the embedded database."""
        if self.pseudonym_key_file or os.environ.get(KEY_ENV):
            return Path(self.pseudonym_key_file or os.environ[KEY_ENV])
        duckdb = [spec["path"] for spec in self.backends.values() if spec["type"] == "duckdb"]
        return Path(duckdb[0] if duckdb else DEFAULT_DUCKDB_PATH).parent / "pseudonym.key"

    def pseudonyms(self, *, create: bool = False) -> Pseudonyms:
        """The device-id pseudonyms of this store (``create``: make a key if there is none yet)."""
        return Pseudonyms.load(self.key_file(), create=create)

    def embedded_backends(self) -> list[str]:
        """The DuckDB backends: single-process stores, so one writer."""
        return [name for name, spec in self.backends.items() if spec["type"] == "duckdb"]

    def with_key_file(self) -> "StorageConfig":
        """This configuration naming its key file by absolute path: what a process elsewhere
        (a Ray actor started in another directory, with another environment) must read."""
        return StorageConfig(**{**self.as_dict(), "pseudonym_key_file": str(self.key_file().resolve())})

    def as_dict(self) -> dict:
        out = {"backends": _thawed(self.backends), "routes": dict(self.routes)}
        if self.retention:  # absent when unset: the documents written before retention stay as they were
            out["retention"] = dict(self.retention)
        if self.pseudonym_key_file:
            out["pseudonym_key_file"] = self.pseudonym_key_file
        return out

    def __reduce__(self):  # MappingProxyType does not pickle; Ray ships this to every actor
        return (_rebuild, (self.as_dict(),))


def _rebuild(d: dict) -> StorageConfig:
    return StorageConfig(**d)


def _check_retention(retention) -> None:
    """Whole days, more than 0, of a kind that may expire; each error names its key."""
    if not isinstance(retention, Mapping):
        raise StorageError(f"retention: expected a mapping of record kind to days, got {retention!r}")
    for kind, days in retention.items():
        if kind in ("devices", "offsets"):
            raise StorageError(f"retention.{kind}: {kind} never expire (they keep first-seen dates and "
                               f"exactly-once); only {', '.join(EXPIRING)} may")
        if kind not in EXPIRING:
            raise StorageError(f"retention.{kind}: unknown record kind; kinds that expire are "
                               f"{', '.join(EXPIRING)}")
        if type(days) is not int or days < 1:
            raise StorageError(f"retention.{kind}: days must be a whole number of at least 1, got {days!r}")



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


# The ingest defaults, read by the CLI's options, the operator and (held equal by a test) the CRD's schema.
INGEST_DEFAULTS = {f.name: f.default for f in fields(IngestConfig) if f.default is not MISSING}
