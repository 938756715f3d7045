"""The operator's logic as pure functions: custom resource → child manifests, observed → status.

No API calls, no clock, no randomness: the same input gives the same output, so
``crds/operator.py`` can apply the result on every event and every resync.

- Children are named ``<resource>-<8 hex of what they run>``. A RayJob or a Job
  cannot be changed in place, so a changed spec gives a child with a new name; the
  operator prunes the old one. Every child has a controller owner reference with
  blockOwnerDeletion, so Kubernetes deletes it with its resource.
- An AIModelDeployer owns nothing: it rewrites the serve config of a RayService it
  does not own (deleting a deployer must never delete the RayService).
- The API server checks types and ranges against the CRD schemas; the checks here
  are the cross-field rules (the CEL rules of the CRDs, which tests cannot run).

``crds/`` imports neither ``actors/``, ``deployments/`` nor ``storage/``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import shlex

import yaml

__all__ = ["InvalidSpec", "stream_children", "stream_status", "schema_children", "schema_status",
           "deployer_patch", "deployer_removal", "deployer_status", "invalid_status", "owner_selector"]

GROUP, VERSION = "podpulse.io", "v1alpha1"
RAY_VERSION = "2.60.0"  # ray's pin in pyproject.toml (a test holds them equal)
DEFAULT_IMAGE = f"podpulse:{RAY_VERSION}-py311"  # the Dockerfile's image; the operator passes its own
MANAGER = "podpulse-operator"
OWNER_LABEL, KIND_LABEL, HASH_LABEL = "podpulse.io/owner", "podpulse.io/owner-kind", "podpulse.io/spec-hash"
TARGET_LABEL = "podpulse.io/target-version"
CANARY_PERCENT, CANARY_ROUTE = "podpulse.io/canary-percent", "podpulse.io/canary-route"
# Ray resources of the ingest actors (actors/partition_consumer.py, actors/storage_writer.py), copied
# because crds/ may not import actors/: they size the first workers; the autoscaler corrects the rest.
CONSUMER_CPUS, WRITER_CPUS = 0.5, 0.25
RAY_UID = 1000  # user "ray" of the rayproject/ray images
STORAGE_DIR, KAFKA_DIR = "/etc/podpulse/storage", "/etc/podpulse/kafka"

STREAM_DEFAULTS = {"batchSize": 20_000, "lingerMs": 200, "maxInFlight": 2, "dlqTopic": "",
                   "untilCaughtUp": False, "rayVersion": RAY_VERSION, "maxRetries": 3,
                   "workers": {"cpu": 2, "memory": "4Gi"}}
SCHEMA_DEFAULTS = {"backoffLimit": 2, "activeDeadlineSeconds": 900,
                   "connectionSecret": {"urlKey": "url", "passwordKey": "password"}}
DEPLOYER_DEFAULTS = {"canaryPercent": 100, "rayService": {"application": "podpulse", "deployment": "PodPulseAPI"}}

_DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_TYPES, _RELATIONAL = ("duckdb", "postgresql", "oracle", "cassandra"), ("duckdb", "postgresql", "oracle")
_KINDS = ("raw_events", "devices", "rollups", "offsets", "anomalies")
_ONE_TRANSACTION = ("devices", "rollups", "offsets")


class InvalidSpec(ValueError):
    """The resource cannot be reconciled as written; retrying will not help."""


# ---- shared ---------------------------------------------------------------------------------------

def _merged(defaults: dict, given: dict) -> dict:
    out = copy.deepcopy(defaults)
    for key, value in given.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else copy.deepcopy(value)
    return out


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:8]


def _check(ok, message: str) -> None:
    if not ok:
        raise InvalidSpec(message)


def _check_name(cr: dict, longest: int) -> None:
    name = cr["metadata"]["name"]
    _check(_DNS1035.fullmatch(name) and len(name) <= longest,
           f"name {name!r} must be a DNS-1035 label of at most {longest} characters")


def owner_selector(cr: dict) -> str:
    """Label selector of the children of ``cr``."""
    return f"{OWNER_LABEL}={cr['metadata']['name']},{KIND_LABEL}={cr['kind'].lower()}"


def _metadata(cr: dict, name: str, component: str, digest: str, extra: dict | None = None) -> dict:
    meta = cr["metadata"]
    labels = {"app.kubernetes.io/name": "podpulse", "app.kubernetes.io/component": component,
              "app.kubernetes.io/managed-by": MANAGER, OWNER_LABEL: meta["name"],
              KIND_LABEL: cr["kind"].lower(), HASH_LABEL: digest, **(extra or {})}
    owner = {"apiVersion": cr["apiVersion"], "kind": cr["kind"], "name": meta["name"], "uid": meta["uid"],
             "controller": True, "blockOwnerDeletion": True}
    return {"name": name, "namespace": meta["namespace"], "labels": labels, "ownerReferences": [owner]}


def _condition(cr: dict, type_: str, ok: bool, reason: str, message: str, now: str) -> dict:
    """A status condition; lastTransitionTime moves only when the status flips."""
    status = "True" if ok else "False"
    old = next((c for c in (cr.get("status") or {}).get("conditions", []) if c.get("type") == type_), None)
    since = old["lastTransitionTime"] if old and old.get("status") == status and old.get("lastTransitionTime") \
        else now
    return {"type": type_, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": since, "observedGeneration": cr["metadata"].get("generation", 0)}


def invalid_status(cr: dict, message: str, now: str) -> dict:
    return {"observedGeneration": cr["metadata"].get("generation", 0), "phase": "Invalid",
            "conditions": [_condition(cr, "Ready", False, "InvalidSpec", message, now)]}


def _image_matches(image: str, ray_version: str) -> bool:
    """A tagged image's tag starts with the Ray version (KubeRay picks commands by rayVersion)."""
    if "@" in image:  # pinned by digest: nothing to compare
        return True
    last = image.rsplit("/", 1)[-1]
    return ":" not in last or last.split(":", 1)[1].startswith(ray_version)


