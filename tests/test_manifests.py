"""Static checks of the Kubernetes manifests that need no cluster."""

from pathlib import Path

import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]


def containers(spec: dict):
    yield from spec["headGroupSpec"]["template"]["spec"]["containers"]
    for group in spec["workerGroupSpecs"]:
        yield from group["template"]["spec"]["containers"]


def test_ray_cluster_matches_the_pinned_ray_and_sets_resources():
    doc = yaml.safe_load((ROOT / "ray-cluster.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    spec = doc["spec"]
    assert spec["rayVersion"] == ray.__version__
    for c in containers(spec):
        assert c["image"].split(":")[1].startswith(spec["rayVersion"]), c["image"]
        assert set(c["resources"]) == {"requests", "limits"}, c["name"]
        assert "metrics" in {p["name"] for p in c["ports"]}, c["name"]
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_ray_cluster_pods_run_restricted():
    """Non-root, RuntimeDefault seccomp, no escalation or capabilities, a read-only root with /tmp an emptyDir."""
    spec = yaml.safe_load((ROOT / "ray-cluster.yaml").read_text())["spec"]
    for template in [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]:
        pod = template["spec"]
        assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 100,
                                          "seccompProfile": {"type": "RuntimeDefault"}}
        assert {"name": "tmp", "emptyDir": {}} in pod["volumes"]
    for c in containers(spec):
        assert c["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                        "capabilities": {"drop": ["ALL"]}}, c["name"]
        assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"], c["name"]


def test_the_image_copies_every_package_the_build_installs():
    """The Dockerfile's COPY lines, pyproject's package list and the packages in the repository agree."""
    import re
    import tomllib

    copied = set(re.findall(r"^COPY --chown=\S+ (\w+) \./\1$", (ROOT / "Dockerfile").read_text(), re.M))
    listed = {p.rstrip("*") for p in tomllib.loads((ROOT / "pyproject.toml").read_text())
              ["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert copied == listed == {p.parent.name for p in ROOT.glob("*/__init__.py")}


def test_the_image_builds_on_a_base_of_the_pinned_ray_that_a_build_argument_replaces():
    import re

    text = (ROOT / "Dockerfile").read_text()
    assert re.findall(r"^ARG BASE=rayproject/ray:(\S+)-py311$", text, re.M) == [ray.__version__]
    assert re.findall(r"^FROM (.+)$", text, re.M) == ["${BASE}"]


def test_the_node_runs_the_kubernetes_release_of_the_control_plane():
    """tools/node (kubelet, kube-scheduler, kube-proxy) and tools/go.mod (kube-apiserver, the controllers)
    pin the same k8s.io/kubernetes, and the same release of each staging module."""
    import re

    def pins(path):
        text = (ROOT / path).read_text()
        replaces = re.search(r"^replace \((.*?)^\)", text, re.S | re.M).group(1)
        return re.search(r"k8s\.io/kubernetes (v\S+)", text).group(1), sorted(replaces.split())

    assert pins("tools/node/go.mod") == pins("tools/go.mod")
