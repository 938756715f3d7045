"""The Helm chart (charts/podpulse): `helm lint`, `helm template` equal in substance to the kustomize
overlays (defaults = prod, values-dev.yaml = dev), its CRDs the files of crds/, and what it renders
accepted by the session's API server (server-side apply, dry run). Helm is built from its Go module
by `make kube` (tools/helm)."""

import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]

CHART = ROOT / "charts" / "podpulse"
OVERLAYS = {"prod": ("podpulse", []), "dev": ("podpulse-dev", ["-f", str(CHART / "values-dev.yaml")])}
# Labels only Helm adds (its release bookkeeping) and the one the kustomize base adds to what it owns.
BOOKKEEPING = {"app.kubernetes.io/managed-by", "app.kubernetes.io/instance", "helm.sh/chart",
               "app.kubernetes.io/part-of"}
NO_CRD_HERE = {"monitoring.coreos.com"}  # the Prometheus Operator's kinds: no CRDs on the test API server


@pytest.fixture(scope="session")
def helm():
    from testbed.kube import tools_bin

    binary = str(tools_bin("helm"))

    def run(*args: str) -> subprocess.CompletedProcess:
        out = subprocess.run([binary, *args], capture_output=True, text=True, timeout=120,
                             env={"HOME": "/nonexistent", "PATH": "/usr/bin:/bin",  # no user config, no repos
                                  "HELM_CACHE_HOME": "/tmp/podpulse-helm/cache",
                                  "HELM_CONFIG_HOME": "/tmp/podpulse-helm/config",
                                  "HELM_DATA_HOME": "/tmp/podpulse-helm/data"})
        assert out.returncode == 0, (args, out.stdout, out.stderr)
        return out
    return run


@pytest.fixture(scope="session")
def charted(helm) -> dict[str, list[dict]]:
    """`helm template` of the chart as each overlay's equivalent, CRDs included, the Namespace too."""
    out = {}
    for overlay, (namespace, values) in OVERLAYS.items():
        run = helm("template", "podpulse", str(CHART), "--namespace", namespace, "--include-crds",
                   "--set", "namespace.create=true", *values)
        out[overlay] = [d for d in yaml.safe_load_all(run.stdout) if d]
    return out


def substance(doc: dict) -> dict:
    """A rendered object less what only says who rendered it; embedded YAML and JSON parsed."""
    doc = yaml.safe_load(yaml.safe_dump(doc))  # a copy
    labels = doc["metadata"].pop("labels", {})
    labels = {k: v for k, v in labels.items() if k not in BOOKKEEPING}
    if labels:
        doc["metadata"]["labels"] = labels
    if doc["kind"] == "ConfigMap":
        doc["data"] = {k: (yaml.safe_load(v)) for k, v in doc["data"].items()}  # JSON is YAML
    if doc["kind"] == "RayService":
        doc["spec"]["serveConfigV2"] = yaml.safe_load(doc["spec"]["serveConfigV2"])
    return doc


def by_name(docs):
    return {(d["kind"], d["metadata"]["name"]): substance(d) for d in docs}


def test_helm_lints_the_chart_with_each_values_file(helm):
    for values in ([], ["-f", str(CHART / "values-dev.yaml")]):
        run = helm("lint", "--strict", str(CHART), *values)
        assert "1 chart(s) linted, 0 chart(s) failed" in run.stdout, run.stdout


@pytest.mark.parametrize("overlay", ["prod", "dev"])
def test_the_chart_renders_what_the_overlay_renders(charted, rendered, overlay):
    ours, theirs = by_name(charted[overlay]), by_name(rendered[overlay])
    assert set(ours) == set(theirs), (set(ours) - set(theirs), set(theirs) - set(ours))
    for key in sorted(theirs):
        assert ours[key] == theirs[key], key


def test_a_difference_would_be_caught(charted, rendered):
    """Not vacuous: one changed image, rule or port and the objects differ."""
    ours = by_name(charted["prod"])
    (operator,) = [d for k, d in ours.items() if k == ("Deployment", "podpulse-operator")]
    operator["spec"]["template"]["spec"]["containers"][0]["image"] += "-other"
    assert operator != by_name(rendered["prod"])[("Deployment", "podpulse-operator")]


def test_the_charts_crds_are_the_files_of_crds(charted):
    """crds/ of the chart: Helm installs them as they are (never templated, never upgraded or deleted)."""
    for path in sorted((CHART / "crds").iterdir()):
        assert path.read_bytes() == (ROOT / "crds" / path.name).read_bytes(), path.name
    crds = [d for d in charted["prod"] if d["kind"] == "CustomResourceDefinition"]
    assert sorted(yaml.safe_dump(d) for d in crds) == sorted(
        yaml.safe_dump(yaml.safe_load(p.read_text())) for p in (ROOT / "crds").glob("podpulse.io_*.yaml"))


