"""The one-node cluster of the end-to-end tests (``testbed.cluster``), started once per module.

Run by ``make e2e`` (``pytest -m e2e tests/e2e``), never by ``make test``. As root: the node
configures this machine's network, and takes it all down again after.
"""

from __future__ import annotations

import pytest

from testbed.cluster import OneNodeCluster


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
    """``shell(pod, script, namespace="default")``: a shell script in the Pod's first container (``kubectl
    exec``); its output."""
    from kubernetes.stream import stream  # heavy: as above

    def run(pod: str, script: str, namespace: str = "default") -> str:
        return stream(core.connect_get_namespaced_pod_exec, pod, namespace, command=["/bin/sh", "-c", script],
                      stderr=True, stdout=True, stdin=False, tty=False)
    return run


@pytest.fixture(scope="module")
def hardened(shell):
    """``hardened(pod, namespace="default")`` checks a PodPulse container as it runs: uid 1000, no
    capabilities, no new privileges (``/proc/1/status``), and a root filesystem that refuses a write."""
    def check(pod: str, namespace: str = "default") -> None:
        status = shell(pod, "grep -E '^(Uid|Gid|NoNewPrivs|CapEff):' /proc/1/status", namespace)
        assert "Uid:\t1000\t1000\t1000\t1000" in status and "NoNewPrivs:\t1" in status, status
        assert "CapEff:\t0000000000000000" in status, status
        refused = shell(pod, "touch /opt/podpulse/written 2>&1; echo rc=$?", namespace)
        assert "Read-only file system" in refused and "rc=1" in refused, refused
    return check
