"""Where records are stored: :class:`StorageConfig` and the typed settings of each backend.

A storage configuration is a small YAML file (the AirPodsDataStream custom resource carries the
same structure)::

    backends:
      core: {type: postgresql, url: "postgresql://podpulse@db:5432/podpulse", password_env: PG_PASSWORD}
      raw:  {type: cassandra, hosts: [cass-1, cass-2], keyspace: podpulse, consistency: LOCAL_QUORUM}
    routes:
      raw_events: raw
      devices: core
      rollups: core
      offsets: core
      anomalies: core

Each backend's entry is checked by the settings class its ``type`` names (:data:`SETTINGS`):
:class:`DuckDBSettings`, :class:`PostgresSettings`, :class:`OracleSettings`,
:class:`CassandraSettings` (raw events only). Devices, rollups and offsets share one relational
backend: they are written in one transaction. Credentials never sit in the file itself
(``password_env`` or ``password_file``). An optional ``retention`` maps ``raw_events``,
``rollups`` and ``anomalies`` to days kept (``storage.retention``).

Light on purpose: a frozen, picklable object that every actor, the operator and the command
line hold; the stores themselves are opened by ``storage.backends``.
"""

from __future__ import annotations

import os
import re
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import ClassVar, Mapping

import yaml

from podpulse.errors import StorageError
from podpulse.pseudonyms import KEY_ENV, Pseudonyms

__all__ = ["StorageConfig", "KINDS", "EXPIRING", "DEFAULT_DUCKDB_PATH", "CASSANDRA_MAX_TTL_DAYS", "SETTINGS",
           "DuckDBSettings", "PostgresSettings", "OracleSettings", "OracleOptions", "CassandraSettings",
           "CONSISTENCY_LEVELS"]

DEFAULT_DUCKDB_PATH = "podpulse-data/podpulse.duckdb"
KINDS = ("raw_events", "devices", "rollups", "offsets", "anomalies")
TRANSACTIONAL = ("devices", "rollups", "offsets")
# The kinds that may expire (``retention``). The registry and the offsets never do: they keep
# first-seen dates and exactly-once.
EXPIRING = ("raw_events", "rollups", "anomalies")
CASSANDRA_MAX_TTL_DAYS = 7300  # Cassandra caps a TTL at 20 years
CONSISTENCY_LEVELS = ("ANY", "ONE", "TWO", "THREE", "QUORUM", "ALL", "LOCAL_QUORUM",  # = the driver's
                      "EACH_QUORUM", "SERIAL", "LOCAL_SERIAL", "LOCAL_ONE")
_SECRET_KEYS = {"password", "passwd", "secret", "token"}
_KEYSPACE = re.compile(r"[a-z][a-z0-9_]{0,47}")


# -- each backend's settings -----------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class DuckDBSettings:
    """The embedded store: one DuckDB file holding every kind of record."""

    type: ClassVar[str] = "duckdb"
    relational: ClassVar[bool] = True
    embedded: ClassVar[bool] = True  # one process writes the file: one writer
    expires_on_write: ClassVar[bool] = False

    path: str = DEFAULT_DUCKDB_PATH
    memory_limit: str = "256MB"  # DuckDB's own cap; the rollups' key indexes grow with the fleet


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    """A database server reached by URL, its password from the environment or a file."""

    relational: ClassVar[bool] = True
    embedded: ClassVar[bool] = False
    expires_on_write: ClassVar[bool] = False

    url: str
    password_env: str | None = None
    password_file: str | None = None

    def password(self) -> str | None:
        """From ``password_env``'s variable or ``password_file``; None when neither is given."""
        if self.password_env:
            value = os.environ.get(self.password_env)
            if value is None:
                raise StorageError(f"environment variable {self.password_env} is not set")
            return value
        if self.password_file:
            try:
                return Path(self.password_file).read_text().strip()
            except OSError as e:
                raise StorageError(f"cannot read password file {self.password_file}: {e.strerror}") from e
        return None


@dataclass(frozen=True, kw_only=True)
class PostgresSettings(ServerSettings):
    type: ClassVar[str] = "postgresql"


@dataclass(frozen=True, kw_only=True)
class OracleOptions:
    """Physical options of the Oracle analytics core (what its DDL renders)."""

    interval_days: int = 1  # one partition per this many days
    inmemory: bool = True
    memcompress: str = "FOR QUERY LOW"  # NO MEMCOMPRESS | FOR DML | FOR QUERY LOW|HIGH | FOR CAPACITY LOW|HIGH
    priority: str = "HIGH"  # NONE | LOW | MEDIUM | HIGH | CRITICAL

    def __post_init__(self) -> None:
        if self.interval_days < 1:
            raise StorageError("oracle interval_days must be at least 1")
        if self.memcompress not in {"NO MEMCOMPRESS", "FOR DML", "FOR QUERY LOW", "FOR QUERY HIGH",
                                    "FOR CAPACITY LOW", "FOR CAPACITY HIGH"}:
            raise StorageError(f"oracle memcompress {self.memcompress!r} is not an Oracle MEMCOMPRESS level")
        if self.priority not in {"NONE", "LOW", "MEDIUM", "HIGH", "CRITICAL"}:
            raise StorageError(f"oracle priority {self.priority!r} is not an INMEMORY PRIORITY")


