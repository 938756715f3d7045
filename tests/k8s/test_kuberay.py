"""KubeRay resources (RayCluster, RayService, RayJob): their pod templates as core PodTemplates,
the structure KubeRay needs, commands the real CLI accepts, and the RayService's serve config
equal to deployments/serve-config.yaml apart from the documented overrides."""

import copy
import shlex

import pytest
import ray
import yaml

from crds import reconcile as rc
from storage.config import StorageConfig

STATIC = ["ray-cluster.yaml", "deployments/rayservice.yaml", "deploy/jobs/ray-job.train.yaml",
          "deploy/jobs/ray-job.backfill.yaml"]
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}


def ray_resources(root, example):
    out = [(path, yaml.safe_load((root / path).read_text())) for path in STATIC]
    out.append(("AirPodsDataStream's RayJob", rc.stream_children(example("AirPodsDataStream"))[1]))
    return out


def cluster_spec(doc):
    return {"RayCluster": lambda s: s, "RayService": lambda s: s["rayClusterConfig"],
            "RayJob": lambda s: s["rayClusterSpec"]}[doc["kind"]](doc["spec"])


def test_every_ray_resource_has_what_kuberay_needs(root, example, pod_templates, validate_pod_template):
    for where, doc in ray_resources(root, example):
        assert doc["apiVersion"] == "ray.io/v1", where
        spec = cluster_spec(doc)
        assert spec["rayVersion"] == ray.__version__, where
        assert spec["authOptions"] == {"mode": "token"}, where  # Ray 2.60 expects token auth
        assert isinstance(spec["headGroupSpec"]["rayStartParams"], dict), where
        assert all(isinstance(v, str) for v in spec["headGroupSpec"]["rayStartParams"].values()), where
        for group in spec["workerGroupSpecs"]:
            assert group["groupName"] and isinstance(group["rayStartParams"], dict), where
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], (where, group)
        for part, template in pod_templates(doc):
            validate_pod_template(template)
            containers = template["spec"]["containers"]
            # KubeRay runs Ray in the first container; its image carries the same Ray.
            assert containers[0]["name"] in ("ray-head", "ray-worker"), (where, part)
            for c in containers:
                assert c["image"].rsplit(":", 1)[1].startswith(spec["rayVersion"]), (where, part, c["image"])
                assert set(c["resources"]) == {"requests", "limits"}, (where, part)
                assert {"cpu", "memory"} <= set(c["resources"]["limits"]), (where, part)
                assert "metrics" in {p["name"] for p in c["ports"]}, (where, part)


def assert_hardened(template, where):
    """Restricted pod security: non-root, RuntimeDefault seccomp, no escalation, no capabilities, a
    read-only root with an emptyDir at /tmp (Ray's session directory is /tmp/ray)."""
    pod = template["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True, where
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
    empty = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
    for c in pod["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}, (where, c["name"])
        assert sc["readOnlyRootFilesystem"] is True, (where, c["name"])
        assert {m["name"] for m in c["volumeMounts"] if m["mountPath"] == "/tmp"} & empty, (where, c["name"])


def test_every_ray_pod_is_hardened(root, example, pod_templates):
    """The operator's RayJob and the static RayCluster, RayService and RayJobs alike."""
    for where, doc in ray_resources(root, example):
        for part, template in pod_templates(doc):
            assert_hardened(template, (where, part))
            # Only the head's autoscaler sidecar calls the Kubernetes API: workers get no token.
            assert template["spec"].get("automountServiceAccountToken", True) is (part == "head"), (where, part)
        autoscaler = cluster_spec(doc)["autoscalerOptions"]["securityContext"]
        assert autoscaler == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}, where


def test_every_rayjob_submits_from_a_hardened_pod_of_its_own(root, example, validate_pod_template):
    """K8sJobMode: KubeRay runs `ray job submit` in a Job whose default pod has no securityContext
    and mounts an API token (tests/k8s/test_kuberay_operator.py shows what it makes of ours)."""
    for where, doc in ray_resources(root, example):
        if doc["kind"] != "RayJob":
            continue
        template = doc["spec"]["submitterPodTemplate"]
        validate_pod_template(template)
        assert_hardened(template, where)
        assert template["spec"]["automountServiceAccountToken"] is False, where
        assert template["spec"]["restartPolicy"] == "Never", where  # KubeRay's Job retries by pods
        (submitter,) = template["spec"]["containers"]
        assert "command" not in submitter and "args" not in submitter, where  # KubeRay's own command
        head = doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert submitter["image"] == head["image"], where  # the same Ray as the cluster


def test_the_migration_job_is_hardened(example, k8s_validate):
    (migrate,) = rc.schema_children(example("OracleDBSchemaManager"))
    assert_hardened(migrate["spec"]["template"], "migration Job")
    assert migrate["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    k8s_validate(migrate)


def test_rayjobs_run_commands_the_cli_accepts(root, example, parse_cli):
    expected = {"deploy/jobs/ray-job.train.yaml": "train", "deploy/jobs/ray-job.backfill.yaml": "ingest",
                "AirPodsDataStream's RayJob": "ingest"}
    for where, doc in ray_resources(root, example):
        if doc["kind"] != "RayJob":
            continue
        spec = doc["spec"]
        assert spec["submissionMode"] in SUBMISSION_MODES and spec["shutdownAfterJobFinishes"] is True, where
        command, params = parse_cli(shlex.split(spec["entrypoint"]))
        assert command == expected[where], where
        # The storage config it reads is mounted on the head, where the driver runs.
        mounts = {m["mountPath"] for c in spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
                  for m in c.get("volumeMounts", [])}
        assert str(params["storage_file"]).rsplit("/", 1)[0] in mounts, where
        if command == "train":
            assert params["model"] == "battery-anomaly" and str(params["registry"]) in mounts


def test_static_rayjobs_use_what_the_base_provides(root):
    base = [d for d in yaml.safe_load_all((root / "deploy" / "base" / "storage.yaml").read_text()) if d]
    provided = {(d["kind"], d["metadata"]["name"]) for d in base}
    for path in STATIC[1:]:
        doc = yaml.safe_load((root / path).read_text())
        for template in [cluster_spec(doc)["headGroupSpec"]["template"],
                         *(g["template"] for g in cluster_spec(doc)["workerGroupSpecs"])]:
            for v in template["spec"].get("volumes", []):
                if "configMap" in v:
                    assert ("ConfigMap", v["configMap"]["name"]) in provided, path
                if "persistentVolumeClaim" in v:
                    assert ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]) in provided, path
    # The jobs' storage config is one PodPulse's router accepts.
    (config,) = [d for d in base if d["kind"] == "ConfigMap"]
    StorageConfig(**yaml.safe_load(config["data"]["storage.yaml"]))


