"""The operator's logic as pure functions: custom resource → child manifests, observed → status.

No API calls, no clock, no randomness: the same input gives the same output, so
``crds/operator.py`` can apply the result on every event and every resync.

- Children are named ``<resource>-<8 hex of what they run>``. A RayJob or a Job
  cannot be changed in place, so a changed spec gives a child with a new name; the
  operator prunes the old one. Every child has a controller owner reference with
  blockOwnerDeletion, so Kubernetes deletes it with its resource.
- An AIModelDeployer owns nothing: it rewrites the serve config of a RayService it
  does not own (deleting a deployer must never delete the RayService).
- The API server checks every rule about a resource's own fields (the CRD schemas and their
  CEL rules, tested against a real kube-apiserver in tests/k8s/test_apiserver.py). The checks
  here are those it cannot make: against the operator's own image and configuration, against
  other objects (the RayService), and the storage routing as ``StorageConfig`` itself decides it.
- What a resource may ask for (images, Secrets, Kafka settings, credentials) is the operator's
  policy (``crds/policy.py``, from its own configuration): outside it, the resource is Refused.

Storage routing is checked by ``StorageConfig`` itself (``storage.config``), and the ingest defaults and
the actors' CPUs are ``actors.config``'s, so the operator and ``podpulse ingest`` cannot disagree.
``crds/`` imports nothing else of the actors, and nothing of ``deployments/``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shlex
from collections.abc import Mapping

import yaml

from actors.config import CONSUMER_CPUS, INGEST_DEFAULTS, WRITER_CPUS
from crds import policy
from crds.policy import InvalidSpec, Policy, Refused
from podpulse.errors import StorageError
from podpulse.pseudonyms import KEY_ENV
from storage.config import StorageConfig

__all__ = ["InvalidSpec", "Refused", "Policy", "DEFAULT_POLICY", "secret_refs", "stream_children", "stream_status",
           "schema_children", "schema_status", "deployer_patch", "deployer_removal", "deployer_status",
           "invalid_status", "owner_selector"]

GROUP, VERSION = "podpulse.io", "v1alpha1"
RAY_VERSION = "2.60.0"  # ray's pin in pyproject.toml (a test holds them equal)
DEFAULT_IMAGE = f"podpulse:{RAY_VERSION}-py311"  # the Dockerfile's image; the operator passes its own
DEFAULT_POLICY = Policy(image=DEFAULT_IMAGE)  # the operator builds its own from its environment
Labels = Mapping[str, "dict | None"]  # Secret name → its labels (None: not found), as the operator read them
MANAGER = "podpulse-operator"
OWNER_LABEL, KIND_LABEL, HASH_LABEL = "podpulse.io/owner", "podpulse.io/owner-kind", "podpulse.io/spec-hash"
TARGET_LABEL = "podpulse.io/target-version"
RAY_UID = 1000  # user "ray" of the rayproject/ray images
RAY_GID = 100  # its group, "users"
STORAGE_DIR, KAFKA_DIR = "/etc/podpulse/storage", "/etc/podpulse/kafka"
PSEUDONYM_DIR = "/etc/podpulse/pseudonym"  # the key of pseudonymKeySecret, as the file "key"

# The ingest settings' defaults come from IngestConfig (tests/k8s/test_crds.py holds the CRD's equal).
STREAM_DEFAULTS = {"writers": INGEST_DEFAULTS["writers"],
                   "batchSize": INGEST_DEFAULTS["batch_size"], "lingerMs": INGEST_DEFAULTS["linger_ms"],
                   "maxInFlight": INGEST_DEFAULTS["max_in_flight"], "dlqTopic": INGEST_DEFAULTS["dlq_topic"],
                   "untilCaughtUp": False, "rayVersion": RAY_VERSION, "maxRetries": 3,
                   "head": {"cpu": 1, "memory": "4Gi"}, "workers": {"cpu": 2, "memory": "4Gi"}}
SCHEMA_DEFAULTS = {"backoffLimit": 2, "activeDeadlineSeconds": 900,
                   "connectionSecret": {"urlKey": "url", "passwordKey": "password"}}
DEPLOYER_DEFAULTS = {"canaryPercent": 100, "rayService": {"application": "podpulse", "deployment": "PodPulseAPI"}}


# ---- shared ---------------------------------------------------------------------------------------

def _merged(defaults: dict, given: dict) -> dict:
    out = copy.deepcopy(defaults)
    for key, value in given.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else copy.deepcopy(value)
    return out


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:8]


def ray_cpus(cpu: int | str) -> int:
    """The CPUs Ray offers on a pod of ``cpu`` cores (2, "2" or "500m"): KubeRay rounds the limit up."""
    cores = int(cpu[:-1]) / 1000 if isinstance(cpu, str) and cpu.endswith("m") else int(cpu)
    return math.ceil(cores)


def _check(ok, message: str) -> None:
    if not ok:
        raise InvalidSpec(message)


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


def invalid_status(cr: dict, error: Exception | str, now: str) -> dict:
    """Invalid (reason InvalidSpec), or Refused (reason NotAllowed) when the operator's policy forbids it."""
    phase, reason = ("Refused", "NotAllowed") if isinstance(error, Refused) else ("Invalid", "InvalidSpec")
    return {"observedGeneration": cr["metadata"].get("generation", 0), "phase": phase,
            "conditions": [_condition(cr, "Ready", False, reason, str(error), now)]}


