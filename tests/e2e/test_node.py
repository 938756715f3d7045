"""The node: Ready, Pods get addresses and reach each other, Services, the host, the API and cluster DNS."""

from __future__ import annotations

import time

from testbed.cluster import NODE_IP, POD_CIDR
from testbed.images import busybox


def pod(name: str, image: str, script: str, labels: dict | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels or {}},
            "spec": {"containers": [{"name": "main", "image": image, "args": ["-c", script]}],
                     "terminationGracePeriodSeconds": 1}}


def run(core, pod_name: str, script: str) -> str:
    """A shell script in the Pod's container (``kubectl exec``); its output."""
    from kubernetes.stream import stream  # heavy: as the conftest's

    return stream(core.connect_get_namespaced_pod_exec, pod_name, "default", command=["/bin/sh", "-c", script],
                  stderr=True, stdout=True, stdin=False, tty=False)


def test_pods_reach_each_other_a_service_the_host_the_api_and_cluster_dns(cluster, core):
    image = busybox(cluster.registry)
    core.create_namespaced_pod("default", pod("web", image, "mkdir -p /www && echo hello-from-web > /www/index.html"
                                                            " && exec httpd -f -p 8080 -h /www", {"app": "web"}))
    core.create_namespaced_pod("default", pod("client", image, "exec sleep 3600"))
    core.create_namespaced_service("default", {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
                                               "spec": {"selector": {"app": "web"},
                                                        "ports": [{"port": 80, "targetPort": 8080}]}})
    started = time.monotonic()
    pods = cluster.wait("both Pods Running", lambda: (
        found if len(found := {p.metadata.name: p for p in core.list_namespaced_pod("default").items}) == 2
        and all(p.status.phase == "Running" for p in found.values()) else None))
    print(f"Pods Running {time.monotonic() - started:.1f} s after they were created; cluster {cluster.timings}")
    web_ip = pods["web"].status.pod_ip
    assert web_ip.startswith(POD_CIDR.rsplit(".", 2)[0]) and pods["client"].status.pod_ip != web_ip
    service_ip = core.read_namespaced_service("web", "default").spec.cluster_ip
    get = "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {} {} | tail -1"
    cluster.wait("httpd answering", lambda: "hello-from-web" in run(core, "client", get.format(web_ip, 8080)), 30)
    assert "hello-from-web" in run(core, "client", get.format(service_ip, 80))  # kube-proxy's rules
    assert f"Address: {service_ip}" in run(core, "client", "nslookup web.default.svc.cluster.local")  # CoreDNS
    assert " 0% packet loss" in run(core, "client", f"ping -c 1 -W 2 {NODE_IP}")  # the host
    api = run(core, "client", "printf '' | nc -w 3 kubernetes.default.svc.cluster.local 443; echo rc=$?")
    assert "rc=0" in api, api  # the API through the kubernetes Service
