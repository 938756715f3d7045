"""`helm install` of charts/podpulse with its dev values, as a user installs it: the PodPulse operator runs
as a Pod (not root, read-only root), and the RayService serves the API and the console through its serve
Service, reached from this machine, with the token of the Secret the chart made.

KubeRay's operator is installed first (the ``kuberay`` fixture). PostgreSQL runs beside the
cluster (a Service without a selector, ``postgres``), holding a simulated fleet written from this machine.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml

from storage.config import StorageConfig
from testbed.api import ROW
from testbed.cluster import NODE_IP, POD_CIDR
from testbed.images import retag
from testbed.postgres import PostgresCluster
from testbed.stores import build_store

NS = "podpulse-dev"  # as values-dev.yaml's instructions
CHROMIUM = "/usr/bin/chromium"
# requests small enough for a second Ray cluster beside the first while an upgrade runs (2 cores in all)
SMALL = {"requests": {"cpu": "250m", "memory": "2Gi"}, "limits": {"cpu": "1", "memory": "3Gi"}}


@pytest.fixture(scope="module")
def postgres(cluster):
    server = PostgresCluster(listen=NODE_IP, clients=POD_CIDR).start()
    routing = {"backends": {"core": {"type": "postgresql", "url": f"postgresql://postgres@127.0.0.1:{server.port}/test"}}}
    build_store(StorageConfig(**routing), devices=200, days=7)
    yield server, routing
    server.remove()


@pytest.fixture(scope="module")
def release(cluster, core, postgres, namespace, install):
    """The chart with what this cluster needs on top: PostgreSQL's Service, an API token, smaller Pods."""
    server, _ = postgres
    namespace(NS)
    cluster.external("postgres", server.port, namespace=NS)
    token = secrets.token_urlsafe(32)
    started, models = install(NS, {
        "storage": {"config": {"backends": {"core": {
            "type": "postgresql", "url": f"postgresql://postgres@postgres.{NS}.svc:{server.port}/test",
            "password_env": None}}}},  # null removes the chart's default: trust from the Pods' range
        "tokens": {"api": {"value": token}},
        "rayService": {"head": {"resources": SMALL}, "workers": {"resources": SMALL},
                       "autoscaler": {"resources": {"requests": {"cpu": "100m", "memory": "256Mi"},
                                                    "limits": {"cpu": "500m", "memory": "512Mi"}}}}})
    return token, started, models


def test_the_operator_runs_as_a_pod_not_root_with_a_read_only_root(cluster, core, release, shell, hardened):
    from kubernetes import client

    apps = client.AppsV1Api(cluster.api_client())
    assert apps.read_namespaced_deployment("podpulse-operator", NS).status.ready_replicas == 1
    pod = core.list_namespaced_pod(NS, label_selector="app.kubernetes.io/component=operator").items[0].metadata.name
    hardened(pod, NS)
    assert "kopf" in shell(pod, "cat /proc/1/cmdline | tr '\\0' ' '", NS)


@pytest.fixture(scope="module")
def served(cluster, core, release):
    """The serve Service's address once /healthz answers through it."""
    token, installed, _ = release

    def address():
        try:
            ip = core.read_namespaced_service("podpulse-serve-svc", NS).spec.cluster_ip
            return f"http://{ip}:8000" if requests.get(f"http://{ip}:8000/healthz", timeout=5).ok else None
        except Exception:  # no Service yet (KubeRay makes it once the application runs), or not answering
            return None
    url = cluster.wait("the RayService answering /healthz through its serve Service", address, timeout_s=900,
                       every_s=3)
    print(f"RayService serving {time.monotonic() - installed:.1f} s after helm install began")
    return url, token


def test_the_rayservice_serves_healthz_and_analytics_with_the_secrets_token(served, postgres):
    url, token = served
    assert requests.get(f"{url}/healthz", timeout=30).status_code == 200
    assert requests.get(f"{url}/v1/analytics/state_overview", timeout=60).status_code == 401  # no token
    answer = requests.get(f"{url}/v1/analytics/state_overview", headers={"Authorization": f"Bearer {token}"},
                          timeout=120)
    assert answer.status_code == 200, answer.text[:2000]
    result = answer.json()
    devices = [row[result["columns"].index("devices")] for row in result["rows"]]
    assert devices and sum(devices) > 0, result


def test_the_console_loads_through_the_serve_service_with_no_error(served):
    from playwright.sync_api import sync_playwright

    url, token = served
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])  # root: no sandbox
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: m.type == "error" and errors.append(m.text))
            page.set_default_timeout(120_000)
            page.goto(f"{url}/")
            page.fill("#token", token)
            page.click("#sign-in button[type=submit]")
            page.wait_for_selector("body[data-loaded='overview']")
            failed = page.locator("section.side .error").all_inner_texts()
            shown = page.eval_on_selector_all("table[data-query='state_overview'] tbody tr", "rows => rows.length")
        finally:
            browser.close()
    assert not failed and not errors, (failed, errors)
    assert shown > 0