# The arguments of the application that differ on Kubernetes, and why (see deployments/rayservice.yaml).
OVERRIDES = {"storage": "PostgreSQL in the cluster, not a DuckDB file in a pod",
             "bootstrap": "the cluster's Kafka",
             "registry": "the models volume at an absolute path"}


def test_rayservice_serves_the_serve_config_file(root):
    service = yaml.safe_load((root / "deployments" / "rayservice.yaml").read_text())
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    file = yaml.safe_load((root / "deployments" / "serve-config.yaml").read_text())
    assert {k: v for k, v in embedded.items() if k != "applications"} == \
        {k: v for k, v in file.items() if k != "applications"}
    assert [a["name"] for a in embedded["applications"]] == [a["name"] for a in file["applications"]]
    for ours, theirs in zip(embedded["applications"], file["applications"]):
        differing = {k for k in ours["args"].keys() | theirs["args"].keys()
                     if ours["args"].get(k) != theirs["args"].get(k)}
        assert differing == set(OVERRIDES), differing  # every override is documented, and used
        strip = lambda app: {**app, "args": {k: v for k, v in app["args"].items() if k not in OVERRIDES}}  # noqa: E731
        assert strip(ours) == strip(theirs)
        StorageConfig(**ours["args"]["storage"])
        assert ours["args"]["registry"].startswith("/")
        mounts = {m["mountPath"] for c in service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
                  ["containers"] for m in c.get("volumeMounts", [])}
        assert ours["args"]["registry"] in mounts


def test_a_diverging_serve_config_would_be_caught(root):
    """The comparison above is not vacuous: change one deployment and it differs."""
    file = yaml.safe_load((root / "deployments" / "serve-config.yaml").read_text())
    changed = copy.deepcopy(file)
    changed["applications"][0]["deployments"][0]["num_replicas"] = 5
    assert changed["applications"][0] != file["applications"][0]


@pytest.mark.parametrize("kind, longest, suffix", [("AirPodsDataStream", 38, 9), ("OracleDBSchemaManager", 46, 17)])
def test_the_longest_allowed_names_fit_kubernetes_and_kuberay(example, kind, longest, suffix):
    cr = example(kind, name="a" * longest)
    children = rc.stream_children(cr) if kind == "AirPodsDataStream" else rc.schema_children(cr)
    for child in children:
        limit = 47 if child["kind"] == "RayJob" else 63  # KubeRay: RayJob ≤ 47; Job names ≤ 63
        assert len(child["metadata"]["name"]) == longest + suffix <= limit


def test_rayservice_containers_run_serve_as_measured_locally(root):
    """Every Ray container of the RayService carries the Serve settings the local runs use."""
    from podpulse.runtime import SERVE_ENV

    service = yaml.safe_load((root / "deployments" / "rayservice.yaml").read_text())
    spec = cluster_spec(service)
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert {k: env.get(k) for k in SERVE_ENV} == SERVE_ENV, container["name"]


def test_every_serve_container_reads_the_scoped_tokens_file_from_its_secret(root):
    """Where a replica runs, $PODPULSE_API_TOKENS_FILE names the mounted tokens Secret (optional, so an
    admin token alone still works; deployments/tokens.py re-reads it when the kubelet updates it)."""
    spec = cluster_spec(yaml.safe_load((root / "deployments" / "rayservice.yaml").read_text()))
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == "api-tokens"]
        assert volume["secret"]["secretName"] == "podpulse-api-tokens" and volume["secret"]["optional"] is True
        (container,) = pod["containers"]
        env = {e["name"]: e for e in container["env"]}
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == "api-tokens"]
        assert env["PODPULSE_API_TOKENS_FILE"]["value"] == f"{mount['mountPath']}/tokens.yaml" and mount["readOnly"]
        assert env["PODPULSE_API_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