def _container(name: str, image: str, cpu, memory: str, ports: dict, env_from_secret: str | None = None,
               mounts: list | None = None) -> dict:
    c = {"name": name, "image": image,
         "ports": [{"containerPort": p, "name": n} for n, p in ports.items()],
         "resources": {"requests": {"cpu": str(cpu), "memory": memory}, "limits": {"cpu": str(cpu), "memory": memory}},
         "securityContext": {"allowPrivilegeEscalation": False}}
    if env_from_secret:
        c["envFrom"] = [{"secretRef": {"name": env_from_secret}}]
    if mounts:
        c["volumeMounts"] = mounts
    return c


def _pod(labels: dict, container: dict, volumes: list | None = None) -> dict:
    spec = {"securityContext": {"runAsNonRoot": True, "runAsUser": RAY_UID}, "containers": [container]}
    if volumes:
        spec["volumes"] = volumes
    return {"metadata": {"labels": labels}, "spec": spec}


# ---- AirPodsDataStream → ConfigMap (storage routing) + RayJob (podpulse ingest) ------------------

def check_storage(storage: dict) -> None:
    """The rules of storage.router.StorageConfig that the CRD schema cannot state."""
    backends, routes = storage.get("backends") or {}, storage.get("routes") or {}
    _check(backends, "storage.backends: name at least one backend")
    for name, b in backends.items():
        _check(b.get("type") in _TYPES, f"storage.backends.{name}.type must be one of {', '.join(_TYPES)}")
        _check(b["type"] not in ("postgresql", "oracle") or b.get("url"), f"storage.backends.{name}: needs a url")
        _check(b["type"] != "cassandra" or b.get("hosts"), f"storage.backends.{name}: needs hosts")
        _check(b["type"] != "cassandra" or ("username_env" in b) == ("password_env" in b),
               f"storage.backends.{name}: username_env and password_env go together")
    for kind in _KINDS:
        _check(routes.get(kind) in backends, f"storage.routes.{kind} must name a backend")
        _check(kind == "raw_events" or backends[routes[kind]]["type"] in _RELATIONAL,
               f"storage.routes.{kind}: {routes[kind]!r} is not a relational backend")
    _check(len({routes[k] for k in _ONE_TRANSACTION}) == 1,
           "storage: devices, rollups and offsets must route to the same backend (one transaction)")


def stream_spec(cr: dict) -> dict:
    """The spec with the CRD's defaults, checked."""
    spec = _merged(STREAM_DEFAULTS, cr.get("spec") or {})
    if "kafkaConfigSecret" in spec:
        spec["kafkaConfigSecret"] = _merged({"key": "kafka.properties"}, spec["kafkaConfigSecret"])
    _check_name(cr, 38)
    _check(spec["consumers"] <= spec["partitions"], "consumers must not exceed partitions")
    _check(not any("password" in k or "secret" in k for k in spec.get("kafka", {})),
           "credentials go in kafkaConfigSecret, never in kafka settings")
    check_storage(spec["storage"])
    return spec


