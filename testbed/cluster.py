"""A one-node Kubernetes cluster on this machine, for the end-to-end tests (``make e2e``).

The control plane of ``testbed.kube`` (etcd, kube-apiserver) plus kube-controller-manager with
all its controllers, kube-scheduler, and a node: containerd (CRI) over runc, a kubelet, kube-proxy in
iptables mode, and CNI ``bridge`` + ``host-local`` + ``loopback`` + ``portmap``. ``make cluster`` builds
the Kubernetes, containerd, CNI and crane binaries from the Go modules ``tools/node``,
``tools/containerd``, ``tools/cni`` and ``tools/crane`` pin; runc and iptables are Debian's.

Images never come from a public registry: a registry on loopback (``crane registry serve``) holds
what ``testbed.images`` builds here, and containerd pulls from it over plain HTTP.

Addresses are this machine's only: the node is ``10.201.0.1`` on a veth pair of its own, Pods get
``10.244.0.0/24`` on the bridge ``ppcni0``, Services ``10.96.0.0/24``. :meth:`OneNodeCluster.remove`
takes it all down again: processes, mounts, iptables rules, the bridge and the node's link.
Needs root (it configures the host's network) and cgroup v1 or v2.
"""

from __future__ import annotations

import ctypes
import json
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

from testbed.images import Registry, coredns, sandbox
from testbed.kube import Etcd, KubeAPIServer, tools_bin
from testbed.process import ServerProcess, ServiceError, checkout, free_port, port_open

__all__ = ["OneNodeCluster", "leftovers", "drop_chains", "NODE_IP", "POD_CIDR", "SERVICE_CIDR", "BRIDGE", "NODE_LINK"]

NODE_IP = "10.201.0.1"  # the node's address: kube-apiserver advertises it, Pods reach the host by it
NODE_LINK = "ppnode0"  # the link that holds NODE_IP (one end of a veth pair: no dummy links here)
POD_CIDR = "10.244.0.0/24"
BRIDGE = "ppcni0"  # the CNI bridge (its gateway: the first address of POD_CIDR)
SERVICE_CIDR = "10.96.0.0/24"
CLUSTER_DNS = "10.96.0.10"  # the kube-dns Service: CoreDNS
NODE_NAME = "podpulse-node"
MOUNT_MARK = "podpulse-cluster"  # in the name of every folder a cluster mounts under (RUN and each root)
RUN = Path(f"/run/{MOUNT_MARK}")  # sockets: a unix socket path must stay under 108 bytes


def cni_bin() -> Path:
    path = Path(os.environ.get("PODPULSE_CNI_BIN", checkout() / ".cache" / "tools" / "cni"))
    if not (path / "bridge").exists():
        raise ServiceError(f"{path}/bridge is missing: run `make cluster`")
    return path


