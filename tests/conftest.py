"""Shared fixtures: the brokers (Tansu, Apache Kafka), a private PostgreSQL, Cassandra, Ray.

The servers themselves are run by ``testbed``, which the benchmarks share.

Markers (``make test-fast`` runs neither): ``integration``, a test that needs a real server (a
broker, a database, Ray, the control plane, Prometheus, a browser), set here from the fixtures
it uses (:data:`SERVERS`) or by the test itself when it starts one; ``slow``, a test of a minute
or more without a server of its own (a model trained, a large fleet built).
"""

from __future__ import annotations

import itertools
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import pytest

from podpulse.broker import EmbeddedBroker
from podpulse.pseudonyms import KEY_ENV, Pseudonyms

# One pseudonym key for the session, outside the repository: the pipeline hashes device ids with it,
# and tests map the ids they sent through it (``storage.pseudonyms()``) to compare with the stores.
os.environ.setdefault(KEY_ENV, str(Path(tempfile.mkdtemp(prefix="podpulse-key-")) / "pseudonym.key"))
Pseudonyms.load(os.environ[KEY_ENV], create=True)

_topic_ids = itertools.count()
# The fixtures that start or need a real server: a test using one is an integration test.
SERVERS = frozenset({"tansu", "kafka", "cassandra", "broker", "new_topic", "produce_fleet", "ray_local", "postgres",
                     "pg_url", "pg_store", "ray_head", "kube", "kube_api", "podpulse_crds", "kuberay_crds",
                     "kuberay", "served", "browser", "prometheus", "helm", "operator", "identity",
                     "garbage_collector"})


def pytest_collection_modifyitems(items) -> None:
    """``integration`` on every test that uses a server fixture (:data:`SERVERS`), and on every
    parametrisation of ``store_config`` that is PostgreSQL; ``e2e`` on every test of ``tests/e2e``."""
    for item in items:
        if "e2e" in Path(str(item.path)).relative_to(Path(__file__).parent).parts[:1]:
            item.add_marker(pytest.mark.e2e)
        params = getattr(getattr(item, "callspec", None), "params", {})
        if SERVERS & set(item.fixturenames) or params.get("store_config") == "postgresql":
            item.add_marker(pytest.mark.integration)

# Monday 2 November 2026, 00:00 in Sydney (AEST, UTC+10): the start of the tests that assert dates.
FIXED_START = datetime(2026, 11, 1, 14, tzinfo=timezone.utc)


@pytest.fixture(scope="session")
def fixed_start() -> datetime:
    """Where the stores of tests that assert dates begin (``build_store(..., start=fixed_start)``)."""
    return FIXED_START


@pytest.fixture(scope="session")
def tansu():
    """One memory-only Tansu broker (the embedded default) for the whole test session."""
    with EmbeddedBroker() as b:
        yield b


@pytest.fixture(scope="session")
def kafka():
    """Apache Kafka 4.x, one KRaft node from Maven Central's jars, for the whole session.

    Its log directory is durable: a fault test may stop and start it."""
    from testbed.kafka import KafkaBroker

    b = KafkaBroker().start()
    yield b
    b.remove()


@pytest.fixture(scope="session")
def cassandra():
    """Apache Cassandra 5.0, one node from Maven Central's jars, for the whole session."""
    from testbed.cassandra import CassandraNode

    node = CassandraNode().start()
    yield node
    node.remove()


@pytest.fixture(scope="session")
def broker(tansu):
    """The broker a test produces to and ingests from: Tansu, unless its module overrides
    ``broker`` with one parametrised over ``["tansu", "kafka"]``."""
    return tansu