def ingest_argv(spec: dict) -> list[str]:
    """The `podpulse ingest` command of a stream (a test parses it with the real CLI)."""
    argv = ["podpulse", "ingest", "--bootstrap", spec["bootstrap"], "--topic", spec["topic"],
            "--consumers", str(spec["consumers"]), "--batch-size", str(spec["batchSize"]),
            "--linger-ms", str(spec["lingerMs"]), "--max-in-flight", str(spec["maxInFlight"]),
            "--storage-config", f"{STORAGE_DIR}/storage.yaml", "--json"]
    if spec["dlqTopic"]:
        argv += ["--dlq-topic", spec["dlqTopic"]]
    if spec["untilCaughtUp"]:
        argv.append("--until-caught-up")
    for key, value in sorted(spec.get("kafka", {}).items()):
        argv += ["-X", f"{key}={value}"]
    if "kafkaConfigSecret" in spec:
        argv += ["--kafka-config", f"{KAFKA_DIR}/{spec['kafkaConfigSecret']['key']}"]
    return argv


def stream_children(cr: dict, image: str = DEFAULT_IMAGE) -> list[dict]:
    """The ConfigMap with the storage routing and the RayJob that ingests the topic."""
    spec = stream_spec(cr)
    image = spec.get("image", image)
    _check(_image_matches(image, spec["rayVersion"]), f"image {image!r}: its tag must start with rayVersion "
                                                      f"{spec['rayVersion']}")
    digest = _digest({"spec": spec, "image": image})
    name = f"{cr['metadata']['name']}-{digest}"
    config = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _metadata(cr, name, "ingest", digest),
              "immutable": True,  # each spec gets its own, named by its hash
              "data": {"storage.yaml": yaml.safe_dump(spec["storage"], sort_keys=True)}}

    pod_labels = {"app.kubernetes.io/name": "podpulse", "app.kubernetes.io/component": "ingest",
                  "podpulse.io/stream": cr["metadata"]["name"]}
    secret = spec.get("credentialsSecret")
    # The driver (`podpulse ingest`) runs on the head and reads both files; the actors get the
    # parsed settings from it, and their credentials from the environment (envFrom).
    volumes = [{"name": "storage", "configMap": {"name": name}}]
    mounts = [{"name": "storage", "mountPath": STORAGE_DIR, "readOnly": True}]
    if "kafkaConfigSecret" in spec:
        volumes.append({"name": "kafka", "secret": {"secretName": spec["kafkaConfigSecret"]["name"]}})
        mounts.append({"name": "kafka", "mountPath": KAFKA_DIR, "readOnly": True})
    head = _pod(pod_labels, _container("ray-head", image, 1, "4Gi", {
        "gcs": 6379, "dashboard": 8265, "client": 10001, "metrics": 8080}, secret, mounts), volumes)
    worker = _pod(pod_labels, _container("ray-worker", image, spec["workers"]["cpu"], spec["workers"]["memory"],
                                         {"metrics": 8080}, secret))
    workers = math.ceil((spec["consumers"] * CONSUMER_CPUS + WRITER_CPUS) / spec["workers"]["cpu"])
    job = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": _metadata(cr, name, "ingest", digest),
           "spec": {
               "entrypoint": shlex.join(ingest_argv(spec)),
               "submissionMode": "K8sJobMode",
               # Each retry is a new Ray cluster; ingest resumes from the stored offsets.
               "backoffLimit": spec["maxRetries"],
               "shutdownAfterJobFinishes": True,
               "ttlSecondsAfterFinished": 600,  # keeps a finished cluster 10 minutes for its logs
               "rayClusterSpec": {
                   "rayVersion": spec["rayVersion"],
                   "authOptions": {"mode": "token"},  # KubeRay ≥ 1.5.1 makes the token Secret and injects it
                   "enableInTreeAutoscaling": True,
                   "autoscalerOptions": {"idleTimeoutSeconds": 120, "resources": {
                       "requests": {"cpu": "200m", "memory": "256Mi"}, "limits": {"cpu": "500m", "memory": "512Mi"}}},
                   # num-cpus 0: no actor that asks for CPUs lands on the head, only the driver and
                   # the 0-CPU IngestSupervisor; consumers and the writer go to the workers.
                   "headGroupSpec": {"rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0",
                                                        "metrics-export-port": "8080"}, "template": head},
                   "workerGroupSpecs": [{"groupName": "consumers", "replicas": workers, "minReplicas": workers,
                                         "maxReplicas": 2 * workers,
                                         "rayStartParams": {"metrics-export-port": "8080"}, "template": worker}]}}}
    return [config, job]