@dataclass(frozen=True, kw_only=True)
class OracleSettings(ServerSettings, OracleOptions):
    type: ClassVar[str] = "oracle"


@dataclass(frozen=True, kw_only=True)
class CassandraSettings:
    """Where and how raw events are kept. ``hosts`` also takes "h1,h2". Credentials
    are never stored here: ``username_env`` / ``password_env`` name the environment
    variables holding them (e.g. ``PODPULSE_CASSANDRA_PASSWORD``); unset, no auth."""

    type: ClassVar[str] = "cassandra"
    relational: ClassVar[bool] = False
    embedded: ClassVar[bool] = False
    expires_on_write: ClassVar[bool] = True  # each row carries its TTL: retention has nothing to run

    hosts: tuple[str, ...]
    port: int = 9042
    keyspace: str = "podpulse"
    local_dc: str | None = None  # None: the DC of the first contact point
    replication: dict = field(default_factory=lambda: {"class": "SimpleStrategy", "replication_factor": 1})
    consistency: str = "LOCAL_QUORUM"  # of writes and reads
    ttl_days: int = 0  # 0: keep forever
    compaction_window_days: int = 1
    concurrency: int = 64  # writes in flight
    username_env: str | None = None
    password_env: str | None = None

    def __post_init__(self) -> None:
        hosts = self.hosts.split(",") if isinstance(self.hosts, str) else self.hosts
        object.__setattr__(self, "hosts", tuple(str(h).strip() for h in hosts))
        object.__setattr__(self, "replication", dict(self.replication))
        object.__setattr__(self, "consistency", str(self.consistency).upper())
        rep = self.replication
        for ok, message in [
            (self.hosts and all(self.hosts), "hosts must name at least one host"),
            (1 <= self.port <= 65535, "port must be between 1 and 65535"),
            (_KEYSPACE.fullmatch(self.keyspace), "keyspace must be 1-48 of a-z, 0-9, _ (a letter first)"),
            (self.local_dc is None or self.local_dc, "local_dc must be a data-centre name or None"),
            (isinstance(rep.get("class"), str) and all(isinstance(v, str) or type(v) is int and v >= 0
                                                        for v in rep.values()),
             "replication needs a 'class' and string or non-negative integer values"),
            (self.consistency in CONSISTENCY_LEVELS,
             f"consistency {self.consistency!r} is not one of {', '.join(CONSISTENCY_LEVELS)}"),
            (0 <= self.ttl_days <= CASSANDRA_MAX_TTL_DAYS,
             f"ttl_days must be between 0 (no TTL) and {CASSANDRA_MAX_TTL_DAYS}"),
            (self.compaction_window_days >= 1, "compaction_window_days must be at least 1"),
            (self.concurrency >= 1, "concurrency must be at least 1"),
            ((self.username_env is None) == (self.password_env is None),
             "username_env and password_env must be given together"),
        ]:
            if not ok:
                raise StorageError(f"Cassandra settings: {message}")


Settings = DuckDBSettings | PostgresSettings | OracleSettings | CassandraSettings
# A backend's ``type`` → its settings class: what ``storage.backends`` opens a store and a reader by.
SETTINGS: Mapping[str, type] = MappingProxyType(
    {s.type: s for s in (DuckDBSettings, PostgresSettings, OracleSettings, CassandraSettings)})


def settings_of(name: str, spec: Mapping) -> Settings:
    """A backend's entry (a mapping with its ``type``) as its typed settings; StorageError naming the
    backend and what is wrong."""
    kind = spec.get("type")
    if kind not in SETTINGS:
        raise StorageError(f"backend {name!r}: type must be one of {', '.join(SETTINGS)}, got {kind!r}")
    if _SECRET_KEYS & set(spec):
        raise StorageError(f"backend {name!r}: credentials come from password_env or "
                           "password_file, never from the configuration itself")
    cls = SETTINGS[kind]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(spec) - known - {"type"}, key=str)
    if unknown:
        raise StorageError(f"backend {name!r} ({kind}): unknown key(s) {', '.join(map(str, unknown))}; "
                           f"known: {', '.join(sorted(known))}")
    missing = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
               and f.name not in spec]
    if missing:
        raise StorageError(f"backend {name!r} ({kind}): {', '.join(missing)} is required")
    values = {k: (tuple(v) if k == "hosts" and not isinstance(v, str) else dict(v) if isinstance(v, Mapping) else v)
              for k, v in spec.items() if k != "type"}
    try:
        return cls(**values)
    except StorageError as e:
        raise StorageError(f"backend {name!r}: {e}") from None
    except (TypeError, ValueError) as e:  # a value of the wrong type, met by a check
        raise StorageError(f"backend {name!r} ({kind}): a value has the wrong type ({e})") from None


