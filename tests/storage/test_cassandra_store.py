"""The Cassandra time-series backend.

The CQL is checked as text, the driver's calls against doubles built from the
real driver's own statement classes (so values really go through its serializers;
failures are injected there), and the integration class runs against a real
Apache Cassandra 5.0 node that the session starts (``testbed/cassandra.py``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from podpulse.contract import ARROW_SCHEMA, decode_batch
from podpulse.errors import PodPulseError
from podpulse.simulator import FleetSpec, simulate
from storage.backends.cassandra import (
    EVENT_COLUMNS,
    CassandraStore,
    add_columns_cql,
    insert_cql,
    keyspace_cql,
    recent_cql,
    row_ttls,
    table_cql,
)
from storage.backends.duckdb import DuckDBStore
from storage.base import StorageError
from storage.config import CONSISTENCY_LEVELS, CassandraSettings, StorageConfig
from storage.router import Storage, open_storage

# What each Arrow type of the contract must become in CQL (written out here, not imported).
EXPECTED_CQL = {pa.int8(): {"tinyint", "smallint"}, pa.int16(): {"smallint"}, pa.int32(): {"int"},
                pa.int64(): {"bigint"}, pa.float64(): {"double"}, pa.bool_(): {"boolean"},
                pa.string(): {"text"}, pa.timestamp("ms", tz="UTC"): {"timestamp"}}
DEFAULT = CassandraSettings(hosts=("cass-1",))


def make_batch(spec: FleetSpec) -> pa.Table:
    table = decode_batch([v for c in simulate(spec) for v in c.values]).table
    n = table.num_rows
    return table.append_column("kafka_partition", pa.array(np.arange(n) % 3, pa.int32())).append_column(
        "kafka_offset", pa.array(np.arange(n) // 3, pa.int64()))


@pytest.fixture(scope="module")
def batch():
    return make_batch(FleetSpec(devices=120, hours=24, seed=11, v2_share=0.5))


def table_columns(cql: str) -> dict[str, str]:
    body = re.search(r"\((.*), PRIMARY KEY", cql).group(1)
    return dict(part.split() for part in body.split(", "))


# --- CQL ------------------------------------------------------------------------------------------

def test_events_are_partitioned_by_device_and_day_newest_first():
    cql = table_cql(DEFAULT)
    assert cql.startswith("CREATE TABLE IF NOT EXISTS podpulse.events (")
    assert "PRIMARY KEY ((device_id, day), event_time, seq))" in cql
    assert "WITH CLUSTERING ORDER BY (event_time DESC, seq DESC)" in cql


def test_compaction_is_time_window_by_days_and_ttl_is_in_seconds():
    cql = table_cql(CassandraSettings(hosts=("h",), ttl_days=30, compaction_window_days=2))
    compaction = re.search(r"compaction = \{(.*?)\}", cql).group(1)
    assert compaction == ("'class': 'TimeWindowCompactionStrategy', 'compaction_window_unit': 'DAYS', "
                          "'compaction_window_size': 2")
    assert cql.endswith("default_time_to_live = 2592000")
    assert table_cql(DEFAULT).endswith("default_time_to_live = 0")  # 0: no TTL


def test_every_contract_column_is_stored_with_its_cql_type():
    columns = table_columns(table_cql(DEFAULT))
    for f in ARROW_SCHEMA:
        assert columns[f.name] in EXPECTED_CQL[f.type], f.name
    assert (columns["kafka_partition"], columns["kafka_offset"], columns["day"]) == ("int", "bigint", "date")
    assert set(columns) == {*ARROW_SCHEMA.names, "kafka_partition", "kafka_offset", "day"}


def test_no_name_needs_quoting():
    metadata = pytest.importorskip("cassandra.metadata")
    for name in [*table_columns(table_cql(DEFAULT)), "podpulse", "events"]:
        assert metadata.maybe_escape_name(name) == name
    assert '"' not in table_cql(DEFAULT) + insert_cql(DEFAULT) + recent_cql(DEFAULT)


def test_keyspace_replication_is_rendered_from_settings_and_names_are_qualified():
    assert keyspace_cql(DEFAULT) == ("CREATE KEYSPACE IF NOT EXISTS podpulse WITH replication = "
                                     "{'class': 'SimpleStrategy', 'replication_factor': 1}")
    s = CassandraSettings(hosts=("h",), keyspace="fleet_au",
                          replication={"class": "NetworkTopologyStrategy", "syd": 3, "mel": "2"})
    assert keyspace_cql(s) == ("CREATE KEYSPACE IF NOT EXISTS fleet_au WITH replication = "
                               "{'class': 'NetworkTopologyStrategy', 'syd': 3, 'mel': '2'}")
    for cql in (table_cql(s), insert_cql(s), recent_cql(s)):
        assert " fleet_au.events " in cql and "podpulse" not in cql


def test_insert_binds_one_marker_per_column():
    cql = insert_cql(DEFAULT)
    names, markers = re.fullmatch(r"INSERT INTO podpulse\.events \((.*)\) VALUES \((.*)\)", cql).groups()
    names, markers = names.split(", "), markers.split(", ")
    assert names == [n for n, _ in EVENT_COLUMNS] + ["day"]
    assert set(markers) == {"?"} and len(markers) == len(names) == len(ARROW_SCHEMA) + 3


def test_recent_reads_one_device_day_newest_first():
    cql = recent_cql(DEFAULT)
    assert re.search(r"FROM podpulse\.events WHERE device_id = \? AND day = \? "
                     r"ORDER BY event_time DESC, seq DESC LIMIT \?$", cql)
    selected = cql.removeprefix("SELECT ").split(" FROM ")[0].split(", ")
    assert selected == [n for n, _ in EVENT_COLUMNS]


def test_new_contract_fields_are_added_to_an_existing_table():
    old = [n for n, _ in EVENT_COLUMNS if n != "spatial_audio"] + ["day"]
    assert add_columns_cql(DEFAULT, old) == ["ALTER TABLE podpulse.events ADD spatial_audio boolean"]
    assert add_columns_cql(DEFAULT, [n for n, _ in EVENT_COLUMNS]) == []


# --- settings -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"consistency": "QUORUMISH"}, "consistency 'QUORUMISH' is not one of ANY, ONE"),
    ({"ttl_days": -1}, "ttl_days must be between 0"),
    ({"ttl_days": 7301}, "ttl_days must be between 0"),
    ({"hosts": ()}, "hosts must name at least one host"),
    ({"hosts": ("cass-1", " ")}, "hosts must name at least one host"),
    ({"port": 0}, "port must be between 1 and 65535"),
    ({"keyspace": "Pod-Pulse"}, "keyspace must be"),
    ({"replication": {"replication_factor": 3}}, "replication needs a 'class'"),
    ({"compaction_window_days": 0}, "compaction_window_days must be at least 1"),
    ({"concurrency": 0}, "concurrency must be at least 1"),
    ({"username_env": "CASS_USER"}, "username_env and password_env must be given together"),
])
def test_invalid_settings_are_refused_with_one_line(kwargs, message):
    with pytest.raises(StorageError, match=re.escape(message)) as e:
        CassandraSettings(**({"hosts": ("cass-1",)} | kwargs))
    assert isinstance(e.value, PodPulseError) and "\n" not in str(e.value)


def test_settings_defaults_and_normalisation():
    s = CassandraSettings(hosts="cass-1, cass-2", consistency="local_one")
    assert (s.hosts, s.consistency, s.port, s.keyspace, s.ttl_days, s.concurrency) == (
        ("cass-1", "cass-2"), "LOCAL_ONE", 9042, "podpulse", 0, 64)
    assert s.replication == {"class": "SimpleStrategy", "replication_factor": 1}


def test_consistency_names_are_the_drivers():
    cassandra = pytest.importorskip("cassandra")
    assert set(CONSISTENCY_LEVELS) == set(cassandra.ConsistencyLevel.name_to_value)


def test_cql_builders_import_without_the_driver_and_connecting_names_the_package():
    code = ("import sys; sys.modules['cassandra'] = None\n"
            "from storage.backends.cassandra import CassandraSettings, CassandraStore, table_cql\n"
            "s = CassandraSettings(hosts=('h',)); assert 'podpulse.events' in table_cql(s)\n"
            "from storage.base import StorageError\n"
            "try:\n    CassandraStore(s).setup()\nexcept StorageError as e:\n    print(e)\n")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "pip install cassandra-driver" in out.stdout


# --- against doubles of the driver ----------------------------------------------------------------

class FakeSession:
    """Records statements; prepares real driver statements; keeps rows by primary key like Cassandra."""

    def __init__(self, existing_columns=()):
        self.executed, self.existing_columns, self.rows = [], list(existing_columns), {}
        self.recent_calls = []

    def prepare(self, cql):
        from cassandra.cqltypes import _casstypes
        from cassandra.protocol import ColumnMetadata
        from cassandra.query import PreparedStatement

        if not cql.startswith("INSERT"):
            return SimpleNamespace(query_string=cql)
        types = {cls.typename: cls for cls in _casstypes.values() if getattr(cls, "typename", None)}
        cql_type = table_columns(table_cql(DEFAULT))
        names = re.search(r"\((.*?)\)", cql).group(1).split(", ")
        meta = [ColumnMetadata("podpulse", "events", n, types[cql_type[n]]) for n in names]
        return PreparedStatement(meta, b"q", [names.index("device_id"), names.index("day")], cql,
                                 "podpulse", 5, None, None)

    def execute(self, statement, params=None):
        if isinstance(statement, SimpleNamespace):  # the recent query
            device_id, day, limit = params
            self.recent_calls.append((day, limit))
            found = sorted((v for k, v in self.rows.items() if k[:2] == (device_id, day)),
                           key=lambda r: (r["event_time"], r["seq"]), reverse=True)
            return [dict(r) for r in found[:limit]]
        self.executed.append((statement, params))
        if statement.startswith("CREATE TABLE") and not self.existing_columns:
            self.existing_columns = list(table_columns(statement))
        if "system_schema.columns" in statement:
            return [{"column_name": c} for c in self.existing_columns]
        return []

    def store(self, bound):
        """Decode a bound insert with the driver's own types, upsert it by primary key."""
        from cassandra.query import UNSET_VALUE

        meta = bound.prepared_statement.column_metadata
        row = {m.name: (None if v is UNSET_VALUE else m.type.deserialize(v, 5))
               for m, v in zip(meta, bound.values)}
        row["day"] = row["day"].date()
        self.rows[(row["device_id"], row["day"], row["event_time"], row["seq"])] = row
        return row