class Load:
    """GET ``url`` at ``rate`` requests a second from a pool of threads, each request's start, latency
    and outcome kept (a failure: an exception, or a status that is not 200)."""

    def __init__(self, url: str, headers: dict, rate: float = 50.0):
        self.url, self.headers, self.period = url, headers, 1.0 / rate
        self.done: list[tuple[float, float, bool]] = []
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=32)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _one(self, at: float) -> None:
        try:
            ok = requests.get(self.url, headers=self.headers, timeout=10).status_code == 200
        except requests.RequestException:
            ok = False
        self.done.append((at, time.monotonic() - at, ok))

    def _run(self) -> None:
        due = time.monotonic()
        while not self._stop.is_set():
            self._pool.submit(self._one, due)
            due += self.period
            self._stop.wait(max(0.0, due - time.monotonic()))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._pool.shutdown(wait=True)

    def between(self, start: float, stop: float) -> dict:
        """Requests sent in [start, stop): how many, how many failed, p50 and p99 latency in ms."""
        sent = [(latency, ok) for at, latency, ok in self.done if start <= at < stop]
        ms = sorted(latency * 1000 for latency, _ in sent) or [float("nan")]
        return {"sent": len(sent), "failed": sum(not ok for _, ok in sent),
                "p50_ms": round(ms[len(ms) // 2], 1), "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 1)}


def rayservice(cluster) -> tuple:
    from kubernetes import client

    custom = client.CustomObjectsApi(cluster.api_client())
    return custom, custom.get_namespaced_custom_object("ray.io", "v1", NS, "rayservices", "podpulse")


def upgraded(cluster, core, served, change, done, what: str, timeout_s: float = 900) -> dict:
    """Change the RayService (``change(custom, obj)``) under 50 requests/s; wait for ``done()``; the
    requests before, during and 10 s after."""
    url, token = served
    with Load(f"{url}/v1/analytics/state_overview", {"Authorization": f"Bearer {token}"}) as load:
        time.sleep(10)
        began = time.monotonic()
        change(*rayservice(cluster))
        cluster.wait(what, done, timeout_s=timeout_s, every_s=2)
        ended = time.monotonic()
        time.sleep(10)
    phases = {"before": load.between(0, began), "during": load.between(began, ended),
              "after": load.between(ended, time.monotonic() + 1)}
    print(f"{what}: {ended - began:.1f} s; {phases}")
    return phases


def test_a_serve_config_change_under_50_requests_a_second_fails_none(cluster, core, served):
    """user_config changes as an AIModelDeployer changes it: replicas reconfigure in place."""
    url, _ = served

    def change(custom, obj):
        config = yaml.safe_load(obj["spec"]["serveConfigV2"])
        config["applications"][0]["deployments"][0]["user_config"]["docs"] = True
        obj["spec"]["serveConfigV2"] = yaml.safe_dump(config)
        custom.replace_namespaced_custom_object("ray.io", "v1", NS, "rayservices", "podpulse", obj)
    assert requests.get(f"{url}/docs", timeout=30).status_code != 200
    phases = upgraded(cluster, core, served, change, lambda: requests.get(f"{url}/docs", timeout=5).status_code == 200,
                      "the serve config applied (/docs served)")
    assert all(p["failed"] == 0 and p["sent"] > 0 for p in phases.values()), phases


def test_an_image_change_under_50_requests_a_second_fails_none(cluster, core, served):
    """A new image tag: KubeRay starts a second Ray cluster, moves the serve Service to it once its
    application runs, and deletes the first."""
    _, obj = rayservice(cluster)
    first = obj["status"]["activeServiceStatus"]["rayClusterName"]
    image = obj["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    retagged = retag(image, image.rsplit(":", 1)[1] + "-next")  # the same image, as a release would push it

    def change(custom, obj):
        spec = obj["spec"]["rayClusterConfig"]
        for template in [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]:
            template["spec"]["containers"][0]["image"] = retagged
        custom.replace_namespaced_custom_object("ray.io", "v1", NS, "rayservices", "podpulse", obj)

    def moved():
        status = rayservice(cluster)[1].get("status", {})
        clusters = core.list_namespaced_pod(NS, label_selector="ray.io/node-type=head").items
        return (status.get("activeServiceStatus", {}).get("rayClusterName") not in (None, first)
                and not status.get("pendingServiceStatus", {}).get("rayClusterName")
                and all(first not in p.metadata.name for p in clusters))
    phases = upgraded(cluster, core, served, change, moved, "the RayService moved to a cluster of the new image")
    assert all(p["failed"] == 0 and p["sent"] > 0 for p in phases.values()), phases


def train(routing: dict, registry, tmp_path) -> str:
    """``podpulse train`` on this machine into the registry the Pods mount (a hostPath); the version."""
    (tmp_path / "storage.yaml").write_text(yaml.safe_dump(routing))
    done = subprocess.run([str(Path(sys.executable).parent / "podpulse"), "train", "--model", "battery-anomaly",
                           "--storage-config", str(tmp_path / "storage.yaml"), "--registry", str(registry),
                           "--epochs", "1", "--json"], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["version"]


def test_a_model_deployer_at_10_percent_sends_a_tenth_of_scoring_to_the_canary_and_100_promotes_it(
        cluster, core, served, release, postgres, tmp_path):
    """The PodPulse operator (a Pod) patches the RayService as an AIModelDeployer says: the first version
    promoted, then a second at 10% answers its binomial share of 1,000 requests, then promoted."""
    from kubernetes.client.exceptions import ApiException

    url, token = served
    _, _, registry = release
    _, routing = postgres
    first, second = train(routing, registry, tmp_path), train(routing, registry, tmp_path)
    custom, _ = rayservice(cluster)
    auth = {"Authorization": f"Bearer {token}"}

    def versions(n: int) -> list[str]:
        with ThreadPoolExecutor(max_workers=8) as pool:
            return list(pool.map(lambda _: requests.post(f"{url}/v1/battery/score", json={"rows": [ROW]}, headers=auth,
                                                         timeout=60).json()["version"], range(n)))

    def deploy(version: str, percent: int) -> None:
        body = {"apiVersion": "podpulse.io/v1alpha1", "kind": "AIModelDeployer",
                "metadata": {"name": "battery-anomaly"},
                "spec": {"model": "battery-anomaly", "version": version, "canaryPercent": percent,
                         "rayService": {"name": "podpulse"}}}
        try:
            old = custom.get_namespaced_custom_object("podpulse.io", "v1alpha1", NS, "aimodeldeployers",
                                                      "battery-anomaly")
            custom.patch_namespaced_custom_object("podpulse.io", "v1alpha1", NS, "aimodeldeployers",
                                                  "battery-anomaly", {"spec": body["spec"]} | {
                                                      "metadata": {"resourceVersion": old["metadata"]["resourceVersion"]}})
        except ApiException as e:
            if e.status != 404:
                raise
            custom.create_namespaced_custom_object("podpulse.io", "v1alpha1", NS, "aimodeldeployers", body)

    deploy(first, 100)
    cluster.wait(f"{first} promoted", lambda: set(versions(10)) == {first}, timeout_s=300, every_s=2)
    deploy(second, 10)
    cluster.wait(f"{second} answering as the canary", lambda: second in versions(40), timeout_s=300, every_s=2)
    answered = versions(1000)
    share = answered.count(second)
    print(f"canary at 10%: {share} of 1000 scoring requests answered by {second}, the rest by {first}")
    assert set(answered) == {first, second}
    assert 53 <= share <= 147, share  # 100 ± 5 standard deviations (√(1000 · 0.1 · 0.9) = 9.5)
    deploy(second, 100)
    cluster.wait(f"{second} promoted", lambda: set(versions(20)) == {second}, timeout_s=300, every_s=2)
    status = custom.get_namespaced_custom_object("podpulse.io", "v1alpha1", NS, "aimodeldeployers", "battery-anomaly")
    assert status["status"]["stableVersion"] == second and not status["status"].get("canaryVersion"), status["status"]


def test_the_rayservice_head_pod_deleted_comes_back_by_itself(cluster, core, served):
    """No GCS fault tolerance is configured (it needs an external Redis): losing the head loses the Ray
    cluster's state. Measured: how long the API answered errors, and that it answers again unaided."""
    url, token = served
    head = core.list_namespaced_pod(NS, label_selector="ray.io/node-type=head").items[0].metadata.name
    with Load(f"{url}/v1/analytics/state_overview", {"Authorization": f"Bearer {token}"}, rate=10) as load:
        time.sleep(5)
        deleted = time.monotonic()
        core.delete_namespaced_pod(head, NS, grace_period_seconds=0)

        def answering_again():
            recent = [ok for at, _, ok in load.done if at > time.monotonic() - 15]
            return len(recent) > 50 and all(recent) and time.monotonic() - deleted > 20
        cluster.wait("the API answering again", answering_again, timeout_s=900, every_s=2)
    failed = [at - deleted for at, _, ok in load.done if not ok]
    window = (max(failed) - min(failed)) if failed else 0.0
    print(f"head Pod deleted: {len(failed)} failed requests of {len(load.done)}, errors for {window:.1f} s, "
          f"from {min(failed, default=0):.1f} s to {max(failed, default=0):.1f} s after the delete")
    assert all(ok for at, _, ok in load.done if at < deleted)