def stream_status(cr: dict, desired: list[dict], rayjobs: list[dict], now: str) -> dict:
    """Phase and Ready condition from the observed RayJob of the current spec."""
    want = next(c["metadata"]["name"] for c in desired if c["kind"] == "RayJob")
    job = next((j for j in rayjobs if j["metadata"]["name"] == want), None)
    st = (job or {}).get("status") or {}
    deployment, ray = st.get("jobDeploymentStatus", ""), st.get("jobStatus", "")
    backfill = bool((cr.get("spec") or {}).get("untilCaughtUp"))
    if job is None:
        phase, ok, reason, message = "Pending", False, "Creating", f"RayJob {want} is not created yet"
    elif deployment == "Failed" or ray == "FAILED":
        phase, ok, reason, message = "Failed", False, st.get("reason") or "JobFailed", st.get("message", "")
    elif deployment == "Complete" or ray in ("SUCCEEDED", "STOPPED"):
        if backfill and ray == "SUCCEEDED":
            phase, ok, reason, message = "Completed", True, "CaughtUp", "every partition was caught up"
        else:  # a continuous stream has no reason to end
            phase, ok, reason, message = "Failed", False, "JobEnded", f"the ingest job ended ({ray or deployment})"
    elif deployment == "Running" and ray == "RUNNING":
        phase, ok, reason, message = "Running", True, "Ingesting", f"RayJob {want} is running"
    else:
        phase, ok, reason, message = "Starting", False, "Starting", f"RayJob {want}: {deployment or 'New'}/{ray or '-'}"
    status = {"observedGeneration": cr["metadata"].get("generation", 0), "phase": phase, "rayJob": want,
              "jobStatus": ray, "jobDeploymentStatus": deployment,
              "conditions": [_condition(cr, "Ready", ok, reason, message, now)]}
    if st.get("dashboardURL"):
        status["dashboardURL"] = st["dashboardURL"]
    return status


# ---- OracleDBSchemaManager → Job (podpulse db migrate) -------------------------------------------

def schema_spec(cr: dict) -> dict:
    spec = _merged(SCHEMA_DEFAULTS, cr.get("spec") or {})
    _check_name(cr, 46)
    return spec


def migrate_argv(spec: dict) -> list[str]:
    # $(VAR) is expanded by the kubelet from the container's env: the URL never sits in the Job.
    return ["podpulse", "db", "migrate", "--url", "$(PODPULSE_DB_URL)", "--target", str(spec["targetVersion"])]


def schema_children(cr: dict, image: str = DEFAULT_IMAGE) -> list[dict]:
    spec = schema_spec(cr)
    image = spec.get("image", image)
    digest = _digest({"spec": spec, "image": image})
    name = f"{cr['metadata']['name']}-migrate-{digest}"
    secret = spec["connectionSecret"]
    meta = _metadata(cr, name, "migration", digest, {TARGET_LABEL: str(spec["targetVersion"])})
    argv = migrate_argv(spec)
    container = {
        "name": "migrate", "image": image, "command": argv[:1], "args": argv[1:],
        "env": [{"name": "PODPULSE_DB_URL", "valueFrom": {"secretKeyRef": {"name": secret["name"],
                                                                           "key": secret["urlKey"]}}},
                # optional: a server with trust auth (or DuckDB) has no password
                {"name": "PODPULSE_DB_PASSWORD", "valueFrom": {"secretKeyRef": {
                    "name": secret["name"], "key": secret["passwordKey"], "optional": True}}}],
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"cpu": "500m", "memory": "512Mi"}},
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]}
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": {
        "backoffLimit": spec["backoffLimit"], "activeDeadlineSeconds": spec["activeDeadlineSeconds"],
        # No ttlSecondsAfterFinished: the finished Job is how the operator knows the version is applied.
        "template": {"metadata": {"labels": {"app.kubernetes.io/name": "podpulse",
                                             "app.kubernetes.io/component": "migration"}},
                     "spec": {"restartPolicy": "Never",
                              "securityContext": {"runAsNonRoot": True, "runAsUser": RAY_UID,
                                                  "seccompProfile": {"type": "RuntimeDefault"}},
                              "containers": [container], "volumes": [{"name": "tmp", "emptyDir": {}}]}}}}
    return [job]