@pytest.fixture
def driver(monkeypatch):
    """Replace Cluster and execute_concurrent_with_args by doubles; yield what they saw."""
    cassandra_cluster = pytest.importorskip("cassandra.cluster")
    import cassandra.concurrent

    seen = SimpleNamespace(clusters=[], writes=[], session=FakeSession(), fail=None)

    class FakeCluster:
        def __init__(self, **kwargs):
            self.kwargs, self.shut = kwargs, False
            seen.clusters.append(self)

        def connect(self):
            if seen.fail:
                raise seen.fail
            return seen.session

        def shutdown(self):
            self.shut = True

    def execute_concurrent_with_args(session, statement, parameters, **kwargs):
        assert session is seen.session
        if seen.fail:
            raise seen.fail
        bound = [statement.bind(list(p)) for p in parameters]
        seen.writes.append(SimpleNamespace(kwargs=kwargs, bound=bound, statement=statement))
        return [seen.session.store(b) for b in bound]

    monkeypatch.setattr(cassandra_cluster, "Cluster", FakeCluster)
    monkeypatch.setattr(cassandra.concurrent, "execute_concurrent_with_args", execute_concurrent_with_args)
    return seen


def test_setup_connects_once_with_token_aware_dc_policy_and_is_repeatable(driver):
    from cassandra import ConsistencyLevel
    from cassandra.cluster import EXEC_PROFILE_DEFAULT
    from cassandra.policies import DCAwareRoundRobinPolicy, TokenAwarePolicy
    from cassandra.query import dict_factory

    s = CassandraSettings(hosts=("cass-1", "cass-2"), port=9142, local_dc="syd", consistency="EACH_QUORUM")
    store = CassandraStore(s)
    store.setup()
    store.setup()
    assert len(driver.clusters) == 1
    kwargs = driver.clusters[0].kwargs
    assert (kwargs["contact_points"], kwargs["port"], kwargs["auth_provider"]) == (["cass-1", "cass-2"], 9142, None)
    profile = kwargs["execution_profiles"][EXEC_PROFILE_DEFAULT]
    assert isinstance(profile.load_balancing_policy, TokenAwarePolicy)
    child = profile.load_balancing_policy._child_policy
    assert isinstance(child, DCAwareRoundRobinPolicy) and child.local_dc == "syd"
    assert profile.row_factory is dict_factory
    statements = [q for q, _ in driver.session.executed]
    ddl = [keyspace_cql(s), table_cql(s)]
    assert [q for q in statements if q.startswith("CREATE")] == ddl * 2
    assert not [q for q in statements if q.startswith("ALTER")]
    assert store._insert.is_idempotent and store._insert.consistency_level == ConsistencyLevel.EACH_QUORUM
    assert store._recent.consistency_level == ConsistencyLevel.EACH_QUORUM
    store.close()
    assert driver.clusters[0].shut


