"""The kopf operator against a real kube-apiserver, under its ServiceAccount's rights.

For the module: kube-controller-manager running only its garbage collector (owner references are
acted on), and one operator process, ``kopf run`` with the command and environment of the dev
overlay's Deployment as kustomize renders it (``--standalone``, ``--namespace=podpulse-dev``;
only the resync is shortened to 2 s, the liveness endpoint moved to a free loopback port, and
``operator_interference.py`` loaded beside ``crds.operator`` to time one concurrent write). It
authenticates with a token the TokenRequest API issued for the overlay's ServiceAccount, whose
namespace, Role, ClusterRole and bindings are applied from the same rendering: anything the
handlers or kopf do that RBAC refuses shows as a 403 in its log, and every test checks there is
none, nor any other error.

The test plays the user (creates, changes and deletes resources, as the admin) and what does not
run here: KubeRay's operator (its CRDs do, ``conftest.kuberay_crds``, generated from KubeRay's API
types; the test writes the RayJob and RayService status KubeRay would; test_kuberay_operator.py
runs KubeRay on the RayJob) and the Job controller (the test writes a Job's completion). No nodes:
nothing runs in a pod.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
import yaml
from kubernetes import client, config, utils
from kubernetes.client.exceptions import ApiException

from crds import reconcile as rc
from testbed.kube import KubeControllerManager
from testbed.process import ServerProcess, free_port

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
IDENTITY_KINDS = ("Namespace", "ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")
RESYNC_S = "2"  # the overlay's 10 s would make every wait on a resync here five times longer
RAYSERVICE = "podpulse"  # deployments/rayservice.yaml; the operator meets a concurrent write to it
INTERFERED = "podpulse.io/test-interfered"  # tests/k8s/operator_interference.py's annotation
PLURAL = {"AirPodsDataStream": "airpodsdatastreams", "OracleDBSchemaManager": "oracledbschemamanagers",
          "AIModelDeployer": "aimodeldeployers", "RayJob": "rayjobs", "RayService": "rayservices"}
STABLE, CANARY = "20261120T070000000000Z", "20261128T070000000000Z"
MODELS = "/data/models/battery-anomaly"  # the RayService's registry argument, and the model


class Operator(ServerProcess):
    """``kopf run`` as the Deployment runs it, authenticated by ``kubeconfig``."""

    name = "podpulse-operator"
    start_timeout_s = 60.0

    def __init__(self, deployment: dict, kubeconfig: Path, root: Path):
        super().__init__(root)
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        self.namespace = deployment["metadata"]["namespace"]
        self.kubeconfig = kubeconfig
        self.liveness = f"http://127.0.0.1:{free_port()}/healthz"
        argv = [f"--liveness={self.liveness}" if arg.startswith("--liveness=") else
                arg.replace("$(POD_NAMESPACE)", self.namespace) for arg in container["command"]]
        assert argv[:2] == ["kopf", "run"] and "--standalone" in argv, argv
        self.argv = [sys.executable, "-m", "kopf", *argv[1:], str(HERE / "operator_interference.py")]
        # The Deployment's own settings: image, allowed Secrets, resync (shortened here).
        self.settings = {e["name"]: e["value"] for e in container["env"] if "value" in e}
        self.settings["PODPULSE_RESYNC_SECONDS"] = RESYNC_S

    def command(self) -> list[str]:
        return self.argv

    def env(self) -> dict[str, str]:
        # Nothing of this machine's own configuration: no in-cluster service address (the client would
        # prefer it to the kubeconfig), no PODPULSE_* setting the Deployment does not make.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBERNETES_", "PODPULSE_", "KUBECONFIG"))}
        tmp = self.root / "tmp"  # the Kubernetes client's discovery cache, as the Deployment's /tmp emptyDir
        tmp.mkdir(exist_ok=True)
        return {**env, **self.settings, "POD_NAMESPACE": self.namespace, "KUBECONFIG": str(self.kubeconfig),
                "TMPDIR": str(tmp), "PYTHONPATH": str(ROOT), "PODPULSE_TEST_INTERFERE": RAYSERVICE}

    def ready(self) -> bool:
        try:
            return requests.get(self.liveness, timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def refusals(self) -> list[str]:
        """Lines of its log where the API server refused it something (403)."""
        return [line for line in self.log().splitlines() if "Forbidden" in line or " 403" in line]

    def errors(self) -> list[str]:
        """Its log's errors but the conflicts the deployer handler retries (a 409 is no fault)."""
        return [line for line in self.log().splitlines() if "[ERROR" in line and
                "failed temporarily: RayService changed while patching it: 409" not in line]


