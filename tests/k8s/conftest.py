"""Helpers for the Kubernetes tests: manifests, schemas, validation, rendered overlays, an API server.

Most tests need no cluster: built-in kinds are checked with kubernetes-validate (the
Kubernetes OpenAPI schemas, offline, strict: unknown fields fail), PodPulse custom
resources with jsonschema against their own CRD, and KubeRay kinds by validating their
pod templates as core PodTemplates plus the structure KubeRay needs. The ``kube`` fixture
is a real control plane (etcd and kube-apiserver, ``tests/infra/kube.py``, built by
``make kube``), started once per session by the first test that asks for it; ``kuberay_crds``
puts stand-ins for KubeRay's RayJob and RayService CRDs on it.
"""

import copy
import subprocess
import time
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import typer
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.32"  # the cluster version the manifests target (kubectl here is v1.32)
CRD_FILES = {"AirPodsDataStream": "podpulse.io_airpodsdatastreams.yaml",
             "OracleDBSchemaManager": "podpulse.io_oracledbschemamanagers.yaml",
             "AIModelDeployer": "podpulse.io_aimodeldeployers.yaml"}
EXAMPLES = {"AirPodsDataStream": "airpodsdatastream.yaml", "OracleDBSchemaManager": "oracledbschemamanager.yaml",
            "AIModelDeployer": "aimodeldeployer.yaml"}


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def load_one(path: Path) -> dict:
    (doc,) = load_docs(path)
    return doc


@pytest.fixture(scope="session")
def kube():
    """etcd and kube-apiserver (Kubernetes 1.37, no nodes) for the session; ``kube.kubeconfig``
    is the admin's kubeconfig, ``kube.api_client()`` a ``kubernetes`` client as the admin."""
    from infra.kube import KubeControlPlane

    with KubeControlPlane() as control_plane:
        yield control_plane


@pytest.fixture(scope="session")
def kube_api(kube):
    """A ``kubernetes`` ApiClient of the session's API server, as the admin (system:masters)."""
    api = kube.api_client()
    yield api
    api.close()


def established(kube_api, definitions: dict[str, dict]) -> dict[str, dict]:
    """Create each CustomResourceDefinition (kind → manifest) and wait until all are Established;
    kind → the CRD as the server returned it."""
    from kubernetes import client  # heavy: only the tests that talk to the API server import it

    ext = client.ApiextensionsV1Api(kube_api)
    for definition in definitions.values():
        ext.create_custom_resource_definition(definition)
    deadline, crds = time.monotonic() + 30, {}
    while len(crds) < len(definitions):
        for kind, definition in definitions.items():
            crd = kube_api.sanitize_for_serialization(ext.read_custom_resource_definition(definition["metadata"]["name"]))
            conditions = {c["type"]: c for c in crd.get("status", {}).get("conditions", [])}
            assert conditions.get("NonStructuralSchema", {}).get("status") != "True", conditions
            if conditions.get("Established", {}).get("status") == "True":
                crds[kind] = crd
        assert time.monotonic() < deadline, f"not Established within 30 s: {set(definitions) - set(crds)}"
        time.sleep(0.1)
    return crds


@pytest.fixture(scope="session")
def podpulse_crds(kube_api) -> dict[str, dict]:
    """PodPulse's three CRDs created on the session's API server and Established, and a namespace
    ``podpulse``; kind → the CRD as the server returned it."""
    from kubernetes import client

    crds = established(kube_api, {kind: load_one(ROOT / "crds" / name) for kind, name in CRD_FILES.items()})
    client.CoreV1Api(kube_api).create_namespace({"metadata": {"name": "podpulse"}})
    return crds