def test_setup_adds_only_missing_columns(driver):
    driver.session.existing_columns = [n for n, _ in EVENT_COLUMNS if n != "spatial_audio"] + ["day"]
    CassandraStore(DEFAULT).setup()
    alters = [q for q, _ in driver.session.executed if q.startswith("ALTER")]
    assert alters == ["ALTER TABLE podpulse.events ADD spatial_audio boolean"]
    query = next(p for q, p in driver.session.executed if "system_schema.columns" in q)
    assert query == ("podpulse",)


def test_credentials_come_only_from_the_named_environment_variables(driver, monkeypatch):
    from cassandra.auth import PlainTextAuthProvider

    s = CassandraSettings(hosts=("h",), username_env="PP_CASS_USER", password_env="PP_CASS_PASSWORD")
    monkeypatch.delenv("PP_CASS_USER", raising=False)
    monkeypatch.delenv("PP_CASS_PASSWORD", raising=False)
    CassandraStore(s).setup()
    assert driver.clusters[-1].kwargs["auth_provider"] is None
    monkeypatch.setenv("PP_CASS_USER", "podpulse")
    with pytest.raises(StorageError, match="set both PP_CASS_USER and PP_CASS_PASSWORD"):
        CassandraStore(s).setup()
    monkeypatch.setenv("PP_CASS_PASSWORD", "s3cret")
    CassandraStore(s).setup()
    auth = driver.clusters[-1].kwargs["auth_provider"]
    assert isinstance(auth, PlainTextAuthProvider) and (auth.username, auth.password) == ("podpulse", "s3cret")


