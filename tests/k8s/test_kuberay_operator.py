"""KubeRay for real: its operator (1.5.1, built from its Go module) and its CRDs (generated from its
Go API types) on the session's API server, given PodPulse's RayCluster, RayService and RayJobs.

The assertions are on what KubeRay makes of them: Pods, Services, Secrets, the RayService's
RayCluster, the serve config it submits, the RayJobs' clusters and submitter Jobs. There is no
kubelet: a test reports Pods Running and Ready itself (``report_pods_ready``) where KubeRay waits
for that, and a stand-in dashboard on loopback takes what KubeRay sends to Ray (testbed/kuberay.py).
"""

import base64
import json
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def load_one(path: Path) -> dict:
    (doc,) = load_docs(path)
    return doc


NAMESPACE = "kuberay"
DEADLINE_S = 60


def wait_for(what, probe, deadline_s=DEADLINE_S):
    """Poll ``probe`` until it returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + deadline_s
    while True:
        value = probe()
        if value:
            return value
        assert time.monotonic() < deadline, f"within {deadline_s} s: {what}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def kuberay(kube, kube_api, kuberay_crds):
    """KubeRay's operator running against the session's API server (its CRDs installed), a namespace
    with stand-ins for what the manifests reference (ConfigMap, PVC, Secrets with dummy values)."""
    from kubernetes import client

    from testbed.kuberay import FakeRayDashboard, RayOperator

    core = client.CoreV1Api(kube_api)
    # labelled as deploy/base/namespace.yaml labels PodPulse's: the API server refuses every Pod KubeRay
    # makes here that is not "restricted" (Pod Security Admission)
    labels = load_one(ROOT / "deploy" / "base" / "namespace.yaml")["metadata"]["labels"]
    core.create_namespace({"metadata": {"name": NAMESPACE, "labels": labels}})
    # What the controller manager's ServiceAccount controller would make in a new namespace: Pods
    # that name no ServiceAccount (the workers') are refused without it.
    core.create_namespaced_service_account(NAMESPACE, {"metadata": {"name": "default"}})
    for doc in load_docs(ROOT / "deploy" / "base" / "storage.yaml"):  # ConfigMap podpulse-storage, PVC podpulse-models
        getattr(core, {"ConfigMap": "create_namespaced_config_map",
                       "PersistentVolumeClaim": "create_namespaced_persistent_volume_claim"}[doc["kind"]])(NAMESPACE, doc)
    for name, data in {"podpulse-credentials": {"PODPULSE_PG_PASSWORD": "dummy"}, "podpulse-api": {"token": "dummy"},
                       "podpulse-pseudonym-key": {"key": "0" * 64},
                       "podpulse-kafka": {"kafka.properties": "security.protocol=PLAINTEXT\n"}}.items():
        core.create_namespaced_secret(NAMESPACE, {"metadata": {"name": name}, "stringData": data})

    with FakeRayDashboard() as dashboard:
        operator = RayOperator(kube.kubeconfig, dashboard.url)
        try:
            operator.start()
            yield {"core": core, "custom": client.CustomObjectsApi(kube_api), "batch": client.BatchV1Api(kube_api),
                   "dashboard": dashboard, "operator": operator}
            assert operator.running, operator.log_tail()
        finally:
            operator.remove()


def create(kuberay, doc):
    plural = {"RayCluster": "rayclusters", "RayService": "rayservices", "RayJob": "rayjobs"}[doc["kind"]]
    return kuberay["custom"].create_namespaced_custom_object("ray.io", "v1", NAMESPACE, plural, doc)


def get(kuberay, plural, name):
    return kuberay["custom"].get_namespaced_custom_object("ray.io", "v1", NAMESPACE, plural, name)


def pods(kuberay, cluster, node_type=None):
    selector = f"ray.io/cluster={cluster}" + (f",ray.io/node-type={node_type}" if node_type else "")
    return kuberay["core"].list_namespaced_pod(NAMESPACE, label_selector=selector).items


def container(pod, name):
    (c,) = [c for c in pod.spec.containers if c.name == name]
    return c


def env_of(c):
    return {e.name: (e.value if e.value is not None else e.value_from.to_dict()) for e in c.env or []}


def owned_cluster(kuberay, owner_kind, owner_name):
    clusters = kuberay["custom"].list_namespaced_custom_object("ray.io", "v1", NAMESPACE, "rayclusters")["items"]
    return [c for c in clusters if any(o["kind"] == owner_kind and o["name"] == owner_name
                                       for o in c["metadata"].get("ownerReferences", []))]


def assert_pod_as_written(pod, template, where):
    """Every setting PodPulse wrote in the pod template reaches the Pod KubeRay made from it."""
    spec = template["spec"]
    sc = pod.spec.security_context
    assert (sc.run_as_non_root, sc.run_as_user, sc.seccomp_profile.type) == (
        spec["securityContext"]["runAsNonRoot"], spec["securityContext"]["runAsUser"],
        spec["securityContext"]["seccompProfile"]["type"]), where
    if "automountServiceAccountToken" in spec:
        assert pod.spec.automount_service_account_token == spec["automountServiceAccountToken"], where
    assert {v.name for v in pod.spec.volumes} >= {v["name"] for v in spec["volumes"]}, where
    for written in spec["containers"]:
        c = container(pod, written["name"])
        assert c.image == written["image"], where
        assert c.resources.to_dict()["requests"] == written["resources"]["requests"], where
        assert c.resources.to_dict()["limits"] == written["resources"]["limits"], where
        csc = c.security_context
        assert (csc.allow_privilege_escalation, csc.read_only_root_filesystem, csc.capabilities.drop) == \
            (False, True, ["ALL"]), where
        assert {(m.name, m.mount_path) for m in c.volume_mounts} >= \
            {(m["name"], m["mountPath"]) for m in written["volumeMounts"]}, where
        env = env_of(c)
        for e in written.get("env", []):
            assert e["name"] in env, (where, e["name"])
        assert [s.secret_ref.name for s in c.env_from or []] == [s["secretRef"]["name"] for s in written["envFrom"]]
        # Ray 2.60's token authentication: KubeRay hands the token of the cluster's Secret to Ray.
        assert env["RAY_AUTH_MODE"] == "token", where
        assert env["RAY_AUTH_TOKEN"]["secret_key_ref"]["key"] == "auth_token", where
        assert {p.name: p.container_port for p in c.ports} == \
            {p["name"]: p["containerPort"] for p in written["ports"]}, where


def assert_cluster_as_written(kuberay, cluster, spec, where):
    """The head and worker Pods of ``cluster`` carry what ``spec`` (a RayCluster spec) says."""
    head_template = spec["headGroupSpec"]["template"]
    (head,) = wait_for(f"{where}: head Pod", lambda: pods(kuberay, cluster, "head"))
    assert_pod_as_written(head, head_template, (where, "head"))
    ray_start = " ".join(container(head, "ray-head").args or container(head, "ray-head").command)
    for key, value in spec["headGroupSpec"]["rayStartParams"].items():
        assert f"--{key}={value}" in ray_start, (where, key, ray_start)
    # The autoscaler sidecar: the head's image, PodPulse's resources and securityContext.
    autoscaler = container(head, "autoscaler")
    options = spec["autoscalerOptions"]
    assert autoscaler.image == head_template["spec"]["containers"][0]["image"]
    assert autoscaler.resources.to_dict()["limits"] == options["resources"]["limits"]
    assert autoscaler.security_context.allow_privilege_escalation is False
    assert autoscaler.security_context.capabilities.drop == ["ALL"]
    for group in spec["workerGroupSpecs"]:
        (workers,) = wait_for(f"{where}: {group['replicas']} {group['groupName']} workers", lambda: [
            ws for ws in [pods(kuberay, cluster, "worker")] if len(ws) == group["replicas"]])
        for worker in workers:
            assert worker.metadata.labels["ray.io/group"] == group["groupName"]
            assert_pod_as_written(worker, group["template"], (where, group["groupName"]))
    # The head Service: every port PodPulse named on the head container.
    service = wait_for(f"{where}: head Service", lambda: [
        s for s in kuberay["core"].list_namespaced_service(NAMESPACE, label_selector=f"ray.io/cluster={cluster}").items
        if s.metadata.labels.get("ray.io/node-type") == "head"])
    ports = {p.name: p.port for p in service[0].spec.ports}
    assert ports == {p["name"]: p["containerPort"] for p in head_template["spec"]["containers"][0]["ports"]}, where
    return head


def test_the_namespace_refuses_a_pod_that_is_not_restricted(kuberay):
    """What makes the tests below mean that KubeRay's Pods of PodPulse's manifests pass Pod Security."""
    from kubernetes.client.exceptions import ApiException

    pod = {"metadata": {"name": "plain"}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}}
    with pytest.raises(ApiException) as refused:
        kuberay["core"].create_namespaced_pod(NAMESPACE, pod, dry_run="All")
    message = json.loads(refused.value.body)["message"]
    assert refused.value.status == 403 and 'violates PodSecurity "restricted:v1.30"' in message, message


def test_the_raycluster_becomes_pods_services_and_a_token(kuberay):
    doc = load_one(ROOT / "ray-cluster.yaml")
    create(kuberay, doc)
    head = assert_cluster_as_written(kuberay, "podpulse", doc["spec"], "ray-cluster.yaml")
    # Only the head's autoscaler calls the Kubernetes API, as the ServiceAccount KubeRay made for it.
    account = head.spec.service_account_name
    assert kuberay["core"].read_namespaced_service_account(account, NAMESPACE)
    secret = wait_for("the token Secret", lambda: kuberay["core"].list_namespaced_secret(
        NAMESPACE, label_selector="ray.io/cluster=podpulse").items)
    assert [s.metadata.name for s in secret] == ["podpulse"] and secret[0].data["auth_token"]
    status = wait_for("RayCluster status", lambda: get(kuberay, "rayclusters", "podpulse").get("status"))
    assert status.get("desiredWorkerReplicas") == doc["spec"]["workerGroupSpecs"][0]["replicas"], status


def test_the_rayservice_gets_a_cluster_and_kuberay_submits_its_serve_config(kuberay):
    doc = load_one(ROOT / "deployments" / "rayservice.yaml")
    create(kuberay, doc)
    (cluster,) = wait_for("the RayService's RayCluster", lambda: owned_cluster(kuberay, "RayService", "podpulse"))
    name = cluster["metadata"]["name"]
    assert cluster["spec"]["rayVersion"] == doc["spec"]["rayClusterConfig"]["rayVersion"]
    assert_cluster_as_written(kuberay, name, doc["spec"]["rayClusterConfig"], "deployments/rayservice.yaml")
    # What a kubelet would report: every Pod Running and Ready. KubeRay then submits the serve config
    # to the head's dashboard with the cluster's token, and points the RayService's Services at it.
    dashboard = kuberay["dashboard"]
    report_ready(kuberay, name)
    (put, *_) = wait_for("the serve config PUT", lambda: dashboard.seen("PUT", "/api/serve/applications/"))
    method, url, headers, body = put
    assert url.startswith(f"http://{name}-head-svc.{NAMESPACE}.svc.cluster.local:8265/"), url
    assert json.loads(body) == yaml.safe_load(doc["spec"]["serveConfigV2"])
    token = kuberay["core"].read_namespaced_secret(name, NAMESPACE).data["auth_token"]
    assert headers["x-ray-authorization"] == f"Bearer {base64.b64decode(token).decode()}"
    serve = wait_for("podpulse-serve-svc", lambda: [s for s in kuberay["core"].list_namespaced_service(NAMESPACE).items
                                                    if s.metadata.name == "podpulse-serve-svc"])
    assert {p.name: p.port for p in serve[0].spec.ports} == {"serve": 8000}
    assert serve[0].spec.selector["ray.io/cluster"] == name
    status = wait_for("the RayService's status names its cluster and application", lambda: (
        get(kuberay, "rayservices", "podpulse").get("status", {}).get("activeServiceStatus", {}).get("applicationStatuses")))
    assert status["podpulse"]["status"] == "RUNNING"


def report_ready(kuberay, cluster):
    """What a kubelet would report once the cluster's Pods run: each Pod Running and Ready."""
    from testbed.kuberay import report_pods_ready

    return report_pods_ready(kuberay["core"], NAMESPACE, f"ray.io/cluster={cluster}")