@pytest.fixture(scope="module")
def dev(rendered) -> dict[tuple[str, str], dict]:
    """The dev overlay as kustomize renders it: (kind, name) → document."""
    return {(d["kind"], d["metadata"]["name"]): d for d in rendered["dev"]}


@pytest.fixture(scope="module")
def deployment(dev) -> dict:
    return dev[("Deployment", "podpulse-operator")]


@pytest.fixture(scope="module")
def identity(kube, kube_api, podpulse_crds, kuberay_crds, dev, deployment, tmp_path_factory):
    """The overlay's namespace, ServiceAccount, Role, ClusterRole and bindings applied as the admin;
    a token for the ServiceAccount from the TokenRequest API, a kubeconfig and a client with it."""
    ns = deployment["metadata"]["namespace"]
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    applied = sorted((doc for (kind, _), doc in dev.items() if kind in IDENTITY_KINDS),
                     key=lambda doc: IDENTITY_KINDS.index(doc["kind"]))  # the namespace first
    assert [d["kind"] for d in applied] == list(IDENTITY_KINDS)
    for doc in applied:
        utils.create_from_dict(kube_api, doc)
    core = client.CoreV1Api(kube_api)
    token = core.create_namespaced_service_account_token(account, ns, {"spec": {"expirationSeconds": 3600}})
    kubeconfig = tmp_path_factory.mktemp("operator-identity") / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "operator",
        "clusters": [{"name": "test", "cluster": {"server": kube.url, "certificate-authority": str(kube.ca_file)}}],
        "users": [{"name": account, "user": {"token": token.status.token}}],
        "contexts": [{"name": "operator", "context": {"cluster": "test", "user": account, "namespace": ns}}]}))
    api = config.new_client_from_config(config_file=str(kubeconfig))
    yield SimpleNamespace(namespace=ns, account=account, kubeconfig=kubeconfig, api=api)
    api.close()


@pytest.fixture(scope="module")
def garbage_collector(kube, podpulse_crds, kuberay_crds, tmp_path_factory):
    """kube-controller-manager's garbage collector, started after the CRDs so that it watches their kinds."""
    with KubeControllerManager(kube.kubeconfig, root=tmp_path_factory.mktemp("kube-controller-manager")) as gc:
        yield gc


@pytest.fixture(scope="module")
def operator(identity, deployment, garbage_collector, tmp_path_factory):
    proc = Operator(deployment, identity.kubeconfig, tmp_path_factory.mktemp("operator"))
    proc.start()
    try:
        yield proc
    finally:
        proc.stop(timeout=15)


# ---- helpers: the admin's view of the cluster --------------------------------------------------