def test_driver_errors_become_storage_errors_with_their_cause(driver, batch):
    from cassandra import OperationTimedOut
    from cassandra.cluster import NoHostAvailable

    driver.fail = NoHostAvailable("Unable to connect to any servers", {"cass-1:9042": OSError("refused")})
    store = CassandraStore(DEFAULT)
    with pytest.raises(StorageError, match="setup on cass-1 failed") as e:
        store.setup()
    assert e.value.__cause__ is driver.fail and driver.clusters[-1].shut
    driver.fail = None
    store.setup()
    driver.fail = OperationTimedOut("Operation timed out")
    with pytest.raises(StorageError, match=f"write of {batch.num_rows} events failed") as e:
        store.write_events(batch)
    assert e.value.__cause__ is driver.fail


def test_writes_need_setup_and_every_column(driver, batch):
    store = CassandraStore(DEFAULT)
    with pytest.raises(StorageError, match="setup"):
        store.write_events(batch)
    store.setup()
    with pytest.raises(StorageError, match="lacks columns: kafka_offset"):
        store.write_events(batch.drop_columns(["kafka_offset"]))
    store.write_events(batch.slice(0, 0))
    assert driver.writes == []


def test_rows_go_through_the_driver_serializers_unchanged(driver, batch):
    s = CassandraSettings(hosts=("h",), concurrency=17)
    store = CassandraStore(s)
    store.setup()
    store.write_events(batch)
    (write,) = driver.writes
    assert write.kwargs == {"concurrency": 17, "raise_on_first_error": True}
    assert write.statement is store._insert and len(write.bound) == batch.num_rows
    assert all(b.is_idempotent for b in write.bound)
    # what the server would store equals the batch, column by column; day is the UTC date
    stored = [driver.session.rows[k] for k in sorted(driver.session.rows, key=lambda k: (k[0], k[3]))]
    expected = batch.sort_by([("device_id", "ascending"), ("seq", "ascending")]).to_pylist()
    assert len(stored) == len(expected)
    for got, want in zip(stored, expected):
        want["event_time"] = want["event_time"].astimezone(timezone.utc).replace(tzinfo=None)
        assert got["day"] == want["event_time"].date()
        assert {k: got[k] for k in want} == want
    # nulls are left unset (no tombstones), never bound as null
    from cassandra.query import UNSET_VALUE
    column = [m.name for m in store._insert.column_metadata].index("temp_left_c")
    nulls = batch["temp_left_c"].null_count
    assert nulls and sum(b.values[column] is UNSET_VALUE for b in write.bound) == nulls
    assert not any(v is None for b in write.bound for v in b.values)