def _job_condition(job: dict, type_: str) -> dict | None:
    return next((c for c in (job.get("status") or {}).get("conditions", [])
                 if c.get("type") == type_ and c.get("status") == "True"), None)


def schema_status(cr: dict, desired: list[dict], jobs: list[dict], now: str) -> dict:
    """appliedVersion: the highest target a Job of this resource completed, kept across Jobs."""
    want = desired[0]["metadata"]["name"]
    target = int(desired[0]["metadata"]["labels"][TARGET_LABEL])
    done = [int(j["metadata"]["labels"][TARGET_LABEL]) for j in jobs
            if _job_condition(j, "Complete") and TARGET_LABEL in j["metadata"].get("labels", {})]
    applied = max([(cr.get("status") or {}).get("appliedVersion", 0), *done])
    job = next((j for j in jobs if j["metadata"]["name"] == want), None)
    failed = _job_condition(job, "Failed") if job else None
    if job is None:
        phase, ok, reason, message = "Pending", False, "Creating", f"Job {want} is not created yet"
    elif _job_condition(job, "Complete"):
        phase, ok, reason = "Applied", True, "Migrated"
        message = f"schema at version {applied}" + (
            f" (target {target} is lower: migrations only go forward)" if applied > target else "")
    elif failed:
        phase, ok, reason, message = "Failed", False, failed.get("reason") or "JobFailed", failed.get("message", "")
    else:
        phase, ok, reason, message = "Migrating", False, "Running", f"Job {want} is migrating to {target}"
    return {"observedGeneration": cr["metadata"].get("generation", 0), "phase": phase,
            "appliedVersion": applied, "job": want,
            "conditions": [_condition(cr, "Ready", ok, reason, message, now)]}


# ---- AIModelDeployer → a patch of a RayService's serveConfigV2 -----------------------------------

def deployer_spec(cr: dict) -> dict:
    return _merged(DEPLOYER_DEFAULTS, cr.get("spec") or {})


def _with_model(app: dict, deployment: str, model_path: str) -> dict:
    app = copy.deepcopy(app)
    deployments = app.setdefault("deployments", [])
    entry = next((d for d in deployments if d.get("name") == deployment), None)
    if entry is None:
        entry = {"name": deployment}
        deployments.append(entry)
    entry["user_config"] = {**(entry.get("user_config") or {}), "model_path": model_path}
    return app


def _plan(cr: dict, rayservice: dict, withdraw: bool = False) -> tuple[dict, dict, str, str | None]:
    """(serve config, annotations, model path, canary application or None) the RayService should have."""
    spec = deployer_spec(cr)
    ref = spec["rayService"]
    config = yaml.safe_load((rayservice.get("spec") or {}).get("serveConfigV2") or "") or {}
    apps = config.get("applications") or []
    primary = next((a for a in apps if a.get("name") == ref["application"]), None)
    _check(primary is not None, f"RayService {ref['name']} has no application {ref['application']!r}")
    registry = spec.get("registry") or (primary.get("args") or {}).get("registry") or ""
    _check(registry.startswith("/"), f"the registry {registry!r} is not an absolute path in the Ray pods: "
                                     "set spec.registry")
    model_path = f"{registry.rstrip('/')}/{spec['model']}/{spec['version']}"
    canary_name = f"{ref['application']}-canary"
    percent = 0 if withdraw else spec["canaryPercent"]
    kept = [a for a in apps if a.get("name") != canary_name]
    annotations = {CANARY_PERCENT: None, CANARY_ROUTE: None}
    canary = None
    if percent == 100:  # promote: the application itself serves the version
        kept = [_with_model(a, ref["deployment"], model_path) if a is primary else a for a in kept]
    elif percent > 0:  # a second application serves it, one replica of each deployment
        canary = _with_model(primary, ref["deployment"], model_path)
        canary["name"] = canary_name
        canary["route_prefix"] = (primary.get("route_prefix") or "/").rstrip("/") + "/canary"
        for d in canary["deployments"]:
            d.pop("autoscaling_config", None)
            d["num_replicas"] = 1
        kept.append(canary)
        annotations = {CANARY_PERCENT: str(percent), CANARY_ROUTE: canary["route_prefix"]}
    return {**config, "applications": kept}, annotations, model_path, canary and canary_name


