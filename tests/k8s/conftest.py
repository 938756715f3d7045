"""Helpers for the Kubernetes tests: manifests, schemas, validation, rendered overlays.

No cluster is involved: built-in kinds are checked with kubernetes-validate (the
Kubernetes OpenAPI schemas, offline, strict: unknown fields fail), PodPulse custom
resources with jsonschema against their own CRD, and KubeRay kinds by validating their
pod templates as core PodTemplates plus the structure KubeRay needs.
"""

import copy
import subprocess
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