def sh(*command: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(command, capture_output=True, text=True)
    if check and out.returncode:
        raise ServiceError(f"{' '.join(command)}: {out.stderr.strip() or out.stdout.strip()}")
    return out


class ClusterAPIServer(KubeAPIServer):
    """kube-apiserver of a cluster with a node: it listens on every address and advertises the node's,
    so Pods reach it through the ``kubernetes`` Service; its certificate names that address."""

    @property
    def url(self) -> str:
        return f"https://{NODE_IP}:{self.port}"

    def command(self) -> list[str]:
        flags = super().command()
        swap = {"--bind-address": "0.0.0.0", "--advertise-address": NODE_IP, "--endpoint-reconciler-type": "lease",
                "--service-cluster-ip-range": SERVICE_CIDR}
        for i, flag in enumerate(flags):
            if flag in swap:
                flags[i + 1] = swap[flag]
        # the node by its address (its name resolves nowhere): logs, exec and port-forward reach the kubelet
        return flags + ["--allow-privileged=true", "--kubelet-preferred-address-types", "InternalIP"]


class ControllerManager(ServerProcess):
    """kube-controller-manager with all its controllers: Deployments, ReplicaSets, Services' endpoints,
    service-account tokens, the CA bundle each namespace gets, the garbage collector."""

    name = "kube-controller-manager"
    start_timeout_s = 60.0

    def __init__(self, apiserver: KubeAPIServer, root=None):
        super().__init__(root)
        self.binary = tools_bin("kube-controller-manager")
        self.apiserver = apiserver
        self.port = free_port()

    def command(self) -> list[str]:
        return [str(self.binary), "--kubeconfig", str(self.apiserver.kubeconfig), "--controllers", "*",
                "--leader-elect=false", "--bind-address", "127.0.0.1", "--secure-port", str(self.port),
                "--cert-dir", str(self.root / "certs"), "--authentication-skip-lookup",
                "--service-account-private-key-file", str(self.apiserver.root / "sa.key"),
                "--root-ca-file", str(self.apiserver.ca_file), "--service-cluster-ip-range", SERVICE_CIDR,
                "--cluster-cidr", POD_CIDR, "--profiling=false"]

    def ready(self) -> bool:
        return port_open("127.0.0.1", self.port)


class Scheduler(ServerProcess):
    name = "kube-scheduler"

    def __init__(self, apiserver: KubeAPIServer, root=None):
        super().__init__(root)
        self.binary = tools_bin("kube-scheduler")
        self.apiserver = apiserver
        self.port = free_port()

    def command(self) -> list[str]:
        return [str(self.binary), "--kubeconfig", str(self.apiserver.kubeconfig), "--leader-elect=false",
                "--bind-address", "127.0.0.1", "--secure-port", str(self.port), "--cert-dir", str(self.root / "certs"),
                "--authentication-skip-lookup", "--profiling=false"]

    def ready(self) -> bool:
        return port_open("127.0.0.1", self.port)


class Containerd(ServerProcess):
    """containerd (CRI) over Debian's runc, cgroupfs, overlayfs; its sandbox image and every other one
    pulled from :class:`Registry` over plain HTTP."""

    name = "containerd"

    def __init__(self, registry: Registry, root=None):
        super().__init__(root)
        self.binary = tools_bin("containerd")
        self.registry = registry
        self.socket = RUN / "containerd.sock"

    def prepare(self) -> None:
        hosts = self.root / "certs.d" / self.registry.host
        hosts.mkdir(parents=True, exist_ok=True)
        (hosts / "hosts.toml").write_text(f'server = "http://{self.registry.host}"\n'
                                          f'[host."http://{self.registry.host}"]\n'
                                          '  capabilities = ["pull", "resolve"]\n')
        (self.root / "net.d").mkdir(exist_ok=True)
        runc = shutil.which("runc") or "/usr/sbin/runc"
        (self.root / "config.toml").write_text(f"""version = 3
root = "{self.root / 'root'}"
state = "{RUN / 'state'}"
[grpc]
  address = "{self.socket}"
[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "{self.registry.host}/pause:3.10"
  [plugins.'io.containerd.cri.v1.images'.registry]
    config_path = "{self.root / 'certs.d'}"
[plugins.'io.containerd.cri.v1.runtime']
  # Root here lacks CAP_SYS_RESOURCE: no process may lower its oom_score_adj (the pause container's
  # -998 killed runc's child: "can't get final child's PID from pipe"). Scores are kept at or above
  # containerd's own (0) instead.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true  # the Pods' network namespaces under RUN, taken down with it
  tolerate_missing_hugetlb_controller = true
  disable_hugetlb_controller = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["{cni_bin()}"]
    conf_dir = "{self.root / 'net.d'}"
""")
        (self.root / "net.d" / "10-podpulse.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": "podpulse",
            "plugins": [{"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": True, "hairpinMode": True,
                         "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR}]],
                                  "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(self.root / "ipam")}},
                        {"type": "portmap", "capabilities": {"portMappings": True}}]}))

    def command(self) -> list[str]:
        return [str(self.binary), "--config", str(self.root / "config.toml")]

    def env(self) -> dict[str, str]:
        # the shim and runc are found on PATH: the shim beside containerd
        return dict(os.environ, PATH=f"{self.binary.parent}:{os.environ['PATH']}")

    def ready(self) -> bool:
        return self.socket.exists() and sh(str(tools_bin("ctr")), "--address", str(self.socket), "version",
                                           check=False).returncode == 0

    def ctr(self, *args: str) -> str:
        return sh(str(tools_bin("ctr")), "--address", str(self.socket), "-n", "k8s.io", *args).stdout


