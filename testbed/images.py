"""Images built on this machine, without a public registry: pushed to a registry on loopback
(:class:`Registry`, ``crane registry serve``) with ``crane``, which containerd then pulls from.

- :func:`sandbox`: the pause image every Pod starts with, compiled from Kubernetes' own ``pause.c``
  (in the ``k8s.io/kubernetes`` module ``tools/node`` pins) as a static binary;
- :func:`busybox`: Debian's ``busybox-static`` and its applets, for the tests' own Pods;
- :func:`coredns`: CoreDNS (``tools/coredns`` pins it), the cluster's DNS;
- :func:`kuberay_operator`: KubeRay's operator (the binary ``make kube`` built) with the C library it
  links, nothing else;
- :func:`podpulse`: PodPulse's own image, on a Debian bookworm base made here (``mmdebstrap``), the
  local counterpart of the ``Dockerfile`` (whose base, ``rayproject/ray``, is on Docker Hub).

The registry keeps its blobs in ``.cache/registry`` and the wheels in ``.cache/wheels``: a second run
pushes and installs only what changed.
"""

from __future__ import annotations

import functools
import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib import metadata
from pathlib import Path

import requests

from testbed.kube import tools_bin
from testbed.process import ServerProcess, ServiceError, checkout, free_port

__all__ = ["Registry", "sandbox", "busybox", "coredns", "kuberay_operator", "podpulse", "push", "retag", "PAUSE", "BUSYBOX",
           "COREDNS", "KUBERAY"]

PAUSE = "pause:3.10"
BUSYBOX = "podpulse/busybox:1"
COREDNS = "coredns:1.15.0"
KUBERAY = "kuberay-operator:1.5.1"
BUSYBOX_APPLETS = ("sh", "ls", "cat", "echo", "sleep", "wget", "nslookup", "ping", "ip", "hostname", "nc", "id",
                   "head", "grep", "touch", "dd", "env", "date", "true", "httpd", "mkdir", "cut", "tr")


class Registry(ServerProcess):
    """An OCI registry on loopback: where the images built here are pushed, and what containerd pulls from."""

    name = "registry"

    def __init__(self, root=None, port: int = 0, disk: Path | None = None):
        super().__init__(root)
        self.binary = tools_bin("crane")
        self.port = port or free_port()
        self.disk = Path(disk or checkout() / ".cache" / "registry")  # kept between runs

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        self.disk.mkdir(parents=True, exist_ok=True)
        return [str(self.binary), "registry", "serve", "--address", self.host, "--disk", str(self.disk)]

    def has(self, name: str) -> bool:
        """Whether the image ``name`` is in the registry (pushed by an earlier run)."""
        try:
            return requests.head(f"http://{self.host}/v2/{name.replace(':', '/manifests/', 1)}", timeout=10,
                                 headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}).status_code == 200
        except requests.RequestException:
            return False

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


def retag(ref: str, tag: str) -> str:
    """The image ``ref`` under another tag in its registry (as a release pushes one); the new reference."""
    target = f"{ref.rsplit(':', 1)[0]}:{tag}"
    _crane("copy", ref, target)
    return target


def push(registry: Registry, name: str, root: Path | None = None, *, layers: list[Path] = (),
         entrypoint: list[str] | None = None, env: dict[str, str] | None = None, user: str | None = None,
         workdir: str | None = None) -> str:
    """The files under ``root`` (or the layer tarballs ``layers``) as a linux/amd64 image ``name`` in
    ``registry``; returns its reference (``HOST/NAME``)."""
    ref = f"{registry.host}/{name}"
    with tempfile.TemporaryDirectory(prefix="podpulse-image-") as tmp:
        if root is not None:
            layers = [Path(tmp) / "layer.tar"]
            with tarfile.open(layers[0], "w") as tar:
                for path in sorted(root.iterdir()):
                    tar.add(path, arcname=path.name)
        _crane("append", *(arg for layer in layers for arg in ("-f", str(layer))), "-t", ref)
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


def kuberay_operator(registry: Registry) -> str:
    """KubeRay's operator as ``KUBERAY``: its binary and the two files of glibc it links (from this
    Debian machine, the release its binary was built against)."""
    binary = tools_bin("ray-operator")
    with tempfile.TemporaryDirectory(prefix="podpulse-kuberay-") as tmp:
        root = Path(tmp) / "root"
        for lib in ("/lib/x86_64-linux-gnu/libc.so.6", "/lib64/ld-linux-x86-64.so.2"):
            (root / lib[1:]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(lib).resolve(), root / lib[1:])
        shutil.copy2(binary, root / "manager")
        return push(registry, KUBERAY, root, entrypoint=["/manager"], user="65532")


# The Debian packages of PodPulse's base: Python 3.11 (bookworm's, as the image's Ray pin expects), bash
# (KubeRay runs Ray's containers as `bash -lc`) and wget (KubeRay's probes).
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates", "bash", "wget", "procps")
DEBIAN_MIRROR = "http://deb.debian.org/debian"
VENV = "/opt/podpulse"


