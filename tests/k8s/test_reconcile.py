"""crds/reconcile.py per kind: create, update, idempotence, owner references, status."""

import copy
import shlex

import pytest
import yaml

from crds import reconcile as rc
from storage.router import StorageConfig

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
    config, job = rc.stream_children(cr, "podpulse:2.60.0-py311-abc")
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
    StorageConfig(**yaml.safe_load(config["data"]["storage.yaml"]))
    # The entrypoint is a `podpulse ingest` the real CLI accepts, with the resource's settings.
    command, params = parse_cli(shlex.split(job["spec"]["entrypoint"]))
    assert command == "ingest"
    assert params["bootstrap"] == "kafka-bootstrap.kafka.svc:9093" and params["topic"] == "podpulse.telemetry"
    assert (params["consumers"], params["batch_size"], params["linger_ms"]) == (6, 20000, 200)
    assert params["dlq_topic"] == "podpulse.telemetry.dlq" and params["until_caught_up"] is False
    assert params["kafka_setting"] == ["compression.type=lz4"]
    assert str(params["storage_file"]) == "/etc/podpulse/storage/storage.yaml"
    assert str(params["kafka_config"]) == "/etc/podpulse/kafka/kafka.properties"
    # The head mounts that ConfigMap where the entrypoint reads it.
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert {"name": "storage", "configMap": {"name": config["metadata"]["name"]}} in head["volumes"]
    assert all(c["image"] == "podpulse:2.60.0-py311-abc" for c in head["containers"])


def test_stream_workers_fit_the_consumers(example):
    for consumers, cpu, workers in [(6, 2, 2), (1, 2, 1), (12, 2, 4), (12, 4, 2)]:
        cr = example("AirPodsDataStream", consumers=consumers, workers={"cpu": cpu, "memory": "4Gi"})
        (group,) = rc.stream_children(cr)[1]["spec"]["rayClusterSpec"]["workerGroupSpecs"]
        assert (group["minReplicas"], group["replicas"], group["maxReplicas"]) == (workers, workers, 2 * workers)
        assert group["minReplicas"] * cpu >= consumers * rc.CONSUMER_CPUS + rc.WRITER_CPUS


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
    assert rc.stream_children(example("AirPodsDataStream"), "podpulse:2.60.0-py311-other")[1]["metadata"]["name"] \
        != old[1]["metadata"]["name"]


@pytest.mark.parametrize("change, message", [
    ({"consumers": 13}, "consumers must not exceed partitions"),
    ({"kafka": {"sasl.password": "hunter2"}}, "kafkaConfigSecret"),
    ({"image": "podpulse:2.59.0-py311"}, "must start with rayVersion"),
    ({"storage": {"backends": {"pg": {"type": "postgresql", "url": "postgresql://p@db/p"},
                               "duck": {"type": "duckdb"}},
                  "routes": {"raw_events": "pg", "devices": "pg", "rollups": "duck", "offsets": "pg",
                             "anomalies": "pg"}}}, "same backend"),
])
def test_stream_rules_the_schema_cannot_state_are_checked(example, change, message):
    with pytest.raises(rc.InvalidSpec, match=message):
        rc.stream_children(example("AirPodsDataStream", **change))


def test_stream_names_must_leave_room_for_the_rayjob_suffix(example):
    rc.stream_children(example("AirPodsDataStream", name="s" * 38))
    with pytest.raises(rc.InvalidSpec, match="at most 38"):
        rc.stream_children(example("AirPodsDataStream", name="s" * 39))
    with pytest.raises(rc.InvalidSpec, match="DNS-1035"):
        rc.stream_children(example("AirPodsDataStream", name="1fleet"))


def rayjob_seen(job, deployment, ray, **extra):
    return with_status(job, {"jobDeploymentStatus": deployment, "jobStatus": ray, **extra})