def stream_rayjob(example):
    """The RayJob (and its ConfigMap) the PodPulse operator makes of the example AirPodsDataStream."""
    from crds import reconcile as rc

    config, job = rc.stream_children(example("AirPodsDataStream"))
    for doc in (config, job):
        doc["metadata"]["namespace"] = NAMESPACE
        doc["metadata"].pop("ownerReferences")  # its AirPodsDataStream is not on this API server
    return config, job


@pytest.mark.parametrize("path, command", [("deploy/jobs/ray-job.train.yaml", "podpulse train"),
                                           ("deploy/jobs/ray-job.backfill.yaml", "podpulse ingest"),
                                           ("AirPodsDataStream's RayJob", "podpulse ingest")])
def test_a_rayjob_gets_a_cluster_and_once_it_is_ready_a_submitter_job(kuberay, example, path, command):
    if path.endswith(".yaml"):
        doc = load_one(ROOT / path)
    else:
        config, doc = stream_rayjob(example)
        kuberay["core"].create_namespaced_config_map(NAMESPACE, config)
    job = create(kuberay, doc)["metadata"]["name"]
    (cluster,) = wait_for(f"{path}: its RayCluster", lambda: owned_cluster(kuberay, "RayJob", job))
    name = cluster["metadata"]["name"]
    assert_cluster_as_written(kuberay, name, doc["spec"]["rayClusterSpec"], path)
    report_ready(kuberay, name)
    (submitter,) = wait_for(f"{path}: the submitter Job", lambda: kuberay["batch"].list_namespaced_job(
        NAMESPACE, label_selector=f"ray.io/originated-from-cr-name={job}").items)
    (c,) = submitter.spec.template.spec.containers
    script = " ".join(c.args or [])
    # `ray job submit` of the entrypoint, word for word, to the dashboard of the cluster made for it.
    dashboard = f"http://{name}-head-svc.{NAMESPACE}.svc.cluster.local:8265"
    assert f"ray job submit --address {dashboard} " in script, script
    assert f" -- {doc['spec']['entrypoint']} ;" in script and doc["spec"]["entrypoint"].startswith(command), script
    assert c.image == doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    env = env_of(c)
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"]["secret_key_ref"]["name"] == name
    # The submitter pod is PodPulse's hardened template, KubeRay's command and env added to it.
    written = doc["spec"]["submitterPodTemplate"]["spec"]
    pod = submitter.spec.template.spec
    assert pod.automount_service_account_token is False and pod.restart_policy == "Never"
    assert pod.security_context.run_as_non_root is True and pod.security_context.seccomp_profile.type == "RuntimeDefault"
    assert (c.security_context.read_only_root_filesystem, c.security_context.capabilities.drop) == (True, ["ALL"])
    assert c.resources.to_dict()["limits"] == written["containers"][0]["resources"]["limits"]
    status = get(kuberay, "rayjobs", job)["status"]
    assert status["jobDeploymentStatus"] in ("Running", "Initializing"), status