# -- the configuration -------------------------------------------------------------------------------

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
        typed = {name: settings_of(name, spec) for name, spec in self.backends.items()}
        unknown = set(self.routes) - set(KINDS)
        if unknown:
            raise StorageError(f"unknown record kind(s) {sorted(unknown)}; kinds are {', '.join(KINDS)}")
        missing = [k for k in KINDS if k not in self.routes]
        if missing:
            raise StorageError(f"routes: no backend for {', '.join(missing)}")
        for kind, name in self.routes.items():
            if name not in self.backends:
                raise StorageError(f"routes.{kind}: no backend named {name!r}")
            if kind != "raw_events" and not typed[name].relational:
                raise StorageError(f"routes.{kind}: {name!r} is not a relational backend")
        if len({self.routes[k] for k in TRANSACTIONAL}) != 1:
            raise StorageError("devices, rollups and offsets must route to the same backend "
                               "(they are written in one transaction)")
        _check_retention(self.retention)
        if (isinstance(typed[self.routes["raw_events"]], CassandraSettings)
                and self.retention.get("raw_events", 0) > CASSANDRA_MAX_TTL_DAYS):
            raise StorageError(f"retention.raw_events: Cassandra keeps a row at most {CASSANDRA_MAX_TTL_DAYS} "
                               "days (its TTL cap)")
        object.__setattr__(self, "backends", _frozen(self.backends))
        object.__setattr__(self, "routes", _frozen(self.routes))
        object.__setattr__(self, "retention", _frozen(self.retention))
        object.__setattr__(self, "_settings", MappingProxyType(typed))

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

    def settings(self, name: str) -> Settings:
        """The typed settings of the backend called ``name``."""
        return self._settings[name]

    def settings_for(self, kind: str) -> Settings:
        """The typed settings of the backend that keeps ``kind`` of records."""
        return self._settings[self.routes[kind]]

    def type_of(self, kind: str) -> str:
        """The type of the backend that keeps ``kind`` (``duckdb``, ``postgresql``, ...)."""
        return self.settings_for(kind).type

    def with_retention(self, days: Mapping[str, int]) -> "StorageConfig":
        """This configuration with ``days`` replacing the retention of the kinds it names."""
        return StorageConfig(**{**self.as_dict(), "retention": {**self.retention, **days}})

    def with_backends(self, backends: Mapping[str, Mapping]) -> "StorageConfig":
        """This configuration with these backends' entries in place of those of the same name."""
        return StorageConfig(**{**self.as_dict(), "backends": {**_thawed(self.backends), **backends}})

    def key_file(self) -> Path:
        """Where the pseudonym key is: ``pseudonym_key_file``, else ``$PODPULSE_PSEUDONYM_KEY_FILE``,
        else ``pseudonym.key`` beside the embedded database."""
        if self.pseudonym_key_file or os.environ.get(KEY_ENV):
            return Path(self.pseudonym_key_file or os.environ[KEY_ENV])
        duckdb = [s.path for s in self._settings.values() if s.embedded]
        return Path(duckdb[0] if duckdb else DEFAULT_DUCKDB_PATH).parent / "pseudonym.key"

    def pseudonyms(self, *, create: bool = False) -> Pseudonyms:
        """The device-id pseudonyms of this store (``create``: make a key if there is none yet)."""
        return Pseudonyms.load(self.key_file(), create=create)

    def embedded_backends(self) -> list[str]:
        """The embedded backends (DuckDB): single-process stores, so one writer."""
        return [name for name, s in self._settings.items() if s.embedded]

    def with_key_file(self) -> "StorageConfig":
        """This configuration naming its key file by absolute path: what a process elsewhere
        (a Ray actor started in another directory, with another environment) must read."""
        # Absolute, its links kept: a Kubernetes Secret's file is a link into a folder whose name differs
        # from pod to pod (..2026_12_07_17_45_06.95051120/key), so a resolved path read on the head would
        # name nothing on a worker.
        return StorageConfig(**{**self.as_dict(), "pseudonym_key_file": os.path.abspath(self.key_file())})

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