@pytest.mark.parametrize("backfill, deployment, ray, phase, ready, reason", [
    (False, "Initializing", "", "Starting", "False", "Starting"),
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
    (job,) = rc.schema_children(cr, "podpulse:2.60.0-py311-abc")
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
    with pytest.raises(rc.InvalidSpec, match="at most 46"):
        rc.schema_children(example("OracleDBSchemaManager", name="m" * 47))


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

@pytest.fixture
def rayservice(root):
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


def scorer(app):
    """The deployment that loads the model (deployments/app.py: PodPulseAPI)."""
    return next(d for d in app["deployments"] if d["name"] == "PodPulseAPI")


def test_promotion_sets_the_model_path_of_the_application(example, rayservice):
    cr = example("AIModelDeployer", canaryPercent=100)
    patch = rc.deployer_patch(cr, rayservice)
    assert patch["metadata"]["resourceVersion"] == "41"  # a conditional write
    svc = applied(rayservice, patch)
    path = "/data/models/battery-anomaly/20261128T070000000000Z"
    assert scorer(apps(svc)["podpulse"])["user_config"] == {"model_path": path}
    assert set(apps(svc)) == {"podpulse"}
    assert rc.deployer_patch(cr, svc) is None  # idempotent: once applied, nothing to do
    # Nothing else of the application changed.
    before, after = apps(rayservice)["podpulse"], apps(svc)["podpulse"]
    assert {k: v for k, v in after.items() if k != "deployments"} == {k: v for k, v in before.items()
                                                                      if k != "deployments"}


def test_canary_adds_a_second_application_and_withdrawal_removes_it(example, rayservice):
    cr = example("AIModelDeployer")  # canaryPercent 10
    svc = applied(rayservice, rc.deployer_patch(cr, rayservice))
    canary = apps(svc)["podpulse-canary"]
    assert canary["route_prefix"] == "/canary" and canary["import_path"] == apps(svc)["podpulse"]["import_path"]
    assert canary["args"] == apps(svc)["podpulse"]["args"]
    assert scorer(canary)["user_config"]["model_path"].endswith("/battery-anomaly/20261128T070000000000Z")
    assert all(d["num_replicas"] == 1 for d in canary["deployments"])
    assert scorer(apps(svc)["podpulse"])["user_config"] == {"model_path": None}  # the primary keeps its model
    assert svc["metadata"]["annotations"] == {"podpulse.io/canary-percent": "10", "podpulse.io/canary-route": "/canary"}
    assert rc.deployer_patch(cr, svc) is None
    # A new share changes only the annotation.
    more = rc.deployer_patch(example("AIModelDeployer", canaryPercent=50), svc)
    assert more["metadata"]["annotations"] == {"podpulse.io/canary-percent": "50"} and "spec" not in more
    # 0 withdraws the canary, as does deleting the deployer.
    for patch in (rc.deployer_patch(example("AIModelDeployer", canaryPercent=0), svc), rc.deployer_removal(cr, svc)):
        back = applied(svc, patch)
        assert set(apps(back)) == {"podpulse"} and not back["metadata"].get("annotations")
        assert apps(back)["podpulse"] == apps(rayservice)["podpulse"]


def test_comments_and_layout_of_the_applied_config_cause_no_patch(example, rayservice):
    cr = example("AIModelDeployer", canaryPercent=100)
    svc = applied(rayservice, rc.deployer_patch(cr, rayservice))
    reformatted = copy.deepcopy(svc)
    reformatted["spec"]["serveConfigV2"] = "# edited by hand\n" + yaml.safe_dump(
        yaml.safe_load(svc["spec"]["serveConfigV2"]), default_flow_style=True)
    assert rc.deployer_patch(cr, reformatted) is None


@pytest.mark.parametrize("change, message", [
    ({"rayService": {"name": "podpulse", "application": "other"}}, "no application 'other'"),
])
def test_deployer_refuses_what_it_cannot_do(example, rayservice, change, message):
    with pytest.raises(rc.InvalidSpec, match=message):
        rc.deployer_patch(example("AIModelDeployer", **change), rayservice)


def test_deployer_needs_an_absolute_registry(example, rayservice, root):
    relative = copy.deepcopy(rayservice)
    relative["spec"]["serveConfigV2"] = (root / "deployments" / "serve-config.yaml").read_text()  # podpulse-data/models
    with pytest.raises(rc.InvalidSpec, match="absolute"):
        rc.deployer_patch(example("AIModelDeployer"), relative)
    patch = rc.deployer_patch(example("AIModelDeployer", registry="/mnt/models", canaryPercent=100), relative)
    assert scorer(apps(applied(relative, patch))["podpulse"])["user_config"]["model_path"].startswith("/mnt/models/")


def test_deployer_status(example, rayservice):
    cr = example("AIModelDeployer")
    missing = rc.deployer_status(cr, None, NOW)
    assert missing["phase"] == "Pending" and missing["conditions"][0]["reason"] == "RayServiceNotFound"
    before = rc.deployer_status(cr, rayservice, NOW)
    assert before["phase"] == "Pending" and before["conditions"][0]["status"] == "False"
    svc = applied(rayservice, rc.deployer_patch(cr, rayservice))  # generation 4, KubeRay still at 3
    statuses = svc["status"]["activeServiceStatus"]["applicationStatuses"]
    lagging = rc.deployer_status(cr, svc, NOW)
    assert lagging["conditions"][0]["status"] == "True" and lagging["phase"] == "Deploying"
    svc["status"]["observedGeneration"] = 4
    statuses["podpulse-canary"] = {"status": "DEPLOYING"}
    assert rc.deployer_status(cr, svc, NOW)["phase"] == "Deploying"
    statuses["podpulse-canary"] = {"status": "RUNNING"}
    ready = rc.deployer_status(cr, svc, NOW)
    assert ready["phase"] == "Canary" and ready["canaryApplication"] == "podpulse-canary"
    assert [c["status"] for c in ready["conditions"]] == ["True", "True"]
    statuses["podpulse-canary"] = {"status": "DEPLOY_FAILED", "message": "model.keras not found"}
    failed = rc.deployer_status(cr, svc, NOW)
    assert failed["phase"] == "Failed" and "model.keras not found" in failed["conditions"][1]["message"]


def test_invalid_status_names_the_problem(example):
    cr = example("AIModelDeployer")
    status = rc.invalid_status(cr, "no application 'x'", NOW)
    assert status["phase"] == "Invalid" and status["conditions"][0]["message"] == "no application 'x'"
