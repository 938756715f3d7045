"""The storage reader: one interface per backend; PodPulse's queries rendered for Oracle parse as Oracle SQL."""

from concurrent.futures import ThreadPoolExecutor
from datetime import date

import duckdb
import pytest
import sqlglot

from analytics import queries as analytics
from analytics.battery_model import FEATURE_SQL, device_days_sql
from analytics.forecast_model import USAGE_SQL
from analytics.summary import QUERIES as SUMMARY_QUERIES
from storage.backends.duckdb import DuckDBReader
from storage.backends.oracle import OracleReader
from storage.backends.postgres import PostgresReader
from storage.base import StorageError
from storage.config import StorageConfig
from storage.reader import Reader, ReaderPool, open_reader
from testbed.stores import build_store


class RecordingOracleReader(OracleReader):
    """Renders for Oracle and keeps what it would run; answers no rows."""

    def __init__(self):
        self.sql: list[str] = []

    def rows(self, sql: str) -> list[tuple]:
        self.sql.append(self.render(sql))
        return [(None, None)] if "min(" in sql and "max(" in sql else []  # data_range: an empty store

    def connection_factory(self):
        raise NotImplementedError


def every_query_for_oracle() -> list[str]:
    r = RecordingOracleReader()
    for run in analytics.QUERIES.values():
        run(r, date(2026, 11, 2), date(2026, 11, 9), 10)
    analytics.data_range(r)
    for sql in (FEATURE_SQL, USAGE_SQL, *SUMMARY_QUERIES.values()):
        r.rows(sql)
    return r.sql


def test_every_analytics_training_and_summary_query_renders_to_oracle_sql_that_parses():
    rendered = every_query_for_oracle()
    assert len(rendered) >= len(analytics.QUERIES) + 4
    for sql in rendered:
        tree = sqlglot.parse_one(sql, read="oracle")
        assert tree.find(sqlglot.exp.Select) is not None, sql
        assert "::" not in sql and " FILTER (" not in sql.upper(), sql  # PostgreSQL-only syntax is gone
        assert "INTERVAL '10 hours'" not in sql and " HOURS" not in sql, sql  # Oracle: INTERVAL '10' HOUR
        for select in tree.find_all(sqlglot.exp.Select):  # Oracle groups by expressions, not positions
            group = select.args.get("group")
            assert group is None or not any(isinstance(e, sqlglot.exp.Literal) for e in group.expressions), sql


def test_duckdb_and_postgresql_read_the_queries_as_written(tmp_path):
    assert DuckDBReader.render is PostgresReader.render is Reader.render
    assert Reader.render(RecordingOracleReader(), "SELECT x::int FROM t") == "SELECT x::int FROM t"


def test_a_backend_without_sql_gets_a_clear_error():
    config = StorageConfig(backends={"c": {"type": "cassandra", "hosts": ["h"]},
                                     "d": {"type": "duckdb", "path": "x.duckdb"}},
                           routes={"raw_events": "c", "devices": "d", "rollups": "d", "offsets": "d",
                                   "anomalies": "d"})
    with pytest.raises(StorageError, match="raw_events are routed to cassandra, which has no SQL reader"):
        open_reader(config, "raw_events")


def test_a_burst_of_reads_through_a_pool_never_holds_more_than_its_connections(pg_url):
    """What a Serve replica does on every analytics request: 40 concurrent reads, a pool of 3."""
    config = StorageConfig(backends={"pg": {"type": "postgresql", "url": pg_url}})
    pool = ReaderPool(config, size=3, wait_s=30)
    sessions = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'podpulse-pool-test'"

    def read(_) -> tuple:
        with pool.reader() as reader:
            reader.rows("SELECT set_config('application_name', 'podpulse-pool-test', false)")
            pid, _, seen = reader.rows(f"SELECT pg_backend_pid(), pg_sleep(0.05), ({sessions})")[0]
            return pid, seen

    try:
        with ThreadPoolExecutor(max_workers=40) as threads:
            done = list(threads.map(read, range(40)))
    finally:
        pool.close()
    assert len(done) == 40
    assert len({pid for pid, _ in done}) <= 3 and max(seen for _, seen in done) <= 3
    with open_reader(config) as reader:  # the pool closed its connections
        assert reader.rows(sessions)[0][0] == 0


def test_a_pool_with_every_connection_busy_answers_a_storage_error_in_time(tmp_path):
    config = StorageConfig.embedded(tmp_path / "x.duckdb")
    duckdb.connect(str(tmp_path / "x.duckdb")).close()
    pool = ReaderPool(config, size=1, wait_s=0.2)
    with pool.reader() as held:
        assert held.rows("SELECT 1") == [(1,)]
        with pytest.raises(StorageError, match=r"all 1 read connections to embedded are busy \(waited 0.2 s\)"):
            with pool.reader():
                pass
    with pool.reader() as again:  # released
        assert again.rows("SELECT 2") == [(2,)]


def test_a_write_to_the_embedded_file_waits_for_the_reads_in_flight(tmp_path):
    """DuckDB will not open a file for writing in a process that has it open read-only: the pool's
    writer waits for its readers, and readers that come meanwhile wait for the write."""
    import threading
    import time

    path = tmp_path / "x.duckdb"
    duckdb.connect(str(path)).execute("CREATE TABLE t (x INTEGER)").close()
    pool = ReaderPool(StorageConfig.embedded(path), size=8, wait_s=5)
    stop, reads = threading.Event(), []

    def read():
        while not stop.is_set():
            with pool.reader() as r:
                reads.append(r.rows("SELECT count(*) FROM t")[0][0])
                time.sleep(0.01)

    threads = [threading.Thread(target=read) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.2)
        for i in range(5):
            with pool.writing():
                con = duckdb.connect(str(path))
                con.execute("INSERT INTO t VALUES (?)", [i])
                con.close()
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert max(reads) <= 5 and len(reads) > 8
    with pool.reader() as r:
        assert r.rows("SELECT count(*) FROM t") == [(5,)]


def test_a_dead_server_is_a_storage_error_naming_it():
    config = StorageConfig(backends={"pg": {"type": "postgresql", "url": "postgresql://x@127.0.0.1:1/none"}})
    with pytest.raises(StorageError, match="cannot read postgresql"):
        open_reader(config)


def test_a_device_read_uses_the_key_on_postgresql_not_a_scan_of_the_fleet(pg_url):
    """GET /v1/devices/{id}/battery-health's query: with sequential scans priced out, PostgreSQL
    still plans it, which it can only do when both filters reach device_hourly's primary key."""
    config = StorageConfig(backends={"pg": {"type": "postgresql", "url": pg_url}})
    build_store(config, devices=20, days=2, seed=3)  # monthly partitions to plan over
    with open_reader(config) as reader:
        reader.rows("SELECT set_config('enable_seqscan', 'off', false)")
        plan = "\n".join(r[0] for r in reader.rows("EXPLAIN " + device_days_sql("ap-0011223344556677", 7)))
    lines = plan.splitlines()
    scans = [i for i, line in enumerate(lines) if " on device_hourly" in line]
    assert len(scans) >= 2, plan  # the rows and the device's last day, each over its partitions
    for i in scans:  # each reads by the key: an index scan whose condition names the device
        assert "Index" in lines[i] and "Index Cond: ((device_id)::text = 'ap-0011223344556677'" in lines[i + 1], plan
    with pytest.raises(ValueError):
        device_days_sql("x' OR '1'='1", 7)