def _image_matches(image: str, ray_version: str) -> bool:
    """A tagged image's tag starts with the Ray version (KubeRay picks commands by rayVersion)."""
    if "@" in image:  # pinned by digest: nothing to compare
        return True
    last = image.rsplit("/", 1)[-1]
    return ":" not in last or last.split(":", 1)[1].startswith(ray_version)


# Every container the operator makes: no privilege escalation, no capabilities, a read-only root.
# Ray writes its session (sockets, logs, spilled objects) under /tmp/ray, and Python's and Keras'
# caches fall back to /tmp: an emptyDir there is the only writable place.
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                      "capabilities": {"drop": ["ALL"]}}
# fsGroup: the image's group users owns the mounted Secrets (mode 0440), which uid 1000 could not read otherwise
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": RAY_UID, "fsGroup": RAY_GID, "seccompProfile": {"type": "RuntimeDefault"}}
# The autoscaler sidecar (KubeRay's container, in the head pod): its root stays writable, since
# what it writes outside /tmp/ray is not documented.
AUTOSCALER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
TMP_VOLUME, TMP_MOUNT = {"name": "tmp", "emptyDir": {}}, {"name": "tmp", "mountPath": "/tmp"}


def _container(name: str, image: str, cpu, memory: str, ports: dict, env_from_secret: str | None = None,
               mounts: list | None = None, env: dict | None = None) -> dict:
    c = {"name": name, "image": image,
         "ports": [{"containerPort": p, "name": n} for n, p in ports.items()],
         "resources": {"requests": {"cpu": str(cpu), "memory": memory}, "limits": {"cpu": str(cpu), "memory": memory}},
         "securityContext": copy.deepcopy(CONTAINER_SECURITY)}
    if env_from_secret:
        c["envFrom"] = [{"secretRef": {"name": env_from_secret}}]
    if env:
        c["env"] = [{"name": k, "value": v} for k, v in env.items()]
    c["volumeMounts"] = [copy.deepcopy(TMP_MOUNT), *(mounts or [])]
    return c


def _pod(labels: dict, container: dict, volumes: list | None = None, api_token: bool = True) -> dict:
    """``api_token``: False for pods that never call the Kubernetes API (the head's autoscaler does)."""
    spec = {"securityContext": copy.deepcopy(POD_SECURITY), "containers": [container],
            "volumes": [copy.deepcopy(TMP_VOLUME), *(volumes or [])]}
    if not api_token:
        spec["automountServiceAccountToken"] = False
    return {"metadata": {"labels": labels}, "spec": spec}


