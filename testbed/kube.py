"""A real Kubernetes control plane for the tests: etcd and kube-apiserver, no nodes.

``make kube`` builds both from their Go modules (``tools/go.mod`` pins etcd 3.7 and
Kubernetes 1.37) into ``.cache/tools/bin``. etcd keeps its data in a private
directory on free loopback ports; kube-apiserver serves HTTPS on 127.0.0.1 with a
certificate it makes itself (``--cert-dir``), authenticates one admin by a static
token (group ``system:masters``), authorizes with RBAC, and signs service-account
tokens with a key made here. No scheduler runs, and by default no controller manager:
objects are stored and validated (schemas, CEL rules, admission), never acted on.
:class:`KubeControllerManager` runs kube-controller-manager (also built by ``make kube``)
with its garbage collector only, for the tests that need owner references acted on.

    python -m testbed.kube     # run one in the foreground, print how to reach it
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path

import requests
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from testbed.process import ServerProcess, ServiceError, checkout, free_port, port_open

__all__ = ["Etcd", "KubeAPIServer", "KubeControlPlane", "KubeControllerManager", "tools_bin"]



def tools_bin(name: str) -> Path:
    """A binary ``make kube`` built (``PODPULSE_TOOLS_BIN`` may name another folder)."""
    path = Path(os.environ.get("PODPULSE_TOOLS_BIN", checkout() / ".cache" / "tools" / "bin")) / name
    if not os.access(path, os.X_OK):
        raise ServiceError(f"{path} is missing: run `make kube` (make test does)")
    return path


class Etcd(ServerProcess):
    name = "etcd"
    start_timeout_s = 30.0

    def __init__(self, root=None, port: int = 0):
        super().__init__(root)
        self.binary = tools_bin("etcd")
        self.port = port or free_port()
        self.peer_port = free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        peer = f"http://127.0.0.1:{self.peer_port}"
        return [str(self.binary), "--name", "podpulse-test", "--data-dir", str(self.root / "data"),
                "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"podpulse-test={peer}", "--initial-cluster-state", "new",
                "--unsafe-no-fsync",  # the tests never need the data after a crash of the machine
                "--log-level", "warn"]

    def ready(self) -> bool:
        if not port_open("127.0.0.1", self.port):
            return False
        try:
            return requests.get(f"{self.url}/health", timeout=2).json().get("health") == "true"
        except (requests.RequestException, ValueError):
            return False


class KubeAPIServer(ServerProcess):
    name = "kube-apiserver"
    start_timeout_s = 90.0
    user = "podpulse-admin"

    def __init__(self, etcd: Etcd, root=None, port: int = 0):
        super().__init__(root)
        self.binary = tools_bin("kube-apiserver")
        self.etcd = etcd
        self.port = port or free_port()
        self.token = secrets.token_urlsafe(32)
        self.certs = self.root / "certs"
        self.kubeconfig = self.root / "kubeconfig"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path:
        """The serving certificate and the CA that signed it, both made by the server at its first start."""
        return self.certs / "apiserver.crt"

    def prepare(self) -> None:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        (self.root / "sa.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                             serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption()))
        (self.root / "sa.pub").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        # token,user,uid,"group1,group2"
        (self.root / "tokens.csv").write_text(f'{self.token},{self.user},{self.user},"system:masters"\n')
        self.kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "podpulse-test",
            "clusters": [{"name": "podpulse-test",
                          "cluster": {"server": self.url, "certificate-authority": str(self.ca_file)}}],
            "users": [{"name": self.user, "user": {"token": self.token}}],
            "contexts": [{"name": "podpulse-test", "context": {"cluster": "podpulse-test", "user": self.user}}],
        }))

    def command(self) -> list[str]:
        return [str(self.binary),
                "--etcd-servers", self.etcd.url, "--etcd-prefix", "/registry",
                "--bind-address", "127.0.0.1", "--secure-port", str(self.port),
                "--advertise-address", "127.0.0.1", "--cert-dir", str(self.certs),
                # The reconciler would publish the advertise address as the `kubernetes` Service's
                # endpoint, and refuses a loopback one; no pod here would dial it anyway.
                "--endpoint-reconciler-type", "none",
                "--token-auth-file", str(self.root / "tokens.csv"),
                "--authorization-mode", "RBAC",
                "--service-account-issuer", "https://kubernetes.default.svc",
                "--service-account-key-file", str(self.root / "sa.pub"),
                "--service-account-signing-key-file", str(self.root / "sa.key"),
                "--service-cluster-ip-range", "10.0.0.0/24",  # names ClusterIPs only: nothing routes to them
                "--enable-aggregator-routing",  # an APIService's backend by its endpoints, never a ClusterIP
                "--profiling=false"]

    def ready(self) -> bool:
        if not port_open("127.0.0.1", self.port) or not self.ca_file.exists():
            return False
        try:
            r = requests.get(f"{self.url}/readyz", headers={"Authorization": f"Bearer {self.token}"},
                             verify=str(self.ca_file), timeout=5)
        except requests.RequestException:
            return False
        return r.status_code == 200


class KubeControllerManager(ServerProcess):
    """kube-controller-manager with only the controllers named (by default the garbage collector:
    dependents of a deleted owner are deleted, foreground deletion waits for them), as the admin.

    The garbage collector learns the API's resources at start and again every 30 s: start it
    after the CustomResourceDefinitions whose objects it should collect."""

    name = "kube-controller-manager"
    start_timeout_s = 60.0

    def __init__(self, kubeconfig: Path, root=None, controllers: tuple[str, ...] = ("garbage-collector-controller",)):
        super().__init__(root)
        self.binary = tools_bin("kube-controller-manager")
        self.kubeconfig = kubeconfig
        self.controllers = controllers
        self.port = free_port()

    def command(self) -> list[str]:
        return [str(self.binary), "--kubeconfig", str(self.kubeconfig),
                "--controllers", ",".join(self.controllers),
                "--leader-elect=false",  # one instance, and no Lease objects in kube-system
                "--bind-address", "127.0.0.1", "--secure-port", str(self.port), "--cert-dir", str(self.root / "certs"),
                "--authentication-skip-lookup",  # no front-proxy CA to read from kube-system
                "--profiling=false"]

    def ready(self) -> bool:
        # The certificate it makes itself at start, with the CA that signed it (as kube-apiserver's).
        cert = self.root / "certs" / "kube-controller-manager.crt"
        if not port_open("127.0.0.1", self.port) or not cert.exists():
            return False
        try:  # /healthz is served to anyone
            r = requests.get(f"https://127.0.0.1:{self.port}/healthz", verify=str(cert), timeout=5)
        except requests.RequestException:
            return False
        return r.status_code == 200


class KubeControlPlane:
    """etcd and kube-apiserver, started together and stopped together (in that order, reversed).

    ``kubeconfig`` is a file for kubectl, kopf or the ``kubernetes`` client; :meth:`api_client`
    is a ``kubernetes`` ApiClient authenticated as the admin."""

    def __init__(self, root: Path | None = None, port: int = 0):
        self.root = Path(root or tempfile.mkdtemp(prefix="podpulse-kube-"))
        for part in ("etcd", "apiserver"):
            (self.root / part).mkdir(parents=True, exist_ok=True)
        self.etcd = Etcd(root=self.root / "etcd")
        self.apiserver = KubeAPIServer(self.etcd, root=self.root / "apiserver", port=port)
        self.start_s: float | None = None

    url = property(lambda self: self.apiserver.url)
    token = property(lambda self: self.apiserver.token)
    kubeconfig = property(lambda self: self.apiserver.kubeconfig)
    ca_file = property(lambda self: self.apiserver.ca_file)

    def start(self) -> "KubeControlPlane":
        t0 = time.monotonic()
        self.etcd.start()
        try:
            self.apiserver.start()
        except BaseException:
            self.etcd.stop()
            raise
        self.start_s = time.monotonic() - t0
        return self

    def stop(self) -> None:
        # kube-apiserver drains for half a minute on SIGTERM; the tests keep nothing of it.
        self.apiserver.stop(timeout=3.0)
        self.etcd.stop()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def api_client(self):
        from kubernetes import config  # heavy: only tests that talk to the cluster need it

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.remove()
            raise

    def __exit__(self, *exc) -> None:
        self.remove()


if __name__ == "__main__":
    import signal

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})  # for sigwait, and the cleanup
    with KubeControlPlane() as cp:
        print(f"kube-apiserver {cp.url} (etcd {cp.etcd.url}), up in {cp.start_s:.1f}s\n"
              f"  export KUBECONFIG={cp.kubeconfig}\n"
              f"  curl --cacert {cp.ca_file} -H 'Authorization: Bearer {cp.token}' {cp.url}/version", flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