def _patch(rayservice: dict, config: dict, annotations: dict) -> dict | None:
    current = yaml.safe_load((rayservice.get("spec") or {}).get("serveConfigV2") or "") or {}
    have = (rayservice["metadata"].get("annotations") or {})
    changed_annotations = {k: v for k, v in annotations.items() if have.get(k) != v}
    if current == config and not changed_annotations:
        return None  # compared parsed, so comments and layout in the applied YAML cause no churn
    # resourceVersion makes the write conditional: a concurrent change gets 409 and a retry.
    meta = {"resourceVersion": rayservice["metadata"]["resourceVersion"]}
    if changed_annotations:
        meta["annotations"] = changed_annotations
    out = {"metadata": meta}
    if current != config:
        out["spec"] = {"serveConfigV2": yaml.safe_dump(config, sort_keys=False)}
    return out


def deployer_patch(cr: dict, rayservice: dict) -> dict | None:
    """The JSON merge patch that makes ``rayservice`` serve the resource's version, or None."""
    config, annotations, _, _ = _plan(cr, rayservice)
    return _patch(rayservice, config, annotations)


def deployer_removal(cr: dict, rayservice: dict) -> dict | None:
    """On deletion: remove the canary application; what the application serves stays."""
    config, annotations, _, _ = _plan(cr, rayservice, withdraw=True)
    return _patch(rayservice, config, annotations)


def deployer_status(cr: dict, rayservice: dict | None, now: str) -> dict:
    """Applied: the serve config holds the version. Ready: KubeRay reports those applications RUNNING."""
    spec = deployer_spec(cr)
    base = {"observedGeneration": cr["metadata"].get("generation", 0)}
    if rayservice is None:
        message = f"RayService {spec['rayService']['name']} not found"
        return {**base, "phase": "Pending", "conditions": [
            _condition(cr, "Applied", False, "RayServiceNotFound", message, now),
            _condition(cr, "Ready", False, "RayServiceNotFound", message, now)]}
    _, _, model_path, canary = _plan(cr, rayservice)
    applied = deployer_patch(cr, rayservice) is None
    statuses = ((rayservice.get("status") or {}).get("activeServiceStatus") or {}).get("applicationStatuses") or {}
    apps = [spec["rayService"]["application"], *([canary] if canary else [])]
    states = {a: (statuses.get(a) or {}).get("status", "") for a in apps}
    observed = (rayservice.get("status") or {}).get("observedGeneration", 0) >= \
        rayservice["metadata"].get("generation", 0)
    broken = {a: s for a, s in states.items() if s in ("DEPLOY_FAILED", "UNHEALTHY")}
    if not applied:
        phase, ok, reason, message = "Pending", False, "NotApplied", "the serve config is being patched"
    elif broken:
        phase, ok, reason = "Failed", False, "DeployFailed"
        message = "; ".join(f"{a}: {s} {(statuses[a] or {}).get('message', '')}".strip() for a, s in broken.items())
    elif observed and all(s == "RUNNING" for s in states.values()):
        phase = {100: "Serving", 0: "Withdrawn"}.get(spec["canaryPercent"], "Canary")
        ok, reason, message = True, "Running", ", ".join(f"{a} RUNNING" for a in apps)
    else:
        phase, ok, reason = "Deploying", False, "Deploying"
        message = ", ".join(f"{a} {s or 'not reported'}" for a, s in states.items())
    where = {100: f"{apps[0]} serves {model_path}", 0: f"no application serves {model_path}"}.get(
        spec["canaryPercent"], f"{canary} serves {model_path} at {spec['canaryPercent']}%")
    status = {**base, "phase": phase, "modelPath": model_path, "conditions": [
        _condition(cr, "Applied", applied, "ServeConfigPatched" if applied else "NotApplied",
                   where if applied else "the serve config is being patched", now),
        _condition(cr, "Ready", ok, reason, message, now)]}
    if canary:
        status["canaryApplication"] = canary
    return status
