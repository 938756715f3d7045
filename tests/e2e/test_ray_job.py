"""Ingest jobs on Ray under KubeRay in Pods. `ray job submit` from this machine: `podpulse ingest` stores
exactly what a producer sent, and its actors run on the worker Pod's node. Then an ``AirPodsDataStream``
applied with kubectl: the PodPulse operator, a Pod installed by `helm install` (without the RayService),
makes the RayJob, KubeRay runs `podpulse ingest` on a Ray cluster of the stream's own, the stream goes
Pending → Starting → Running and stores each event exactly once; deleting it takes its RayJob and Pods.

KubeRay's operator runs as a Pod (its binary from ``make kube``); ``ray-cluster.yaml`` runs as written
but for its image (built here) and its sizes (a head and one worker on a 2-core node). Kafka and
PostgreSQL run beside the cluster, on the node's address, and the Pods reach them through Services
without selectors (``OneNodeCluster.external``), as a cluster reaches a managed Kafka or database. The
node's 2 cores hold one Ray cluster at a time: ``ray-cluster.yaml``'s is deleted before the stream's.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from podpulse.simulator import FleetSpec
from storage.config import StorageConfig
from storage.reader import run_queries
from testbed.cluster import NODE_IP, POD_CIDR
from testbed.kafka import KafkaBroker
from testbed.postgres import PostgresCluster
from testbed.topics import produce_fleet

ROOT = Path(__file__).resolve().parents[2]
NS = "podpulse-dev"  # the stream's, as values-dev.yaml's instructions
KINDS = ("raw_events", "devices", "rollups", "offsets", "anomalies")
SIZES = {"requests": {"cpu": "500m", "memory": "2Gi"}, "limits": {"cpu": "1", "memory": "3Gi"}}  # 2 cores in all


@pytest.fixture(scope="module")
def servers(cluster):
    """Kafka and PostgreSQL on the node's address; in the cluster, Services named ``kafka`` and ``postgres``."""
    kafka = KafkaBroker(host=NODE_IP).start()
    postgres = PostgresCluster(listen=NODE_IP, clients=POD_CIDR).start()
    cluster.external("kafka", kafka.port)
    cluster.external("postgres", postgres.port)
    yield kafka, postgres
    postgres.remove()
    kafka.remove()


@pytest.fixture(scope="module")
def ray_cluster(cluster, core, kuberay, image):
    """ray-cluster.yaml's head and one worker, every container Ready."""
    from kubernetes import client  # heavy: as the conftest's

    custom = client.CustomObjectsApi(cluster.api_client())
    reference, figures = image
    core.create_namespaced_secret("default", {"metadata": {"name": "podpulse-pseudonym-key"},
                                              "stringData": {"key": secrets.token_hex(32)}})
    doc = yaml.safe_load((ROOT / "ray-cluster.yaml").read_text())
    spec = doc["spec"]
    for template in [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]:
        for container in template["spec"]["containers"]:
            container |= {"image": reference, "resources": SIZES}
    for group in spec["workerGroupSpecs"]:
        group |= {"replicas": 1, "minReplicas": 1, "maxReplicas": 1}
    spec["autoscalerOptions"]["resources"] = {"requests": {"cpu": "100m", "memory": "256Mi"},
                                              "limits": {"cpu": "500m", "memory": "512Mi"}}
    started = time.monotonic()
    custom.create_namespaced_custom_object("ray.io", "v1", "default", "rayclusters", doc)

    def ready():
        pods = core.list_namespaced_pod("default", label_selector="ray.io/cluster=podpulse").items
        return len(pods) == 2 and all(p.status.phase == "Running" and all(c.ready for c in p.status.container_statuses)
                                      for p in pods)
    cluster.wait("the head and the worker Ready", ready, timeout_s=600, every_s=2)
    print(f"image {figures}; head and worker Ready {time.monotonic() - started:.1f} s after the RayCluster was created")
    # KubeRay's head Service is headless (no ClusterIP): this machine reaches the head Pod on the bridge
    head = core.list_namespaced_pod("default", label_selector="ray.io/cluster=podpulse,ray.io/node-type=head"
                                    ).items[0].status.pod_ip
    token = next(base64.b64decode(s.data["auth_token"]).decode() for s in core.list_namespaced_secret("default").items
                 if s.data and "auth_token" in s.data)
    return f"http://{head}:8265", token


