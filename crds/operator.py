"""The PodPulse operator: thin kopf handlers around crds.reconcile.

    kopf run --standalone --namespace podpulse -m crds.operator

Each handler renders the children with a pure function, applies them (server-side
apply: create or patch in one call), reads them back, writes the status computed
from what it read, then deletes children of earlier specs. A timer repeats this every
PODPULSE_RESYNC_SECONDS, so status follows the RayJobs and Jobs without watching them.
What a resource may ask for is the operator's policy (crds/policy.py), read from its
environment at start; the handlers only look up the labels of the Secrets it names.
--standalone: one replica, no peering objects (and no RBAC for them).
"""

from __future__ import annotations

import logging
import os
import threading
from datetime import datetime, timezone

import kopf
from kubernetes import client, config, dynamic
from kubernetes.dynamic.exceptions import ConflictError, NotFoundError

from crds import reconcile as rc

IMAGE = os.environ.get("PODPULSE_IMAGE", rc.DEFAULT_IMAGE)  # the operator's own image, set by kustomize
# What resources may ask for (images, Secrets): the operator's configuration, read once at start.
POLICY = rc.Policy.from_env(os.environ, IMAGE)
RESYNC = float(os.environ.get("PODPULSE_RESYNC_SECONDS", "30"))
STREAMS, SCHEMAS, DEPLOYERS = "airpodsdatastreams", "oracledbschemamanagers", "aimodeldeployers"
# The kinds each resource may own, for pruning: (apiVersion, kind).
OWNED = {STREAMS: [("v1", "ConfigMap"), ("ray.io/v1", "RayJob")], SCHEMAS: [("batch/v1", "Job")]}


class Cluster:
    """Every Kubernetes call the operator makes; deploy/base/rbac.yaml grants exactly these."""

    def __init__(self):
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()  # running outside the cluster: kopf run ... on a laptop
        self.api = dynamic.DynamicClient(client.ApiClient())

    def _resource(self, api_version: str, kind: str):
        return self.api.resources.get(api_version=api_version, kind=kind)

    def apply(self, obj: dict) -> None:
        self._resource(obj["apiVersion"], obj["kind"]).server_side_apply(
            body=obj, field_manager=rc.MANAGER, force_conflicts=True)

    def list(self, api_version: str, kind: str, namespace: str, selector: str) -> list[dict]:
        return self._resource(api_version, kind).get(namespace=namespace, label_selector=selector).to_dict()["items"]

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        self._resource(api_version, kind).delete(name=name, namespace=namespace, propagation_policy="Background")

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict | None:
        try:
            return self._resource(api_version, kind).get(name=name, namespace=namespace).to_dict()
        except NotFoundError:
            return None

    def labels(self, api_version: str, kind: str, namespace: str, name: str) -> dict | None:
        """An object's labels, None if it does not exist; reads its metadata only (of a Secret, not its data)."""
        try:
            found = self._resource(api_version, kind).get(name=name, namespace=namespace, header_params={
                "Accept": "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"})
        except NotFoundError:
            return None
        return dict(found.to_dict()["metadata"].get("labels") or {})

    def merge_patch(self, api_version: str, kind: str, namespace: str, name: str, patch: dict) -> None:
        self._resource(api_version, kind).patch(body=patch, name=name, namespace=namespace,
                                                content_type="application/merge-patch+json")


_cluster: Cluster | None = None
_cluster_lock = threading.Lock()


def cluster() -> Cluster:
    """The one client. kopf runs these sync handlers in threads, so the first calls come at once (a
    resource's create handler and its timer): unlocked, each made a client, and their discovery
    caches (one file) were written and read over each other ("load cache error" in the log)."""
    global _cluster
    with _cluster_lock:
        if _cluster is None:
            _cluster = Cluster()
    return _cluster


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _plain(body) -> dict:
    return {k: body[k] for k in body}  # kopf's Body is a read-only mapping over the raw dict


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_) -> None:
    settings.persistence.finalizer = "podpulse.io/finalizer"
    # Kubernetes events (kubectl describe) for what went wrong: a handler that failed or will retry.
    # kopf 1.45 posts its object log as events only with posting.loggers, whatever the level.
    # Successes stay in the log: the resync timer would post one per resource every resync.
    settings.posting.loggers = True
    settings.posting.level = logging.WARNING


