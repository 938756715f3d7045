"""The fleet-scale time-series backend: raw events in Cassandra, by (device, UTC day).

A partition holds one device's events of one day, newest first (288 a day at the
five-minute interval); time-window compaction plus a TTL lets whole SSTables
expire. With ``retention.raw_events`` set, each row gets its own TTL at insert:
it expires that many days after its event time (not its write time), and a row
already that old is not written at all (counted in ``expired_on_write``).
Cassandra has no transactions, so exactly-once rests on
idempotence: a write is an upsert by primary key ``((device_id, day), event_time,
seq)``, so a redelivered batch overwrites itself and never duplicates a row (the
consumed offsets live in the relational store). The CQL comes from pure functions;
the driver (``pip install cassandra-driver``) is imported only to connect.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import replace
from datetime import date, datetime, timedelta, timezone
from typing import Iterable, Iterator, Mapping

import numpy as np
import pyarrow as pa

from podpulse.contract import ARROW_SCHEMA
from storage.base import Backend, RefusedRows, StorageError, TimeSeriesStore
from storage.config import CASSANDRA_MAX_TTL_DAYS, CassandraSettings
from storage.rollups import KAFKA_COLUMNS

__all__ = ["CassandraStore", "BACKEND", "EVENT_COLUMNS",
           "keyspace_cql", "table_cql", "add_columns_cql", "insert_cql", "row_ttls", "recent_cql", "identity_cql",
           "partition_count_cql", "delete_partition_cql"]

MAX_TTL_DAYS = CASSANDRA_MAX_TTL_DAYS  # Cassandra caps a TTL at 20 years
_CQL_TYPES = {pa.int8(): "tinyint", pa.int16(): "smallint", pa.int32(): "int", pa.int64(): "bigint",
              pa.float64(): "double", pa.bool_(): "boolean", pa.string(): "text"}


def _cql_type(t: pa.DataType) -> str:
    return "timestamp" if pa.types.is_timestamp(t) else _CQL_TYPES[t]


EVENT_COLUMNS = [(f.name, _cql_type(f.type)) for f in [*ARROW_SCHEMA, *(pa.field(*c) for c in KAFKA_COLUMNS)]]
"""Name and CQL type of each stored event field; the table adds the ``day date`` bucket."""
_NAMES = [name for name, _ in EVENT_COLUMNS]


def _cql_map(options: dict) -> str:
    def literal(v) -> str:
        return str(v) if type(v) is int else "'" + str(v).replace("'", "''") + "'"
    return "{" + ", ".join(f"{literal(k)}: {literal(v)}" for k, v in options.items()) + "}"


def keyspace_cql(s: CassandraSettings) -> str:
    """Create the keyspace (an existing one keeps its replication)."""
    return f"CREATE KEYSPACE IF NOT EXISTS {s.keyspace} WITH replication = {_cql_map(s.replication)}"


def table_cql(s: CassandraSettings) -> str:
    """Create the raw events table (an existing one keeps its options; see :func:`add_columns_cql`)."""
    compaction = {"class": "TimeWindowCompactionStrategy", "compaction_window_unit": "DAYS",
                  "compaction_window_size": s.compaction_window_days}
    return (f"CREATE TABLE IF NOT EXISTS {s.keyspace}.events ("
            + ", ".join(f"{name} {cql}" for name, cql in EVENT_COLUMNS) + ", day date, "
            "PRIMARY KEY ((device_id, day), event_time, seq)) "
            "WITH CLUSTERING ORDER BY (event_time DESC, seq DESC) "
            f"AND compaction = {_cql_map(compaction)} AND default_time_to_live = {s.ttl_days * 86400}")


def add_columns_cql(s: CassandraSettings, existing: Iterable[str]) -> list[str]:
    """``ALTER TABLE`` adding the event fields a newer contract brought (cheap: metadata only)."""
    have = set(existing)
    return [f"ALTER TABLE {s.keyspace}.events ADD {name} {cql}" for name, cql in EVENT_COLUMNS
            if name not in have]


def insert_cql(s: CassandraSettings, row_ttl: bool = False) -> str:
    """Upsert one event: the columns of :data:`EVENT_COLUMNS`, then ``day``; with ``row_ttl``,
    then the row's TTL in seconds (overriding the table's default)."""
    return (f"INSERT INTO {s.keyspace}.events ({', '.join([*_NAMES, 'day'])}) "
            f"VALUES ({', '.join('?' * (len(_NAMES) + 1))})" + (" USING TTL ?" if row_ttl else ""))


def row_ttls(event_ms: np.ndarray, retention_days: int, now_ms: int) -> np.ndarray:
    """Seconds each row has left, counted from its event time: ``event + retention - now``,
    rounded up, at most Cassandra's cap; 0 or less means already expired."""
    left_ms = event_ms.astype(np.int64) + retention_days * 86_400_000 - now_ms
    return np.minimum(-(-left_ms // 1000), MAX_TTL_DAYS * 86400)


def identity_cql(s: CassandraSettings) -> str:
    """Which Kafka record one stored event came from (a point read by its full primary key)."""
    return (f"SELECT kafka_partition, kafka_offset FROM {s.keyspace}.events "
            "WHERE device_id = ? AND day = ? AND event_time = ? AND seq = ?")


def partition_count_cql(s: CassandraSettings) -> str:
    """How many events one (device, day) partition holds."""
    return f"SELECT count(*) AS n FROM {s.keyspace}.events WHERE device_id = ? AND day = ?"


def delete_partition_cql(s: CassandraSettings) -> str:
    """Erasure: delete one (device, day) partition whole (one partition tombstone)."""
    return f"DELETE FROM {s.keyspace}.events WHERE device_id = ? AND day = ?"


def recent_cql(s: CassandraSettings) -> str:
    """One device's events of one day bucket, newest first."""
    return (f"SELECT {', '.join(_NAMES)} FROM {s.keyspace}.events WHERE device_id = ? AND day = ? "
            "ORDER BY event_time DESC, seq DESC LIMIT ?")


def _driver():
    """The driver package and its error types, imported on first use (the CQL builders need neither)."""
    try:
        import cassandra  # lazy: only a Cassandra store loads its driver
        import cassandra.auth  # lazy: as the line above
        import cassandra.cluster  # lazy: as the line above
        import cassandra.concurrent  # lazy: as the line above
        import cassandra.connection  # lazy: as the line above
        import cassandra.policies  # lazy: as the line above
        import cassandra.query  # lazy: as the line above
    except ImportError as e:
        raise StorageError("the Cassandra backend needs its driver: pip install cassandra-driver") from e
    return cassandra, (cassandra.DriverException, cassandra.cluster.NoHostAvailable,
                       cassandra.connection.ConnectionException)


class CassandraStore(TimeSeriesStore):
    """Raw events in Cassandra; connects in :meth:`setup`.

    :meth:`write_events` is an idempotent upsert by primary key: a redelivered
    event overwrites itself, so redelivery is harmless, and the statement is
    marked idempotent so the driver may retry it. Null fields are left unset
    instead of written as null, so they leave no tombstones.
    """

    def __init__(self, settings: CassandraSettings, retention_days: int | None = None):
        if retention_days is not None and not 1 <= retention_days <= MAX_TTL_DAYS:
            raise StorageError(f"Cassandra retention must be 1 to {MAX_TTL_DAYS} days, got {retention_days}")
        self.settings = settings
        self.retention_days = retention_days
        self.expired_on_write = 0  # rows not written: older than the retention already
        self._cluster = self._session = self._insert = self._recent = self._identity = None
        self._count = self._delete = None

    def _auth(self, c):
        s = self.settings
        user, password = (os.environ.get(n) if n else None for n in (s.username_env, s.password_env))
        if (user is None) != (password is None):
            raise StorageError(f"Cassandra credentials: set both {s.username_env} and {s.password_env}")
        return None if user is None else c.auth.PlainTextAuthProvider(username=user, password=password)

    def setup(self) -> None:
        """Connect (once), create the keyspace and table, add new columns, prepare statements."""
        (c, errors), s = _driver(), self.settings
        level = c.ConsistencyLevel.name_to_value[s.consistency]
        try:
            if self._session is None:
                policy = c.policies.TokenAwarePolicy(c.policies.DCAwareRoundRobinPolicy(local_dc=s.local_dc or ""))
                profile = c.cluster.ExecutionProfile(load_balancing_policy=policy, consistency_level=level,
                                                     row_factory=c.query.dict_factory)
                cluster = c.cluster.Cluster(contact_points=list(s.hosts), port=s.port, auth_provider=self._auth(c),
                                            execution_profiles={c.cluster.EXEC_PROFILE_DEFAULT: profile})
                try:
                    self._session = cluster.connect()
                except BaseException:
                    cluster.shutdown()
                    raise
                self._cluster = cluster
            session = self._session
            for statement in (keyspace_cql(s), table_cql(s)):
                session.execute(statement)
            existing = session.execute("SELECT column_name FROM system_schema.columns "
                                       "WHERE keyspace_name = %s AND table_name = 'events'", (s.keyspace,))
            for statement in add_columns_cql(s, (row["column_name"] for row in existing)):
                session.execute(statement)
            self._insert, self._recent, self._identity, self._count, self._delete = (
                session.prepare(q) for q in (insert_cql(s, row_ttl=self.retention_days is not None),
                                             recent_cql(s), identity_cql(s), partition_count_cql(s),
                                             delete_partition_cql(s)))
            for prepared in (self._insert, self._recent, self._identity, self._count, self._delete):
                prepared.is_idempotent, prepared.consistency_level = True, level
        except errors as e:
            raise StorageError(f"Cassandra setup on {', '.join(s.hosts)} failed: {e}") from e

    def _ready(self):
        if self._insert is None:
            raise StorageError("CassandraStore: call setup() first")
        return _driver()

    def count_events(self) -> tuple[int, int]:
        """A full scan of the table: its rows are distinct events (the key holds ``(device_id, seq)``)."""
        _, errors = self._ready()
        try:
            rows = sum(1 for _ in self._session.execute(
                f"SELECT device_id FROM {self.settings.keyspace}.events", timeout=600))
        except errors as e:
            raise StorageError(f"Cassandra count of {self.settings.keyspace}.events failed: {e}") from e
        return rows, rows

    def drop_keyspace(self) -> None:
        """Drop the keyspace and everything in it (a scratch namespace's end)."""
        _, errors = self._ready()
        try:
            self._session.execute(f"DROP KEYSPACE IF EXISTS {self.settings.keyspace}", timeout=120)
        except errors as e:
            raise StorageError(f"Cassandra: dropping keyspace {self.settings.keyspace} failed: {e}") from e

    def write_events(self, events: pa.Table) -> None:
        """Upsert the events (ARROW_SCHEMA plus the Kafka columns); durable at the consistency level."""
        c, errors = self._ready()
        missing = [name for name in _NAMES if name not in events.column_names]
        if missing:
            raise StorageError(f"events batch lacks columns: {', '.join(missing)}")
        ttls = None
        if self.retention_days is not None and events.num_rows:
            events, ttls = self._unexpired(events)
        if events.num_rows == 0:
            return
        times = events["event_time"].cast(pa.timestamp("ms", tz="UTC"))
        columns = []
        for name in _NAMES:
            column = times.cast(pa.int64()) if name == "event_time" else events[name]  # epoch ms
            values = column.to_pylist()
            columns.append([c.query.UNSET_VALUE if v is None else v for v in values]
                           if column.null_count else values)
        columns.append(times.cast(pa.date32()).to_pylist())  # day: the UTC date
        if ttls is not None:
            columns.append(ttls.tolist())
        try:
            c.concurrent.execute_concurrent_with_args(self._session, self._insert, zip(*columns),
                                                      concurrency=self.settings.concurrency,
                                                      raise_on_first_error=True)
        except c.InvalidRequest as e:  # the server refused a value: the same rows fail again
            raise RefusedRows(f"Cassandra refused the batch: {e}") from e
        except (TypeError, ValueError, OverflowError) as e:  # the driver could not encode a value
            raise RefusedRows(f"the Cassandra driver refused a value: {e}") from e
        except errors as e:
            raise StorageError(f"Cassandra write of {events.num_rows} events failed: {e}") from e

    def _unexpired(self, events: pa.Table) -> tuple[pa.Table, np.ndarray]:
        """The rows still inside the retention, and their TTLs; counts the others as expired."""
        event_ms = events["event_time"].cast(pa.timestamp("ms", tz="UTC")).cast(pa.int64()).to_numpy()
        ttls = row_ttls(event_ms, self.retention_days, int(time.time() * 1000))
        keep = ttls > 0
        self.expired_on_write += int((~keep).sum())
        return events.filter(pa.array(keep)), ttls[keep]

    def stored_elsewhere(self, rows: pa.Table) -> list[tuple[str, int]]:
        """Point reads by primary key: rows stored from another (partition, offset) were sent again.
        Meant for the few rows first_sightings suspects (late events and re-sends)."""
        c, errors = self._ready()
        if rows.num_rows == 0:
            return []
        times = rows["event_time"].cast(pa.timestamp("ms", tz="UTC"))
        ids, seqs = rows["device_id"].to_pylist(), rows["seq"].to_pylist()
        sources = list(zip(rows["kafka_partition"].to_pylist(), rows["kafka_offset"].to_pylist()))
        params = zip(ids, times.cast(pa.date32()).to_pylist(), times.cast(pa.int64()).to_pylist(), seqs)
        try:
            results = c.concurrent.execute_concurrent_with_args(
                self._session, self._identity, params, concurrency=self.settings.concurrency,
                raise_on_first_error=True)
        except errors as e:
            raise StorageError(f"Cassandra read of {rows.num_rows} event keys failed: {e}") from e
        out = []
        for (_, result), device, seq, source in zip(results, ids, seqs, sources):
            row = result.one()
            if row is not None and (row["kafka_partition"], row["kafka_offset"]) != source:
                out.append((device, seq))
        return out

    def erase_events(self, days: Mapping[str, Iterable[date]]) -> dict[str, int]:
        """Delete each device's partitions of these UTC days, whole: counted first (to say how many
        events went), then one partition tombstone each. Idempotent: an empty or deleted partition
        counts 0 and takes one more tombstone."""
        c, errors = self._ready()
        keys = sorted({(device, day) for device, some in days.items() for day in some})
        if not keys:
            return {"events": 0, "partitions": 0}
        try:
            counted = c.concurrent.execute_concurrent_with_args(
                self._session, self._count, keys, concurrency=self.settings.concurrency, raise_on_first_error=True)
            events = sum(result.one()["n"] for _, result in counted)
            c.concurrent.execute_concurrent_with_args(self._session, self._delete, keys,
                                                      concurrency=self.settings.concurrency,
                                                      raise_on_first_error=True)
        except errors as e:
            raise StorageError(f"Cassandra erasure of {len(keys)} device-day partitions failed: {e}") from e
        return {"events": int(events), "partitions": len(keys)}

    def recent(self, device_id: str, days: int = 1, limit: int = 100) -> list[dict]:
        """A device's newest events over the last ``days`` UTC day buckets (today first), newest first."""
        _, errors = self._ready()
        if days < 1 or limit < 1:
            raise StorageError("recent: days and limit must be at least 1")
        today, rows = datetime.now(timezone.utc).date(), []
        try:
            for back in range(days):
                if len(rows) >= limit:
                    break
                day = today - timedelta(days=back)
                rows.extend(self._session.execute(self._recent, (device_id, day, limit - len(rows))))
        except errors as e:
            raise StorageError(f"Cassandra read of device {device_id} failed: {e}") from e
        for row in rows:  # the driver returns naive UTC datetimes
            row["event_time"] = row["event_time"].replace(tzinfo=timezone.utc)
        return rows

    def close(self) -> None:
        if self._cluster is not None:
            self._cluster.shutdown()
        self._cluster = self._session = self._insert = self._recent = self._identity = None
        self._count = self._delete = None


@contextmanager
def scratch(settings: CassandraSettings, name: str, directory: str) -> Iterator[CassandraSettings]:
    """A new keyspace ``name`` on the same cluster, dropped with its table at the end."""
    scratched = replace(settings, keyspace=name)
    try:
        yield scratched
    finally:
        store = CassandraStore(scratched)
        try:
            store.setup()
            store.drop_keyspace()
        finally:
            store.close()


BACKEND = Backend(settings=CassandraSettings,
                  store=lambda s, raw_events_days: CassandraStore(s, retention_days=raw_events_days), scratch=scratch)
