"""KubeRay's operator against the test control plane (``testbed.kube``), and a stand-in Ray dashboard.

``make kube`` builds ``ray-operator`` from KubeRay's Go module (``tools/kuberay/go.mod``) and
generates its CRDs from its Go API types with controller-gen into ``.cache/tools/kuberay-crds``.
The operator runs as the admin of the test API server (its kubeconfig), watches every namespace,
serves its health probe and metrics on loopback only, and runs no leader election and no webhooks.

There is no kubelet: the Pods KubeRay creates stay Pending until a test reports them Running and
Ready itself (:func:`report_pods_ready`, what a kubelet would report). Once a head Pod is Ready,
KubeRay talks to the Ray dashboard at the head Service's cluster DNS name; the operator's
``HTTP_PROXY`` sends that to :class:`FakeRayDashboard` on 127.0.0.1, which records each request
and answers as a dashboard would. It never forwards anything: every connection of the test
stays on loopback (the API server's too: Go never proxies loopback addresses, and NO_PROXY says so).
"""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import requests

from testbed.kube import tools_bin
from testbed.process import ServerProcess, ServiceError, free_port

__all__ = ["FakeRayDashboard", "RayOperator", "kuberay_crd_files", "report_pods_ready"]


def kuberay_crd_files() -> list[Path]:
    """The CRDs ``make kube`` generated from KubeRay's API types (RayCluster, RayJob, RayService)."""
    folder = tools_bin("ray-operator").parent.parent / "kuberay-crds"
    files = sorted(folder.glob("ray.io_*.yaml"))
    if len(files) != 3:
        raise ServiceError(f"{folder} lacks KubeRay's generated CRDs: run `make kube` (make test does)")
    return files


class FakeRayDashboard:
    """An HTTP proxy on 127.0.0.1 that answers every request itself, as the Ray dashboard would.

    Serve: ``PUT /api/serve/applications/`` stores the config; ``GET`` reports each application
    of the last config RUNNING with its deployments HEALTHY (none before a PUT). Anything else: 404.
    ``requests`` holds (method, url, headers with lower-case names, body) of every request, in order."""

    def __init__(self):
        self.requests: list[tuple[str, str, dict, bytes]] = []
        self.serve_config: dict | None = None
        self.lock = threading.Lock()
        dashboard = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                url = self.path  # a proxy's request line carries the absolute URL
                with dashboard.lock:
                    dashboard.requests.append((self.command, url, {k.lower(): v for k, v in self.headers.items()}, body))
                    status, payload = dashboard.answer(self.command, urlsplit(url).path, body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = _answer

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def answer(self, method: str, path: str, body: bytes) -> tuple[int, dict]:
        if path == "/api/serve/applications/":
            if method == "PUT":
                self.serve_config = json.loads(body)
                return 200, {}
            if method == "GET":
                apps = {a["name"]: {"name": a["name"], "status": "RUNNING", "route_prefix": a.get("route_prefix"),
                                    "deployments": {d["name"]: {"name": d["name"], "status": "HEALTHY"}
                                                    for d in a.get("deployments", [])}}
                        for a in (self.serve_config or {}).get("applications", [])}
                return 200, {"applications": apps, "deploy_mode": "MULTI_APP"}
        return 404, {"error": f"{method} {path}: not served by the stand-in dashboard"}

    def seen(self, method: str, path: str) -> list[tuple[str, str, dict, bytes]]:
        with self.lock:
            return [r for r in self.requests if r[0] == method and urlsplit(r[1]).path == path]

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


class RayOperator(ServerProcess):
    """KubeRay's ray-operator, watching every namespace of the API server ``kubeconfig`` names."""

    name = "ray-operator"
    start_timeout_s = 60.0

    def __init__(self, kubeconfig: Path, http_proxy: str, root=None):
        super().__init__(root)
        self.binary = tools_bin("ray-operator")
        self.kubeconfig = kubeconfig
        self.http_proxy = http_proxy
        self.probe_port = free_port()
        self.metrics_port = free_port()

    def command(self) -> list[str]:
        return [str(self.binary),
                f"--metrics-addr=127.0.0.1:{self.metrics_port}",  # its defaults listen on every interface
                f"--health-probe-bind-address=127.0.0.1:{self.probe_port}",
                "--enable-leader-election=false",
                "--log-stdout-encoder=console"]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "no_proxy")}
        return {**env, "KUBECONFIG": str(self.kubeconfig), "HTTP_PROXY": self.http_proxy,
                "NO_PROXY": "127.0.0.1,localhost"}

    def ready(self) -> bool:
        try:
            return requests.get(f"http://127.0.0.1:{self.probe_port}/readyz", timeout=2).status_code == 200
        except requests.RequestException:
            return False


def report_pods_ready(core, namespace: str, selector: str, ip: str = "127.0.0.1") -> int:
    """What a kubelet would report of each Pod ``selector`` picks: Running, every container ready.
    The Pod IP is loopback: nothing the operator could dial leaves the machine."""
    pods = core.list_namespaced_pod(namespace, label_selector=selector).items
    for pod in pods:
        if pod.status.phase == "Running":
            continue
        now = "2026-01-01T00:00:00Z"
        core.patch_namespaced_pod_status(pod.metadata.name, namespace, {"status": {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": ip, "startTime": now,
            "conditions": [{"type": t, "status": "True", "lastTransitionTime": now}
                           for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")],
            "containerStatuses": [{"name": c.name, "image": c.image, "imageID": "", "ready": True, "started": True,
                                   "restartCount": 0, "state": {"running": {"startedAt": now}}}
                                  for c in pod.spec.containers]}})
    return len(pods)
