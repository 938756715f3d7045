"""crds/reconcile.py per kind: create, update, idempotence, owner references, status."""

import copy
import re
import shlex

import pytest
import yaml

from crds import reconcile as rc
from storage.config import StorageConfig

NOW, LATER = "2026-11-28T07:00:00Z", "2026-11-28T07:05:00Z"


def owned_by(child, cr):
    (ref,) = child["metadata"]["ownerReferences"]
    return ref == {"apiVersion": "podpulse.io/v1alpha1", "kind": cr["kind"], "name": cr["metadata"]["name"],
                   "uid": cr["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}


def with_status(obj, status):
    obj = copy.deepcopy(obj)
    obj["status"] = status
    return obj


# ---- AirPodsDataStream ---------------------------------------------------------------------------

def test_stream_creates_a_configmap_and_a_rayjob_owned_by_it(example, parse_cli, k8s_validate):
    cr = example("AirPodsDataStream")
    config, job = rc.stream_children(cr, rc.Policy(image="podpulse:2.60.0-py311-abc"))
    assert [config["kind"], job["kind"]] == ["ConfigMap", "RayJob"]
    for child in (config, job):
        assert owned_by(child, cr)
        assert child["metadata"]["namespace"] == "podpulse"
        assert child["metadata"]["name"].startswith("fleet-au-") and len(child["metadata"]["name"]) <= 47
        assert rc.owner_selector(cr) == "podpulse.io/owner=fleet-au,podpulse.io/owner-kind=airpodsdatastream"
        assert child["metadata"]["labels"]["podpulse.io/owner"] == "fleet-au"
    k8s_validate(config)
    # The ConfigMap is the --storage-config file, and PodPulse's router accepts it.
    assert yaml.safe_load(config["data"]["storage.yaml"]) == cr["spec"]["storage"]
    stored = StorageConfig(**yaml.safe_load(config["data"]["storage.yaml"]))
    assert dict(stored.retention) == {"raw_events": 400}  # the ingest gives Cassandra rows their TTL
    # The entrypoint is a `podpulse ingest` the real CLI accepts, with the resource's settings.
    command, params = parse_cli(shlex.split(job["spec"]["entrypoint"]))
    assert command == "ingest"
    assert params["bootstrap"] == "kafka-bootstrap.podpulse.svc:9093" and params["topic"] == "podpulse.telemetry"
    assert (params["consumers"], params["writers"], params["batch_size"], params["linger_ms"]) == (6, 1, 20000, 200)
    assert params["dlq_topic"] == "podpulse.telemetry.dlq" and params["until_caught_up"] is False
    assert params["kafka_setting"] == ["compression.type=lz4"]
    assert str(params["storage_file"]) == "/etc/podpulse/storage/storage.yaml"
    assert str(params["kafka_config"]) == "/etc/podpulse/kafka/kafka.properties"
    # The head mounts that ConfigMap where the entrypoint reads it.
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert {"name": "storage", "configMap": {"name": config["metadata"]["name"]}} in head["volumes"]
    assert all(c["image"] == "podpulse:2.60.0-py311-abc" for c in head["containers"])


def test_stream_workers_fit_the_consumers_and_writers(example):
    """Ray offers whole CPUs: KubeRay gives a pod limited to 500m one CPU (num-cpus), 1500m two."""
    for consumers, writers, cpu, workers in [(6, 1, 2, 2), (1, 1, 2, 1), (12, 1, 2, 4), (12, 1, 4, 2), (12, 8, 2, 4),
                                             (12, 9, 2, 5), (1, 1, "500m", 1), (4, 1, "500m", 3), (4, 1, "1500m", 2),
                                             (4, 1, "2", 2)]:
        cr = example("AirPodsDataStream", consumers=consumers, writers=writers, workers={"cpu": cpu, "memory": "4Gi"})
        (group,) = rc.stream_children(cr)[1]["spec"]["rayClusterSpec"]["workerGroupSpecs"]
        assert (group["minReplicas"], group["replicas"], group["maxReplicas"]) == (workers, workers, 2 * workers)
        assert group["minReplicas"] * rc.ray_cpus(cpu) >= consumers * rc.CONSUMER_CPUS + writers * rc.WRITER_CPUS
        (container,) = group["template"]["spec"]["containers"]
        assert container["resources"]["requests"]["cpu"] == container["resources"]["limits"]["cpu"] == str(cpu)


def test_stream_head_has_the_size_asked_for(example):
    cr = example("AirPodsDataStream", head={"cpu": "250m", "memory": "1Gi"})
    head = rc.stream_children(cr)[1]["spec"]["rayClusterSpec"]["headGroupSpec"]
    (container,) = head["template"]["spec"]["containers"]
    assert container["resources"] == {"requests": {"cpu": "250m", "memory": "1Gi"},
                                      "limits": {"cpu": "250m", "memory": "1Gi"}}
    assert head["rayStartParams"]["num-cpus"] == "0"  # whatever its size, no actor asking for CPUs lands there


def test_stream_children_are_idempotent_and_leave_the_resource_alone(example):
    cr = example("AirPodsDataStream")
    before = copy.deepcopy(cr)
    assert rc.stream_children(cr) == rc.stream_children(copy.deepcopy(cr))
    assert cr == before
    # Metadata the children do not depend on changes nothing.
    touched = copy.deepcopy(cr)
    touched["metadata"].update(generation=7, resourceVersion="99", annotations={"note": "x"})
    assert rc.stream_children(touched) == rc.stream_children(cr)


def test_a_changed_spec_gives_new_children(example, parse_cli):
    old = rc.stream_children(example("AirPodsDataStream"))
    new = rc.stream_children(example("AirPodsDataStream", consumers=12, untilCaughtUp=True))
    assert {c["metadata"]["name"] for c in old}.isdisjoint(c["metadata"]["name"] for c in new)
    _, params = parse_cli(shlex.split(new[1]["spec"]["entrypoint"]))
    assert params["consumers"] == 12 and params["until_caught_up"] is True
    # A new image alone is a new spec too.
    other = rc.Policy(image="podpulse:2.60.0-py311-other")
    assert rc.stream_children(example("AirPodsDataStream"), other)[1]["metadata"]["name"] != old[1]["metadata"]["name"]


# The rules about a resource's own fields are the API server's (tests/k8s/test_apiserver.py): names,
# consumers ≤ partitions, Kafka keys and values. What the operator checks itself:
@pytest.mark.parametrize("change, message", [
    ({"image": "podpulse:2.59.0-py311"}, "must start with rayVersion"),
    ({"rayVersion": "2.59.0"}, "'podpulse:2.60.0-py311': its tag must start with rayVersion 2.59.0"),  # its own
    ({"writers": 2, "storage": {"backends": {"duck": {"type": "duckdb"}}}}, "DuckDB .* takes one writer"),
    ({"storage": {"backends": {"pg": {"type": "postgresql", "url": "postgresql://p@db/p"},
                               "duck": {"type": "duckdb"}},
                  "routes": {"raw_events": "pg", "devices": "pg", "rollups": "duck", "offsets": "pg",
                             "anomalies": "pg"}}}, "same backend"),
])
def test_stream_rules_the_operator_checks_itself(example, change, message):
    with pytest.raises(rc.InvalidSpec, match=message):
        rc.stream_children(example("AirPodsDataStream", **change))


def test_the_longest_names_the_crds_allow_make_valid_child_names(example):
    """The CRDs cap names at 38 (streams) and 46 (schema managers): their RayJob and Job names fit."""
    (config, job) = rc.stream_children(example("AirPodsDataStream", name="s" * 38))
    assert len(job["metadata"]["name"]) <= 47  # KubeRay's cap on RayJob names
    (migrate,) = rc.schema_children(example("OracleDBSchemaManager", name="m" * 46))
    assert len(migrate["metadata"]["name"]) <= 63


def rayjob_seen(job, deployment, ray, **extra):
    return with_status(job, {"jobDeploymentStatus": deployment, "jobStatus": ray, **extra})


@pytest.mark.parametrize("backfill, deployment, ray, phase, ready, reason", [
    (False, "", "", "Pending", "False", "RayClusterStarting"),
    (False, "Initializing", "", "Pending", "False", "RayClusterStarting"),
    (False, "Retrying", "", "Starting", "False", "Starting"),
    (False, "ValidationFailed", "", "Failed", "False", "JobFailed"),
    (False, "Running", "PENDING", "Starting", "False", "Starting"),
    (False, "Running", "RUNNING", "Running", "True", "Ingesting"),
    (False, "Failed", "FAILED", "Failed", "False", "AppFailed"),
    (False, "Complete", "SUCCEEDED", "Failed", "False", "JobEnded"),  # a continuous stream should not end
    (True, "Complete", "SUCCEEDED", "Completed", "True", "CaughtUp"),
])
def test_stream_status_follows_the_rayjob(example, backfill, deployment, ray, phase, ready, reason):
    cr = example("AirPodsDataStream", untilCaughtUp=backfill)
    children = rc.stream_children(cr)
    job = rayjob_seen(children[1], deployment, ray, reason="AppFailed" if ray == "FAILED" else "")
    status = rc.stream_status(cr, children, [job], NOW)
    (cond,) = status["conditions"]
    assert (status["phase"], cond["type"], cond["status"], cond["reason"]) == (phase, "Ready", ready, reason)
    assert status["rayJob"] == children[1]["metadata"]["name"] and status["observedGeneration"] == 1


def test_stream_status_ignores_rayjobs_of_older_specs_and_keeps_transition_times(example):
    cr = example("AirPodsDataStream")
    old_job = rayjob_seen(rc.stream_children(example("AirPodsDataStream", consumers=2))[1], "Running", "RUNNING")
    children = rc.stream_children(cr)
    first = rc.stream_status(cr, children, [old_job], NOW)
    assert first["phase"] == "Pending" and first["conditions"][0]["lastTransitionTime"] == NOW
    cr["status"] = first
    # Same condition later: the transition time stays; a flip moves it.
    assert rc.stream_status(cr, children, [old_job], LATER)["conditions"][0]["lastTransitionTime"] == NOW
    running = rc.stream_status(cr, children, [rayjob_seen(children[1], "Running", "RUNNING")], LATER)
    assert running["conditions"][0]["lastTransitionTime"] == LATER and running["phase"] == "Running"


# ---- OracleDBSchemaManager -----------------------------------------------------------------------

def test_schema_manager_creates_a_migration_job(example, parse_cli, k8s_validate):
    cr = example("OracleDBSchemaManager")
    (job,) = rc.schema_children(cr, rc.Policy(image="podpulse:2.60.0-py311-abc"))
    k8s_validate(job)
    assert owned_by(job, cr) and job["metadata"]["name"].startswith("analytics-core-migrate-")
    assert job["metadata"]["labels"]["podpulse.io/target-version"] == "5"
    (container,) = job["spec"]["template"]["spec"]["containers"]
    command, params = parse_cli(container["command"] + container["args"])
    assert command == "migrate" and params["target"] == 5 and params["url"] == "$(PODPULSE_DB_URL)"
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert env["PODPULSE_DB_URL"] == {"name": "podpulse-oracle", "key": "url"}
    assert env["PODPULSE_DB_PASSWORD"] == {"name": "podpulse-oracle", "key": "password", "optional": True}
    assert job["spec"]["backoffLimit"] == 2 and "ttlSecondsAfterFinished" not in job["spec"]


def test_schema_manager_is_idempotent_and_a_new_target_is_a_new_job(example, parse_cli):
    cr = example("OracleDBSchemaManager")
    assert rc.schema_children(cr) == rc.schema_children(copy.deepcopy(cr))
    (old,), (new,) = rc.schema_children(cr), rc.schema_children(example("OracleDBSchemaManager", targetVersion=4))
    assert old["metadata"]["name"] != new["metadata"]["name"]
    c = new["spec"]["template"]["spec"]["containers"][0]
    assert parse_cli(c["command"] + c["args"])[1]["target"] == 4


def job_seen(job, condition=None, reason=""):
    status = {"active": 1} if condition is None else {
        "conditions": [{"type": condition, "status": "True", "reason": reason, "message": f"{condition} here"}]}
    return with_status(job, status)


def test_schema_status_reports_the_applied_version_from_completed_jobs(example):
    cr = example("OracleDBSchemaManager", targetVersion=3)
    children = rc.schema_children(cr)
    pending = rc.schema_status(cr, children, [], NOW)
    assert (pending["phase"], pending["appliedVersion"]) == ("Pending", 0)
    running = rc.schema_status(cr, children, [job_seen(children[0])], NOW)
    assert (running["phase"], running["conditions"][0]["status"]) == ("Migrating", "False")
    done = rc.schema_status(cr, children, [job_seen(children[0], "Complete")], NOW)
    assert (done["phase"], done["appliedVersion"], done["conditions"][0]["status"]) == ("Applied", 3, "True")
    failed = rc.schema_status(cr, children, [job_seen(children[0], "Failed", "BackoffLimitExceeded")], NOW)
    assert (failed["phase"], failed["conditions"][0]["reason"]) == ("Failed", "BackoffLimitExceeded")


def test_schema_status_keeps_the_applied_version_across_targets(example):
    cr = example("OracleDBSchemaManager", targetVersion=3)
    cr["status"] = {"appliedVersion": 5}  # reached before, by a Job since pruned
    children = rc.schema_children(cr)
    status = rc.schema_status(cr, children, [job_seen(children[0], "Complete")], NOW)
    assert status["appliedVersion"] == 5 and "only go forward" in status["conditions"][0]["message"]
    # A completed Job of an older spec still counts, while the new one runs.
    older = job_seen(rc.schema_children(example("OracleDBSchemaManager", targetVersion=4))[0], "Complete")
    cr["status"] = {}
    assert rc.schema_status(cr, children, [older, job_seen(children[0])], NOW)["appliedVersion"] == 4


# ---- AIModelDeployer -----------------------------------------------------------------------------

REGISTRY = "/data/models/battery-anomaly"  # deployments/rayservice.yaml's args.registry + the model
OLD, NEW = f"{REGISTRY}/20261120T070000000000Z", f"{REGISTRY}/20261128T070000000000Z"  # NEW: the example's


@pytest.fixture
def rayservice(root):
    """deployments/rayservice.yaml as KubeRay runs it: model_path null, no canary."""
    svc = yaml.safe_load((root / "deployments" / "rayservice.yaml").read_text())
    svc["metadata"].update(namespace="podpulse", resourceVersion="41", generation=3)
    svc["status"] = {"observedGeneration": 3, "activeServiceStatus": {"applicationStatuses": {
        "podpulse": {"status": "RUNNING"}}}}
    return svc


def merge(target, patch):
    """RFC 7386 JSON merge patch, as the API server applies it."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge(out.get(key), value)
    return out


def applied(svc, patch):
    svc = merge(svc, patch)
    svc["metadata"]["generation"] += 1
    svc["metadata"]["resourceVersion"] = str(int(svc["metadata"]["resourceVersion"]) + 1)
    return svc


def apps(svc):
    return {a["name"]: a for a in yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]}


def scorer(svc):
    """The user_config of the deployment that loads the models (deployments/app.py: PodPulseAPI)."""
    return next(d for d in apps(svc)["podpulse"]["deployments"] if d["name"] == "PodPulseAPI")["user_config"]


def serving(svc, **user_config):
    """``svc`` with PodPulseAPI's user_config set by hand (not by the code under test)."""
    svc = copy.deepcopy(svc)
    config = yaml.safe_load(svc["spec"]["serveConfigV2"])
    config["applications"][0]["deployments"][0]["user_config"] = user_config
    svc["spec"]["serveConfigV2"] = yaml.safe_dump(config)
    return svc


def without_user_config(svc):
    """Everything of the application but the scorer's user_config, to show nothing else moves."""
    app = copy.deepcopy(apps(svc)["podpulse"])
    for d in app["deployments"]:
        d.pop("user_config", None)
    return app


@pytest.fixture
def pinned(rayservice):
    """The RayService with a stable version pinned and no canary."""
    return serving(rayservice, model_path=OLD, canary_model_path=None, canary_percent=0)


def test_promotion_makes_the_version_the_stable_one(example, rayservice):
    cr = example("AIModelDeployer", canaryPercent=100)
    patch = rc.deployer_patch(cr, rayservice)
    assert patch["metadata"] == {"resourceVersion": "41"}  # a conditional write, and no annotations
    svc = applied(rayservice, patch)
    assert scorer(svc) == {"model_path": NEW, "canary_model_path": None, "canary_percent": 0}
    assert list(apps(svc)) == ["podpulse"]  # one application, on its own route
    assert without_user_config(svc) == without_user_config(rayservice)
    assert {k: v for k, v in yaml.safe_load(svc["spec"]["serveConfigV2"]).items() if k != "applications"} == \
        {k: v for k, v in yaml.safe_load(rayservice["spec"]["serveConfigV2"]).items() if k != "applications"}
    assert rc.deployer_patch(cr, svc) is None  # idempotent: once applied, nothing to do


def test_a_canary_answers_its_share_beside_the_stable_version(example, pinned):
    cr = example("AIModelDeployer")  # canaryPercent 10
    svc = applied(pinned, rc.deployer_patch(cr, pinned))
    assert scorer(svc) == {"model_path": OLD, "canary_model_path": NEW, "canary_percent": 10}
    assert list(apps(svc)) == ["podpulse"] and apps(svc)["podpulse"]["route_prefix"] == "/"
    assert without_user_config(svc) == without_user_config(pinned)
    assert not svc["metadata"].get("annotations")
    assert rc.deployer_patch(cr, svc) is None
    # A new share changes only the share; a new version only the canary.
    more = applied(svc, rc.deployer_patch(example("AIModelDeployer", canaryPercent=50), svc))
    assert scorer(more) == {"model_path": OLD, "canary_model_path": NEW, "canary_percent": 50}
    newer = applied(more, rc.deployer_patch(example("AIModelDeployer", canaryPercent=50, version="v3"), more))
    assert scorer(newer) == {"model_path": OLD, "canary_model_path": f"{REGISTRY}/v3", "canary_percent": 50}


def test_promoting_the_canary_ends_it(example, pinned):
    canary = applied(pinned, rc.deployer_patch(example("AIModelDeployer"), pinned))
    promoted = applied(canary, rc.deployer_patch(example("AIModelDeployer", canaryPercent=100), canary))
    assert scorer(promoted) == {"model_path": NEW, "canary_model_path": None, "canary_percent": 0}
    # Deleting the deployer now leaves the promotion in place.
    assert rc.deployer_removal(example("AIModelDeployer", canaryPercent=100), promoted) is None


def test_zero_or_deletion_withdraws_the_canary_and_keeps_the_stable_version(example, pinned):
    cr = example("AIModelDeployer")
    svc = applied(pinned, rc.deployer_patch(cr, pinned))
    for patch in (rc.deployer_patch(example("AIModelDeployer", canaryPercent=0), svc), rc.deployer_removal(cr, svc)):
        back = applied(svc, patch)
        assert scorer(back) == {"model_path": OLD, "canary_model_path": None, "canary_percent": 0}
        assert apps(back) == apps(pinned)
        # Withdrawn stays withdrawn: nothing more to patch, on a resync or a deletion.
        assert rc.deployer_patch(example("AIModelDeployer", canaryPercent=0), back) is None
        assert rc.deployer_removal(cr, back) is None


def test_withdrawal_leaves_an_unpinned_stable_version_unpinned(example, rayservice):
    assert rc.deployer_patch(example("AIModelDeployer", canaryPercent=0), rayservice) is None
    # A user_config that already means "no canary", however written, is not rewritten.
    assert rc.deployer_patch(example("AIModelDeployer", canaryPercent=0), serving(rayservice, model_path=OLD)) is None
    canary = serving(rayservice, model_path=None, canary_model_path=NEW, canary_percent=30)  # set by hand
    back = applied(canary, rc.deployer_removal(example("AIModelDeployer"), canary))
    assert scorer(back) == {"model_path": None, "canary_model_path": None, "canary_percent": 0}


def test_a_canary_needs_a_pinned_stable_version_other_than_itself(example, rayservice, pinned):
    # model_path null is the registry's latest: most likely the version under test itself.
    with pytest.raises(rc.InvalidSpec, match="pinned stable version"):
        rc.deployer_patch(example("AIModelDeployer"), rayservice)
    promoted = serving(rayservice, model_path=NEW + "/", canary_model_path=None, canary_percent=0)
    with pytest.raises(rc.InvalidSpec, match="already the stable version"):
        rc.deployer_patch(example("AIModelDeployer"), promoted)
    rc.deployer_patch(example("AIModelDeployer"), pinned)  # the same spec, once a stable version is pinned


def test_the_stable_version_is_read_as_the_deployment_runs_it(example, rayservice):
    config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    # No user_config in the serve config: build() takes it from the application's arguments.
    config["applications"][0]["args"]["model_path"] = OLD
    del config["applications"][0]["deployments"][0]["user_config"]
    svc = copy.deepcopy(rayservice)
    svc["spec"]["serveConfigV2"] = yaml.safe_dump(config)
    out = applied(svc, rc.deployer_patch(example("AIModelDeployer"), svc))
    assert scorer(out) == {"model_path": OLD, "canary_model_path": NEW, "canary_percent": 10}
    # Keys the operator does not know are kept; a missing deployment entry is added.
    extra = applied(svc, rc.deployer_patch(example("AIModelDeployer"), serving(svc, model_path=OLD, note="x")))
    assert scorer(extra) == {"model_path": OLD, "canary_model_path": NEW, "canary_percent": 10, "note": "x"}
    config["applications"][0]["deployments"] = []
    svc["spec"]["serveConfigV2"] = yaml.safe_dump(config)
    out = applied(svc, rc.deployer_patch(example("AIModelDeployer", canaryPercent=100), svc))
    assert scorer(out) == {"model_path": NEW, "canary_model_path": None, "canary_percent": 0}


def test_comments_and_layout_of_the_applied_config_cause_no_patch(example, pinned):
    cr = example("AIModelDeployer")
    svc = applied(pinned, rc.deployer_patch(cr, pinned))
    reformatted = copy.deepcopy(svc)
    reformatted["spec"]["serveConfigV2"] = "# edited by hand\n" + yaml.safe_dump(
        yaml.safe_load(svc["spec"]["serveConfigV2"]), default_flow_style=True)
    assert rc.deployer_patch(cr, reformatted) is None


@pytest.mark.parametrize("change, message", [
    ({"rayService": {"name": "podpulse", "application": "other"}}, "no application 'other'"),
    ({"rayService": {"name": "podpulse", "application": "other"}, "canaryPercent": 0}, "no application 'other'"),
])
def test_deployer_refuses_what_it_cannot_do(example, pinned, change, message):
    with pytest.raises(rc.InvalidSpec, match=message):
        rc.deployer_patch(example("AIModelDeployer", **change), pinned)


def test_deployer_needs_an_absolute_registry(example, rayservice, root):
    relative = copy.deepcopy(rayservice)
    relative["spec"]["serveConfigV2"] = (root / "deployments" / "serve-config.yaml").read_text()  # podpulse-data/models
    with pytest.raises(rc.InvalidSpec, match="absolute"):
        rc.deployer_patch(example("AIModelDeployer", canaryPercent=100), relative)
    patch = rc.deployer_patch(example("AIModelDeployer", registry="/mnt/models", canaryPercent=100), relative)
    assert scorer(applied(relative, patch))["model_path"] == "/mnt/models/battery-anomaly/20261128T070000000000Z"


def kuberay_saw(svc, state="RUNNING", **extra):
    """KubeRay has observed the current generation and reports the application ``state``."""
    svc = copy.deepcopy(svc)
    svc["status"] = {"observedGeneration": svc["metadata"]["generation"], "activeServiceStatus": {
        "applicationStatuses": {"podpulse": {"status": state, **extra}}}}
    return svc


def present(status):
    """The status as stored: a None in the merge patch removes the field."""
    return {k: v for k, v in status.items() if v is not None}


def test_deployer_status_names_the_stable_and_the_canary_version(example, pinned, validate_cr):
    cr = example("AIModelDeployer")
    missing = rc.deployer_status(cr, None, NOW)
    assert missing["phase"] == "Pending" and missing["conditions"][0]["reason"] == "RayServiceNotFound"
    assert present(missing).keys() == {"observedGeneration", "phase", "conditions"}
    before = rc.deployer_status(cr, pinned, NOW)
    assert before["phase"] == "Pending" and before["conditions"][0]["status"] == "False"
    assert (before["stableVersion"], before["canaryVersion"]) == ("20261120T070000000000Z", None)  # as it is
    svc = applied(pinned, rc.deployer_patch(cr, pinned))  # generation 4, KubeRay still at 3
    lagging = rc.deployer_status(cr, svc, NOW)
    assert lagging["conditions"][0]["status"] == "True" and lagging["phase"] == "Deploying"
    assert rc.deployer_status(cr, kuberay_saw(svc, "DEPLOYING"), NOW)["phase"] == "Deploying"
    ready = rc.deployer_status(cr, kuberay_saw(svc), NOW)
    assert ready["phase"] == "Canary" and [c["status"] for c in ready["conditions"]] == ["True", "True"]
    assert ready.items() >= {"stableModelPath": OLD, "stableVersion": "20261120T070000000000Z",
                             "canaryModelPath": NEW, "canaryVersion": "20261128T070000000000Z",
                             "canaryPercent": 10}.items()
    assert "canary 20261128T070000000000Z answers 10% of scoring requests" in ready["conditions"][0]["message"]
    validate_cr({**cr, "status": present(ready)})
    failed = rc.deployer_status(cr, kuberay_saw(svc, "DEPLOY_FAILED", message="model.keras not found"), NOW)
    assert failed["phase"] == "Failed" and "model.keras not found" in failed["conditions"][1]["message"]


def test_deployer_status_after_promotion_and_withdrawal_clears_the_canary(example, pinned, validate_cr):
    cr = example("AIModelDeployer")
    canary = applied(pinned, rc.deployer_patch(cr, pinned))
    cr["status"] = present(rc.deployer_status(cr, kuberay_saw(canary), NOW))
    for percent, phase, stable in [(100, "Serving", NEW), (0, "Withdrawn", OLD)]:
        changed = example("AIModelDeployer", canaryPercent=percent)
        changed["status"] = cr["status"]
        svc = kuberay_saw(applied(canary, rc.deployer_patch(changed, canary)))
        status = rc.deployer_status(changed, svc, LATER)
        assert status["phase"] == phase and status["stableModelPath"] == stable
        # None, so that the merge patch of the status removes the canary it named before.
        assert status["canaryVersion"] is status["canaryModelPath"] is status["canaryPercent"] is None
        assert present(merge(cr["status"], status)).keys().isdisjoint({"canaryVersion", "canaryModelPath",
                                                                        "canaryPercent"})
        assert "no canary" in status["conditions"][0]["message"]
        validate_cr({**changed, "status": present(merge(cr["status"], status))})


def test_an_invalid_deployer_still_names_what_is_served(example, rayservice, validate_cr):
    cr = example("AIModelDeployer")
    svc = kuberay_saw(serving(rayservice, model_path=None, canary_model_path=OLD, canary_percent=5))
    status = rc.deployer_status(cr, svc, NOW)
    assert status["phase"] == "Invalid" and "pinned stable version" in status["conditions"][1]["message"]
    assert [c["status"] for c in status["conditions"]] == ["False", "False"]
    assert (status["stableVersion"], status["stableModelPath"]) == (rc.UNPINNED, None)  # (latest)
    assert (status["canaryVersion"], status["canaryPercent"]) == ("20261120T070000000000Z", 5)
    validate_cr({**cr, "status": present(status)})
    # A canary share of 0 is no canary: reconfigure() does not load it.
    idle = rc.deployer_status(cr, serving(rayservice, model_path=OLD, canary_model_path=NEW, canary_percent=0), NOW)
    assert idle["canaryVersion"] is None


def test_the_unpinned_marker_is_no_version_name(crd_schema):
    pattern = crd_schema("AIModelDeployer")["properties"]["spec"]["properties"]["version"]["pattern"]
    assert not re.match(pattern, rc.UNPINNED)


def test_invalid_status_names_the_problem(example):
    cr = example("AIModelDeployer")
    status = rc.invalid_status(cr, "no application 'x'", NOW)
    assert status["phase"] == "Invalid" and status["conditions"][0]["message"] == "no application 'x'"
