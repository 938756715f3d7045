"""The podpulse command line, run as a user runs it: in a subprocess."""

import hashlib
import json
import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import duckdb
import msgspec
import pytest
import yaml
from confluent_kafka.admin import AdminClient

from podpulse import geo
from podpulse.pseudonyms import KEY_ENV, Pseudonyms
from storage.config import StorageConfig

CLI = [sys.executable, "-m", "cli.main"]


def podpulse(*args, check=True, timeout=300):
    proc = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_simulate_to_file_writes_one_event_per_line_and_summarises(tmp_path):
    path = tmp_path / "fleet.jsonl"
    proc = podpulse("simulate", "--devices", 10_000, "--hours", 24, "--to", path)
    lines = path.read_bytes().splitlines()
    records = [msgspec.json.decode(line) for line in lines[:: len(lines) // 500]]
    assert all(r["device_id"].startswith("ap-") and len(r["postcode"]) == 4 for r in records)
    for s in geo.STATES:
        assert s.code in proc.stdout
    for word in ("urban", "rural", "v1", "v2", f"{len(lines):,} events"):
        assert word in proc.stdout
    truth = json.loads(path.with_suffix(".truth.json").read_text())
    assert len(truth) == 200


def test_simulate_json_summary_counts_add_up(tmp_path):
    proc = podpulse("simulate", "--devices", 500, "--hours", 6, "--malformed", 0.01,
                    "--to", tmp_path / "f.jsonl", "--json")
    summary = json.loads(proc.stdout)
    lines = (tmp_path / "f.jsonl").read_bytes().count(b"\n")
    assert summary["events"] == lines == sum(summary["events_by_state"].values())
    assert sum(summary["devices_by_state"].values()) == 500
    assert 0 < summary["malformed"] < lines


@pytest.mark.parametrize("args, words", [
    (["simulate", "--devices", "-3", "--to", "x.jsonl"], ["--devices"]),
    (["simulate", "--devices", "ten", "--to", "x.jsonl"], ["--devices", "integer"]),
    (["simulate"], ["--to"]),
    (["simulate", "--to", "kafka://nohost"], ["kafka://HOST:PORT/TOPIC"]),
    (["simulate", "--to", "/no/such/dir/x.jsonl"], ["/no/such/dir"]),
    (["simulate", "--to", "x.jsonl", "--start", "yesterday"], ["--start"]),
    (["simulate", "--to", "x.jsonl", "-X", "novalue"], ["key=value"]),
    (["simulate", "--to", "x.jsonl", "--fault-mix", "slow_leak"], ["--fault-mix", "slow_leak", "subtle"]),
    (["bench", "store", "--db", "s.duckdb", "--fault-mix", "subtle,nope"], ["fault mix", "nope"]),
    (["frobnicate"], ["frobnicate"]),
])
def test_bad_arguments_get_one_line_not_a_traceback(tmp_path, args, words):
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("podpulse: error:"), proc.stderr
    for word in words:
        assert word in lines[0]


FAILING_COMMAND = """
import sys
from pathlib import Path

from cli import main as cli, render as console
from podpulse.errors import ConfigError


@cli.app.command("fail")
def fail(kind: str) -> None:
    console.stderr_to(Path(sys.argv[1]))  # as quiet_logs does before a demo starts Ray
    print("a library's log line", file=sys.stderr)
    if kind == "config":
        raise ConfigError("backend 'pg': type must be one of duckdb, postgresql")
    raise RuntimeError("HAProxy crashed during startup:\\n[ALERT] cannot bind socket for [0.0.0.0:8404]")


sys.exit(cli.main(["fail", sys.argv[2]]))
"""


@pytest.mark.parametrize("kind, words", [
    ("config", ["podpulse: error: backend 'pg': type must be"]),
    ("crash", ["podpulse: error: RuntimeError: [ALERT] cannot bind socket", "(traceback in "]),
])
def test_an_error_reaches_the_terminal_after_the_logs_went_to_a_file(tmp_path, kind, words):
    """The demo once exited 1 with nothing on the terminal: its error went where Ray's logs go."""
    log = tmp_path / "demo.log"
    proc = subprocess.run([sys.executable, "-c", FAILING_COMMAND, str(log), kind], capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and all(w in lines[0] for w in words), proc.stderr
    logged = log.read_text()
    assert "a library's log line" in logged and "podpulse: error" not in logged
    assert ("Traceback (most recent call last)" in logged) == (kind == "crash")


def test_help_everywhere_and_memory_only_is_said():
    for cmd in ([], ["simulate"], ["broker"], ["bench"], ["bench", "simulate"]):
        assert "Usage" in podpulse(*cmd, "--help").stdout
    assert "MEMORY-ONLY" in podpulse("broker", "--help").stdout
    for group in ([], ["db"], ["retention"]):  # no command: the help, once
        bare = podpulse(*group, check=False)
        assert bare.returncode == 2 and bare.stdout.count("Usage") == 1, bare.stdout


def test_bench_simulate_json_reports_the_rate_and_its_baseline():
    result = json.loads(podpulse("bench", "simulate", "--devices", 1000, "--hours", 6,
                                 "--json").stdout)
    assert result["events"] > 1_000
    assert result["events_per_s"] > 0 and result["encode_only_events_per_s"] > 0


@pytest.mark.integration  # a broker and Ray, in the command's own process
def test_broker_command_serves_kafka_until_terminated(tmp_path):
    from podpulse.broker import free_port

    port = free_port()
    proc = subprocess.Popen([*CLI, "broker", "--port", str(port), "--topic", "telemetry",
                             "--partitions", "3"], stdout=subprocess.PIPE, text=True)
    try:
        assert "listening" in proc.stdout.readline()
        topics = AdminClient({"bootstrap.servers": f"127.0.0.1:{port}"}).list_topics(timeout=10).topics
        assert len(topics["telemetry"].partitions) == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


@pytest.mark.integration  # a broker and Ray, in the command's own process
def test_demo_runs_the_main_job_and_prints_the_summary(tmp_path):
    """One demo run (--json, models on), its summary checked against the store; the human closing
    lines it would print are rendered from that same summary (one run instead of two: the suite's
    time)."""
    from cli.render import out, print_demo_result
    from podpulse.broker import free_port

    db = tmp_path / "demo.duckdb"
    proc = subprocess.run([*CLI, "demo", "--devices", "400", "--hours", "36", "--db", str(db), "--json",
                           "--port", str(free_port())], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # quiet: Ray's and the libraries' own logs went to a file; stdout is the summary alone
    assert " INFO " not in proc.stdout + proc.stderr and len(proc.stderr.splitlines()) < 40, proc.stderr
    (line,) = proc.stdout.strip().splitlines()
    summary = json.loads(line)
    log = db.parent / "demo.log"
    assert log.stat().st_size > 0
    with out.capture() as printed:
        print_demo_result(summary, models=True, log_file=log, kept_store=False)
    text = " ".join(printed.get().split())
    for words in ("events stored", "from 400 devices", "dead-lettered", "urban:", "rural:", "NSW",
                  f"logs: {log}", f"Fleet console: {summary['serve']['url']}/", "export TOKEN="):
        assert words in text, text
    assert summary["events_stored"] + summary["dead_lettered"] == summary["events_produced"]
    assert summary["dead_lettered"] == summary["malformed_injected"] > 0
    assert summary["ingested"] == summary["events_stored"]
    con = duckdb.connect(str(db), read_only=True)
    rows, distinct = con.execute("SELECT count(*), count(DISTINCT (device_id, seq)) FROM events").fetchone()
    con.close()
    assert rows == distinct == summary["events_stored"]
    assert Path(summary["report"]).read_text().count("<svg") == 5

    from analytics.queries import QUERIES

    report = json.loads(podpulse("report", "--format", "json", "--db", db).stdout)
    assert set(QUERIES) <= set(report) and report["k"] == 10
    assert report["events_covered"] == summary["events_stored"]
    narrow = json.loads(podpulse("report", "--format", "json", "--db", db, "--from", report["range"]["from"],
                                 "--to", report["range"]["from"]).stdout)
    assert 0 < narrow["events_covered"] < report["events_covered"]
    parts = [json.loads(podpulse("report", "--format", "json", "--db", db, "--cohort", f"urban={area}").stdout)
             for area in ("true", "false")]
    assert [p["cohort"]["label"] for p in parts] == ["urban", "rural"]
    assert 0 < parts[0]["events_covered"] and sum(p["events_covered"] for p in parts) == report["events_covered"]
    html = podpulse("report", "--format", "html", "--db", db, "--out", tmp_path / "r")
    assert (tmp_path / "r" / "report.html").exists() and "report written to" in html.stdout
    assert summary["devices"] == 400 and set(summary["listening"]) == {"urban", "rural"}

    # The models: trained on the demo store, scored against the faults the simulator injected,
    # served by Ray Serve, which answered for the most anomalous device before the demo exited.
    battery = summary["battery_anomaly"]
    assert battery["auc"] >= 0.9 and Path(battery["path"], "model.keras").exists()
    worst = battery["most_anomalous"][0]
    assert worst["flagged"] and worst["injected_fault"] is not None
    assert summary["serve"]["checked"]["device_id"] == worst["device_id"]
    assert summary["serve"]["checked"]["model_version"] == battery["version"]
    assert "28 complete days" in summary["usage_forecast"]["skipped"]  # 36 hours of data


@pytest.mark.parametrize("args, words", [
    (["ingest", "--topic", "t"], ["--bootstrap"]),
    (["ingest", "--bootstrap", "127.0.0.1:1", "--topic", "t", "--consumers", "-1"], ["--consumers"]),
    (["demo", "--devices", "0"], ["--devices"]),
    (["report", "--format", "pdf"], ["--format"]),
    (["report", "--db", "/nonexistent/x.duckdb"], ["no store"]),
    (["report", "--cohort", "state=Queensland"], ["state", "QLD"]),
    (["report", "--cohort", "colour=white"], ["colour", "not a cohort field"]),
    (["report", "--cohort", "model"], ["--cohort", "FIELD=VALUE"]),
    (["report", "--saved", "x", "--cohort", "state=QLD"], ["--saved", "not both"]),
])
def test_bad_pipeline_arguments_get_one_line(args, words):
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and all(w in lines[0] for w in words), proc.stderr


@pytest.mark.integration  # a broker and Ray, in the command's own process
def test_bench_ingest_reports_the_pipeline_beside_the_raw_ceiling_and_loses_nothing(tmp_path):
    result = json.loads(podpulse("bench", "ingest", "--events", 20_000, "--partitions", 4, "--json",
                                 "--profile", tmp_path / "profiles", timeout=600).stdout)
    assert set(result) >= {"events", "events_per_s", "raw_consume_events_per_s", "ratio", "lost",
                           "duplicated", "peak_rss_mb"}
    assert result["events"] == 20_000 and result["lost"] == 0 and result["duplicated"] == 0
    assert result["events_per_s"] > 0 and result["raw_consume_events_per_s"] > 0
    assert result["peak_rss_mb"] > 100  # the driver and every Ray process were counted
    # ingest costs CPU somewhere among them; a simulated event is a few hundred bytes of JSON
    assert result["cpu_s_per_million_events"] > 0 and 150 < result["message_bytes_per_event"] < 1000
    assert 0 < result["stored_bytes_per_event"] < 10_000
    # py-spy recorded the driver and each ingest actor, and says where their time went
    roles = {p["role"] for p in result["profiles"]}
    assert {"driver", "ShardConsumer", "Writer", "Supervisor"} <= roles, result["profiles"]
    writer = next(p for p in result["profiles"] if p["role"] == "Writer")
    assert Path(writer["file"]).exists() and writer["top_own"] and writer["active_s"] > 0


def test_demo_fills_postgresql_through_a_storage_config(tmp_path, pg_url):
    config = tmp_path / "pg.yaml"
    config.write_text(f"backends:\n  pg: {{type: postgresql, url: '{pg_url}'}}\n"
                      "routes: {raw_events: pg, devices: pg, rollups: pg, offsets: pg, anomalies: pg}\n")
    summary = json.loads(podpulse("demo", "--devices", 300, "--hours", 12, "--storage-config", config,
                                  "--json", "--no-models", timeout=600).stdout)
    assert summary["events_stored"] == summary["ingested"] == \
        summary["events_produced"] - summary["dead_lettered"] > 0
    # a device that was never in use, charging or plugged in during the 12 hours sent nothing
    from podpulse.contract import decode_batch
    from podpulse.simulator import FleetSpec, simulate

    spec = FleetSpec(devices=300, hours=12, seed=summary["seed"], malformed_rate=0.002)
    sent = {d for c in simulate(spec) for d in decode_batch(c.values).table["device_id"].to_pylist()}
    assert summary["devices"] == len(sent) > 250
    status = json.loads(podpulse("db", "status", "--url", pg_url, "--json").stdout)
    assert status["current"] == status["latest"]


def test_demo_puts_raw_events_in_cassandra_and_every_report_query_still_answers(tmp_path, pg_url, cassandra):
    from analytics import queries as analytics
    from storage.config import StorageConfig
    from storage.reader import open_reader

    config = tmp_path / "split.yaml"
    config.write_text(f"backends:\n  core: {{type: postgresql, url: '{pg_url}'}}\n"
                      f"  raw: {{type: cassandra, hosts: [{cassandra.hosts}], port: {cassandra.port}, "
                      "keyspace: demo_split}\n"
                      "routes: {raw_events: raw, devices: core, rollups: core, offsets: core, anomalies: core}\n")
    summary = json.loads(podpulse("demo", "--devices", 300, "--hours", 30, "--storage-config", config,
                                  "--json", "--no-models", timeout=600).stdout)
    assert summary["events_stored"] == summary["events_produced"] - summary["dead_lettered"] > 0
    assert Path(summary["report"]).exists()
    with open_reader(StorageConfig.load(config)) as reader:
        start, end = analytics.data_range(reader)
        adoption = analytics.firmware_adoption(reader, start, end, 1)
    assert adoption.rows and sum(r[2] for r in adoption.rows) >= 300  # every device, every day it was seen
    from testbed.cassandra import cassandra_events

    raw = cassandra_events({"hosts": [cassandra.hosts], "port": cassandra.port, "keyspace": "demo_split"})
    assert raw.execute("SELECT count(*) FROM events").fetchone()[0] == summary["events_stored"]


@pytest.mark.integration  # a broker and Ray, in the command's own process
def test_train_and_drift_from_the_command_line(tmp_path):
    from testbed.stores import build_store

    build_store(tmp_path / "s.duckdb", 300, 3, seed=61)
    trained = json.loads(podpulse("train", "--model", "battery-anomaly", "--epochs", 2, "--db",
                                  tmp_path / "s.duckdb", "--registry", tmp_path / "models", "--json").stdout)
    assert trained["auc"] is None and Path(trained["path"], "model.keras").exists()
    report = json.loads(podpulse("drift", trained["path"], "--db", tmp_path / "s.duckdb", "--json").stdout)
    assert set(report["features"]) >= {"playback_h", "output_dba"} and isinstance(report["retrain"], bool)


def test_token_prints_a_token_and_the_entry_holding_only_its_hash():
    proc = podpulse("token", "--name", "gateway", "--scope", "ingest", "--scope", "read:devices")
    token, *entry = proc.stdout.splitlines()
    (made,) = yaml.safe_load("\n".join(entry))
    assert made == {"name": "gateway", "sha256": hashlib.sha256(token.encode()).hexdigest(),
                    "scopes": ["ingest", "read:devices"]}
    bad = podpulse("token", "--name", "x", "--scope", "root", check=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "'root' is not one of" in bad.stderr


def test_pseudonym_prints_what_a_device_is_stored_as_and_a_missing_key_is_one_line(tmp_path):
    key = tmp_path / "db" / "pseudonym.key"
    made = Pseudonyms.load(key, create=True)
    env = {k: v for k, v in os.environ.items() if k != KEY_ENV}  # the key beside the database
    proc = subprocess.run([*CLI, "pseudonym", "ap-0011223344556677", "ap-1", "--db", str(tmp_path / "db" / "x.duckdb")],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.stdout.split() == [made.of("ap-0011223344556677"), made.of("ap-1")], proc.stderr
    missing = subprocess.run([*CLI, "pseudonym", "ap-1", "--db", str(tmp_path / "none" / "x.duckdb")],
                             capture_output=True, text=True, env=env, timeout=60)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and KEY_ENV in missing.stderr


@pytest.fixture
def old_store(tmp_path, fixed_start):
    """Three AEST days of a small fleet, starting 31 October 2026 (the retention tests' store)."""
    from testbed.stores import build_store

    path = tmp_path / "store.duckdb"
    build_store(path, 20, 3, seed=3, start=fixed_start - timedelta(days=2))
    return path


def test_retention_apply_removes_what_is_older_and_says_what(tmp_path, old_store, fixed_start):
    config = tmp_path / "storage.yaml"
    config.write_text(f"backends: {{db: {{type: duckdb, path: '{old_store}'}}}}\n"
                      "retention: {raw_events: 2, rollups: 2}\n")
    now = fixed_start + timedelta(days=2)  # the cutoff: Monday 2 November 00:00 AEST
    result = json.loads(podpulse("retention", "apply", "--storage-config", config, "--now", now.isoformat(),
                                 "--json").stdout)
    tables = result["backends"]["db"]["tables"]
    assert set(tables) == {"events", "device_hourly", "device_daily", "device_firmware_daily"}  # anomalies: kept forever
    assert all(t["by"] == "delete" and t["rows"] > 0 and t["cutoff"] == fixed_start.isoformat()
               for t in tables.values())
    with duckdb.connect(str(old_store), read_only=True) as con:
        con.execute("SET TimeZone = 'UTC'")
        oldest = con.execute("SELECT (SELECT min(event_time) FROM events), (SELECT min(hour) FROM device_hourly)"
                             ).fetchone()
    assert all(t >= fixed_start for t in oldest)
    text = podpulse("retention", "apply", "--db", old_store, "--keep", "anomalies=30", "--keep", "raw_events=2",
                    "--now", now.isoformat()).stdout
    assert "events" in text and "0 rows deleted" in text  # idempotent, and --keep over the (embedded) config
    assert "no retention configured" in podpulse("retention", "apply", "--db", old_store).stdout


@pytest.mark.parametrize("args, words", [
    (["--keep", "devices=30"], ["retention.devices", "never expire"]),
    (["--keep", "offsets=30"], ["retention.offsets", "never expire"]),
    (["--keep", "raw_events=0"], ["retention.raw_events", "at least 1, got 0"]),
    (["--keep", "rollups=1.5"], ["retention.rollups", "whole number"]),
    (["--keep", "events=3"], ["retention.events", "unknown record kind"]),
    (["--keep", "raw_events"], ["--keep takes KIND=DAYS"]),
    (["--keep", "raw_events=3", "--now", "yesterday"], ["--now", "ISO"]),
])
def test_retention_apply_bad_arguments_get_one_line(old_store, args, words):
    proc = podpulse("retention", "apply", "--db", old_store, *args, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("podpulse: error:"), proc.stderr
    assert all(w in lines[0] for w in words), lines[0]


def test_retention_apply_needs_a_store(tmp_path):
    proc = podpulse("retention", "apply", "--db", tmp_path / "none.duckdb", check=False)
    assert proc.returncode == 1 and "no store at" in proc.stderr


def test_erase_removes_a_device_from_the_store_and_says_what(tmp_path, old_store):
    with duckdb.connect(str(old_store), read_only=True) as con:
        device, events = con.execute("SELECT device_id, events FROM devices ORDER BY device_id LIMIT 1").fetchall()[0]
    result = json.loads(podpulse("erase", "--db", old_store, "--pseudonym", device, "--device", "ap-unknown-0001",
                                 "--json").stdout)
    unknown = StorageConfig.embedded(old_store).pseudonyms().of("ap-unknown-0001")  # as sent → as stored
    assert result["devices"] == sorted([device, unknown])
    backend = result["backends"]["embedded"]
    assert (backend["tables"]["events"], backend["tables"]["devices"], backend["tombstones"]) == (events, 1, 2)
    with duckdb.connect(str(old_store), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM events WHERE device_id = ?", [device]).fetchall() == [(0,)]
        assert con.execute("SELECT count(*) FROM erased_devices").fetchall() == [(2,)]
    text = podpulse("erase", "--db", old_store, "--pseudonym", device).stdout  # again: nothing more to delete
    assert device in text and "events" in text and "0 rows deleted" in text and "tombstone" in text
    missing = podpulse("erase", "--db", tmp_path / "none.duckdb", "--pseudonym", device, check=False)
    assert missing.returncode == 1 and "no store at" in missing.stderr
    nothing = podpulse("erase", "--db", old_store, check=False)
    assert nothing.returncode == 1 and nothing.stderr.count("\n") == 1 and "--device" in nothing.stderr


def test_each_command_parses_calls_and_renders_in_fifteen_lines_or_fewer():
    """The command line runs no use case of its own: a command's body (its docstring aside) is short."""
    import ast

    from cli import main

    tree = ast.parse(Path(main.__file__).read_text())
    commands = [fn for fn in tree.body if isinstance(fn, ast.FunctionDef) and any(
        isinstance(d, ast.Call) and getattr(d.func, "attr", "") == "command" for d in fn.decorator_list)]
    long = {}
    for fn in commands:
        body = fn.body[1:] if isinstance(fn.body[0], ast.Expr) and isinstance(fn.body[0].value, ast.Constant) \
            else fn.body
        if body[-1].end_lineno - body[0].lineno + 1 > 15:
            long[fn.name] = body[-1].end_lineno - body[0].lineno + 1
    assert len(commands) == 15 and not long, long


def test_no_command_goes_under_the_privacy_floor(tmp_path):
    for args, option in ((("report", "--k", 1), "--k"), (("detect", "--min-k", 2), "--min-k")):
        proc = podpulse(*args, "--db", tmp_path / "none.duckdb", check=False)
        assert proc.returncode != 0 and option in proc.stderr and "10" in proc.stderr, proc.stderr
