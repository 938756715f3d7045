"""Apache Kafka for real: one KRaft node (combined controller and broker), fetched from Maven Central.

``make infra`` copies ``org.apache.kafka:kafka_2.13`` and its dependencies (see
``testbed/maven/kafka/pom.xml``) into ``.cache/infra/kafka``; that folder is the
classpath. The log directory is durable and outlives :meth:`stop`, so a test can
stop the broker mid-ingest and start it again on the same data and port.

    python -m testbed.kafka [PORT]      # run one in the foreground, print its bootstrap
"""

from __future__ import annotations

import base64
import re
import subprocess
import uuid

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from podpulse.kafka import client_config, ensure_topic
from testbed.process import ServerProcess, ServiceError, cache_dir, free_port, port_open

__all__ = ["KafkaBroker", "kafka_classpath"]

HEAP = "-Xmx768m"


def kafka_classpath() -> str:
    libs = cache_dir() / "kafka"
    if not any(libs.glob("kafka_2.13-*.jar")):
        raise ServiceError(f"Apache Kafka's jars are not in {libs}: run `make infra` (make test does)")
    return str(libs / "*")


class KafkaBroker(ServerProcess):
    """Same surface as ``podpulse.broker.EmbeddedBroker``: ``bootstrap``, ``config``, ``create_topic``."""

    name = "kafka"
    start_timeout_s = 90.0
    kind = "kafka"

    def __init__(self, root=None, port: int = 0, host: str = "127.0.0.1", cluster_id: str | None = None):
        """``host``: the address it listens on and advertises (the end-to-end cluster's Pods reach the
        node's, ``testbed.cluster.NODE_IP``). ``cluster_id``: KRaft's, random unless given."""
        super().__init__(root)
        self.cluster_id = cluster_id or base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        self.host = host
        self.port = port or free_port()
        self.controller_port = free_port()
        self.classpath = kafka_classpath()
        self.properties = self.root / "server.properties"

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def config(self) -> dict:
        return client_config(self.bootstrap)

    def create_topic(self, name: str, partitions: int) -> None:
        ensure_topic(self.config, name, partitions)

    def log_batches(self, topic: str, partition: int) -> list[dict]:
        """The record batches of one partition as the broker wrote them to disk (DumpLogSegments):
        ``baseOffset``, ``count``, ``producerId``, ``baseSequence``, ``lastSequence``..."""
        segments = sorted((self.root / "log" / f"{topic}-{partition}").glob("*.log"))
        out = subprocess.run(["java", "-Xmx256m", "-cp", self.classpath, "kafka.tools.DumpLogSegments",
                              "--files", ",".join(map(str, segments))], capture_output=True, text=True)
        if out.returncode:
            raise ServiceError(f"DumpLogSegments failed: {out.stderr[-500:]}")
        batches = []
        for line in out.stdout.splitlines():
            if line.startswith("baseOffset:"):
                fields = re.findall(r"(\w+): (\S+)", line)
                batches.append({k: int(v) if re.fullmatch(r"-?\d+", v) else v for k, v in fields})
        return batches

    def prepare(self) -> None:
        settings = {
            "process.roles": "broker,controller", "node.id": 1,
            "controller.quorum.voters": f"1@{self.host}:{self.controller_port}",
            "listeners": f"PLAINTEXT://{self.host}:{self.port},CONTROLLER://{self.host}:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{self.host}:{self.port}",
            "controller.listener.names": "CONTROLLER", "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": self.root / "log", "num.partitions": 1,
            "offsets.topic.replication.factor": 1, "offsets.topic.num.partitions": 4,
            "transaction.state.log.replication.factor": 1, "transaction.state.log.min.isr": 1,
            "transaction.state.log.num.partitions": 2,
            "share.coordinator.state.topic.replication.factor": 1, "share.coordinator.state.topic.min.isr": 1,
            "group.initial.rebalance.delay.ms": 0,
            "log.flush.interval.messages": 9223372036854775807,  # the OS page cache, as in production
            "auto.create.topics.enable": "false",
        }
        self.properties.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
        # One id in 64 starts with "-": given as its own word, the tool's parser takes it for an option.
        out = subprocess.run(["java", HEAP, "-cp", self.classpath, "kafka.tools.StorageTool", "format",
                              f"--cluster-id={self.cluster_id}", "--config", str(self.properties)],
                             capture_output=True, text=True)
        if out.returncode:
            raise ServiceError(f"formatting Kafka's log directory failed:\n{out.stdout}{out.stderr}")

    def command(self) -> list[str]:
        return ["java", HEAP, "-Xms256m", "-XX:+UseG1GC",
                "-Djava.awt.headless=true", "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn",
                "-cp", self.classpath, "kafka.Kafka", str(self.properties)]

    def ready(self) -> bool:
        if not port_open(self.host, self.port):
            return False
        try:
            AdminClient({**self.config, "log_level": 0}).list_topics(timeout=2)
            return True
        except KafkaException:
            return False


if __name__ == "__main__":
    import signal
    import sys

    with KafkaBroker(port=int(sys.argv[1]) if len(sys.argv) > 1 else 0) as broker:
        print(broker.bootstrap, flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
