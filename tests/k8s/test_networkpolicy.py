"""deploy/base/networkpolicy.yaml, evaluated: who reaches which port of which PodPulse pod.

The pods are the rendered manifests' (and the operator's RayJob), with the labels KubeRay adds
to every Ray pod; the sources are pods of the namespace, of the monitoring namespace, of the
KubeRay operator's, and of any other namespace.
"""

import pytest

from crds import reconcile as rc

NS = "podpulse"  # the prod overlay's namespace
ANY_RAY_PORT = 14321  # a port Ray picks at start (worker processes: 10002-19999)


def selects(selector, labels):
    assert set(selector) <= {"matchLabels"}, selector  # the evaluator knows no matchExpressions
    return selector.get("matchLabels", {}).items() <= labels.items()


def peer_admits(peer, source, target_ns):
    assert "ipBlock" not in peer, peer
    if "namespaceSelector" in peer:
        ns_ok = selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": source["ns"]})
    else:
        ns_ok = source["ns"] == target_ns
    return ns_ok and selects(peer.get("podSelector", {}), source["labels"])


def rule_admits(rule, source, target_ns, port):
    ports = rule.get("ports")
    if ports and not any(p["port"] == port and p.get("protocol", "TCP") == "TCP" for p in ports):
        return False
    return "from" not in rule or any(peer_admits(peer, source, target_ns) for peer in rule["from"])


def admitted(policies, target, source, port):
    """Kubernetes' semantics: a pod no Ingress policy selects takes anything; else the union of rules."""
    selecting = [p["spec"] for p in policies if p["metadata"]["namespace"] == target["ns"]
                 and "Ingress" in p["spec"]["policyTypes"] and selects(p["spec"]["podSelector"], target["labels"])]
    return not selecting or any(rule_admits(rule, source, target["ns"], port)
                                for spec in selecting for rule in spec.get("ingress", []))


def pod(labels, ns=NS):
    return {"labels": labels, "ns": ns}


def ray_pod(template, node_type):
    """A Ray pod as KubeRay labels it: the template's labels plus its own."""
    return pod({**template["metadata"]["labels"], "ray.io/is-ray-node": "yes", "ray.io/node-type": node_type})


@pytest.fixture
def cluster(rendered, example):
    docs = rendered["prod"]
    by_kind = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    (service,) = by_kind["RayService"]
    (operator,) = by_kind["Deployment"]
    serve = service["spec"]["rayClusterConfig"]
    ingest = rc.stream_children(example("AirPodsDataStream"))[1]["spec"]["rayClusterSpec"]
    targets = {
        "serve head": ray_pod(serve["headGroupSpec"]["template"], "head"),
        "serve worker": ray_pod(serve["workerGroupSpecs"][0]["template"], "worker"),
        "ingest head": ray_pod(ingest["headGroupSpec"]["template"], "head"),
        "ingest worker": ray_pod(ingest["workerGroupSpecs"][0]["template"], "worker"),
        "operator": pod(operator["spec"]["template"]["metadata"]["labels"]),
    }
    sources = {**targets,
               "namespace pod": pod({"app": "submitter"}),
               "prometheus": pod({"app.kubernetes.io/name": "prometheus"}, "monitoring"),
               "kuberay": pod({"app.kubernetes.io/name": "kuberay-operator"}, "kuberay-system"),
               "stranger": pod({"app": "x"}, "elsewhere")}
    return by_kind["NetworkPolicy"], targets, sources


# (source, target, port, admitted)
CASES = [
    ("ingest worker", "ingest head", 6379, True), ("ingest worker", "ingest head", ANY_RAY_PORT, True),
    ("ingest head", "ingest worker", ANY_RAY_PORT, True), ("serve head", "serve worker", ANY_RAY_PORT, True),
    ("namespace pod", "ingest head", 6379, True), ("namespace pod", "ingest head", 8265, True),
    ("namespace pod", "ingest head", 10001, True), ("namespace pod", "ingest head", ANY_RAY_PORT, False),
    ("namespace pod", "ingest worker", ANY_RAY_PORT, False),
    ("kuberay", "serve head", 8265, True), ("kuberay", "serve head", 6379, False),
    ("stranger", "ingest head", 6379, False), ("stranger", "ingest head", 8265, False),
    ("stranger", "ingest head", 10001, False), ("stranger", "ingest head", 8080, False),
    ("stranger", "serve head", 8000, True), ("stranger", "serve worker", 8000, True),
    ("stranger", "ingest head", 8000, False), ("stranger", "serve worker", ANY_RAY_PORT, False),
    ("prometheus", "ingest worker", 8080, True), ("prometheus", "serve head", 8080, True),
    ("prometheus", "serve head", 6379, False),
    ("namespace pod", "operator", 8080, False), ("stranger", "operator", 8080, False),
]


@pytest.mark.parametrize("source, target, port, ok", CASES, ids=[f"{s}->{t}:{p}" for s, t, p, _ in CASES])
def test_each_role_admits_only_the_ports_it_serves(cluster, source, target, port, ok):
    policies, targets, sources = cluster
    assert admitted(policies, targets[target], sources[source], port) is ok


def test_every_port_a_ray_container_declares_is_reachable_by_someone(cluster, rendered):
    """No declared port is left unreachable by the policies (a forgotten role would be)."""
    policies, targets, sources = cluster
    (service,) = [d for d in rendered["prod"] if d["kind"] == "RayService"]
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    for p in head["ports"]:
        assert any(admitted(policies, targets["serve head"], s, p["containerPort"])
                   for name, s in sources.items() if not name.startswith("serve")), p
