"""A real Prometheus scrapes the Ray metrics endpoint of a local Ray running a real ingest.

The Prometheus (Debian's, 2.42) runs on a free port with its own storage
directory, scrapes the node's metrics export port every second and loads the
real alert rules; the test reads everything back through its HTTP API.
"""

import json
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import ray
import yaml

from actors.config import IngestConfig
from actors.supervisor import IngestSupervisor
from podpulse import metrics
from podpulse.simulator import FleetSpec
from storage.config import StorageConfig

RULES = Path(__file__).resolve().parents[2] / "monitoring" / "prometheus" / "podpulse-rules.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    def __init__(self, url: str):
        self.url = url

    def api(self, path: str, **params) -> dict:
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}",
                                    timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]

    def value(self, query: str) -> float | None:
        """The value of a query that yields one series (None: no series)."""
        result = self.api("query", query=query)["result"]
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, query: str, ok, timeout: float = 90) -> float | None:
        deadline = time.monotonic() + timeout
        while True:
            v = self.value(query)
            if ok(v):
                return v
            if time.monotonic() > deadline:
                raise AssertionError(f"{query} = {v} after {timeout} s")
            time.sleep(0.5)


@pytest.fixture(scope="module")
def prometheus(ray_local, tmp_path_factory):
    """Prometheus scraping the local Ray node's metrics export port, with PodPulse's rules."""
    node_port = ray_local.nodes()[0]["MetricsExportPort"]
    tmp = tmp_path_factory.mktemp("prometheus")
    config = tmp / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "ray", "static_configs": [{"targets": [f"127.0.0.1:{node_port}"]}]}],
    }))
    port = free_port()
    log = (tmp / "prometheus.log").open("w")
    proc = subprocess.Popen(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (tmp / "prometheus.log").read_text()
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "Prometheus did not become ready"
            time.sleep(0.2)
        prom = Prometheus(url)
        prom.wait_for('up{job="ray"}', lambda v: v == 1, timeout=30)
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_prometheus_sees_the_ingest_counters_rise(ray_local, broker, new_topic, produce_fleet, prometheus,
                                                 tmp_path):
    topic = new_topic(4)
    first = produce_fleet(topic, FleetSpec(devices=1000, hours=6, seed=51, malformed_rate=0.02))
    sel = f'{{topic="{topic}"}}'
    consumed = f"sum(ray_podpulse_events_consumed_total{sel})"
    applied = 'sum(ray_podpulse_events_written_total{backend="duckdb", outcome="applied"})'
    writes = 'sum(ray_podpulse_batch_write_seconds_count{backend="duckdb"})'
    applied_before = prometheus.value(applied) or 0  # other tests' writers in this Ray session
    writes_before = prometheus.value(writes) or 0
    assert prometheus.value(consumed) is None

    config = IngestConfig(bootstrap=broker.bootstrap, topic=topic, consumers=2, batch_size=1000, linger_ms=50,
                          storage=StorageConfig.embedded(tmp_path / "store.duckdb"))
    supervisor = IngestSupervisor.remote(config)
    done = supervisor.run.remote()  # until stopped: the pipeline keeps running between the two waves
    try:
        n1 = len(first["valid"]) + len(first["malformed"])
        assert prometheus.wait_for(consumed, lambda v: v is not None and v >= n1) == n1

        second = produce_fleet(topic, FleetSpec(devices=1000, hours=6, seed=52, malformed_rate=0.02))
        n2 = len(second["valid"]) + len(second["malformed"])
        # a query between two scrapes of a restarted exporter may find no series: None, not a failure
        assert prometheus.wait_for(consumed, lambda v: v is not None and v > n1) > n1  # seen rising
        assert prometheus.wait_for(consumed, lambda v: v is not None and v >= n1 + n2) == n1 + n2

        valid = len(first["valid"]) + len(second["valid"])
        malformed = len(first["malformed"]) + len(second["malformed"])
        assert malformed > 0
        assert prometheus.wait_for(f"sum(ray_podpulse_events_stored_total{sel})", lambda v: v == valid) == valid
        dead = f"sum(ray_podpulse_events_dead_lettered_total{sel})"
        assert prometheus.wait_for(dead, lambda v: v == malformed) == malformed
        # per partition: every partition counted, and the partitions add up
        per_partition = prometheus.api("query", query=f"sum by (partition) (ray_podpulse_events_consumed_total{sel})")
        assert sorted(r["metric"]["partition"] for r in per_partition["result"]) == ["0", "1", "2", "3"]
        assert sum(float(r["value"][1]) for r in per_partition["result"]) == n1 + n2
        # the writer: every valid event newly applied once, and its batches timed
        assert prometheus.wait_for(applied, lambda v: v is not None and v - applied_before >= valid) - applied_before == valid
        assert prometheus.value(writes) > writes_before
        # the supervisor's lag gauge, one per partition, settles at 0 once everything is stored
        lag = f"max by (partition) (ray_podpulse_consumer_lag{sel})"
        prometheus.wait_for(f"count({lag})", lambda v: v == 4, timeout=30)
        assert prometheus.wait_for(f"max({lag})", lambda v: v == 0, timeout=30) == 0

        # the counter as a time series: it never fell, and it rose
        end = time.time()
        series = prometheus.api("query_range", query=consumed, start=end - 120, end=end, step="1s")["result"]
        values = [float(v) for _, v in series[0]["values"]]
        assert values == sorted(values) and values[0] < values[-1] == n1 + n2
    finally:
        ray.get(supervisor.stop.remote())
        ray.get(done, timeout=120)
        ray.kill(supervisor)


@ray.remote(num_cpus=0)
def record_every_metric() -> None:
    """What a Serve replica and the pipeline record, once each, in a Ray worker."""
    metrics.events_consumed("names", {0: 5})
    metrics.events_stored("names", {0: 4})
    metrics.events_dead_lettered("names", [0])
    metrics.consumer_lag("names", {0: 7})
    metrics.batch_written("names-backend", 0.02, 4, 1)
    metrics.write_failed("names-backend")
    metrics.failure("names-component", "StorageError")
    metrics.scoring_latency("/v1/battery/score", 0.004)
    metrics.model_version("names-model", "v1")
    metrics.anomalous_devices("names-model", "v1", {"NSW-urban": 2, "WA-rural": 1})
    metrics.model_version("names-model", "v2")  # a live swap: v1 goes to 0
    metrics.anomalous_devices("names-model", "v2", {"NSW-urban": 3})
    metrics.feature_drift("names-model", "v2", {"playback_h": 0.3})
    found = {"model": "names-model", "firmware": "F2", "baseline_firmware": "F1", "drain_change": 0.2, "regression": True}
    metrics.firmware_regressions([found, dict(found, firmware="F3", baseline_firmware="F2")])
    metrics.firmware_regressions([found])  # a later detect run no longer finds F3: it goes to 0
    metrics.tokens_file_readable(True)
    time.sleep(3)  # outlive a report interval (1 s in the tests' Ray): gauges vanish with the process


def test_every_metric_is_exported_under_its_documented_name_and_the_rules_evaluate(prometheus):
    ray.get(record_every_metric.remote())
    prometheus.wait_for('ray_podpulse_feature_drift_psi{model="names-model"}', lambda v: v is not None)
    scraped = set(prometheus.api("label/__name__/values"))
    assert metrics.exported_series() <= scraped, metrics.exported_series() - scraped
    info = prometheus.api("query", query='ray_podpulse_model_info{model="names-model"}')["result"]
    assert {r["metric"]["version"]: float(r["value"][1]) for r in info} == {"v1": 0.0, "v2": 1.0}
    regions = prometheus.api("query", query='ray_podpulse_anomalous_devices{model="names-model"}')["result"]
    assert {(r["metric"]["version"], r["metric"]["region"]): float(r["value"][1]) for r in regions} == {
        ("v1", "NSW-urban"): 0.0, ("v1", "WA-rural"): 0.0, ("v2", "NSW-urban"): 3.0}  # the replaced version zeroed
    firmware = prometheus.api("query", query='ray_podpulse_firmware_regression{model="names-model"}')["result"]
    assert {r["metric"]["firmware"]: float(r["value"][1]) for r in firmware} == {"F2": 0.2, "F3": 0.0}
    # the real rules loaded, and evaluate against the real series without error
    deadline = time.monotonic() + 30
    while True:
        loaded = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
        if all(r["health"] != "unknown" for r in loaded) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(loaded) == 7 and all(r["health"] == "ok" and not r.get("lastError") for r in loaded), loaded
