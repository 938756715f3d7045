"""PodPulse's image, built here (``testbed.images.podpulse``), runs in a Pod as the manifests run it: not
root, its root filesystem read-only, /tmp an emptyDir."""

from __future__ import annotations

import time

import pytest

from testbed.images import podpulse

HARDENED = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}


@pytest.fixture(scope="module")
def image(cluster):
    ref, figures = podpulse(cluster.registry)
    print(f"PodPulse image {ref}: {figures}")
    return ref


def test_the_image_runs_podpulse_as_ray_with_a_read_only_root(cluster, core, image, shell, hardened):
    core.create_namespaced_pod("default", {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "podpulse"},
        "spec": {"terminationGracePeriodSeconds": 1,
                 "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
                 "containers": [{"name": "podpulse", "image": image, "command": ["sleep", "infinity"],
                                 "securityContext": HARDENED, "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                                 "resources": {"requests": {"cpu": "100m", "memory": "256Mi"},
                                               "limits": {"memory": "1Gi"}}}],
                 "volumes": [{"name": "tmp", "emptyDir": {}}]}})
    started = time.monotonic()
    cluster.wait("the PodPulse Pod Running", lambda: core.read_namespaced_pod("podpulse", "default").status.phase
                 == "Running", timeout_s=600)
    print(f"Pod Running {time.monotonic() - started:.1f} s after it was created (the image pulled and unpacked)")
    hardened("podpulse")
    assert "rc=0" in shell("podpulse", "touch /tmp/written; echo rc=$?")  # the emptyDir
    assert "Usage: podpulse" in shell("podpulse", "podpulse --help")
    versions = shell("podpulse", "bash -lc 'python -c \"import ray, crds.operator, deployments.app; "
                                     "print(ray.__version__)\"' 2>&1 | tail -1")
    assert versions.strip() == "2.60.0", versions