def _submitter(labels: dict, image: str) -> dict:
    """The pod of a RayJob that runs `ray job submit` (K8sJobMode): KubeRay's default one has no
    securityContext and mounts an API token. KubeRay sets its command and env; it needs neither
    the API nor a port. It mostly waits, following the job's log: it asks for 100m where KubeRay's
    default asks for 500m, and may burst to KubeRay's limit of one core."""
    container = {"name": "ray-job-submitter", "image": image,
                 "resources": {"requests": {"cpu": "100m", "memory": "200Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
                 "securityContext": copy.deepcopy(CONTAINER_SECURITY), "volumeMounts": [copy.deepcopy(TMP_MOUNT)]}
    pod = _pod(labels, container, api_token=False)
    pod["spec"]["restartPolicy"] = "Never"
    return pod


def secret_refs(cr: dict) -> dict[str, str]:
    """The Secrets a resource names, by field: the operator looks up the labels of those its list lacks."""
    spec = cr.get("spec") or {}
    if cr["kind"] == "AirPodsDataStream":
        refs = {"spec.kafkaConfigSecret.name": (spec.get("kafkaConfigSecret") or {}).get("name"),
                "spec.credentialsSecret": spec.get("credentialsSecret"),
                "spec.pseudonymKeySecret": spec.get("pseudonymKeySecret")}
    elif cr["kind"] == "OracleDBSchemaManager":
        refs = {"spec.connectionSecret.name": (spec.get("connectionSecret") or {}).get("name")}
    else:
        refs = {}
    return {field: name for field, name in refs.items() if name}


def _admit(cr: dict, spec: dict, pol: Policy, secret_labels: Labels | None) -> None:
    """Refused unless the operator's policy allows the image, the Secrets and the settings."""
    problems = policy.check_images(pol, spec) + policy.check_secrets(pol, secret_refs(cr), secret_labels or {})
    if cr["kind"] == "AirPodsDataStream":
        problems += policy.check_storage_credentials(spec["storage"]) + policy.check_hosts(pol, spec, cr["metadata"]["namespace"])
        problems += policy.check_kafka(spec.get("kafka") or {}, KAFKA_DIR if "kafkaConfigSecret" in spec else None)
    policy.refuse(problems)


# ---- AirPodsDataStream → ConfigMap (storage routing) + RayJob (podpulse ingest) ------------------

def check_storage(storage: dict) -> None:
    """The storage routing rules, as ``podpulse ingest`` will apply them (storage.router), plus one
    of the operator's: a stream names its backends (the router's default is a DuckDB file in the pod)."""
    _check(storage.get("backends"), "storage.backends: name at least one backend")
    try:
        StorageConfig(**copy.deepcopy(storage))
    except (StorageError, TypeError) as e:
        raise InvalidSpec(f"storage: {e}") from e


def stream_spec(cr: dict) -> dict:
    """The spec with the CRD's defaults, checked."""
    spec = _merged(STREAM_DEFAULTS, cr.get("spec") or {})
    if "kafkaConfigSecret" in spec:
        spec["kafkaConfigSecret"] = _merged({"key": "kafka.properties"}, spec["kafkaConfigSecret"])
    check_storage(spec["storage"])
    embedded = StorageConfig(**copy.deepcopy(spec["storage"])).embedded_backends()
    _check(spec["writers"] == 1 or not embedded,
           f"writers: DuckDB ({', '.join(embedded)}) takes one writer; more need server backends")
    return spec


def ingest_argv(spec: dict) -> list[str]:
    """The `podpulse ingest` command of a stream (a test parses it with the real CLI)."""
    argv = ["podpulse", "ingest", "--bootstrap", spec["bootstrap"], "--topic", spec["topic"],
            "--consumers", str(spec["consumers"]), "--writers", str(spec["writers"]),
            "--batch-size", str(spec["batchSize"]),
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


def stream_children(cr: dict, pol: Policy = DEFAULT_POLICY, secret_labels: Labels | None = None) -> list[dict]:
    """The ConfigMap with the storage routing and the RayJob that ingests the topic.

    ``secret_labels``: labels of the Secrets named by the resource that ``pol`` does not list.
    """
    spec = stream_spec(cr)
    _admit(cr, spec, pol, secret_labels)
    image = spec.get("image", pol.image)
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
    # Every pod hashes device ids with the one key (podpulse.pseudonyms): the consumers read the file
    # the driver names, at the same path on each pod.
    key = [{"name": "pseudonym-key", "secret": {"secretName": spec["pseudonymKeySecret"], "defaultMode": 0o440,
                                                "items": [{"key": "key", "path": "key"}]}}]
    key_mount = [{"name": "pseudonym-key", "mountPath": PSEUDONYM_DIR, "readOnly": True}]
    key_env = {KEY_ENV: f"{PSEUDONYM_DIR}/key"}
    volumes = [{"name": "storage", "configMap": {"name": name}}, *key]
    mounts = [{"name": "storage", "mountPath": STORAGE_DIR, "readOnly": True}, *key_mount]
    if "kafkaConfigSecret" in spec:
        volumes.append({"name": "kafka", "secret": {"secretName": spec["kafkaConfigSecret"]["name"]}})
        mounts.append({"name": "kafka", "mountPath": KAFKA_DIR, "readOnly": True})
    head = _pod(pod_labels, _container("ray-head", image, spec["head"]["cpu"], spec["head"]["memory"], {
        "gcs": 6379, "dashboard": 8265, "client": 10001, "metrics": 8080}, secret, mounts, key_env), volumes)
    worker = _pod(pod_labels, _container("ray-worker", image, spec["workers"]["cpu"], spec["workers"]["memory"],
                                         {"metrics": 8080}, secret, key_mount, key_env), key, api_token=False)
    workers = math.ceil((spec["consumers"] * CONSUMER_CPUS + spec["writers"] * WRITER_CPUS)
                        / ray_cpus(spec["workers"]["cpu"]))
    submitter = _submitter(pod_labels, image)
    job = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": _metadata(cr, name, "ingest", digest),
           "spec": {
               "entrypoint": shlex.join(ingest_argv(spec)),
               "submissionMode": "K8sJobMode",
               # Each retry is a new Ray cluster; ingest resumes from the stored offsets.
               "backoffLimit": spec["maxRetries"],
               "shutdownAfterJobFinishes": True,
               "ttlSecondsAfterFinished": 600,  # keeps a finished cluster 10 minutes for its logs
               "submitterPodTemplate": submitter,
               "rayClusterSpec": {
                   "rayVersion": spec["rayVersion"],
                   "authOptions": {"mode": "token"},  # KubeRay ≥ 1.5.1 makes the token Secret and injects it
                   "enableInTreeAutoscaling": True,
                   "autoscalerOptions": {"idleTimeoutSeconds": 120, "resources": {
                       "requests": {"cpu": "200m", "memory": "256Mi"}, "limits": {"cpu": "500m", "memory": "512Mi"}},
                       "securityContext": copy.deepcopy(AUTOSCALER_SECURITY)},
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
    elif deployment in ("Failed", "ValidationFailed") or ray == "FAILED":
        phase, ok, reason, message = "Failed", False, st.get("reason") or "JobFailed", st.get("message", "")
    elif deployment == "Complete" or ray in ("SUCCEEDED", "STOPPED"):
        if backfill and ray == "SUCCEEDED":
            phase, ok, reason, message = "Completed", True, "CaughtUp", "every partition was caught up"
        else:  # a continuous stream has no reason to end
            phase, ok, reason, message = "Failed", False, "JobEnded", f"the ingest job ended ({ray or deployment})"
    elif deployment == "Running" and ray == "RUNNING":
        phase, ok, reason, message = "Running", True, "Ingesting", f"RayJob {want} is running"
    elif deployment in ("", "Initializing"):  # as a Pod is Pending until its containers start
        phase, ok, reason, message = "Pending", False, "RayClusterStarting", \
            f"RayJob {want}: KubeRay is bringing up its Ray cluster ({deployment or 'New'})"
    else:  # the Ray cluster is up, the job submitted (or KubeRay retrying, waiting)
        phase, ok, reason, message = "Starting", False, "Starting", f"RayJob {want}: {deployment or 'New'}/{ray or '-'}"
    status = {"observedGeneration": cr["metadata"].get("generation", 0), "phase": phase, "rayJob": want,
              "jobStatus": ray, "jobDeploymentStatus": deployment,
              "conditions": [_condition(cr, "Ready", ok, reason, message, now)]}
    if st.get("dashboardURL"):
        status["dashboardURL"] = st["dashboardURL"]
    return status


# ---- OracleDBSchemaManager → Job (podpulse db migrate) -------------------------------------------

def schema_spec(cr: dict) -> dict:
    return _merged(SCHEMA_DEFAULTS, cr.get("spec") or {})


def migrate_argv(spec: dict) -> list[str]:
    # $(VAR) is expanded by the kubelet from the container's env: the URL never sits in the Job.
    return ["podpulse", "db", "migrate", "--url", "$(PODPULSE_DB_URL)", "--target", str(spec["targetVersion"])]


def schema_children(cr: dict, pol: Policy = DEFAULT_POLICY, secret_labels: Labels | None = None) -> list[dict]:
    spec = schema_spec(cr)
    _admit(cr, spec, pol, secret_labels)
    image = spec.get("image", pol.image)
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
        "securityContext": copy.deepcopy(CONTAINER_SECURITY), "volumeMounts": [copy.deepcopy(TMP_MOUNT)]}
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": {
        "backoffLimit": spec["backoffLimit"], "activeDeadlineSeconds": spec["activeDeadlineSeconds"],
        # No ttlSecondsAfterFinished: the finished Job is how the operator knows the version is applied.
        "template": {"metadata": {"labels": {"app.kubernetes.io/name": "podpulse",
                                             "app.kubernetes.io/component": "migration"}},
                     "spec": {"restartPolicy": "Never", "automountServiceAccountToken": False,
                              "securityContext": copy.deepcopy(POD_SECURITY),
                              "containers": [container], "volumes": [copy.deepcopy(TMP_VOLUME)]}}}}
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
#
# The scoring deployment (PodPulseAPI, deployments/app.py) takes user_config {model_path,
# canary_model_path, canary_percent}: each scoring request is answered by the canary with
# probability canary_percent / 100, else by model_path (null: the registry's latest version, looked
# up by each replica). Serve applies a changed user_config with reconfigure() on the running replicas.

SCORER_CONFIG = {"model_path": None, "canary_model_path": None, "canary_percent": 0}
UNPINNED = "(latest)"  # status.stableVersion when model_path is null; no version is named so (CRD pattern)
_FAILED = ("DEPLOY_FAILED", "UNHEALTHY")


def deployer_spec(cr: dict) -> dict:
    return _merged(DEPLOYER_DEFAULTS, cr.get("spec") or {})


def _serve_config(rayservice: dict) -> dict:
    return yaml.safe_load((rayservice.get("spec") or {}).get("serveConfigV2") or "") or {}


def _application(config: dict, ref: dict) -> dict:
    app = next((a for a in config.get("applications") or [] if a.get("name") == ref["application"]), None)
    _check(app is not None, f"RayService {ref['name']} has no application {ref['application']!r}")
    return app


def _scorer_config(app: dict, deployment: str) -> dict:
    """The user_config the deployment runs with: its own in the serve config, else the one
    ``build()`` makes from the application's arguments."""
    entry = next((d for d in app.get("deployments") or [] if d.get("name") == deployment), None)
    if entry is not None and isinstance(entry.get("user_config"), dict):
        given = entry["user_config"]
    else:
        args = app.get("args") or {}
        given = {k: args[k] for k in SCORER_CONFIG if k in args}
    out = {**SCORER_CONFIG, **given}
    out["canary_percent"] = out["canary_percent"] or 0
    return out


def _model_path(spec: dict, app: dict) -> str:
    registry = spec.get("registry") or (app.get("args") or {}).get("registry") or ""
    _check(registry.startswith("/"), f"the registry {registry!r} is not an absolute path in the Ray pods: "
                                     "set spec.registry")
    return f"{registry.rstrip('/')}/{spec['model']}/{spec['version']}"


def _wanted(spec: dict, app: dict, served: dict, percent: int) -> dict:
    """The scorer's user_config: 100 promotes the version, 1-99 makes it the canary, 0 withdraws the canary."""
    if percent == 0:  # model_path stays as it is
        return {**served, "canary_model_path": None, "canary_percent": 0}
    path = _model_path(spec, app)
    if percent == 100:
        return {**served, "model_path": path, "canary_model_path": None, "canary_percent": 0}
    stable = served["model_path"]
    _check(stable, f"a canary needs a pinned stable version, and {spec['rayService']['deployment']}'s model_path "
                   "is null (the registry's latest, which may be this very version): promote the serving "
                   "version first (canaryPercent: 100)")
    _check(stable.rstrip("/") != path, f"{spec['version']} is already the stable version: a canary of it "
                                       "changes nothing (to roll back, promote the previous version)")
    return {**served, "canary_model_path": path, "canary_percent": percent}


def _with_scorer_config(app: dict, deployment: str, user_config: dict) -> dict:
    app = copy.deepcopy(app)
    deployments = app.setdefault("deployments", [])
    entry = next((d for d in deployments if d.get("name") == deployment), None)
    if entry is None:
        entry = {"name": deployment}
        deployments.append(entry)
    entry["user_config"] = user_config
    return app


def _plan(cr: dict, rayservice: dict, withdraw: bool = False) -> dict:
    """The serve config the RayService should have."""
    spec = deployer_spec(cr)
    ref = spec["rayService"]
    config = _serve_config(rayservice)
    app = _application(config, ref)
    served = _scorer_config(app, ref["deployment"])
    wanted = _wanted(spec, app, served, 0 if withdraw else spec["canaryPercent"])
    if wanted == served:
        return config  # already so, however the user_config is written
    return {**config, "applications": [_with_scorer_config(a, ref["deployment"], wanted) if a is app else a
                                       for a in config["applications"]]}


def _patch(rayservice: dict, config: dict) -> dict | None:
    if _serve_config(rayservice) == config:
        return None  # compared parsed, so comments and layout in the applied YAML cause no churn
    # resourceVersion makes the write conditional: a concurrent change gets 409 and a retry.
    return {"metadata": {"resourceVersion": rayservice["metadata"]["resourceVersion"]},
            "spec": {"serveConfigV2": yaml.safe_dump(config, sort_keys=False)}}


def deployer_patch(cr: dict, rayservice: dict) -> dict | None:
    """The JSON merge patch that makes ``rayservice`` serve the resource's version, or None."""
    return _patch(rayservice, _plan(cr, rayservice))


def deployer_removal(cr: dict, rayservice: dict) -> dict | None:
    """On deletion: withdraw the canary; the stable version stays."""
    return _patch(rayservice, _plan(cr, rayservice, withdraw=True))


def _version(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _serving(rayservice: dict | None, ref: dict) -> dict:
    """Status fields naming what the RayService's serve config serves now; None clears a field."""
    try:
        _check(rayservice is not None, "no RayService")
        served = _scorer_config(_application(_serve_config(rayservice), ref), ref["deployment"])
    except InvalidSpec:  # no RayService, or no such application: nothing to name
        return dict.fromkeys(("stableModelPath", "stableVersion", "canaryModelPath", "canaryVersion",
                              "canaryPercent"))
    stable = served["model_path"]
    canary = served["canary_model_path"] if served["canary_percent"] > 0 else None  # reconfigure() ignores it at 0
    return {"stableModelPath": stable, "stableVersion": _version(stable) if stable else UNPINNED,
            "canaryModelPath": canary, "canaryVersion": canary and _version(canary),
            "canaryPercent": served["canary_percent"] if canary else None}


def deployer_status(cr: dict, rayservice: dict | None, now: str) -> dict:
    """Applied: the serve config holds the spec. Ready: KubeRay reports the application RUNNING.

    The stable and canary fields name what the serve config holds, whether or not it is the spec:
    an Invalid spec leaves the RayService alone, and the status still says what it serves.
    """
    spec = deployer_spec(cr)
    ref = spec["rayService"]
    base = {"observedGeneration": cr["metadata"].get("generation", 0), **_serving(rayservice, ref)}
    if rayservice is None:
        message = f"RayService {ref['name']} not found"
        return {**base, "phase": "Pending", "conditions": [
            _condition(cr, "Applied", False, "RayServiceNotFound", message, now),
            _condition(cr, "Ready", False, "RayServiceNotFound", message, now)]}
    try:
        applied = deployer_patch(cr, rayservice) is None
    except InvalidSpec as e:
        return {**base, "phase": "Invalid", "conditions": [
            _condition(cr, "Applied", False, "InvalidSpec", str(e), now),
            _condition(cr, "Ready", False, "InvalidSpec", str(e), now)]}
    serves = f"stable {base['stableVersion']}" + (
        f", canary {base['canaryVersion']} answers {base['canaryPercent']}% of scoring requests"
        if base["canaryVersion"] else ", no canary")
    app = ref["application"]
    st = (((rayservice.get("status") or {}).get("activeServiceStatus") or {}).get("applicationStatuses") or {}
          ).get(app) or {}
    state = st.get("status", "")
    observed = (rayservice.get("status") or {}).get("observedGeneration", 0) >= \
        rayservice["metadata"].get("generation", 0)
    if not applied:
        phase, ok, reason, message = "Pending", False, "NotApplied", "the serve config is being patched"
    elif state in _FAILED:
        phase, ok, reason, message = "Failed", False, "DeployFailed", f"{app}: {state} {st.get('message', '')}".strip()
    elif observed and state == "RUNNING":
        phase = {100: "Serving", 0: "Withdrawn"}.get(spec["canaryPercent"], "Canary")
        ok, reason, message = True, "Running", f"{app} RUNNING: {serves}"
    else:
        phase, ok, reason, message = "Deploying", False, "Deploying", f"{app} {state or 'not reported'}"
    return {**base, "phase": phase, "conditions": [
        _condition(cr, "Applied", applied, "ServeConfigPatched" if applied else "NotApplied",
                   serves if applied else "the serve config is being patched", now),
        _condition(cr, "Ready", ok, reason, message, now)]}
