"""Migrations on real PostgreSQL and DuckDB: pending, rerun, target, two processes at once."""

import json
import subprocess
import sys

import duckdb
import pytest
from sqlalchemy import create_engine, inspect

from storage.admin import migrate, status
from storage.backends.postgres import engine_url
from storage.migrations import LATEST, MIGRATIONS

CLI = [sys.executable, "-m", "cli.main"]
APPLIED_ALL = "applied " + ", ".join(str(m.version) for m in MIGRATIONS)


def columns(url, table):
    engine = create_engine(engine_url(url))
    try:
        return {c["name"] for c in inspect(engine).get_columns(table)}
    finally:
        engine.dispose()


def test_postgres_migrates_to_a_target_then_to_the_latest(pg_url):
    assert status(pg_url)["current"] == 0
    assert migrate(pg_url, target=1) == [1]
    assert "spatial_audio" not in columns(pg_url, "events")
    assert [m["version"] for m in status(pg_url)["pending"]] == list(range(2, LATEST + 1))
    assert migrate(pg_url) == list(range(2, LATEST + 1))
    assert "spatial_audio" in columns(pg_url, "events")
    assert migrate(pg_url) == []
    assert status(pg_url) == {"current": LATEST, "latest": LATEST, "pending": []}


def test_postgres_time_tables_are_range_partitioned(pg_url):
    migrate(pg_url)
    engine = create_engine(engine_url(pg_url))
    with engine.connect() as conn:
        kinds = dict(conn.exec_driver_sql(
            "SELECT c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p')").all())
    engine.dispose()
    assert kinds["events"] == "p" and kinds["device_hourly"] == "p"  # partitioned
    assert kinds["devices"] == "r" and kinds["kafka_offsets"] == "r"


def run_twice_at_once(url):
    procs = [subprocess.Popen([*CLI, "db", "migrate", "--url", url], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(120), p.stdout.read(), p.stderr.read()) for p in procs]
    assert all(rc == 0 for rc, _, _ in results), results
    return sorted(out.strip() for _, out, _ in results)


def test_two_migrations_at_once_on_postgres_apply_once(pg_url):
    outputs = run_twice_at_once(pg_url)
    assert outputs == [APPLIED_ALL, "nothing to apply"]
    status_out = subprocess.run([*CLI, "db", "status", "--url", pg_url, "--json"],
                                capture_output=True, text=True, check=True).stdout
    assert json.loads(status_out)["current"] == LATEST


def test_two_migrations_at_once_on_duckdb_apply_once(tmp_path):
    url = f"duckdb:///{tmp_path / 'm.duckdb'}"
    assert run_twice_at_once(url) == [APPLIED_ALL, "nothing to apply"]
    con = duckdb.connect(str(tmp_path / "m.duckdb"), read_only=True)
    rows = con.execute("SELECT version FROM podpulse_schema_version ORDER BY version").fetchall()
    con.close()
    assert rows == [(m.version,) for m in MIGRATIONS]


def test_a_target_beyond_the_latest_is_refused(tmp_path):
    from storage.base import StorageError

    with pytest.raises(StorageError, match="does not exist"):
        migrate(f"duckdb:///{tmp_path / 'x.duckdb'}", target=LATEST + 1)


def test_cli_errors_are_one_line(tmp_path):
    proc = subprocess.run([*CLI, "db", "status", "--url", "postgresql://postgres:secret@127.0.0.1/test"],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "podpulse: error: put no password in a database URL: use an environment variable or a file"]