def test_redelivered_events_land_on_the_same_primary_keys(driver, batch):
    store = CassandraStore(DEFAULT)
    store.setup()
    store.write_events(batch.slice(0, 3000))
    store.write_events(batch.slice(1000, 3000))  # 2000 redelivered, 1000 new
    store.write_events(batch.slice(0, 3000))
    assert len(driver.session.rows) == 4000
    assert len({(k[0], k[3]) for k in driver.session.rows}) == 4000


def test_recent_walks_day_buckets_newest_first_until_the_limit(driver):
    now = datetime.now(timezone.utc)
    spec = FleetSpec(devices=3, hours=60, seed=3, start=now - timedelta(hours=62))
    events = make_batch(spec)
    store = CassandraStore(DEFAULT)
    store.setup()
    store.write_events(events)
    device = events["device_id"][0].as_py()
    mine = events.filter(pc.equal(events["device_id"], device))
    today = now.date()
    got = store.recent(device, days=2, limit=1000)
    in_window = sorted((r for r in mine.to_pylist() if r["event_time"].date() >= today - timedelta(days=1)),
                       key=lambda r: (r["event_time"], r["seq"]), reverse=True)
    assert [(r["seq"], r["event_time"]) for r in got] == [(r["seq"], r["event_time"]) for r in in_window]
    assert got and all(r["event_time"].tzinfo is not None for r in got)
    driver.session.recent_calls.clear()
    assert len(store.recent(device, days=3, limit=5)) == 5
    assert driver.session.recent_calls[0] == (today, 5)
    assert [d for d, _ in driver.session.recent_calls] == [today - timedelta(days=i)
                                                          for i in range(len(driver.session.recent_calls))]
    with pytest.raises(StorageError, match="days and limit must be at least 1"):
        store.recent(device, days=0)


# --- retention: a TTL per row, from its event time ---------------------------------------------------

DAY_MS = 86_400_000


def test_a_rows_ttl_counts_from_its_event_time_not_its_write():
    now = 1_800_000_000_000
    event_ms = np.array([now, now - DAY_MS, now - 2 * DAY_MS + 1500, now - 2 * DAY_MS, now - 3 * DAY_MS])
    assert row_ttls(event_ms, 2, now).tolist() == [2 * 86400, 86400, 2, 0, -86400]  # 2: 1.5 s, rounded up
    assert row_ttls(np.array([now + DAY_MS]), 7300, now).tolist() == [7300 * 86400]  # Cassandra's cap


def test_the_insert_binds_the_rows_ttl_last_only_under_retention():
    assert insert_cql(DEFAULT, row_ttl=True) == insert_cql(DEFAULT) + " USING TTL ?"
    assert "USING TTL" not in insert_cql(DEFAULT)


def test_the_raw_events_retention_reaches_the_cassandra_store_only():
    config = StorageConfig(backends={"db": {"type": "duckdb", "path": ":memory:"},
                                     "raw": {"type": "cassandra", "hosts": ["h"]}},
                           routes={"raw_events": "raw", "devices": "db", "rollups": "db", "offsets": "db",
                                   "anomalies": "db"}, retention={"raw_events": 30, "rollups": 400})
    storage = open_storage(config)
    assert storage.timeseries.retention_days == 30
    assert open_storage(StorageConfig(**{**config.as_dict(), "retention": {}})).timeseries.retention_days is None
    with pytest.raises(StorageError, match="retention must be 1 to 7300 days"):
        CassandraStore(DEFAULT, retention_days=0)


