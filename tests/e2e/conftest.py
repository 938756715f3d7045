"""The one-node cluster of the end-to-end tests (``testbed.cluster``), started once per module.

Run by ``make e2e`` (``pytest -m e2e tests/e2e``), never by ``make test``. As root: the node
configures this machine's network, and takes it all down again after.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import yaml

from testbed.cluster import OneNodeCluster, kuberay_manifests
from testbed.images import kuberay_operator, podpulse
from testbed.kube import tools_bin
from testbed.kuberay import kuberay_crd_files
from testbed.process import checkout

CHART = checkout() / "charts" / "podpulse"


@pytest.fixture(scope="module")
def cluster():
    """A one-node cluster, its node Ready and its DNS serving; removed after the module."""
    with OneNodeCluster() as c:
        yield c


@pytest.fixture(scope="module")
def core(cluster):
    from kubernetes import client  # heavy: only the end-to-end tests talk to the cluster

    return client.CoreV1Api(cluster.api_client())


@pytest.fixture(scope="module")
def shell(core):
    """``shell(pod, script, namespace="default", container=None)``: a shell script in the Pod's container,
    its only one unless named (``kubectl exec``); its output."""
    from kubernetes.stream import stream  # heavy: as above

    def run(pod: str, script: str, namespace: str = "default", container: str | None = None) -> str:
        named = {"container": container} if container else {}
        return stream(core.connect_get_namespaced_pod_exec, pod, namespace, command=["/bin/sh", "-c", script],
                      stderr=True, stdout=True, stdin=False, tty=False, **named)
    return run


@pytest.fixture(scope="module")
def hardened(shell):
    """``hardened(pod, namespace="default", container=None)`` checks a PodPulse container as it runs: uid
    1000, no capabilities, no new privileges (``/proc/1/status``), and a root filesystem that refuses a write."""
    def check(pod: str, namespace: str = "default", container: str | None = None) -> None:
        status = shell(pod, "grep -E '^(Uid|Gid|NoNewPrivs|CapEff):' /proc/1/status", namespace, container)
        assert "Uid:\t1000\t1000\t1000\t1000" in status and "NoNewPrivs:\t1" in status, status
        assert "CapEff:\t0000000000000000" in status, status
        refused = shell(pod, "touch /opt/podpulse/written 2>&1; echo rc=$?", namespace, container)
        assert "Read-only file system" in refused and "rc=1" in refused, refused
    return check


@pytest.fixture(scope="module")
def namespace(core):
    """``namespace(name)`` creates it labelled as deploy/base/namespace.yaml labels PodPulse's: the API
    server refuses any Pod there that is not Pod Security "restricted"."""
    labels = yaml.safe_load((checkout() / "deploy" / "base" / "namespace.yaml").read_text())["metadata"]["labels"]

    def make(name: str) -> None:
        core.create_namespace({"metadata": {"name": name, "labels": labels}})
    return make


@pytest.fixture(scope="module")
def helm(cluster):
    """``helm(*args)``: Helm as the cluster's admin."""
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(tools_bin("helm")), "--kubeconfig", str(cluster.kubeconfig), *args],
                              capture_output=True, text=True, timeout=900)
    return run


@pytest.fixture(scope="module")
def kuberay(cluster):
    """KubeRay's CRDs and operator (its binary from ``make kube``, in an image built here), Ready.
    Applied from ``testbed.cluster.kuberay_manifests``: KubeRay's Helm chart is not in its Go module."""
    from kubernetes import client  # heavy: as above

    started = time.monotonic()
    cluster.apply([yaml.safe_load(f.read_text()) for f in kuberay_crd_files()])
    cluster.apply(kuberay_manifests(kuberay_operator(cluster.registry)))
    apps = client.AppsV1Api(cluster.api_client())
    cluster.wait("KubeRay's operator Ready", lambda: (apps.read_namespaced_deployment(
        "kuberay-operator", "kuberay-system").status.ready_replicas or 0) >= 1, 180)
    print(f"KubeRay's operator Ready in {time.monotonic() - started:.1f} s")


@pytest.fixture(scope="module")
def image(cluster):
    """PodPulse's image, built here (``testbed.images.podpulse``) and pushed to the node's registry:
    its reference and the build's figures."""
    return podpulse(cluster.registry)


@pytest.fixture(scope="module")
def install(cluster, kuberay, image, helm, tmp_path_factory):
    """``install(namespace, values)``: `helm install` of charts/podpulse in ``namespace`` (which must exist), as a user
    installs it with values-dev.yaml, plus the image built here and ``values`` on top; a hostPath
    volume for the model registry's claim. Returns when every Pod is Ready (``--wait``): the seconds taken
    and the models folder."""
    def run(namespace: str, values: dict) -> tuple[float, Path]:
        repository, tag = image[0].rsplit(":", 1)
        models = tmp_path_factory.mktemp("models")
        models.chmod(0o755)  # pytest makes it 0700: the Pods' user 1000 could not open it (the replicas said so)
        cluster.apply([{"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "podpulse-models"},
                        "spec": {"capacity": {"storage": "2Gi"}, "accessModes": ["ReadWriteOnce"],
                                 "hostPath": {"path": str(models), "type": "Directory"}}}])
        file = tmp_path_factory.mktemp("values") / "cluster.yaml"
        file.write_text(yaml.safe_dump({**values, "image": {"repository": repository, "tag": tag}}))
        started = time.monotonic()
        done = helm("install", "podpulse", str(CHART), "-n", namespace, "-f", str(CHART / "values-dev.yaml"),
                    "-f", str(file), "--wait", "--timeout", "10m")
        assert done.returncode == 0, done.stderr[-3000:]
        print(f"image {image[0]} {image[1]}; helm install --wait: {time.monotonic() - started:.1f} s")
        return started, models
    return run