class Kubelet(ServerProcess):
    name = "kubelet"
    start_timeout_s = 90.0

    def __init__(self, apiserver: KubeAPIServer, containerd: Containerd, root=None):
        super().__init__(root)
        self.binary = tools_bin("kubelet")
        self.apiserver, self.containerd = apiserver, containerd
        self.port = free_port()

    def prepare(self) -> None:
        (self.root / "config.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "address": NODE_IP, "port": self.port, "readOnlyPort": 0, "healthzPort": free_port(),
            "healthzBindAddress": "127.0.0.1",
            "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            "cgroupDriver": "cgroupfs", "failCgroupV1": False, "failSwapOn": False,
            "containerRuntimeEndpoint": f"unix://{self.containerd.socket}",
            "podLogsDir": str(self.root / "pod-logs"),
            "clusterDNS": [CLUSTER_DNS], "clusterDomain": "cluster.local",
            "resolvConf": "/etc/resolv.conf",  # the host's: what CoreDNS forwards to, and dnsPolicy Default
            "staticPodPath": str(self.root / "manifests"),
            "evictionHard": {"memory.available": "200Mi", "nodefs.available": "2%", "imagefs.available": "2%"},
            "imageGCHighThresholdPercent": 99, "imageGCLowThresholdPercent": 98,
            "serializeImagePulls": False, "registerNode": True,
        }))
        (self.root / "manifests").mkdir(exist_ok=True)

    def command(self) -> list[str]:
        return [str(self.binary), "--config", str(self.root / "config.yaml"),
                "--kubeconfig", str(self.apiserver.kubeconfig), "--root-dir", str(self.root / "root"),
                "--hostname-override", NODE_NAME, "--node-ip", NODE_IP, "--cert-dir", str(self.root / "pki")]

    def ready(self) -> bool:
        return port_open(NODE_IP, self.port)


class KubeProxy(ServerProcess):
    name = "kube-proxy"

    def __init__(self, apiserver: KubeAPIServer, root=None):
        super().__init__(root)
        self.binary = tools_bin("kube-proxy")
        self.apiserver = apiserver
        self.port = free_port()

    def prepare(self) -> None:
        (self.root / "config.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(self.apiserver.kubeconfig)},
            "mode": "iptables", "clusterCIDR": POD_CIDR, "hostnameOverride": NODE_NAME,
            "healthzBindAddress": f"127.0.0.1:{self.port}", "metricsBindAddress": f"127.0.0.1:{free_port()}",
            "conntrack": {"maxPerCore": 0},  # leave the host's conntrack table size alone
        }))

    def command(self) -> list[str]:
        return [str(self.binary), "--config", str(self.root / "config.yaml")]

    def ready(self) -> bool:
        return port_open("127.0.0.1", self.port)


def drop_chains(tool: str, prefixes: tuple[str, ...]) -> int:
    """Delete every rule that jumps to a chain named with one of ``prefixes``, then those chains, in each
    table of ``tool`` (``iptables`` or ``ip6tables``); returns how many chains went."""
    dropped = 0
    for table in ("nat", "filter", "mangle", "raw"):
        rules = sh(f"{tool}-save", "-t", table, check=False).stdout.splitlines()
        chains = [line.split()[0][1:] for line in rules if line.startswith(":") and line[1:].startswith(prefixes)]
        for rule in rules:
            words = shlex.split(rule) if rule.startswith("-A ") else []
            if words and words[1] not in chains and "-j" in words and words[words.index("-j") + 1].startswith(prefixes):
                subprocess.run([tool, "-t", table, "-D", *words[1:]], capture_output=True)
        for chain in chains:
            subprocess.run([tool, "-t", table, "-F", chain], capture_output=True)
        for chain in chains:
            dropped += subprocess.run([tool, "-t", table, "-X", chain], capture_output=True).returncode == 0
    return dropped