@functools.cache
def _wheels(cache: Path) -> tuple[Path, list[Path]]:
    """This checkout as a wheel, and every wheel it needs (``pip download`` into ``cache``, kept). Once per
    process: each end-to-end module asks for the image, and pip takes about 20 s to find nothing changed."""
    cache.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "-q"]
    built = cache.parent / "podpulse-wheel"  # this checkout's wheel alone, made again each time
    shutil.rmtree(built, ignore_errors=True)
    built.mkdir()
    for args in (["download", "-d", str(cache), str(checkout())], ["wheel", "--no-deps", "-w", str(built), str(checkout())]):
        out = subprocess.run([*pip, *args], capture_output=True, text=True, cwd=built)
        if out.returncode:
            raise ServiceError(f"pip {args[0]}: {out.stderr.strip()[-500:]}")
    shutil.rmtree(checkout() / "build", ignore_errors=True)  # what `pip wheel` of a source folder leaves
    return next(built.glob("podpulse-*.whl")), sorted(cache.glob("*.whl"))


def podpulse(registry: Registry, cache: Path | None = None) -> tuple[str, dict]:
    """PodPulse's image, built here: bookworm (``mmdebstrap``, :data:`BASE_PACKAGES`) with a user ``ray``
    (uid 1000, group users) as the rayproject images have, and this checkout installed with its
    dependencies in a venv at :data:`VENV`, first on every PATH. Tagged ``<Ray>-py311-<digest of what went in>``;
    an image of that tag in the registry is reused. Returns the reference and the build's figures
    (seconds per step, root filesystem bytes)."""
    cache = Path(cache or checkout() / ".cache")
    figures: dict = {}
    t0 = time.monotonic()
    wheel, wheels = _wheels(cache / "wheels")
    # <Ray>-py311-<digest>: the tag starts with the Ray version, as KubeRay's rayVersion and the operator want
    name = f"podpulse:{metadata.version('ray')}-py311-{_source_key(wheels)}"
    figures["wheels_s"] = round(time.monotonic() - t0, 1)
    saved = cache / "images" / name.replace(":", "-")  # an OCI layout of a build before
    if registry.has(name):
        figures["reused"] = "registry"
        return f"{registry.host}/{name}", figures
    if (saved / "index.json").exists():
        t0 = time.monotonic()
        _crane("push", str(saved), f"{registry.host}/{name}")  # blobs the registry's disk has are not sent again
        figures |= {"reused": str(saved), "push_s": round(time.monotonic() - t0, 1)}
        return f"{registry.host}/{name}", figures
    with tempfile.TemporaryDirectory(prefix="podpulse-rootfs-") as tmp:
        root = Path(tmp) / "rootfs"
        t0 = time.monotonic()
        _run("mmdebstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", "--mode=root", "bookworm",
             str(root), DEBIAN_MIRROR)
        figures["base_s"] = round(time.monotonic() - t0, 1)
        t0 = time.monotonic()
        clean = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}
        _run("chroot", str(root), "useradd", "-u", "1000", "-g", "100", "-m", "-s", "/bin/bash", "ray", env=clean)
        _run("chroot", str(root), "python3", "-m", "venv", VENV, env=clean)
        (root / "wheels").mkdir()
        shutil.copy2(wheel, root / "tmp" / wheel.name)
        _run("mount", "--bind", str(cache / "wheels"), str(root / "wheels"))
        try:
            _run("chroot", str(root), f"{VENV}/bin/pip", "install", "-q", "--no-index", "--find-links", "/wheels",
                 f"/tmp/{wheel.name}", env=clean)
        finally:
            _run("umount", str(root / "wheels"))
        (root / "wheels").rmdir()
        (root / "tmp" / wheel.name).unlink()
        (root / "etc" / "profile.d" / "podpulse.sh").write_text(f'export PATH="{VENV}/bin:$PATH"\n')
        figures["install_s"] = round(time.monotonic() - t0, 1)
        figures["rootfs_bytes"] = sum(f.stat().st_size for f in root.rglob("*") if f.is_file() and not f.is_symlink())
        t0 = time.monotonic()
        ref = push(registry, name, root, env={"PATH": f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                                              "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1"},
                   user="1000:100", workdir="/home/ray")
        figures["push_s"] = round(time.monotonic() - t0, 1)
    shutil.rmtree(saved, ignore_errors=True)
    saved.parent.mkdir(parents=True, exist_ok=True)
    _crane("pull", "--format", "oci", ref, str(saved))  # for the next run: the layout, compressed once
    for old in saved.parent.glob("podpulse-*"):
        if old != saved:
            shutil.rmtree(old, ignore_errors=True)
    return ref, figures


def _source_key(wheels: list[Path]) -> str:
    """A digest of what goes into the image: the packages' files and pyproject.toml of this checkout, the
    wheels of its dependencies (by name: name and version), and the base's packages."""
    digest = hashlib.sha256("\n".join([*(w.name for w in wheels), *BASE_PACKAGES]).encode())
    root = checkout()
    for path in sorted([root / "pyproject.toml", *(f for init in root.glob("*/__init__.py")
                                                    for f in init.parent.rglob("*") if f.is_file())]):
        if "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def _run(*command: str, env: dict | None = None) -> None:
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode:
        raise ServiceError(f"{' '.join(command[:3])} ...: {(out.stderr or out.stdout).strip()[-800:]}")
