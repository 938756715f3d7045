"""The kustomize tree: every built-in manifest, and every overlay as `kubectl kustomize` renders it."""

import pytest
import yaml

from crds import reconcile as rc

NAMESPACES = {"dev": "podpulse-dev", "prod": "podpulse"}
CLUSTER_SCOPED = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}
# Kinds kubernetes-validate has no schema for: the Prometheus Operator's, which the prod overlay
# includes from monitoring/ (tests/monitoring/ checks those manifests).
OTHER_GROUPS = {"monitoring.coreos.com"}


def test_every_base_manifest_validates(root, k8s_validate):
    files = sorted((root / "deploy" / "base").glob("*.yaml")) + sorted((root / "crds").glob("podpulse.io_*.yaml"))
    docs = [(f.name, d) for f in files if f.name != "kustomization.yaml"
            for d in yaml.safe_load_all(f.read_text()) if d]
    assert {d["kind"] for _, d in docs} >= {"Namespace", "ServiceAccount", "Role", "RoleBinding", "ClusterRole",
                                            "ClusterRoleBinding", "Deployment", "ConfigMap", "PersistentVolumeClaim",
                                            "CustomResourceDefinition", "NetworkPolicy", "CronJob"}
    for name, doc in docs:
        k8s_validate(doc)


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_rendered_overlay_validates(rendered, k8s_validate, pod_templates, validate_pod_template, overlay):
    docs = rendered[overlay]
    kinds = {}
    for doc in docs:
        kinds.setdefault(doc["kind"], []).append(doc["metadata"]["name"])
        group = doc["apiVersion"].rpartition("/")[0]
        if group == "ray.io":
            for _, template in pod_templates(doc):
                validate_pod_template(template)
        elif group not in OTHER_GROUPS:
            k8s_validate(doc)  # a built-in kind (an unknown one fails: no schema)
        if doc["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in doc["metadata"], doc["metadata"]
        else:
            assert doc["metadata"]["namespace"] == NAMESPACES[overlay], doc["metadata"]
    assert sorted(kinds["CustomResourceDefinition"]) == [
        "aimodeldeployers.podpulse.io", "airpodsdatastreams.podpulse.io", "oracledbschemamanagers.podpulse.io"]
    assert kinds["Namespace"] == [NAMESPACES[overlay]]
    assert kinds["RayService"] == ["podpulse"] and kinds["Deployment"] == ["podpulse-operator"]
    assert "RayCluster" not in kinds  # ray-cluster.yaml is applied on its own (see the base)


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_rendered_crds_are_the_files(root, rendered, overlay):
    for doc in rendered[overlay]:
        if doc["kind"] == "CustomResourceDefinition":
            plural = doc["spec"]["names"]["plural"]
            original = yaml.safe_load((root / "crds" / f"podpulse.io_{plural}.yaml").read_text())
            labels = doc["metadata"].pop("labels")
            assert labels == {"app.kubernetes.io/part-of": "podpulse"} and doc == original


def images(docs):
    for doc in docs:
        for container in _containers(doc):
            yield doc["kind"], container["image"]


def _containers(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "containers":
                yield from value
            else:
                yield from _containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from _containers(item)


@pytest.mark.parametrize("overlay, image", [("dev", "podpulse:2.60.0-py311-dev"),
                                            ("prod", "registry.example.com/podpulse/podpulse:2.60.0-py311-0.1.0")])
def test_overlay_sets_one_image_everywhere_and_the_operator_passes_it_on(rendered, overlay, image):
    assert set(images(rendered[overlay])) == {("Deployment", image), ("RayService", image), ("CronJob", image)}
    (operator,) = [d for d in rendered[overlay] if d["kind"] == "Deployment"]
    (container,) = operator["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PODPULSE_IMAGE"] == container["image"] == image
    assert image.rsplit(":", 1)[1].startswith(rc.RAY_VERSION)


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_the_operators_policy_admits_its_own_image_and_the_examples_only(rendered, example, overlay):
    (operator,) = [d for d in rendered[overlay] if d["kind"] == "Deployment"]
    env = {e["name"]: e["value"] for e in operator["spec"]["template"]["spec"]["containers"][0]["env"] if "value" in e}
    pol = rc.Policy.from_env(env, env["PODPULSE_IMAGE"])
    assert pol == rc.Policy(image=env["PODPULSE_IMAGE"])  # the documented defaults, written out
    stream = example("AirPodsDataStream", image=env["PODPULSE_IMAGE"])
    assert rc.stream_children(stream, pol) and rc.schema_children(example("OracleDBSchemaManager"), pol)
    with pytest.raises(rc.Refused):
        rc.stream_children(example("AirPodsDataStream", image="podpulse-evil:2.60.0"), pol)


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_operator_runs_kopf_as_its_service_account(rendered, overlay):
    by_kind = {}
    for doc in rendered[overlay]:
        by_kind.setdefault(doc["kind"], []).append(doc)
    (operator,) = by_kind["Deployment"]
    (account,) = by_kind["ServiceAccount"]
    pod = operator["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert operator["spec"]["replicas"] == 1 and operator["spec"]["strategy"]["type"] == "Recreate"
    command = pod["containers"][0]["command"]
    assert command[:3] == ["kopf", "run", "--standalone"] and command[-2:] == ["-m", "crds.operator"]
    assert "--namespace=$(POD_NAMESPACE)" in command
    for binding in by_kind["RoleBinding"] + by_kind["ClusterRoleBinding"]:
        (subject,) = binding["subjects"]
        assert (subject["kind"], subject["name"], subject["namespace"]) == \
            ("ServiceAccount", account["metadata"]["name"], NAMESPACES[overlay])


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_retention_runs_daily_on_the_mounted_storage_config(rendered, overlay, parse_cli):
    """The CronJob's command is a real `podpulse retention apply` reading the storage ConfigMap."""
    (job,) = [d for d in rendered[overlay] if d["kind"] == "CronJob"]
    spec = job["spec"]
    assert spec["concurrencyPolicy"] == "Forbid" and spec["timeZone"] == "Etc/UTC"
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    name, params = parse_cli(container["command"])
    assert name == "apply" and container["command"][:3] == ["podpulse", "retention", "apply"]
    assert str(params["storage_file"]) == "/etc/podpulse/storage/storage.yaml" and params["json_out"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "storage"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "storage"]
    assert mount["mountPath"] == "/etc/podpulse/storage" and volume["configMap"]["name"] == "podpulse-storage"
    (config,) = [d for d in rendered[overlay]
                 if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "podpulse-storage"]
    assert "storage.yaml" in config["data"]
    assert pod["securityContext"]["runAsNonRoot"] and container["securityContext"]["readOnlyRootFilesystem"]
    assert set(container["resources"]) == {"requests", "limits"}


def test_only_prod_brings_the_prometheus_operator_kinds(rendered):
    """Dev clusters often lack the Prometheus Operator's CRDs; prod is expected to have them."""
    def kinds(overlay):
        return {d["kind"] for d in rendered[overlay] if d["apiVersion"].startswith("monitoring.coreos.com/")}

    assert kinds("prod") == {"PodMonitor", "PrometheusRule"}
    assert kinds("dev") == set()
    dashboards = [d for d in rendered["prod"] if d["kind"] == "ConfigMap"
                  and d["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    assert len(dashboards) == 1