@pytest.fixture
def new_topic(broker, request):
    """Create a fresh topic: ``new_topic(partitions) -> name``."""

    def make(partitions: int = 4) -> str:
        name = f"t{os.getpid()}-{next(_topic_ids)}-{request.node.name[:40]}".replace("[", "-").replace("]", "")
        broker.create_topic(name, partitions)
        return name

    return make


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray instance for the session (two CPUs, no dashboard).

    Metrics are reported every second (Ray's default: 10 s), so that a test sees
    them on the node's metrics port soon after they are recorded.
    """
    import ray

    from podpulse.runtime import local_ray_env

    with local_ray_env():  # Serve as `podpulse serve` runs it
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning",
                 _system_config={"metrics_report_interval_ms": 1000})
    yield ray
    ray.shutdown()


@pytest.fixture
def produce_fleet(broker):
    """``produce_fleet(topic, spec) -> {"valid": [...], "malformed": [...], "malformed_samples": N}``: the
    values produced, those with a corrupted event or sample apart."""
    from testbed.topics import produce_fleet as produce

    return lambda topic, spec: produce(broker.bootstrap, topic, spec)


ROLLUP_RECOMPUTED = """
WITH e AS (
    SELECT *, lag(seq) OVER w AS p_seq, lag(battery_left) OVER w AS p_bl,
           lag(battery_right) OVER w AS p_br, lag(battery_case) OVER w AS p_bc,
           lag(in_ear_left) OVER w AS p_el, lag(in_ear_right) OVER w AS p_er, lag(charging) OVER w AS p_ch
    FROM events WINDOW w AS (PARTITION BY device_id ORDER BY seq)
), pairs AS (
    SELECT *, (seq = p_seq + 1 AND in_ear_left AND in_ear_right AND p_el AND p_er
               AND charging = 'none' AND p_ch = 'none') AS worn,
              (seq = p_seq + 1 AND charging NOT IN ('case', 'both') AND p_ch NOT IN ('case', 'both')) AS case_off
    FROM e
)
SELECT device_id, date_trunc('hour', event_time) AS hour, count(*) AS events,
       sum(playback_s) AS listening_s,
       sum(CASE WHEN in_ear_left OR in_ear_right THEN interval_s ELSE 0 END) AS in_ear_s,
       sum(CASE WHEN (in_ear_left OR in_ear_right) AND noise_mode = 'anc' THEN interval_s ELSE 0 END),
       sum(CASE WHEN (in_ear_left OR in_ear_right) AND noise_mode = 'off' THEN interval_s ELSE 0 END),
       sum(CASE WHEN playback_s > 0 THEN output_dba ELSE 0 END),
       count(*) FILTER (WHERE playback_s > 0),
       max(CASE WHEN playback_s > 0 THEN output_dba END),
       sum(CASE WHEN in_ear_left OR in_ear_right THEN ambient_dba ELSE 0 END),
       min(battery_left), min(battery_right), min(battery_case),
       sum(playback_s * power(2, (output_dba - 80) / 3.0)),
       sum(CASE WHEN worn THEN greatest(p_bl - battery_left, 0) ELSE 0 END),
       sum(CASE WHEN worn THEN greatest(p_br - battery_right, 0) ELSE 0 END),
       sum(CASE WHEN worn THEN playback_s ELSE 0 END),
       sum(CASE WHEN case_off THEN greatest(p_bc - battery_case, 0) ELSE 0 END)
FROM pairs GROUP BY 1, 2 ORDER BY 1, 2
"""
ROLLUP_STORED = """
SELECT device_id, hour, events, listening_s, in_ear_s, anc_s, off_s, output_dba_sum,
       output_samples, output_dba_max, ambient_dba_sum, battery_left_min, battery_right_min,
       battery_case_min, dose_s, drain_left_pct, drain_right_pct, drain_playback_s, drain_case_pct
FROM device_hourly ORDER BY 1, 2
"""


DRAIN_COLUMNS = 4  # the last four columns: battery drain, paired sample to sample


def _assert_rollups_match_raw(store, in_order: bool = True) -> None:
    """``store``: a StorageConfig, or an open DuckDB connection.

    Drain pairs a sample with its predecessor as samples arrive; when a device's
    samples were delivered out of order (``in_order=False``) a pair across the
    disorder is missed, so drain may only fall short of the recomputation.
    """
    import numpy as np

    if hasattr(store, "execute"):
        store.execute("SET TimeZone = 'UTC'")
        stored, recomputed = store.execute(ROLLUP_STORED).fetchall(), store.execute(ROLLUP_RECOMPUTED).fetchall()
    elif store.backends[store.routes["raw_events"]]["type"] == "cassandra":
        from storage.reader import run_queries

        stored = run_queries(store, {"s": ROLLUP_STORED})["s"]
        from testbed.cassandra import cassandra_events

        recomputed = cassandra_events(store.backends[store.routes["raw_events"]]).execute(
            ROLLUP_RECOMPUTED).fetchall()
    else:
        from storage.reader import run_queries

        r = run_queries(store, {"s": ROLLUP_STORED, "r": ROLLUP_RECOMPUTED})
        stored, recomputed = r["s"], r["r"]
    assert len(stored) == len(recomputed) > 0
    _assert_daily_matches_hourly(store)
    for a, b in zip(stored, recomputed):
        assert a[:3] == b[:3]
        nums = [np.array([np.nan if v is None else float(v) for v in row[3:]]) for row in (a, b)]
        if in_order:
            assert np.allclose(nums[0], nums[1], equal_nan=True), (a, b)
        else:
            exact = slice(0, -DRAIN_COLUMNS)
            assert np.allclose(nums[0][exact], nums[1][exact], equal_nan=True), (a, b)
            assert (nums[0][-DRAIN_COLUMNS:] <= nums[1][-DRAIN_COLUMNS:] + 1e-9).all(), (a, b)


def _assert_daily_matches_hourly(store) -> None:
    """device_daily, kept by the writer commit by commit, equals migration 11's backfill from device_hourly."""
    import numpy as np

    from storage.migrations import MIGRATIONS, statements
    from storage.rollups import DAILY_MERGE

    (backfill,) = [s for s in statements(next(m for m in MIGRATIONS if m.version == 11), "postgresql")
                   if s.startswith("INSERT")]
    queries = {"kept": f"SELECT device_id, day, state, urban, {', '.join(DAILY_MERGE)} FROM device_daily "
                       "ORDER BY 1, 2, 3, 4",
               "backfill": backfill[backfill.index("SELECT"):] + " ORDER BY 1, 2, 3, 4"}
    if hasattr(store, "execute"):
        kept, backfilled = (store.execute(q).fetchall() for q in queries.values())
    else:
        from storage.reader import run_queries

        r = run_queries(store, queries)
        kept, backfilled = r["kept"], r["backfill"]
    assert len(kept) == len(backfilled) > 0
    for a, b in zip(kept, backfilled):
        assert a[:4] == b[:4] and int(a[-1]) == int(b[-1]), (a, b)  # the key; the local hours, bit for bit
        assert np.allclose([float(v or 0) for v in a[4:-1]], [float(v or 0) for v in b[4:-1]]), (a, b)


@pytest.fixture
def assert_rollups_match_raw():
    """Every hourly rollup row equals a GROUP BY over the raw events (and no row is missing); every daily
    one, the sum of its hours."""
    return _assert_rollups_match_raw


@pytest.fixture(scope="session")
def postgres():
    """A private PostgreSQL cluster for the session (``initdb`` into a temp dir, its own port,
    trust auth), removed at the end. Fault tests may stop and start it."""
    from testbed.postgres import PostgresCluster

    cluster = PostgresCluster().start()
    yield cluster
    cluster.remove()


@pytest.fixture
def pg_url(postgres):
    """A fresh schema on the private cluster; the URL selects it by search_path."""
    import uuid

    from sqlalchemy import create_engine

    from storage.backends.postgres import engine_url

    schema = f"t_{uuid.uuid4().hex[:12]}"
    engine = create_engine(engine_url(postgres.url), pool_pre_ping=True)  # fault tests restart the server
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    yield f"{postgres.url}?options=-csearch_path%3D{schema}"
    if postgres.running:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
    engine.dispose()


@pytest.fixture(params=["duckdb", "postgresql"])
def store_config(request, tmp_path):
    """The store the pipeline writes to: the embedded DuckDB, then real PostgreSQL."""
    from storage.config import StorageConfig

    if request.param == "duckdb":
        return StorageConfig.embedded(tmp_path / "store.duckdb")
    url = request.getfixturevalue("pg_url")
    return StorageConfig(backends={"pg": {"type": "postgresql", "url": url}})