# --- against a real Cassandra ---------------------------------------------------------------------

class TestAgainstCassandra:
    @pytest.fixture
    def store(self, cassandra):
        settings = CassandraSettings(hosts=cassandra.hosts, port=cassandra.port,
                                     keyspace=f"podpulse_test_{os.getpid()}")
        store = CassandraStore(settings)
        yield store
        if store._session is not None:
            store._session.execute(f"DROP KEYSPACE IF EXISTS {settings.keyspace}")
        store.close()

    def test_setup_twice_and_redelivered_events_are_stored_once(self, store):
        now = datetime.now(timezone.utc)
        events = make_batch(FleetSpec(devices=12, hours=2, seed=8, start=now - timedelta(hours=3)))
        store.setup()
        store.setup()  # idempotent
        again = CassandraStore(store.settings)
        again.setup()  # a second process finds everything in place
        again.close()
        store.write_events(events)
        store.write_events(events)  # redelivery
        store.write_events(events.slice(events.num_rows // 2))
        devices = set(events["device_id"].to_pylist())
        total = 0
        for device in devices:
            rows = store.recent(device, days=2, limit=10_000)
            seqs = [r["seq"] for r in rows]
            assert len(seqs) == len(set(seqs)), device
            times = [r["event_time"] for r in rows]
            assert times == sorted(times, reverse=True)
            total += len(rows)
        assert total == events.num_rows
        count = store._session.execute(f"SELECT count(*) AS n FROM {store.settings.keyspace}.events").one()
        assert count["n"] == events.num_rows

    def test_the_deployed_schema_is_read_back_from_system_schema(self, cassandra):
        settings = CassandraSettings(hosts=cassandra.hosts, port=cassandra.port, keyspace="podpulse_schema",
                                     ttl_days=30, compaction_window_days=2)
        store = CassandraStore(settings)
        store.setup()
        try:
            session = store._session
            table = session.execute("SELECT compaction, default_time_to_live FROM system_schema.tables "
                                    "WHERE keyspace_name = 'podpulse_schema' AND table_name = 'events'").one()
            assert table["default_time_to_live"] == 30 * 86400
            assert table["compaction"]["class"].endswith("TimeWindowCompactionStrategy")
            assert (table["compaction"]["compaction_window_unit"], table["compaction"]["compaction_window_size"]) \
                == ("DAYS", "2")
            columns = {r["column_name"]: r for r in session.execute(
                "SELECT column_name, kind, position, clustering_order, type FROM system_schema.columns "
                "WHERE keyspace_name = 'podpulse_schema' AND table_name = 'events'")}
            keys = sorted((r["kind"], r["position"], name, r["clustering_order"]) for name, r in columns.items()
                          if r["kind"] != "regular")
            assert keys == [("clustering", 0, "event_time", "desc"), ("clustering", 1, "seq", "desc"),
                            ("partition_key", 0, "device_id", "none"), ("partition_key", 1, "day", "none")]
            for name, cql in EVENT_COLUMNS:
                assert columns[name]["type"] == cql, name
        finally:
            store._session.execute("DROP KEYSPACE IF EXISTS podpulse_schema")
            store.close()

    def test_written_rows_carry_the_retention_ttl_and_expire(self, cassandra):
        settings = CassandraSettings(hosts=cassandra.hosts, port=cassandra.port, keyspace="podpulse_ttl",
                                     ttl_days=1)
        store = CassandraStore(settings)
        store.setup()
        try:
            now = datetime.now(timezone.utc)
            events = make_batch(FleetSpec(devices=3, hours=1, seed=9, start=now - timedelta(hours=1)))
            store.write_events(events)
            ttls = [r["t"] for r in store._session.execute("SELECT TTL(battery_left) AS t FROM podpulse_ttl.events")]
            assert len(ttls) == events.num_rows
            assert all(86400 - 300 < t <= 86400 for t in ttls)
            # The same rows under a table TTL of one second are gone a moment later.
            store._session.execute("ALTER TABLE podpulse_ttl.events WITH default_time_to_live = 1")
            store._session.execute("TRUNCATE podpulse_ttl.events")
            store.write_events(events)
            assert store._session.execute("SELECT count(*) AS n FROM podpulse_ttl.events").one()["n"] > 0
            time.sleep(2.5)
            assert store._session.execute("SELECT count(*) AS n FROM podpulse_ttl.events").one()["n"] == 0
        finally:
            store._session.execute("DROP KEYSPACE IF EXISTS podpulse_ttl")
            store.close()

    def test_retention_gives_each_row_its_ttl_from_its_event_time(self, cassandra):
        """Rows older than the retention are not written (counted as expired); the others expire
        at event time + retention, whatever the table's default TTL."""
        settings = CassandraSettings(hosts=cassandra.hosts, port=cassandra.port, keyspace="podpulse_retention",
                                     ttl_days=400)
        store = CassandraStore(settings, retention_days=2)
        store.setup()
        try:
            now = datetime.now(timezone.utc)
            events = make_batch(FleetSpec(devices=3, hours=72, seed=9, start=now - timedelta(hours=72)))
            limit = 2 * 86400

            def ages(table) -> np.ndarray:
                event_ms = table["event_time"].cast(pa.timestamp("ms", tz="UTC")).cast(pa.int64()).to_numpy()
                return now.timestamp() - event_ms / 1000
            # none within 5 minutes of the limit: such a row could expire between the write and the read
            events = events.filter(pa.array(np.abs(ages(events) - limit) > 300))
            store.write_events(events)
            assert store.expired_on_write == (ages(events) > limit).sum() > 0
            rows = list(store._session.execute("SELECT event_time, TTL(kafka_offset) AS t "
                                               "FROM podpulse_retention.events"))
            assert len(rows) + store.expired_on_write == events.num_rows
            for row in rows:
                left = row["event_time"].replace(tzinfo=timezone.utc) + timedelta(days=2) - now
                assert abs(row["t"] - left.total_seconds()) < 60, row
            # Rows a few seconds short of the retention are gone a few seconds later.
            store._session.execute("TRUNCATE podpulse_retention.events")
            store.expired_on_write = 0
            soon = datetime.now(timezone.utc) - timedelta(days=2) + timedelta(seconds=3)
            nearly = events.slice(0, 20)
            nearly = nearly.set_column(nearly.schema.get_field_index("event_time"), "event_time",
                                       pa.array([soon] * 20, nearly.schema.field("event_time").type))
            store.write_events(nearly)
            count = "SELECT count(*) AS n FROM podpulse_retention.events"
            assert store._session.execute(count).one()["n"] == 20 and store.expired_on_write == 0
            time.sleep(4.5)
            assert store._session.execute(count).one()["n"] == 0
        finally:
            store._session.execute("DROP KEYSPACE IF EXISTS podpulse_retention")
            store.close()

    def test_a_commit_says_how_many_raw_events_were_past_their_retention(self, cassandra, tmp_path):
        """Through the router: the rollups count every event, Cassandra keeps only the unexpired ones,
        and the commit's result says how many it left out."""
        settings = CassandraSettings(hosts=cassandra.hosts, port=cassandra.port, keyspace="podpulse_expired")
        storage = Storage(CassandraStore(settings, retention_days=1), DuckDBStore(tmp_path / "core.duckdb"))
        storage.setup()
        try:
            now = datetime.now(timezone.utc)
            events = make_batch(FleetSpec(devices=3, hours=48, seed=4, start=now - timedelta(hours=48)))
            events = events.sort_by([("kafka_partition", "ascending"), ("kafka_offset", "ascending")])
            partitions = pc.unique(events["kafka_partition"]).to_pylist()
            ends = {p: pc.max(events.filter(pc.equal(events["kafka_partition"], p))["kafka_offset"]).as_py() + 1
                    for p in partitions}
            result = storage.commit("t", events, ends)
            stored = storage.timeseries._session.execute("SELECT count(*) AS n FROM podpulse_expired.events").one()
            assert result.applied == events.num_rows and 0 < result.expired < events.num_rows
            assert stored["n"] + result.expired == events.num_rows
            hourly = storage.relational.con.execute("SELECT sum(events) FROM device_hourly").fetchone()[0]
            assert hourly == events.num_rows  # rollups keep their own retention
        finally:
            storage.timeseries._session.execute("DROP KEYSPACE IF EXISTS podpulse_expired")
            storage.close()
