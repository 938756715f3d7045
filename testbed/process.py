"""One server process of the tests: started, waited for, stopped and restarted.

Each real service (PostgreSQL, Apache Kafka, Apache Cassandra) is a subclass that
says how to prepare its data directory once, which command runs it, and how to
tell that it answers. The data directory outlives a :meth:`stop`, so a fault test
can stop a server mid-run and :meth:`start` it again on the same data and port.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from podpulse.broker import free_port  # re-exported: every server here takes its ports from it
from podpulse.errors import PodPulseError

__all__ = ["ServerProcess", "ServiceError", "free_port", "port_open", "cache_dir", "checkout"]


class ServiceError(PodPulseError, RuntimeError):
    """A test service could not be prepared or did not come up (a PodPulseError: the command line
    says it in one line)."""


def checkout() -> Path:
    """The repository this package runs from (an editable install), else the working directory: where
    ``make infra`` and ``make kube`` put what they fetch and build (``.cache/``)."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "Makefile").exists() else Path.cwd()


def cache_dir() -> Path:
    """Where fetched server artifacts are kept between runs (``make infra`` fills it)."""
    return Path(os.environ.get("PODPULSE_INFRA_CACHE", checkout() / ".cache" / "infra"))


class ServerProcess:
    name = "server"
    start_timeout_s = 60.0

    def __init__(self, root: Path | None = None):
        self.root = Path(root or tempfile.mkdtemp(prefix=f"podpulse-{self.name}-"))
        self.log_path = self.root / f"{self.name}.log"
        self._proc: subprocess.Popen | None = None
        self._prepared = False

    # -- what a service supplies ---------------------------------------------------
    def prepare(self) -> None:
        """Create the data directory and configuration (called once, before the first start)."""

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        """True once the server answers a client."""
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def preexec(self):
        return None

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> "ServerProcess":
        if not self._prepared:
            self.prepare()
            self._prepared = True
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=self.env(),
                                          preexec_fn=self.preexec(), start_new_session=True)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ServiceError(f"{self.name} exited with code {self._proc.returncode}:\n{self.log_tail()}")
            if self.ready():
                return self
            time.sleep(0.2)
        self.stop()
        raise ServiceError(f"{self.name} did not answer within {self.start_timeout_s:.0f}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0, kill: bool = False) -> None:
        """Stop the server (SIGTERM, or SIGKILL with ``kill``); its data stays for a restart."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout)
        except ProcessLookupError:
            pass

    def restart(self) -> None:
        self.stop()
        self.start()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:].strip() or "(no output)"
        except OSError:
            return "(no log)"

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.remove()


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False