def _subreaper() -> None:
    """Make this process the one orphans come back to: containerd's shims are orphaned (they outlive its
    call that starts them), and this machine's init reaps them only seconds after they exit."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
        raise ServiceError(f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}")


def _kubepods_cgroups() -> list[Path]:
    """Every cgroup the kubelet made (``kubepods`` and below), in each hierarchy."""
    root = Path("/sys/fs/cgroup")
    # os.walk, not rglob: a Pod's cgroup may go while it is walked, and os.walk skips what went
    return [Path(path) for top in [*root.glob("*/kubepods"), root / "kubepods"] for path, _, _ in os.walk(top)]


def _procs(cgroup: Path) -> list[int]:
    """The processes in ``cgroup``; none once it is gone (the kubelet removes a Pod's as its last one exits)."""
    try:
        return [int(pid) for pid in (cgroup / "cgroup.procs").read_text().split()]
    except OSError:  # ENOENT, or ENODEV from a cgroup removed while it was read
        return []


def _kill_pods(timeout_s: float = 10.0) -> None:
    """SIGKILL every process in the ``kubepods`` cgroups (the Pods' containers), until none is left."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pids = {pid for cgroup in _kubepods_cgroups() for pid in _procs(cgroup)}
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        _reap()
        time.sleep(0.1)


def _zombies() -> list[int]:
    """This process's children that have exited and wait to be reaped."""
    me, found = os.getpid(), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if fields[0] == "Z" and int(fields[1]) == me:
            found.append(int(stat.parent.name))
    return found


def _reap() -> None:
    """Wait for this process's exited children: the shims come back to it (:func:`_subreaper`), and
    would stay zombies until it exits."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def leftovers() -> list[str]:
    """What a cluster could leave on the host, still there: processes, mounts, links, cgroups, iptables
    chains. (A ``veth`` link here is always a Pod's: this machine has none of its own.)"""
    found = [f"process {p}" for p in sh("pgrep", "-a", "-f", "containerd|kubelet|kube-proxy|kube-scheduler",
                                         check=False).stdout.splitlines() if "pgrep" not in p]
    found += [f"mount {line.split()[1]}" for line in Path("/proc/mounts").read_text().splitlines()
              if MOUNT_MARK in line.split()[1]]
    found += [f"link {name}" for name in (BRIDGE, NODE_LINK)
              if sh("ip", "link", "show", name, check=False).returncode == 0]
    found += [f"link {line.split()[0]}" for line in sh("ip", "-br", "link", check=False).stdout.splitlines()
              if line.startswith("veth")]  # a Pod's end of the bridge, kept by a network namespace
    found += [f"cgroup {path}" for path in _kubepods_cgroups() if path.name == "kubepods"]
    for tool in ("iptables", "ip6tables"):
        found += [f"{tool} chain {line.split()[0][1:]}" for line in sh(f"{tool}-save", check=False).stdout.splitlines()
                  if line.startswith((":KUBE-", ":CNI-"))]
    return found


def dns_manifests(image: str) -> list[dict]:
    """CoreDNS as cluster DNS: its ServiceAccount and RBAC, its Corefile, a Deployment and the kube-dns
    Service on :data:`CLUSTER_DNS`. Names outside the cluster go to the host's resolver."""
    labels = {"k8s-app": "kube-dns"}
    meta = {"namespace": "kube-system", "labels": labels}
    corefile = (".:53 {\n    errors\n    health :8080\n    ready :8181\n"
                "    kubernetes cluster.local in-addr.arpa ip6.arpa {\n        pods insecure\n"
                "        fallthrough in-addr.arpa ip6.arpa\n    }\n    forward . /etc/resolv.conf\n"
                "    cache 30\n    loop\n    reload\n}\n")
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "coredns", **meta}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "system:coredns"},
         "rules": [{"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"],
                    "verbs": ["list", "watch"]},
                   {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "system:coredns"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:coredns"},
         "subjects": [{"kind": "ServiceAccount", "name": "coredns", "namespace": "kube-system"}]},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "coredns", **meta},
         "data": {"Corefile": corefile}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "coredns", **meta},
         "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {
             "metadata": {"labels": labels},
             "spec": {"serviceAccountName": "coredns", "dnsPolicy": "Default",
                      "securityContext": {"runAsNonRoot": True, "runAsUser": 65532},
                      "containers": [{
                          "name": "coredns", "image": image, "args": ["-conf", "/etc/coredns/Corefile"],
                          "ports": [{"containerPort": 53, "protocol": "UDP", "name": "dns"},
                                    {"containerPort": 53, "protocol": "TCP", "name": "dns-tcp"}],
                          "readinessProbe": {"httpGet": {"path": "/ready", "port": 8181}, "periodSeconds": 2},
                          "resources": {"requests": {"cpu": "50m", "memory": "64Mi"},
                                        "limits": {"memory": "128Mi"}},
                          "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                              "capabilities": {"drop": ["ALL"]}},
                          "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns"}]}],
                      "volumes": [{"name": "config", "configMap": {"name": "coredns"}}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "kube-dns", **meta},
         "spec": {"selector": labels, "clusterIP": CLUSTER_DNS,
                  "ports": [{"name": "dns", "port": 53, "protocol": "UDP"},
                            {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]}},
    ]


