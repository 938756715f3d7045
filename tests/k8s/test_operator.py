"""The kopf handlers against an in-memory cluster, and the RBAC they need.

The double records every call the handlers make; the test then holds deploy/base/rbac.yaml
to exactly those calls (plus what kopf itself does), so the Role grants nothing unused.
kopf's own machinery (watching, posting events, patching status) is not exercised here;
test_operator_live.py runs the operator, kopf and all, against a real API server under this RBAC.
"""

import copy

import kopf
import pytest
import yaml

from crds import operator as op
from crds import reconcile as rc

PLURAL = {"ConfigMap": ("", "configmaps"), "RayJob": ("ray.io", "rayjobs"), "Job": ("batch", "jobs"),
          "RayService": ("ray.io", "rayservices"), "Secret": ("", "secrets")}
VERBS = {"apply": {"create", "patch"}, "list": {"list"}, "delete": {"delete"}, "get": {"get"},
         "merge_patch": {"patch"}, "labels": {"get"}}


def merge(target, patch):
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge(out.get(key), value)
    return out


class FakeCluster:
    """Objects by (kind, namespace, name); server-side apply is a merge that keeps status."""

    def __init__(self):
        self.objects, self.calls = {}, []

    def _record(self, verb, kind):
        self.calls.append((verb, kind))

    def apply(self, obj):
        self._record("apply", obj["kind"])
        key = (obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"])
        self.objects[key] = merge(self.objects.get(key, {}), obj)

    def list(self, api_version, kind, namespace, selector):
        self._record("list", kind)
        wanted = dict(pair.split("=") for pair in selector.split(","))
        return [copy.deepcopy(o) for (k, ns, _), o in sorted(self.objects.items())
                if k == kind and ns == namespace and wanted.items() <= o["metadata"].get("labels", {}).items()]

    def delete(self, api_version, kind, namespace, name):
        self._record("delete", kind)
        del self.objects[(kind, namespace, name)]

    def get(self, api_version, kind, namespace, name):
        self._record("get", kind)
        found = self.objects.get((kind, namespace, name))
        return copy.deepcopy(found) if found else None

    def labels(self, api_version, kind, namespace, name):
        self._record("labels", kind)
        found = self.objects.get((kind, namespace, name))
        return dict(found["metadata"].get("labels", {})) if found else None

    def merge_patch(self, api_version, kind, namespace, name, patch):
        self._record("merge_patch", kind)
        current = self.objects[(kind, namespace, name)]
        assert patch["metadata"]["resourceVersion"] == current["metadata"]["resourceVersion"]  # else 409
        updated = merge(current, {k: v for k, v in patch.items() if k != "metadata"})
        updated["metadata"] = merge(current["metadata"], {**patch["metadata"],
                                                          "resourceVersion": str(int(current["metadata"]
                                                                                     ["resourceVersion"]) + 1),
                                                          "generation": current["metadata"]["generation"] + 1})
        self.objects[(kind, namespace, name)] = updated

    def names(self, kind):
        return sorted(name for (k, _, name) in self.objects if k == kind)


@pytest.fixture
def cluster(monkeypatch):
    fake = FakeCluster()
    monkeypatch.setattr(op, "cluster", lambda: fake)
    return fake


def run(handler, cr):
    """Call a handler the way kopf does; return the status it wrote."""
    patch = kopf.Patch()
    handler(body=kopf.Body(copy.deepcopy(cr)), patch=patch, logger=None)
    status = dict(patch.get("status", {}))
    cr["status"] = merge(cr.get("status", {}), status)  # kopf patches the status subresource
    return status


def test_stream_handler_creates_follows_updates_and_prunes(cluster, example):
    cr = example("AirPodsDataStream")
    status = run(op.reconcile_stream, cr)
    (job_name,) = cluster.names("RayJob")
    assert cluster.names("ConfigMap") == [job_name] and status["rayJob"] == job_name
    assert status["phase"] == "Pending"  # the RayJob exists, KubeRay has not reported yet
    # KubeRay reports the job running; the next resync (the timer) sees it.
    cluster.objects[("RayJob", "podpulse", job_name)]["status"] = {"jobDeploymentStatus": "Running",
                                                                    "jobStatus": "RUNNING"}
    assert run(op.reconcile_stream, cr)["phase"] == "Running"
    assert cluster.names("RayJob") == [job_name]  # a resync creates nothing new
    # A changed spec: new children, the old ones pruned.
    cr["spec"]["consumers"] = 12
    cr["metadata"]["generation"] = 2
    status = run(op.reconcile_stream, cr)
    (new_name,) = cluster.names("RayJob")
    assert new_name != job_name and cluster.names("ConfigMap") == [new_name]
    assert (status["phase"], status["observedGeneration"]) == ("Pending", 2)
    # An invalid edit (a Ray the operator's own image does not carry) is reported and leaves the
    # running job alone.
    cr["spec"]["rayVersion"] = "2.59.0"
    status = run(op.reconcile_stream, cr)
    assert status["phase"] == "Invalid" and "rayVersion 2.59.0" in status["conditions"][0]["message"]
    assert cluster.names("RayJob") == [new_name]


def secret(cluster, name, **labels):
    cluster.objects[("Secret", "podpulse", name)] = {"metadata": {"name": name, "namespace": "podpulse",
                                                                  "labels": labels}, "data": {"x": "eA=="}}


@pytest.mark.parametrize("kind, handler, change, named", [
    ("AirPodsDataStream", op.reconcile_stream, {"image": "evil/x:2.60.0"}, "spec.image 'evil/x:2.60.0'"),
    ("AirPodsDataStream", op.reconcile_stream, {"credentialsSecret": "cluster-admin-token"},
     "spec.credentialsSecret 'cluster-admin-token'"),
    ("AirPodsDataStream", op.reconcile_stream, {"kafka": {"plugin.library.paths": "/tmp/evil.so"}},
     "spec.kafka 'plugin.library.paths'"),
    ("OracleDBSchemaManager", op.reconcile_schema, {"connectionSecret": {"name": "cluster-admin-token"}},
     "spec.connectionSecret.name 'cluster-admin-token'"),
])
def test_a_refused_resource_gets_no_children_and_a_status_saying_why(cluster, example, kind, handler, change,
                                                                    named):
    secret(cluster, "cluster-admin-token")  # exists, unlabelled
    status = run(handler, example(kind, **change))
    (ready,) = status["conditions"]
    assert (status["phase"], ready["status"], ready["reason"]) == ("Refused", "False", "NotAllowed")
    assert named in ready["message"]
    assert not cluster.names("RayJob") and not cluster.names("ConfigMap") and not cluster.names("Job")
    assert {verb for verb, _ in cluster.calls} <= {"labels"}  # it read labels, and created nothing


def test_a_labelled_secret_is_admitted_when_the_operator_admits_by_label(cluster, example, monkeypatch):
    secret(cluster, "team-db", **{"podpulse.io/allowed": "true"})
    assert run(op.reconcile_stream, example("AirPodsDataStream", credentialsSecret="team-db"))["phase"] == "Refused"
    assert not cluster.calls  # by default the operator never reads a Secret
    monkeypatch.setattr(op, "POLICY", rc.Policy(image=op.IMAGE, secret_label="podpulse.io/allowed=true"))
    assert run(op.reconcile_stream, example("AirPodsDataStream", credentialsSecret="team-db"))["phase"] == "Pending"
    assert ("labels", "Secret") in cluster.calls and cluster.names("RayJob")


def test_schema_handler_reports_the_applied_version(cluster, example):
    cr = example("OracleDBSchemaManager", targetVersion=4)
    assert run(op.reconcile_schema, cr)["phase"] == "Migrating"
    (job,) = cluster.names("Job")
    cluster.objects[("Job", "podpulse", job)]["status"] = {"conditions": [{"type": "Complete", "status": "True"}]}
    status = run(op.reconcile_schema, cr)
    assert (status["phase"], status["appliedVersion"]) == ("Applied", 4)
    cr["spec"]["targetVersion"] = 5
    status = run(op.reconcile_schema, cr)
    assert cluster.names("Job") != [job] and len(cluster.names("Job")) == 1
    assert (status["phase"], status["appliedVersion"]) == ("Migrating", 4)


@pytest.fixture
def rayservice(cluster, root):
    svc = yaml.safe_load((root / "deployments" / "rayservice.yaml").read_text())
    svc["metadata"].update(namespace="podpulse", resourceVersion="7", generation=1)
    svc["status"] = {"observedGeneration": 1, "activeServiceStatus": {"applicationStatuses": {
        "podpulse": {"status": "RUNNING"}}}}
    cluster.objects[("RayService", "podpulse", "podpulse")] = svc
    return svc


def scorer(cluster):
    """PodPulseAPI's user_config in the RayService as the cluster holds it."""
    svc = cluster.objects[("RayService", "podpulse", "podpulse")]
    (app,) = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]  # never a second application
    return next(d for d in app["deployments"] if d["name"] == "PodPulseAPI")["user_config"]