def test_the_api_token_secret_only_when_a_value_is_given(helm):
    def secrets(*args):
        run = helm("template", "podpulse", str(CHART), "-n", "podpulse", *args)
        return [d for d in yaml.safe_load_all(run.stdout) if d and d["kind"] == "Secret"]

    assert secrets() == []
    (secret,) = secrets("--set", "tokens.api.value=s3cret")
    assert (secret["metadata"]["name"], list(secret["data"])) == ("podpulse-api", ["token"])


def test_the_rendered_chart_is_accepted_by_the_api_server(kube, kube_api, kuberay_crds, helm):
    """Server-side apply, dry run, of everything the chart renders into a namespace of its own:
    schemas, CEL rules and admission of the API server (KubeRay's CRDs for the RayService)."""
    from kubernetes import client

    namespace = "podpulse-chart"
    client.CoreV1Api(kube_api).create_namespace({"metadata": {"name": namespace}})
    run = helm("template", "podpulse", str(CHART), "-n", namespace, "--include-crds")
    docs = [d for d in yaml.safe_load_all(run.stdout) if d]
    applied = [d for d in docs if d["apiVersion"].split("/")[0] not in NO_CRD_HERE]
    assert {d["kind"] for d in docs} - {d["kind"] for d in applied} == {"PodMonitor", "PrometheusRule"}
    out = subprocess.run(["kubectl", "--kubeconfig", str(kube.kubeconfig), "apply", "--server-side",
                          "--dry-run=server", "--field-manager=podpulse-chart-test", "-f", "-"],
                         input=yaml.safe_dump_all(applied), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    assert len(lines) == len(applied) and all(line.endswith("(server dry run)") for line in lines), out.stdout


def test_helm_installs_upgrades_and_uninstalls_the_release(kube, kube_api, kuberay_crds, helm):
    """`helm install` for real against the session's API server (monitoring off: no Prometheus
    Operator CRDs here), an upgrade that changes a value, and an uninstall that removes what the
    release made. No kubelet: the operator's and Ray's pods stay unscheduled; this is Helm's side."""
    from kubernetes import client

    namespace, config = "podpulse-helm", ["--kubeconfig", str(kube.kubeconfig)]
    helm("install", "podpulse", str(CHART), "-n", namespace, "--create-namespace", "--set", "monitoring.enabled=false",
         "--set", "operator.resyncSeconds=45", *config)
    apps, core = client.AppsV1Api(kube_api), client.CoreV1Api(kube_api)
    (deployment,) = apps.list_namespaced_deployment(namespace).items
    env = {e.name: e.value for e in deployment.spec.template.spec.containers[0].env}
    assert deployment.metadata.labels["app.kubernetes.io/managed-by"] == "Helm"
    assert env["PODPULSE_RESYNC_SECONDS"] == "45"
    rayservices = client.CustomObjectsApi(kube_api).list_namespaced_custom_object(
        "ray.io", "v1", namespace, "rayservices")["items"]
    assert [r["metadata"]["name"] for r in rayservices] == ["podpulse"]

    helm("upgrade", "podpulse", str(CHART), "-n", namespace, "--reuse-values", "--set", "operator.resyncSeconds=60",
         *config)
    (deployment,) = apps.list_namespaced_deployment(namespace).items
    assert {e.name: e.value for e in deployment.spec.template.spec.containers[0].env}["PODPULSE_RESYNC_SECONDS"] == "60"
    listed = helm("list", "-n", namespace, "-o", "yaml", *config)
    assert [(r["name"], r["revision"], r["status"]) for r in yaml.safe_load(listed.stdout)] == [
        ("podpulse", "2", "deployed")]

    # no --wait: the models PVC keeps its kubernetes.io/pvc-protection finalizer, whose controller does not
    # run here (only the garbage collector does), so it stays Terminating
    helm("uninstall", "podpulse", "-n", namespace, *config)
    assert apps.list_namespaced_deployment(namespace).items == []
    assert core.list_namespaced_config_map(namespace, label_selector="app.kubernetes.io/managed-by=Helm").items == []
    assert all(c.metadata.deletion_timestamp for c in core.list_namespaced_persistent_volume_claim(namespace).items)
    assert yaml.safe_load(helm("list", "-n", namespace, "-o", "yaml", *config).stdout) == []


def test_without_the_rayservice_the_chart_is_the_operator_alone(helm):
    """rayService.enabled=false: streams and schema jobs through the operator, no Serve cluster."""
    def kinds(*args):
        run = helm("template", "podpulse", str(CHART), "-n", "podpulse", *args)
        assert run.returncode == 0, run.stderr
        return {(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(run.stdout) if d}

    full, bare = kinds(), kinds("--set", "rayService.enabled=false")
    assert full - bare == {("RayService", "podpulse"), ("NetworkPolicy", "podpulse-serve")}
    assert bare < full and ("Deployment", "podpulse-operator") in bare