def kuberay_manifests(image: str) -> list[dict]:
    """KubeRay's operator as a Deployment in ``kuberay-system``, with a ServiceAccount allowed what its
    controllers do (KubeRay's own chart grants about as much: Ray clusters, Pods, Services, Jobs,
    Secrets, Ingresses, Routes, Events). Its CRDs are applied apart (:func:`testbed.kuberay.kuberay_crd_files`)."""
    ns = "kuberay-system"
    labels = {"app.kubernetes.io/name": "kuberay-operator"}
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "kuberay-operator", "namespace": ns}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "kuberay-operator"},
         "rules": [{"apiGroups": ["ray.io"], "resources": ["*"], "verbs": ["*"]},
                   {"apiGroups": [""], "resources": ["pods", "pods/status", "services", "services/status", "endpoints",
                                                     "secrets", "serviceaccounts", "events", "configmaps"],
                    "verbs": ["*"]},
                   {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["*"]},
                   {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles", "rolebindings"], "verbs": ["*"]},
                   {"apiGroups": ["networking.k8s.io"], "resources": ["ingresses", "ingressclasses"], "verbs": ["*"]},
                   {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["*"]},
                   {"apiGroups": ["route.openshift.io"], "resources": ["routes"], "verbs": ["*"]},
                   {"apiGroups": ["gateway.networking.k8s.io"], "resources": ["*"], "verbs": ["*"]},
                   {"apiGroups": ["scheduling.x-k8s.io", "scheduling.volcano.sh"], "resources": ["*"],
                    "verbs": ["*"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "kuberay-operator"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "kuberay-operator"},
         "subjects": [{"kind": "ServiceAccount", "name": "kuberay-operator", "namespace": ns}]},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "kuberay-operator", "namespace": ns,
                                                                     "labels": labels},
         "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {
             "metadata": {"labels": labels},
             "spec": {"serviceAccountName": "kuberay-operator",
                      "securityContext": {"runAsNonRoot": True, "runAsUser": 65532},
                      "containers": [{
                          "name": "kuberay-operator", "image": image,
                          "args": ["--enable-leader-election=false", "--log-stdout-encoder=console",
                                   "--health-probe-bind-address=:8082", "--metrics-addr=:8080"],
                          "readinessProbe": {"httpGet": {"path": "/readyz", "port": 8082}, "periodSeconds": 2},
                          "resources": {"requests": {"cpu": "50m", "memory": "128Mi"},
                                        "limits": {"memory": "512Mi"}},
                          "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                              "capabilities": {"drop": ["ALL"]}}}]}}}},
    ]


class OneNodeCluster:
    """The whole cluster, started in order and stopped in reverse; ``kubeconfig`` reaches it as admin."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root or tempfile.mkdtemp(prefix=f"{MOUNT_MARK}-"))
        parts = {name: self.root / name for name in ("etcd", "apiserver", "kcm", "scheduler", "registry",
                                                     "containerd", "kubelet", "proxy")}
        for path in parts.values():
            path.mkdir(parents=True, exist_ok=True)
        self.etcd = Etcd(root=parts["etcd"])
        self.apiserver = ClusterAPIServer(self.etcd, root=parts["apiserver"])
        self.controllers = ControllerManager(self.apiserver, root=parts["kcm"])
        self.scheduler = Scheduler(self.apiserver, root=parts["scheduler"])
        self.registry = Registry(root=parts["registry"])
        self.containerd = Containerd(self.registry, root=parts["containerd"])
        self.kubelet = Kubelet(self.apiserver, self.containerd, root=parts["kubelet"])
        self.proxy = KubeProxy(self.apiserver, root=parts["proxy"])
        self.started: list[ServerProcess] = []
        self.timings: dict[str, float] = {}
        self._sysctls: dict[str, str] = {}

    kubeconfig = property(lambda self: self.apiserver.kubeconfig)

    def start(self) -> "OneNodeCluster":
        _subreaper()
        self._network()
        RUN.mkdir(parents=True, exist_ok=True)
        for server in (self.etcd, self.apiserver, self.controllers, self.scheduler, self.registry):
            self._start(server)
        sandbox(self.registry)  # the pause image: every Pod's first container
        for server in (self.containerd, self.kubelet, self.proxy):
            self._start(server)
        self._dns()
        return self

    def api_client(self):
        from kubernetes import config  # heavy: only what talks to the cluster needs it

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def apply(self, docs: list[dict]) -> None:
        """Create each object (as the admin)."""
        from kubernetes import utils  # heavy: as api_client's

        client = self.api_client()
        for doc in docs:
            utils.create_from_dict(client, doc)

    def wait(self, what: str, probe, timeout_s: float = 120.0, every_s: float = 0.5):
        """``probe()`` until it returns something true (returned); ServiceError naming ``what`` after
        ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                found = probe()
            except Exception:  # the API not ready yet, an object not created yet
                found = None
            if found:
                return found
            time.sleep(every_s)
        raise ServiceError(f"{what}: not within {timeout_s:.0f} s")

    def external(self, name: str, port: int, namespace: str = "default") -> str:
        """A Service without a selector and its EndpointSlice, ``name:port`` in the cluster to the node's
        address and ``port`` on this machine: how the Pods reach a server running beside the cluster (as a
        cluster reaches a managed Kafka or database). Returns the Service's DNS name."""
        self.apply([{"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace},
                     "spec": {"ports": [{"name": "main", "port": port, "targetPort": port, "protocol": "TCP"}]}},
                    {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                     "metadata": {"name": f"{name}-host", "namespace": namespace,
                                  "labels": {"kubernetes.io/service-name": name}},
                     "addressType": "IPv4", "ports": [{"name": "main", "port": port, "protocol": "TCP"}],
                     "endpoints": [{"addresses": [NODE_IP], "conditions": {"ready": True}}]}])
        return f"{name}.{namespace}.svc.cluster.local"

    def _dns(self) -> None:
        """CoreDNS as a Deployment behind kube-dns, once the node is Ready; waits for it to be Ready too."""
        from kubernetes import client  # heavy: as api_client's

        t0 = time.monotonic()
        core, apps = client.CoreV1Api(self.api_client()), client.AppsV1Api(self.api_client())
        self.wait("the node Ready", lambda: any(c.type == "Ready" and c.status == "True" for n in core.list_node().items
                                                 for c in n.status.conditions or []))
        self.timings["node Ready"] = round(time.monotonic() - t0, 1)
        self.wait("namespace kube-system", lambda: core.read_namespace("kube-system"))
        self.apply(dns_manifests(coredns(self.registry)))
        self.wait("CoreDNS Ready", lambda: (apps.read_namespaced_deployment("coredns", "kube-system").status
                                            .ready_replicas or 0) >= 1)
        self.timings["cluster DNS"] = round(time.monotonic() - t0 - self.timings["node Ready"], 1)

    def _start(self, server: ServerProcess) -> None:
        t0 = time.monotonic()
        server.start()
        self.started.append(server)
        self.timings[server.name] = round(time.monotonic() - t0, 1)

    def _network(self) -> None:
        for key in ("net/ipv4/ip_forward", "net/bridge/bridge-nf-call-iptables"):
            path = Path("/proc/sys") / key
            self._sysctls[key] = path.read_text().strip()
            path.write_text("1")
        if sh("ip", "link", "show", NODE_LINK, check=False).returncode:  # this kernel has no dummy links
            sh("ip", "link", "add", NODE_LINK, "type", "veth", "peer", "name", f"{NODE_LINK}p")
        sh("ip", "addr", "replace", f"{NODE_IP}/32", "dev", NODE_LINK)
        for link in (NODE_LINK, f"{NODE_LINK}p"):
            sh("ip", "link", "set", link, "up")

    def stop(self) -> None:
        """Stop the node first and every container it ran (SIGKILL to each process of ``kubepods``),
        then the control plane, then clean the host (:meth:`_clean_host`)."""
        node = [s for s in (self.proxy, self.kubelet) if s in self.started]
        try:
            for server in node:
                server.stop()
            _kill_pods()
        finally:  # whatever failed above, the rest still goes
            for server in reversed([s for s in self.started if s not in node]):
                try:
                    server.stop(timeout=5.0 if server is self.apiserver else 30.0)
                except Exception:  # keep stopping the others
                    pass
            self.started.clear()
            self._clean_host()

    def _clean_host(self) -> None:
        """Everything the node left on the host: containerd's shims, the mounts under its folders (the
        Pods' root filesystems and network namespaces), the ``kubepods`` cgroups, kube-proxy's, the
        kubelet's and the CNI plugins' iptables chains, the bridge, the node's link, the sysctls it changed."""
        shims = [int(pid) for pid in sh("pgrep", "-f", "containerd-shim-runc-v2", check=False).stdout.split()]
        subprocess.run(["pkill", "-9", "-f", "containerd-shim-runc-v2"], capture_output=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (any(Path(f"/proc/{pid}").exists() for pid in shims) or _zombies()):
            _reap()  # a zombie keeps its /proc entry until it is reaped
            time.sleep(0.1)
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
                  if MOUNT_MARK in line.split()[1]]  # an earlier cluster's too, if its run was cut short
        for mount in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", mount], capture_output=True)
        for cgroup in sorted(_kubepods_cgroups(), key=lambda p: len(p.parts), reverse=True):
            try:
                cgroup.rmdir()
            except OSError:  # a controller's folder already went with another
                pass
        subprocess.run([str(tools_bin("kube-proxy")), "--cleanup"], capture_output=True)
        for tool in ("iptables", "ip6tables"):
            drop_chains(tool, ("KUBE-", "CNI-"))
        for link in (BRIDGE, NODE_LINK):
            subprocess.run(["ip", "link", "delete", link], capture_output=True)
        for key, value in self._sysctls.items():
            (Path("/proc/sys") / key).write_text(value)
        shutil.rmtree(RUN, ignore_errors=True)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.remove()
            raise

    def __exit__(self, *exc) -> None:
        self.remove()