def patches(cluster, since=0):
    return [c for c in cluster.calls[since:] if c[0] == "merge_patch"]


def test_deployer_handler_pins_runs_a_canary_and_withdraws_it_on_delete(cluster, rayservice, example):
    old = example("AIModelDeployer", name="battery-stable", version="20261120T070000000000Z", canaryPercent=100)
    status = run(op.reconcile_deployer, old)  # pin the serving version
    assert scorer(cluster)["model_path"].endswith("/20261120T070000000000Z")
    assert (status["phase"], status["stableVersion"]) == ("Deploying", "20261120T070000000000Z")
    op.withdraw_canary(body=kopf.Body(copy.deepcopy(old)), logger=None)  # its deletion keeps the promotion
    assert scorer(cluster)["model_path"].endswith("/20261120T070000000000Z")

    cr = example("AIModelDeployer")  # a 10% canary of the example's version
    status = run(op.reconcile_deployer, cr)
    assert scorer(cluster) == {"model_path": "/data/models/battery-anomaly/20261120T070000000000Z",
                               "canary_model_path": "/data/models/battery-anomaly/20261128T070000000000Z",
                               "canary_percent": 10}
    assert status["conditions"][0]["status"] == "True" and status["phase"] == "Deploying"
    assert (status["stableVersion"], status["canaryVersion"], status["canaryPercent"]) == \
        ("20261120T070000000000Z", "20261128T070000000000Z", 10)
    calls = len(cluster.calls)
    svc = cluster.objects[("RayService", "podpulse", "podpulse")]
    svc["status"]["observedGeneration"] = svc["metadata"]["generation"]  # KubeRay caught up
    assert run(op.reconcile_deployer, cr)["phase"] == "Canary"  # resync: reads, does not patch again
    assert patches(cluster, calls) == []
    op.withdraw_canary(body=kopf.Body(copy.deepcopy(cr)), logger=None)
    assert scorer(cluster) == {"model_path": "/data/models/battery-anomaly/20261120T070000000000Z",
                               "canary_model_path": None, "canary_percent": 0}