def until(operator: Operator, what: str, read, ok, timeout: float = 20.0):
    """``read()`` until ``ok(value)``; fails naming the last value and the operator's log."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if ok(value):
            return value
        if time.monotonic() > deadline or not operator.running:
            pytest.fail(f"{what}: not within {timeout:.0f} s; last seen: {value!r}\n"
                        f"--- operator log ---\n{operator.log_tail(6000)}")
        time.sleep(0.2)


class Admin:
    """The admin's calls the tests make, in namespace ``ns``."""

    def __init__(self, kube, kube_api, ns: str):
        self.kube, self.api, self.ns = kube, kube_api, ns
        self.custom, self.batch = client.CustomObjectsApi(kube_api), client.BatchV1Api(kube_api)
        self.core = client.CoreV1Api(kube_api)

    @staticmethod
    def _gv(kind: str) -> tuple[str, str]:
        return ("ray.io", "v1") if kind.startswith("Ray") else (rc.GROUP, rc.VERSION)

    def create(self, doc: dict) -> dict:
        doc = {"apiVersion": doc["apiVersion"], "kind": doc["kind"], "metadata": {"name": doc["metadata"]["name"]},
               "spec": doc["spec"]}
        return self.custom.create_namespaced_custom_object(*self._gv(doc["kind"]), self.ns, PLURAL[doc["kind"]], doc)

    def get(self, kind: str, name: str) -> dict | None:
        try:
            return self.custom.get_namespaced_custom_object(*self._gv(kind), self.ns, PLURAL[kind], name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def patch(self, kind: str, name: str, body: dict, **kw) -> dict:
        return self.custom.patch_namespaced_custom_object(*self._gv(kind), self.ns, PLURAL[kind], name, body, **kw)

    def patch_status(self, kind: str, name: str, status: dict) -> dict:
        return self.custom.patch_namespaced_custom_object_status(*self._gv(kind), self.ns, PLURAL[kind], name,
                                                                 {"status": status})

    def delete(self, kind: str, name: str, **kw) -> dict:
        return self.custom.delete_namespaced_custom_object(*self._gv(kind), self.ns, PLURAL[kind], name, **kw)

    def children(self, cr: dict, kind: str) -> dict[str, dict]:
        """The objects of ``kind`` carrying ``cr``'s owner labels, by name."""
        selector = rc.owner_selector(cr)
        if kind == "ConfigMap":
            items = self.api.sanitize_for_serialization(
                self.core.list_namespaced_config_map(self.ns, label_selector=selector).items)
        elif kind == "Job":
            items = self.api.sanitize_for_serialization(
                self.batch.list_namespaced_job(self.ns, label_selector=selector).items)
        else:
            items = self.custom.list_namespaced_custom_object(*self._gv(kind), self.ns, PLURAL[kind],
                                                              label_selector=selector)["items"]
        return {item["metadata"]["name"]: item for item in items}

    def columns(self, kind: str, name: str) -> dict:
        """The resource as ``kubectl get`` shows it: the CRD's printer columns, by name (-o wide's too)."""
        r = requests.get(f"{self.kube.url}/apis/{rc.GROUP}/{rc.VERSION}/namespaces/{self.ns}/{PLURAL[kind]}/{name}",
                         headers={"Authorization": f"Bearer {self.kube.token}",
                                  "Accept": "application/json;as=Table;g=meta.k8s.io;v=v1"},
                         verify=str(self.kube.ca_file), timeout=10)
        r.raise_for_status()
        table = r.json()
        (row,) = table["rows"]
        return {c["name"]: cell for c, cell in zip(table["columnDefinitions"], row["cells"])}


@pytest.fixture(scope="module")
def admin(kube, kube_api, identity) -> Admin:
    return Admin(kube, kube_api, identity.namespace)


@pytest.fixture(scope="module")
def policy(operator):
    """The operator's policy, from the same settings (crds/policy.py): what it should render."""
    return rc.Policy.from_env(operator.settings, operator.settings["PODPULSE_IMAGE"])


@pytest.fixture
def resource(example, identity):
    """An example resource as a user writes it (name and spec), in the operator's namespace, its hosts
    that namespace's Services (which the operator admits by default)."""
    def make(kind: str, name: str | None = None, **spec_changes) -> dict:
        doc = example(kind, name, **spec_changes)
        spec = json.loads(json.dumps(doc["spec"]).replace(".podpulse.svc", f".{identity.namespace}.svc"))
        return {"apiVersion": doc["apiVersion"], "kind": kind,
                "metadata": {"name": doc["metadata"]["name"], "namespace": identity.namespace}, "spec": spec}
    return make


def status(cr: dict | None) -> dict:
    return (cr or {}).get("status") or {}


def condition(cr: dict | None, type_: str) -> dict:
    return next((c for c in status(cr).get("conditions", []) if c["type"] == type_), {})


def owned_by(child: dict, cr: dict) -> bool:
    """The child's one owner reference is ``cr``, as controller, blocking its deletion."""
    return child["metadata"].get("ownerReferences") == [{
        "apiVersion": f"{rc.GROUP}/{rc.VERSION}", "kind": cr["kind"], "name": cr["metadata"]["name"],
        "uid": cr["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}]


def contains(stored, sent) -> bool:
    """Everything ``sent`` holds is in ``stored`` as sent (a schema's defaults may add more; an unknown
    field, pruned, would be missing)."""
    if isinstance(sent, dict):
        return isinstance(stored, dict) and all(k in stored and contains(stored[k], v) for k, v in sent.items())
    if isinstance(sent, list):
        return isinstance(stored, list) and len(stored) == len(sent) and all(map(contains, stored, sent))
    return stored == sent


def applied_by_operator(child: dict) -> bool:
    return any(m["manager"] == rc.MANAGER and m["operation"] == "Apply" for m in child["metadata"]["managedFields"])


def no_refusals(operator: Operator) -> None:
    """All it did was allowed and went through: no 403, no error but retried conflicts."""
    assert operator.running, operator.log_tail()
    assert not operator.refusals(), "\n".join(operator.refusals())
    assert not operator.errors(), "\n".join(operator.errors())


# ---- the tests -----------------------------------------------------------------------------------

def test_the_operator_has_its_roles_rights_and_no_secrets(operator, identity, dev, admin, resource):
    review = client.AuthenticationV1Api(identity.api).create_self_subject_review({})
    assert review.status.user_info.username == f"system:serviceaccount:{identity.namespace}:{identity.account}"
    authz = client.AuthorizationV1Api(identity.api)

    def can(verb: str, group: str, resource: str, namespace: str | None = identity.namespace) -> bool:
        resource, _, sub = resource.partition("/")
        attributes = {"verb": verb, "group": group, "resource": resource, "subresource": sub, "namespace": namespace}
        answer = authz.create_self_subject_access_review({"spec": {"resourceAttributes": attributes}})
        return answer.status.allowed

    for doc, namespace in ((dev[("Role", "podpulse-operator")], identity.namespace),
                           (dev[("ClusterRole", "podpulse-operator-crds")], None)):
        for rule in doc["rules"]:
            for group in rule["apiGroups"]:
                for res in rule["resources"]:
                    for verb in rule["verbs"]:
                        assert can(verb, group, res, namespace), (verb, group, res, namespace)
    refused = [("get", "", "secrets"), ("list", "", "secrets"), ("watch", "", "secrets"),
               ("list", "", "secrets", None), ("list", "", "configmaps", None), ("create", "", "pods"),
               ("delete", rc.GROUP, "airpodsdatastreams"), ("update", rc.GROUP, "airpodsdatastreams"),
               ("create", "", "configmaps", "default"), ("patch", "ray.io", "rayservices", "default")]
    for verb, group, res, *namespace in refused:
        assert not can(verb, group, res, *namespace), (verb, group, res, *namespace)

    # A stream naming a Secret the policy does not list is refused without reading it (trying would
    # leave a 403 in its log: no_refusals).
    admin.core.create_namespaced_secret(identity.namespace, {"metadata": {"name": "team-db"},
                                                             "stringData": {"PODPULSE_PG_PASSWORD": "x"}})
    cr = admin.create(resource("AirPodsDataStream", "team", credentialsSecret="team-db"))
    cr = until(operator, "phase Refused", lambda: admin.get("AirPodsDataStream", "team"),
               lambda cr: status(cr).get("phase") == "Refused")
    ready = condition(cr, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "NotAllowed")
    assert "spec.credentialsSecret 'team-db'" in ready["message"]
    assert not admin.children(cr, "RayJob") and not admin.children(cr, "ConfigMap")
    admin.delete("AirPodsDataStream", "team")
    until(operator, "the refused stream deleted", lambda: admin.get("AirPodsDataStream", "team"), lambda cr: cr is None)
    no_refusals(operator)


def test_a_stream_gets_its_children_follows_kuberay_and_changes_and_is_collected(operator, admin, resource, policy):
    name = "fleet-au"
    cr = admin.create(resource("AirPodsDataStream", name))
    config_map, job = rc.stream_children(cr, policy)  # what the operator should make of it
    children = until(operator, "ConfigMap and RayJob", lambda: (admin.children(cr, "ConfigMap"),
                                                                admin.children(cr, "RayJob")),
                     lambda seen: all(seen))
    assert [list(kind) for kind in children] == [[config_map["metadata"]["name"]], [job["metadata"]["name"]]]
    made_map, made_job = (next(iter(kind.values())) for kind in children)
    assert made_map["data"] == config_map["data"] and made_map["immutable"] is True
    assert contains(made_job["spec"], job["spec"])  # KubeRay's CRD pruned nothing (it adds defaults)
    for child in (made_map, made_job):
        assert owned_by(child, cr) and applied_by_operator(child), child["metadata"]
        assert child["metadata"]["labels"][rc.HASH_LABEL] == job["metadata"]["labels"][rc.HASH_LABEL]

    cr = until(operator, "phase Pending", lambda: admin.get("AirPodsDataStream", name),
               lambda cr: status(cr).get("phase") == "Pending")
    assert (status(cr)["rayJob"], status(cr)["observedGeneration"]) == (job["metadata"]["name"], 1)
    assert "podpulse.io/finalizer" in cr["metadata"]["finalizers"]  # kopf's, for its resync timer
    ready = condition(cr, "Ready")
    assert (ready["status"], ready["reason"], ready["observedGeneration"]) == ("False", "RayClusterStarting", 1)

    # KubeRay reports the job running; a resync (kopf's timer) reads it.
    admin.patch_status("RayJob", job["metadata"]["name"], {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING",
                                                           "dashboardURL": "fleet-au-head-svc:8265"})
    cr = until(operator, "phase Running", lambda: admin.get("AirPodsDataStream", name),
               lambda cr: status(cr).get("phase") == "Running")
    ready = condition(cr, "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "Ingesting") and ready["lastTransitionTime"]
    assert (status(cr)["jobStatus"], status(cr)["dashboardURL"]) == ("RUNNING", "fleet-au-head-svc:8265")
    columns = admin.columns("AirPodsDataStream", name)
    assert columns.pop("Age")
    assert columns == {"Name": name, "Topic": "podpulse.telemetry", "Partitions": 12, "Consumers": 6,
                       "Phase": "Running", "RayJob": job["metadata"]["name"]}

    # Someone edits the RayJob: the next server-side apply takes the field back (forced: the
    # field's other manager is a conflict the operator overrides).
    admin.patch("RayJob", job["metadata"]["name"], {"spec": {"entrypoint": "sleep infinity"}},
                field_manager="someone-else")
    made_job = until(operator, "the entrypoint re-asserted", lambda: admin.get("RayJob", job["metadata"]["name"]),
                     lambda j: j["spec"]["entrypoint"] == job["spec"]["entrypoint"])
    owners = {m["manager"]: m.get("fieldsV1", {}) for m in made_job["metadata"]["managedFields"]
              if not m.get("subresource")}
    assert "f:entrypoint" in owners[rc.MANAGER]["f:spec"]
    assert "f:entrypoint" not in owners.get("someone-else", {}).get("f:spec", {})

    # A changed spec: new children, the old ones pruned by the operator.
    cr = admin.patch("AirPodsDataStream", name, {"spec": {"consumers": 12}})
    assert cr["metadata"]["generation"] == 2
    new_map, new_job = rc.stream_children(cr, policy)
    assert new_job["metadata"]["name"] != job["metadata"]["name"]
    until(operator, "only the new spec's children", lambda: (set(admin.children(cr, "ConfigMap")),
                                                             set(admin.children(cr, "RayJob"))),
          lambda seen: seen == ({new_map["metadata"]["name"]}, {new_job["metadata"]["name"]}))
    cr = until(operator, "status of generation 2", lambda: admin.get("AirPodsDataStream", name),
               lambda cr: status(cr).get("observedGeneration") == 2)
    assert (status(cr)["phase"], status(cr)["rayJob"]) == ("Pending", new_job["metadata"]["name"])

    # Deleted (background propagation): the garbage collector deletes the children by their owner
    # reference. The operator has no deletion handler for streams: kopf only drops its finalizer.
    admin.delete("AirPodsDataStream", name)
    until(operator, "the stream and its children gone", lambda: (admin.get("AirPodsDataStream", name),
                                                                 admin.children(cr, "ConfigMap"),
                                                                 admin.children(cr, "RayJob")),
          lambda seen: not any(seen))
    no_refusals(operator)


def test_a_schema_manager_reports_the_applied_version_and_is_deleted_in_the_foreground(operator, admin, resource,
                                                                                      policy):
    name = "analytics-core"
    cr = admin.create(resource("OracleDBSchemaManager", name, targetVersion=4))
    (job,) = rc.schema_children(cr, policy)
    jobs = until(operator, "the migration Job", lambda: admin.children(cr, "Job"), bool)
    assert list(jobs) == [job["metadata"]["name"]]
    made = jobs[job["metadata"]["name"]]
    assert owned_by(made, cr) and applied_by_operator(made), made["metadata"]
    container = made["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["db", "migrate", "--url", "$(PODPULSE_DB_URL)", "--target", "4"]
    assert container["image"] == policy.image and made["spec"]["backoffLimit"] == 2
    cr = until(operator, "phase Migrating", lambda: admin.get("OracleDBSchemaManager", name),
               lambda cr: status(cr).get("phase") == "Migrating")

    # The Job completes (the Job controller would write this).
    start = datetime.now(timezone.utc).replace(microsecond=0)
    done = [{"type": t, "status": "True", "lastTransitionTime": start + timedelta(seconds=1), "reason": "Done",
             "message": "migrated"} for t in ("SuccessCriteriaMet", "Complete")]
    admin.batch.patch_namespaced_job_status(job["metadata"]["name"], admin.ns, {"status": {
        "startTime": start, "completionTime": start + timedelta(seconds=1), "succeeded": 1, "conditions": done}})
    cr = until(operator, "phase Applied", lambda: admin.get("OracleDBSchemaManager", name),
               lambda cr: status(cr).get("phase") == "Applied")
    assert status(cr)["appliedVersion"] == 4 and condition(cr, "Ready")["status"] == "True"
    columns = admin.columns("OracleDBSchemaManager", name)
    assert {k: columns[k] for k in ("Name", "Target", "Applied", "Phase", "Job")} == {
        "Name": name, "Target": 4, "Applied": 4, "Phase": "Applied", "Job": job["metadata"]["name"]}

    # A new target: a new Job, the finished one pruned; the applied version stays until it completes.
    cr = admin.patch("OracleDBSchemaManager", name, {"spec": {"targetVersion": 5}})
    (new_job,) = rc.schema_children(cr, policy)
    until(operator, "only the new Job", lambda: set(admin.children(cr, "Job")),
          lambda names: names == {new_job["metadata"]["name"]})
    cr = until(operator, "Migrating to 5", lambda: admin.get("OracleDBSchemaManager", name),
               lambda cr: status(cr).get("observedGeneration") == 2)
    assert (status(cr)["phase"], status(cr)["appliedVersion"]) == ("Migrating", 4)

    # Foreground deletion: the resource stays, marked, until the garbage collector has deleted the
    # Job, which blocks it (blockOwnerDeletion).
    deleting = admin.delete("OracleDBSchemaManager", name, propagation_policy="Foreground")
    assert "foregroundDeletion" in deleting["metadata"]["finalizers"] and deleting["metadata"]["deletionTimestamp"]
    seen = []

    def look() -> tuple[bool, bool]:  # (the resource exists, its Job exists)
        seen.append((admin.get("OracleDBSchemaManager", name) is not None, bool(admin.children(cr, "Job"))))
        return seen[-1]

    until(operator, "the Job, then the resource, gone", look, lambda both: both == (False, False))
    assert (False, True) not in seen, seen  # never the resource gone while its Job remained
    no_refusals(operator)


def scorer(admin: Admin) -> dict:
    """PodPulseAPI's user_config in the RayService's serve config as stored."""
    config_ = yaml.safe_load(admin.get("RayService", RAYSERVICE)["spec"]["serveConfigV2"])
    (app,) = config_["applications"]
    return next(d for d in app["deployments"] if d["name"] == "PodPulseAPI")["user_config"]


def kuberay_caught_up(admin: Admin) -> None:
    """What KubeRay reports once Serve runs the RayService's current spec."""
    generation = admin.get("RayService", RAYSERVICE)["metadata"]["generation"]
    admin.patch_status("RayService", RAYSERVICE, {"observedGeneration": generation, "activeServiceStatus": {
        "applicationStatuses": {"podpulse": {"status": "RUNNING"}}}})


def test_a_deployer_patches_the_rayservice_through_a_conflict_and_withdraws_its_canary(operator, admin, resource,
                                                                                       dev):
    admin.create(dev[("RayService", RAYSERVICE)])
    kuberay_caught_up(admin)
    assert scorer(admin) == {"model_path": None, "canary_model_path": None, "canary_percent": 0}

    # Pin the serving version. Just before the operator's patch, another writer changes the
    # RayService (tests/k8s/operator_interference.py): the patch's resourceVersion is stale, the API
    # server answers 409, the handler asks kopf for a retry, and the retry applies it.
    cr = admin.create(resource("AIModelDeployer", "battery-stable", version=STABLE, canaryPercent=100))
    until(operator, "model_path pinned", lambda: scorer(admin), lambda c: c["model_path"] == f"{MODELS}/{STABLE}")
    assert admin.get("RayService", RAYSERVICE)["metadata"]["annotations"][INTERFERED] == "1"
    log = operator.log()  # kopf's timer and its create handler both met the 409 (they run side by side)
    assert "failed temporarily: RayService changed while patching it: 409" in log, operator.log_tail(6000)
    assert "the object has been modified; please apply your changes to the latest version" in log
    # ... and said so where `kubectl describe` shows it: an event, posted with the operator's token.
    events = until(operator, "an event about the retry", lambda: admin.core.list_namespaced_event(
        admin.ns, field_selector=f"involvedObject.uid={cr['metadata']['uid']}").items, bool)
    assert any(e.type == "Error" and "RayService changed while patching it" in e.message for e in events), \
        [(e.type, e.message) for e in events]
    cr = until(operator, "Applied, KubeRay not caught up", lambda: admin.get("AIModelDeployer", "battery-stable"),
               lambda cr: status(cr).get("phase") == "Deploying" and condition(cr, "Applied").get("status") == "True")
    kuberay_caught_up(admin)
    cr = until(operator, "phase Serving", lambda: admin.get("AIModelDeployer", "battery-stable"),
               lambda cr: status(cr).get("phase") == "Serving")
    assert condition(cr, "Ready")["status"] == "True" and status(cr)["stableVersion"] == STABLE
    columns = admin.columns("AIModelDeployer", "battery-stable")
    assert {k: columns[k] for k in ("Version", "Percent", "Stable", "Canary", "Phase", "RayService")} == {
        "Version": STABLE, "Percent": 100, "Stable": STABLE, "Canary": None, "Phase": "Serving",
        "RayService": RAYSERVICE}

    # Its deployer goes; the promotion stays (one deployer per application: a deployer at 100 would
    # take any canary out again at its next resync).
    admin.delete("AIModelDeployer", "battery-stable")
    until(operator, "the stable deployer gone", lambda: admin.get("AIModelDeployer", "battery-stable"),
          lambda cr: cr is None)
    assert scorer(admin)["model_path"] == f"{MODELS}/{STABLE}"

    # A 10% canary beside it (the example).
    admin.create(resource("AIModelDeployer"))
    until(operator, "the canary in the serve config", lambda: scorer(admin),
          lambda c: c == {"model_path": f"{MODELS}/{STABLE}", "canary_model_path": f"{MODELS}/{CANARY}",
                          "canary_percent": 10})
    kuberay_caught_up(admin)
    cr = until(operator, "phase Canary", lambda: admin.get("AIModelDeployer", "battery-anomaly"),
               lambda cr: status(cr).get("phase") == "Canary")
    assert (status(cr)["stableVersion"], status(cr)["canaryVersion"], status(cr)["canaryPercent"]) == (STABLE, CANARY, 10)
    assert admin.columns("AIModelDeployer", "battery-anomaly")["Canary"] == CANARY

    # Deleting its deployer withdraws the canary (kopf's finalizer holds the deletion until then); the
    # RayService, which no deployer owns, stays, and so does the stable version.
    admin.delete("AIModelDeployer", "battery-anomaly")
    until(operator, "the canary deployer gone", lambda: admin.get("AIModelDeployer", "battery-anomaly"),
          lambda cr: cr is None)
    assert scorer(admin) == {"model_path": f"{MODELS}/{STABLE}", "canary_model_path": None, "canary_percent": 0}
    service = admin.get("RayService", RAYSERVICE)
    assert service is not None and not service["metadata"].get("ownerReferences")
    no_refusals(operator)
