"""The node: Ready, Pods get addresses and reach each other, Services, the host, the API and cluster DNS."""

from __future__ import annotations

import time

from testbed.cluster import NODE_IP, POD_CIDR
from testbed.images import busybox


def pod(name: str, image: str, script: str, labels: dict | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels or {}},
            "spec": {"containers": [{"name": "main", "image": image, "args": ["-c", script]}],
                     "terminationGracePeriodSeconds": 1}}


def test_pods_reach_each_other_a_service_the_host_the_api_and_cluster_dns(cluster, core, shell):
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
    cluster.wait("httpd answering", lambda: "hello-from-web" in shell("client", get.format(web_ip, 8080)), 30)
    assert "hello-from-web" in shell("client", get.format(service_ip, 80))  # kube-proxy's rules
    assert f"Address: {service_ip}" in shell("client", "nslookup web.default.svc.cluster.local")  # CoreDNS
    assert " 0% packet loss" in shell("client", f"ping -c 1 -W 2 {NODE_IP}")  # the host
    api = shell("client", "printf '' | nc -w 3 kubernetes.default.svc.cluster.local 443; echo rc=$?")
    assert "rc=0" in api, api  # the API through the kubernetes Service


def test_a_container_over_its_memory_limit_is_oom_killed_and_restarted(cluster, core):
    """``dd`` with a 256 MiB block (the container's first process) fills its buffer from /dev/zero, four
    times the 64 MiB limit: the kernel kills it in its cgroup, the kubelet says so and starts it again."""
    spec = pod("hungry", busybox(cluster.registry), "exec dd if=/dev/zero of=/dev/null bs=256M count=1")
    spec["spec"]["containers"][0]["resources"] = {"limits": {"memory": "64Mi"}, "requests": {"memory": "64Mi"}}
    core.create_namespaced_pod("default", spec)

    def restarted():
        statuses = core.read_namespaced_pod("hungry", "default").status.container_statuses or []
        return statuses[0] if statuses and statuses[0].restart_count >= 1 and statuses[0].last_state.terminated \
            else None
    status = cluster.wait("the container OOM-killed and restarted", restarted, timeout_s=120)
    assert status.last_state.terminated.reason == "OOMKilled", status.last_state
    assert status.last_state.terminated.exit_code == 137  # SIGKILL

    def said():
        events = core.list_namespaced_event("default", field_selector="involvedObject.name=hungry").items
        found = {e.reason: e.message for e in events if e.source.component == "kubelet"}
        return found if "BackOff" in found else None
    events = cluster.wait("the kubelet's back-off event", said, timeout_s=120)
    print(f"kubelet's events for the Pod: {events}")
    assert events["BackOff"].startswith("Back-off restarting failed container main"), events