def ray_cli(address: str, token: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {
        "RAY_ADDRESS": address, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    return subprocess.run([str(Path(sys.executable).parent / "ray"), *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_ray_job_submit_stores_exactly_what_was_sent_with_its_actors_on_the_worker(cluster, servers, ray_cluster,
                                                                                   tmp_path):
    kafka, postgres = servers
    address, token = ray_cluster
    kafka.create_topic("telemetry", 4)
    sent = produce_fleet(kafka.bootstrap, "telemetry", FleetSpec(devices=300, hours=12, seed=5, fault_share=0.0))
    (tmp_path / "storage.yaml").write_text(yaml.safe_dump({"backends": {"pg": {
        "type": "postgresql", "url": f"postgresql://postgres@postgres:{postgres.port}/test"}}}))
    started = time.monotonic()
    job = ray_cli(address, token, "job", "submit", "--working-dir", str(tmp_path), "--",
                  "podpulse", "ingest", "--bootstrap", f"kafka:{kafka.port}", "--topic", "telemetry",
                  "--storage-config", "storage.yaml", "--until-caught-up", "--json")
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    summary = json.loads([line for line in job.stdout.splitlines() if line.startswith("{")][-1])
    print(f"ray job submit: {time.monotonic() - started:.1f} s; {summary['writer']}")
    host = StorageConfig(backends={"pg": {"type": "postgresql",
                                          "url": f"postgresql://postgres@127.0.0.1:{postgres.port}/test"}})
    rows, distinct = run_queries(host, {"n": "SELECT count(*), count(DISTINCT (device_id, seq)) FROM events"})["n"][0]
    assert rows == distinct == len(sent["valid"]) == summary["writer"]["applied"]
    nodes = json.loads(ray_cli(address, token, "list", "nodes", "--format", "json").stdout)
    head = next(n["node_id"] for n in nodes if n.get("is_head_node"))
    actors = json.loads(ray_cli(address, token, "list", "actors", "--format", "json", "--detail", "--limit",
                                "1000").stdout)
    placed = {a["class_name"]: a["node_id"] for a in actors if a["class_name"] in ("ShardConsumer", "Writer")}
    assert placed and all(node != head for node in placed.values()), placed


def test_a_worker_pod_deleted_in_the_middle_of_an_ingest_job_loses_and_duplicates_nothing(cluster, core, servers,
                                                                                          ray_cluster, tmp_path):
    """The worker Pod, with the consumers and the writer on it, is deleted at once (no grace) once the job
    has stored some events: KubeRay starts another, the supervisor (beside the driver, on the head) starts
    new actors on it, and they resume from the offsets stored with the data."""
    kafka, postgres = servers
    address, token = ray_cluster
    kafka.create_topic("telemetry-2", 4)
    sent = produce_fleet(kafka.bootstrap, "telemetry-2", FleetSpec(devices=600, hours=48, seed=6, fault_share=0.0))
    (tmp_path / "storage.yaml").write_text(yaml.safe_dump({"backends": {"pg": {
        "type": "postgresql", "url": f"postgresql://postgres@postgres:{postgres.port}/test2"}}}))
    postgres.psql("CREATE DATABASE test2")
    host = StorageConfig(backends={"pg": {"type": "postgresql",
                                          "url": f"postgresql://postgres@127.0.0.1:{postgres.port}/test2"}})
    # small batches, one in flight: slow enough to be caught in the middle
    job = ray_cli(address, token, "job", "submit", "--no-wait", "--submission-id", "ingest-worker-lost",
                  "--working-dir", str(tmp_path), "--", "podpulse", "ingest", "--bootstrap", f"kafka:{kafka.port}",
                  "--topic", "telemetry-2", "--storage-config", "storage.yaml", "--until-caught-up", "--json",
                  "--batch-size", "100", "--linger-ms", "0", "--max-in-flight", "1")
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]

    def stored() -> int:
        try:
            return run_queries(host, {"n": "SELECT count(*) FROM events"})["n"][0][0]
        except Exception:  # the job has not made its tables yet
            return 0
    at_kill = cluster.wait("the job storing events", lambda: n if (n := stored()) > 0 else None, timeout_s=300,
                           every_s=0.2)
    worker = core.list_namespaced_pod("default", label_selector="ray.io/cluster=podpulse,ray.io/node-type=worker"
                                      ).items[0].metadata.name
    core.delete_namespaced_pod(worker, "default", grace_period_seconds=0)
    killed = time.monotonic()

    def finished():  # the CLI says "Job '<id>' succeeded" (or failed, or was stopped)
        status = ray_cli(address, token, "job", "status", "ingest-worker-lost").stdout
        return next((s for s in ("succeeded", "failed", "stopped") if f"' {s}" in status or f"was {s}" in status), None)
    outcome = cluster.wait("the job finished", finished, timeout_s=600, every_s=3)
    logs = ray_cli(address, token, "job", "logs", "ingest-worker-lost").stdout
    assert outcome == "succeeded", logs[-4000:]
    summary = json.loads([line for line in logs.splitlines() if line.startswith("{")][-1])
    replaced = next(p for p in core.list_namespaced_pod("default", label_selector="ray.io/node-type=worker").items
                    if p.metadata.name != worker)
    print(f"worker deleted with {at_kill} of {len(sent['valid'])} events stored; the job succeeded "
          f"{time.monotonic() - killed:.1f} s later, on {replaced.metadata.name}; restarts {summary['restarts']}")
    rows, distinct = run_queries(host, {"n": "SELECT count(*), count(DISTINCT (device_id, seq)) FROM events"})["n"][0]
    assert rows == distinct == len(sent["valid"]), (rows, distinct, len(sent["valid"]))
    assert summary["restarts"] >= 1 and at_kill < len(sent["valid"])


@pytest.fixture(scope="module")
def operator(cluster, core, servers, ray_cluster, namespace, install):
    """``ray-cluster.yaml``'s Ray cluster deleted, then the chart's operator alone, with the Services and the
    pseudonym key Secret a stream names in its namespace."""
    from kubernetes import client  # heavy: as the conftest's

    kafka, postgres = servers
    client.CustomObjectsApi(cluster.api_client()).delete_namespaced_custom_object(
        "ray.io", "v1", "default", "rayclusters", "podpulse")
    cluster.wait("ray-cluster.yaml's Pods gone", lambda: not core.list_namespaced_pod(
        "default", label_selector="ray.io/cluster=podpulse").items, timeout_s=180, every_s=2)
    namespace(NS)
    cluster.external("kafka", kafka.port, namespace=NS)
    cluster.external("postgres", postgres.port, namespace=NS)
    core.create_namespaced_secret(NS, {"metadata": {"name": "podpulse-pseudonym-key"},
                                       "stringData": {"key": secrets.token_hex(32)}})
    install(NS, {"rayService": {"enabled": False},
                 "operator": {"resyncSeconds": 2},  # the status follows the RayJob by this timer
                 "storage": {"config": {"backends": {"core": {
        "type": "postgresql", "url": f"postgresql://postgres@postgres.{NS}.svc:{postgres.port}/test",
        "password_env": None}}}}})


def phases_of(cluster, name: str, seen: list, stop: threading.Event) -> None:
    """Each phase the stream's status takes, with the seconds since the watch began (a watch sees every
    change, where polling could miss a short one)."""
    from kubernetes import client, watch  # heavy: as the conftest's

    custom, started = client.CustomObjectsApi(cluster.api_client()), time.monotonic()
    while not stop.is_set():
        w = watch.Watch()
        for event in w.stream(custom.list_namespaced_custom_object, "podpulse.io", "v1alpha1", NS,
                              "airpodsdatastreams", field_selector=f"metadata.name={name}", timeout_seconds=5):
            phase = (event["object"].get("status") or {}).get("phase")
            if phase and (not seen or seen[-1][0] != phase):
                seen.append((phase, round(time.monotonic() - started, 1)))
            if stop.is_set():
                w.stop()


def test_a_stream_applied_with_kubectl_runs_under_the_operator_and_stores_each_event_once(
        cluster, core, servers, operator, shell, hardened, tmp_path):
    from kubernetes import client  # heavy: as the conftest's

    kafka, postgres = servers
    kafka.create_topic("telemetry-3", 4)
    sent = produce_fleet(kafka.bootstrap, "telemetry-3", FleetSpec(devices=300, hours=12, seed=7, fault_share=0.0))
    stream = {"apiVersion": "podpulse.io/v1alpha1", "kind": "AirPodsDataStream", "metadata": {"name": "fleet-au"},
              "spec": {"bootstrap": f"kafka.{NS}.svc:{kafka.port}", "topic": "telemetry-3", "partitions": 4,
                       "consumers": 1, "pseudonymKeySecret": "podpulse-pseudonym-key",
                       "storage": {"backends": {"pg": {"type": "postgresql",
                                                       "url": f"postgresql://postgres@postgres.{NS}.svc:"
                                                              f"{postgres.port}/stream"}},
                                   "routes": dict.fromkeys(KINDS, "pg")},
                       # one consumer and one writer: 0.75 of the one CPU Ray counts on a 500m worker
                       "head": {"cpu": "750m", "memory": "3Gi"}, "workers": {"cpu": "500m", "memory": "3Gi"}}}
    (tmp_path / "stream.yaml").write_text(yaml.safe_dump(stream))
    postgres.psql("CREATE DATABASE stream")
    host = StorageConfig(backends={"pg": {"type": "postgresql",
                                          "url": f"postgresql://postgres@127.0.0.1:{postgres.port}/stream"}})

    seen, stop = [], threading.Event()
    watcher = threading.Thread(target=phases_of, args=(cluster, "fleet-au", seen, stop), daemon=True)
    watcher.start()
    time.sleep(1)  # the watch is open before the stream exists
    applied = time.monotonic()
    done = subprocess.run(["kubectl", "--kubeconfig", str(cluster.kubeconfig), "apply", "-n", NS, "-f",
                           str(tmp_path / "stream.yaml")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

    def stored() -> int | None:
        n = run_queries(host, {"n": "SELECT count(*) FROM events"})["n"][0][0]
        return n if n >= len(sent["valid"]) else None
    try:
        cluster.wait("every event stored", stored, timeout_s=900, every_s=2)
        stored_s = time.monotonic() - applied
        cluster.wait("the stream Running", lambda: seen and seen[-1][0] == "Running", timeout_s=120)
    finally:
        stop.set()
        watcher.join(10)
        print(f"phases (seconds after the watch began): {seen}")
    print(f"{len(sent['valid'])} events stored {stored_s:.1f} s after kubectl apply")
    assert [phase for phase, _ in seen] == ["Pending", "Starting", "Running"], seen
    rows, distinct = run_queries(host, {"n": "SELECT count(*), count(DISTINCT (device_id, seq)) FROM events"})["n"][0]
    assert rows == distinct == len(sent["valid"]), (rows, distinct, len(sent["valid"]))

    # The operator made it all: the RayJob it owns, whose Ray Pods run as the operator's containers do.
    custom = client.CustomObjectsApi(cluster.api_client())
    status = custom.get_namespaced_custom_object("podpulse.io", "v1alpha1", NS, "airpodsdatastreams", "fleet-au")["status"]
    job = custom.get_namespaced_custom_object("ray.io", "v1", NS, "rayjobs", status["rayJob"])
    assert job["metadata"]["ownerReferences"][0]["name"] == "fleet-au"
    assert (job["status"]["jobDeploymentStatus"], job["status"]["jobStatus"]) == ("Running", "RUNNING")
    pods = core.list_namespaced_pod(NS, label_selector="podpulse.io/stream=fleet-au,ray.io/is-ray-node=yes").items
    assert sorted(p.metadata.labels["ray.io/node-type"] for p in pods) == ["head", "worker"]
    for pod in pods:
        hardened(pod.metadata.name, NS, pod.spec.containers[0].name)  # ray-head or ray-worker

    # Deleting the stream deletes what it owns (Kubernetes' garbage collector, by owner references).
    done = subprocess.run(["kubectl", "--kubeconfig", str(cluster.kubeconfig), "delete", "-n", NS, "-f",
                           str(tmp_path / "stream.yaml")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    deleted = time.monotonic()
    cluster.wait("the stream's RayJob and Pods gone", lambda: not custom.list_namespaced_custom_object(
        "ray.io", "v1", NS, "rayjobs")["items"] and not core.list_namespaced_pod(
        NS, label_selector="podpulse.io/stream=fleet-au").items, timeout_s=180, every_s=2)
    print(f"stream deleted: its RayJob and Pods gone {time.monotonic() - deleted:.1f} s later")
