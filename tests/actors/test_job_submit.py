"""`ray job submit -- podpulse ingest|train` against a real `ray start --head` cluster."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import pytest

from podpulse.broker import free_port
from podpulse.simulator import FleetSpec

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture
def ray_head():
    """A Ray head started the way a user starts one, stopped with its own process group."""
    port, dashboard = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dashboard}",
         "--num-cpus=2", "--disable-usage-stats", "--include-dashboard=true",
         # its own agent ports: another Ray (the other tests' local one) may hold the defaults
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
         f"--temp-dir={temp_dir}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 90
    while subprocess.run([str(BIN / "ray"), "job", "list", "--address", address],
                         env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True).returncode != 0:
        assert head.poll() is None and time.monotonic() < deadline, "ray head did not start"
        time.sleep(1)
    yield address, env
    os.killpg(head.pid, signal.SIGTERM)  # Ray drains for up to 30 s: give it 5, then end it
    try:
        head.wait(5)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(30)
    shutil.rmtree(temp_dir, ignore_errors=True)


def submit(address: str, env: dict, *command) -> dict:
    """``ray job submit --working-dir . -- COMMAND``; the JSON line the command printed."""
    argv = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
            *map(str, command)]
    deadline = time.monotonic() + 90
    while True:  # the head's job agent comes up a little after its HTTP API
        proc = subprocess.run(argv, env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True,
                              text=True, timeout=300, cwd=ROOT)
        if "No available agent" not in proc.stderr or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))


def test_ingest_and_training_run_as_ray_jobs(ray_head, broker, new_topic, produce_fleet, tmp_path):
    address, env = ray_head
    topic = new_topic(4)
    produced = produce_fleet(topic, FleetSpec(devices=300, hours=24, seed=31))
    db = tmp_path / "job.duckdb"
    summary = submit(address, env, "podpulse", "ingest", "--bootstrap", broker.bootstrap, "--topic", topic,
                     "--until-caught-up", "--db", db, "--json")
    assert summary["writer"]["applied"] == len(produced["valid"])
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT count(DISTINCT (device_id, seq)) FROM events").fetchone()[0] == len(produced["valid"])
    con.close()

    trained = submit(address, env, "podpulse", "train", "--model", "battery-anomaly", "--epochs", 2,
                     "--db", db, "--registry", tmp_path / "models", "--json")
    assert trained["device_days"] > 0
    assert (tmp_path / "models" / "battery-anomaly" / trained["version"] / "model.keras").exists()
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT version FROM model_versions").fetchall() == [(trained["version"],)]
    con.close()


def test_ray_is_on_the_path_of_this_environment():
    assert shutil.which("ray", path=str(BIN))
