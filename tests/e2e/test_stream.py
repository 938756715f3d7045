"""An ``AirPodsDataStream`` applied with kubectl: the PodPulse operator, a Pod installed by `helm install`
(without the RayService, to leave the node's 2 cores to the stream), makes the RayJob; KubeRay runs
`podpulse ingest` on a Ray cluster of the stream's own; the stream goes Pending → Starting → Running and
stores each event exactly once. Deleting the stream takes its RayJob and Pods with it.

Kafka and PostgreSQL run beside the cluster, on the node's address, behind Services without selectors
in the release's namespace (the operator's policy admits only hosts ending in ``.svc``).
"""

from __future__ import annotations

import secrets
import subprocess
import threading
import time

import pytest
import yaml

from podpulse.simulator import FleetSpec
from storage.config import StorageConfig
from storage.reader import run_queries
from testbed.cluster import NODE_IP, POD_CIDR
from testbed.kafka import KafkaBroker
from testbed.postgres import PostgresCluster
from testbed.topics import produce_fleet

NS = "podpulse-dev"
KINDS = ("raw_events", "devices", "rollups", "offsets", "anomalies")


@pytest.fixture(scope="module")
def servers(cluster, core):
    """Kafka and PostgreSQL on the node's address; ``kafka.podpulse-dev.svc`` and ``postgres.podpulse-dev.svc``."""
    kafka = KafkaBroker(host=NODE_IP).start()
    postgres = PostgresCluster(listen=NODE_IP, clients=POD_CIDR).start()
    core.create_namespace({"metadata": {"name": NS}})
    cluster.external("kafka", kafka.port, namespace=NS)
    cluster.external("postgres", postgres.port, namespace=NS)
    yield kafka, postgres
    postgres.remove()
    kafka.remove()


@pytest.fixture(scope="module")
def operator(core, servers, install):
    """The chart's operator alone, with the pseudonym key Secret a stream names."""
    _, postgres = servers
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
    kafka.create_topic("telemetry", 4)
    sent = produce_fleet(kafka.bootstrap, "telemetry", FleetSpec(devices=300, hours=12, seed=7, fault_share=0.0))
    stream = {"apiVersion": "podpulse.io/v1alpha1", "kind": "AirPodsDataStream", "metadata": {"name": "fleet-au"},
              "spec": {"bootstrap": f"kafka.{NS}.svc:{kafka.port}", "topic": "telemetry", "partitions": 4,
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