def stand_in_crd(kind: str, plural: str) -> dict:
    """A CRD of KubeRay's group and version for ``kind`` that stores any spec and status (no schema
    beyond that), with the status subresource KubeRay's own CRDs have."""
    anything = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.ray.io"},
            "spec": {"group": "ray.io", "scope": "Namespaced",
                     "names": {"kind": kind, "plural": plural, "singular": kind.lower(), "listKind": f"{kind}List"},
                     "versions": [{"name": "v1", "served": True, "storage": True, "subresources": {"status": {}},
                                   "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                                       "spec": anything, "status": anything}}}}]}}


@pytest.fixture(scope="session")
def kuberay_crds(kube_api) -> dict[str, dict]:
    """ray.io/v1 RayJob and RayService on the session's API server, Established; kind → the CRD.

    A STAND-IN until KubeRay's generated CRDs land in the repository: the kinds exist and keep
    whatever spec and status they are given, but nothing checks them against KubeRay's schema,
    and no KubeRay operator acts on them (the tests write the status KubeRay would)."""
    return established(kube_api, {"RayJob": stand_in_crd("RayJob", "rayjobs"),
                                  "RayService": stand_in_crd("RayService", "rayservices")})


@pytest.fixture
def root() -> Path:
    return ROOT


@pytest.fixture
def k8s_validate():
    """Validate a built-in-kind manifest; raises kubernetes_validate.ValidationError."""
    def validate(doc: dict) -> None:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    return validate


@pytest.fixture
def pod_templates():
    """Every (where, pod template) of a KubeRay resource."""
    def templates(doc: dict) -> list[tuple[str, dict]]:
        spec = doc["spec"]
        cluster = {"RayCluster": spec, "RayService": spec.get("rayClusterConfig"),
                   "RayJob": spec.get("rayClusterSpec")}[doc["kind"]]
        out = [("head", cluster["headGroupSpec"]["template"])]
        out += [(f"worker group {g['groupName']}", g["template"]) for g in cluster.get("workerGroupSpecs", [])]
        return out
    return templates


@pytest.fixture
def validate_pod_template(k8s_validate):
    """A KubeRay pod template as the core kind PodTemplate (what KubeRay turns into pods)."""
    def validate(template: dict, name: str = "template") -> None:
        k8s_validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name},
                      "template": template})
    return validate


@pytest.fixture
def crd_schema():
    """The openAPIV3Schema of a PodPulse kind."""
    def schema(kind: str) -> dict:
        crd = load_one(ROOT / "crds" / CRD_FILES[kind])
        (version,) = crd["spec"]["versions"]
        return version["schema"]["openAPIV3Schema"]
    return schema


@pytest.fixture
def validate_cr(crd_schema):
    """Validate a PodPulse custom resource against its own CRD; raises jsonschema.ValidationError."""
    def validate(doc: dict) -> None:
        jsonschema.Draft7Validator(crd_schema(doc["kind"])).validate(doc)
    return validate


@pytest.fixture
def example():
    """An example custom resource as the API server hands it to the operator (namespace, uid)."""
    def make(kind: str, name: str | None = None, **spec_changes) -> dict:
        doc = copy.deepcopy(load_one(ROOT / "crds" / "examples" / EXAMPLES[kind]))
        doc["metadata"].update(namespace="podpulse", uid=f"uid-{kind.lower()}", generation=1)
        if name:
            doc["metadata"]["name"] = name
        doc["spec"].update(spec_changes)
        return doc
    return make


@pytest.fixture
def parse_cli():
    """Parse a podpulse command line with the real CLI, without running it: (command, params)."""
    from podpulse.cli import app

    def parse(argv: list[str]) -> tuple[str, dict]:
        assert argv[0] == "podpulse", argv
        command, i = typer.main.get_command(app), 1
        while hasattr(command, "commands"):  # a group: `podpulse db migrate ...`
            command, i = command.commands[argv[i]], i + 1
        return command.name, command.make_context(command.name, list(argv[i:])).params
    return parse


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    """`kubectl kustomize` of each overlay, with the default load restrictor."""
    out = {}
    for overlay in ("dev", "prod"):
        run = subprocess.run(["kubectl", "kustomize", str(ROOT / "deploy" / "overlays" / overlay)],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        out[overlay] = [d for d in yaml.safe_load_all(run.stdout) if d]
    return out