def test_deployer_handler_promotion_clears_the_canary_from_the_status(cluster, rayservice, example):
    run(op.reconcile_deployer, example("AIModelDeployer", name="pin", version="20261120T070000000000Z",
                                       canaryPercent=100))
    cr = example("AIModelDeployer")
    assert run(op.reconcile_deployer, cr)["canaryVersion"] == "20261128T070000000000Z"
    cr["spec"]["canaryPercent"], cr["metadata"]["generation"] = 100, 2
    run(op.reconcile_deployer, cr)
    assert cr["status"]["stableVersion"] == "20261128T070000000000Z"
    assert {"canaryVersion", "canaryModelPath", "canaryPercent"}.isdisjoint(cr["status"])  # removed, not stale


def test_deployer_handler_leaves_an_unpinned_rayservice_alone(cluster, rayservice, example):
    cr = example("AIModelDeployer")  # a canary, while deployments/rayservice.yaml serves the registry's latest
    status = run(op.reconcile_deployer, cr)
    assert status["phase"] == "Invalid" and "pinned stable version" in status["conditions"][1]["message"]
    assert status["stableVersion"] == rc.UNPINNED and patches(cluster) == []
    assert scorer(cluster) == {"model_path": None, "canary_model_path": None, "canary_percent": 0}


def test_deployer_handler_without_its_rayservice_waits(cluster, example):
    status = run(op.reconcile_deployer, example("AIModelDeployer"))
    assert status["phase"] == "Pending" and status["conditions"][1]["reason"] == "RayServiceNotFound"
    assert {verb for verb, _ in cluster.calls} == {"get"}


def rules(doc):
    return {(group, resource, verb) for rule in doc["rules"] for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def test_rbac_grants_exactly_what_the_operator_uses(cluster, rayservice, example, root):
    # Exercise every handler path: create, resync, update (prune), deployer patch and delete.
    for kind, handler, change in [("AirPodsDataStream", op.reconcile_stream, {"consumers": 12}),
                                  ("OracleDBSchemaManager", op.reconcile_schema, {"targetVersion": 4})]:
        cr = example(kind)
        run(handler, cr)
        cr["spec"].update(change)
        run(handler, cr)
    # A Secret the policy does not list is refused unread: the Role grants nothing on Secrets.
    secret(cluster, "team-db", **{"podpulse.io/allowed": "true"})
    run(op.reconcile_stream, example("AirPodsDataStream", name="team", credentialsSecret="team-db"))
    run(op.reconcile_deployer, example("AIModelDeployer", canaryPercent=100))
    op.withdraw_canary(body=kopf.Body(example("AIModelDeployer")), logger=None)
    used = {(PLURAL[kind][0], PLURAL[kind][1], verb) for call, kind in cluster.calls for verb in VERBS[call]}

    docs = {d["kind"]: d for d in yaml.safe_load_all((root / "deploy" / "base" / "rbac.yaml").read_text())}
    granted = rules(docs["Role"])
    plurals = [op.STREAMS, op.SCHEMAS, op.DEPLOYERS]
    kopf_needs = {("podpulse.io", p, v) for p in plurals for v in ("list", "watch", "patch")} \
        | {("podpulse.io", f"{p}/status", "patch") for p in plurals} | {("", "events", "create")}
    assert used <= granted, used - granted
    assert granted - kopf_needs == used, (granted - kopf_needs) - used  # nothing granted that goes unused
    # kopf observes CRDs and namespaces (with a fixed --namespace too; test_operator_live.py runs it)
    assert rules(docs["ClusterRole"]) == {(group, resource, v) for v in ("list", "watch") for group, resource in
                                          [("apiextensions.k8s.io", "customresourcedefinitions"), ("", "namespaces")]}
    # The plurals the operator and the Role name are the CRDs' own.
    crd_plurals = {yaml.safe_load(f.read_text())["spec"]["names"]["plural"]
                   for f in (root / "crds").glob("podpulse.io_*")}
    assert set(plurals) == crd_plurals
    assert {g for g, _, _ in kopf_needs if g} == {rc.GROUP}
