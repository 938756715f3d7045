"""Images built on this machine, without a public registry: pushed to a registry on loopback
(:class:`Registry`, ``crane registry serve``) with ``crane``, which containerd then pulls from.

- :func:`sandbox`: the pause image every Pod starts with, compiled from Kubernetes' own ``pause.c``
  (in the ``k8s.io/kubernetes`` module ``tools/node`` pins) as a static binary;
- :func:`busybox`: Debian's ``busybox-static`` and its applets, for the tests' own Pods;
- :func:`coredns`: CoreDNS (``tools/coredns`` pins it), the cluster's DNS.
"""

from __future__ import annotations

import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import requests

from testbed.kube import tools_bin
from testbed.process import ServerProcess, ServiceError, free_port

__all__ = ["Registry", "sandbox", "busybox", "coredns", "push", "PAUSE", "BUSYBOX", "COREDNS"]

PAUSE = "pause:3.10"
BUSYBOX = "podpulse/busybox:1"
COREDNS = "coredns:1.15.0"
BUSYBOX_APPLETS = ("sh", "ls", "cat", "echo", "sleep", "wget", "nslookup", "ping", "ip", "hostname", "nc", "id",
                   "head", "grep", "touch", "dd", "env", "date", "true", "httpd", "mkdir", "cut", "tr")


class Registry(ServerProcess):
    """An OCI registry on loopback: where the images built here are pushed, and what containerd pulls from."""

    name = "registry"

    def __init__(self, root=None, port: int = 0):
        super().__init__(root)
        self.binary = tools_bin("crane")
        self.port = port or free_port()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        (self.root / "blobs").mkdir(exist_ok=True)
        return [str(self.binary), "registry", "serve", "--address", self.host, "--disk", str(self.root / "blobs")]

    def ready(self) -> bool:
        try:
            return requests.get(f"http://{self.host}/v2/", timeout=2).status_code == 200
        except requests.RequestException:
            return False


def _crane(*args: str) -> str:
    out = subprocess.run([str(tools_bin("crane")), *args, "--insecure"], capture_output=True, text=True)
    if out.returncode:
        raise ServiceError(f"crane {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout.strip()


def push(registry: Registry, name: str, root: Path, *, entrypoint: list[str] | None = None,
         env: dict[str, str] | None = None, user: str | None = None, workdir: str | None = None) -> str:
    """The files under ``root`` as a one-layer linux/amd64 image ``name`` in ``registry``; returns its
    reference (``HOST/NAME``)."""
    ref = f"{registry.host}/{name}"
    with tempfile.TemporaryDirectory(prefix="podpulse-image-") as tmp:
        layer = Path(tmp) / "layer.tar"
        with tarfile.open(layer, "w") as tar:
            for path in sorted(root.iterdir()):
                tar.add(path, arcname=path.name)
        _crane("append", "-f", str(layer), "-t", ref)
    mutate = ["mutate", ref, "-t", ref, "--set-platform", "linux/amd64"]
    if entrypoint:
        mutate += ["--entrypoint", ",".join(entrypoint)]
    for key, value in (env or {}).items():
        mutate += ["--env", f"{key}={value}"]
    if user:
        mutate += ["--user", user]
    if workdir:
        mutate += ["--workdir", workdir]
    _crane(*mutate)
    return ref


def _pause_source() -> Path:
    version = "v1.37.2"
    cache = subprocess.run(["go", "env", "GOMODCACHE"], capture_output=True, text=True).stdout.strip()
    source = Path(cache) / f"k8s.io/kubernetes@{version}" / "build" / "pause" / "linux" / "pause.c"
    if not source.exists():
        raise ServiceError(f"{source} is missing: run `make cluster` (it downloads tools/node's modules)")
    return source


def sandbox(registry: Registry) -> str:
    """The pause image, compiled here (``gcc -static``), as ``PAUSE``."""
    with tempfile.TemporaryDirectory(prefix="podpulse-pause-") as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        out = subprocess.run(["gcc", "-Os", "-Wall", "-Werror", "-static", "-DVERSION=v3.10-podpulse", "-o",
                              str(root / "pause"), str(_pause_source())], capture_output=True, text=True)
        if out.returncode:
            raise ServiceError(f"compiling pause.c: {out.stderr.strip()}")
        return push(registry, PAUSE, root, entrypoint=["/pause"])


def busybox(registry: Registry) -> str:
    """Debian's static busybox with the applets the tests use, as ``BUSYBOX``."""
    found = shutil.which("busybox") or "/bin/busybox"
    if not Path(found).exists():
        raise ServiceError("busybox is missing: run `make cluster` (Debian's busybox-static)")
    with tempfile.TemporaryDirectory(prefix="podpulse-busybox-") as tmp:
        root = Path(tmp) / "root"
        (root / "bin").mkdir(parents=True)
        (root / "tmp").mkdir(mode=0o1777)
        shutil.copy2(found, root / "bin" / "busybox")
        for applet in BUSYBOX_APPLETS:
            (root / "bin" / applet).symlink_to("busybox")
        return push(registry, BUSYBOX, root, entrypoint=["/bin/sh"], env={"PATH": "/bin"})


def coredns(registry: Registry) -> str:
    """The CoreDNS binary ``make cluster`` built, alone in an image, as ``COREDNS``."""
    with tempfile.TemporaryDirectory(prefix="podpulse-coredns-") as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        shutil.copy2(tools_bin("coredns"), root / "coredns")
        return push(registry, COREDNS, root, entrypoint=["/coredns"], user="65532")