def _sync(plural: str, cr: dict, children: list[dict], status_of) -> dict:
    """Apply the children, observe, compute the status, then prune children of older specs."""
    c, ns = cluster(), cr["metadata"]["namespace"]
    for child in children:
        c.apply(child)
    selector, keep = rc.owner_selector(cr), {child["metadata"]["name"] for child in children}
    observed = {kind: c.list(api, kind, ns, selector) for api, kind in OWNED[plural]}
    status = status_of(observed)  # before pruning: a finished Job of the old spec still counts
    for api, kind in OWNED[plural]:
        for item in observed[kind]:
            if item["metadata"]["name"] not in keep:
                c.delete(api, kind, ns, item["metadata"]["name"])
    return status


def _secret_labels(cr: dict) -> dict[str, dict | None]:
    """Labels of the Secrets the resource names that the policy does not list by name."""
    names = POLICY.unlisted(rc.secret_refs(cr).values())
    return {name: cluster().labels("v1", "Secret", cr["metadata"]["namespace"], name) for name in names}


@kopf.on.create(rc.GROUP, rc.VERSION, STREAMS)
@kopf.on.update(rc.GROUP, rc.VERSION, STREAMS)
@kopf.on.resume(rc.GROUP, rc.VERSION, STREAMS)
@kopf.timer(rc.GROUP, rc.VERSION, STREAMS, interval=RESYNC)
def reconcile_stream(body, patch, **_) -> None:
    cr = _plain(body)
    try:
        children = rc.stream_children(cr, POLICY, _secret_labels(cr))
    except rc.InvalidSpec as e:  # or Refused: nothing is created
        patch.status.update(rc.invalid_status(cr, e, _now()))
        return  # the running job, if any, is left alone: a bad edit does not stop ingestion
    patch.status.update(_sync(STREAMS, cr, children,
                              lambda seen: rc.stream_status(cr, children, seen["RayJob"], _now())))


@kopf.on.create(rc.GROUP, rc.VERSION, SCHEMAS)
@kopf.on.update(rc.GROUP, rc.VERSION, SCHEMAS)
@kopf.on.resume(rc.GROUP, rc.VERSION, SCHEMAS)
@kopf.timer(rc.GROUP, rc.VERSION, SCHEMAS, interval=RESYNC)
def reconcile_schema(body, patch, **_) -> None:
    cr = _plain(body)
    try:
        children = rc.schema_children(cr, POLICY, _secret_labels(cr))
    except rc.InvalidSpec as e:
        patch.status.update(rc.invalid_status(cr, e, _now()))
        return
    patch.status.update(_sync(SCHEMAS, cr, children,
                              lambda seen: rc.schema_status(cr, children, seen["Job"], _now())))


def _rayservice(cr: dict) -> dict | None:
    ref = rc.deployer_spec(cr)["rayService"]["name"]
    return cluster().get("ray.io/v1", "RayService", cr["metadata"]["namespace"], ref)


@kopf.on.create(rc.GROUP, rc.VERSION, DEPLOYERS)
@kopf.on.update(rc.GROUP, rc.VERSION, DEPLOYERS)
@kopf.on.resume(rc.GROUP, rc.VERSION, DEPLOYERS)
@kopf.timer(rc.GROUP, rc.VERSION, DEPLOYERS, interval=RESYNC)
def reconcile_deployer(body, patch, **_) -> None:
    """Re-asserts the model every resync: a `kubectl apply` of the RayService undoes the patch."""
    cr = _plain(body)
    service = _rayservice(cr)
    try:
        change = rc.deployer_patch(cr, service) if service else None
        if change:
            cluster().merge_patch("ray.io/v1", "RayService", cr["metadata"]["namespace"], service["metadata"]["name"],
                                  change)
            service = _rayservice(cr)
    except rc.InvalidSpec:
        pass  # the RayService is left alone; deployer_status reports why (phase Invalid) and what it serves
    except ConflictError as e:  # the RayService changed under us: read it again
        raise kopf.TemporaryError(f"RayService changed while patching it: {e}", delay=5) from e
    patch.status.update(rc.deployer_status(cr, service, _now()))


@kopf.on.delete(rc.GROUP, rc.VERSION, DEPLOYERS)
def withdraw_canary(body, **_) -> None:
    """Withdraws the canary (canary_percent 0); the stable version (model_path) stays as it is."""
    cr = _plain(body)
    service = _rayservice(cr)
    try:
        change = rc.deployer_removal(cr, service) if service else None
    except rc.InvalidSpec:
        return  # the application is gone: there is no canary to withdraw
    if change:
        cluster().merge_patch("ray.io/v1", "RayService", cr["metadata"]["namespace"], service["metadata"]["name"],
                              change)
