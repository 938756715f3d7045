"""Apache Cassandra for real: one node, fetched from Maven Central, started with fast-start settings.

``make infra`` copies ``org.apache.cassandra:cassandra-all`` and its dependencies
(see ``testbed/maven/cassandra/pom.xml``) into ``.cache/infra/cassandra``; that folder
is the classpath of ``CassandraDaemon``. The node runs on its own ports with a
small heap, no gossip settling wait and no JMX; its data directory outlives
:meth:`stop`, so a test can restart it on the same data.

    python -m testbed.cassandra [PORT]    # run one in the foreground, print host:port
"""

from __future__ import annotations

import socket

import duckdb
import pyarrow as pa
import yaml
from cassandra.cluster import Cluster

from testbed.process import ServerProcess, ServiceError, cache_dir, free_port, port_open

__all__ = ["CassandraNode", "cassandra_classpath", "cassandra_events"]

# Java 17 module access that Cassandra 5.0 needs (its conf/jvm17-server.options, JPMS part).
JPMS = [f"--add-exports={m}=ALL-UNNAMED" for m in (
    "java.base/jdk.internal.misc", "java.management.rmi/com.sun.jmx.remote.internal.rmi",
    "java.rmi/sun.rmi.registry", "java.rmi/sun.rmi.server", "java.sql/java.sql", "java.base/java.lang.ref",
    "jdk.unsupported/sun.misc", "jdk.compiler/com.sun.tools.javac.file", "jdk.attach/sun.tools.attach")] + [
    f"--add-opens={m}=ALL-UNNAMED" for m in (
    "java.base/java.lang.module", "java.base/jdk.internal.loader", "java.base/jdk.internal.ref",
    "java.base/jdk.internal.reflect", "java.base/jdk.internal.math", "java.base/jdk.internal.module",
    "java.base/jdk.internal.util.jar", "jdk.management/com.sun.management.internal", "java.base/sun.nio.ch",
    "java.base/java.io", "java.base/java.lang.reflect", "jdk.compiler/com.sun.tools.javac",
    "java.base/java.lang", "java.base/java.util")]

LOGBACK = """<configuration>
  <appender name="STDOUT" class="ch.qos.logback.core.ConsoleAppender">
    <encoder><pattern>%d{HH:mm:ss.SSS} %-5level [%thread] %logger{20} %msg%n</pattern></encoder>
  </appender>
  <root level="WARN"><appender-ref ref="STDOUT"/></root>
  <logger name="org.apache.cassandra.service.CassandraDaemon" level="INFO"/>
</configuration>
"""


def cassandra_classpath() -> str:
    libs = cache_dir() / "cassandra"
    if not any(libs.glob("cassandra-all-*.jar")):
        raise ServiceError(f"Apache Cassandra's jars are not in {libs}: run `make infra` (make test does)")
    return str(libs / "*")


class CassandraNode(ServerProcess):
    name = "cassandra"
    start_timeout_s = 180.0

    def __init__(self, root=None, port: int = 0, heap_mb: int = 1024):
        super().__init__(root)
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.storage_port = free_port()
        self.heap_mb = heap_mb
        self.classpath = cassandra_classpath()
        self.conf = self.root / "conf"

    @property
    def hosts(self) -> str:
        return self.host

    def prepare(self) -> None:
        self.conf.mkdir(parents=True, exist_ok=True)
        data = self.root / "data"
        config = {
            "cluster_name": "podpulse-test", "num_tokens": 1, "initial_token": 0,
            "partitioner": "org.apache.cassandra.dht.Murmur3Partitioner",
            "endpoint_snitch": "SimpleSnitch", "auto_bootstrap": False,
            "seed_provider": [{"class_name": "org.apache.cassandra.locator.SimpleSeedProvider",
                               "parameters": [{"seeds": f"{self.host}:{self.storage_port}"}]}],
            "listen_address": self.host, "rpc_address": self.host,
            "storage_port": self.storage_port, "native_transport_port": self.port,
            "start_native_transport": True,
            "data_file_directories": [str(data / "data")], "commitlog_directory": str(data / "commitlog"),
            "saved_caches_directory": str(data / "saved_caches"), "hints_directory": str(data / "hints"),
            "cdc_raw_directory": str(data / "cdc_raw"),
            "commitlog_sync": "periodic", "commitlog_sync_period": "10000ms",
            "authenticator": "AllowAllAuthenticator", "authorizer": "AllowAllAuthorizer",
            "concurrent_reads": 8, "concurrent_writes": 16, "concurrent_compactors": 1,
            "memtable_heap_space": "128MiB", "memtable_offheap_space": "128MiB",
            "key_cache_size": "16MiB", "counter_cache_size": "0MiB",
            "dynamic_snitch": False, "hinted_handoff_enabled": False,
            "user_defined_functions_enabled": False, "materialized_views_enabled": False,
            "sasi_indexes_enabled": False, "drop_compact_storage_enabled": False,
            "write_request_timeout": "10000ms", "read_request_timeout": "10000ms",
        }
        (self.conf / "cassandra.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        (self.conf / "logback.xml").write_text(LOGBACK)

    def command(self) -> list[str]:
        props = {
            "cassandra.config": (self.conf / "cassandra.yaml").as_uri(),
            "logback.configurationFile": (self.conf / "logback.xml").as_uri(),
            "cassandra.storagedir": self.root / "data", "cassandra-foreground": "yes",
            "cassandra.skip_wait_for_gossip_to_settle": 0, "cassandra.ring_delay_ms": 100,
            "cassandra.superuser_setup_delay_ms": 0, "cassandra.migration_delay_ms": 0,
            "cassandra.jmx.local.port": free_port(),
            "jdk.attach.allowAttachSelf": "true", "io.netty.tryReflectionSetAccessible": "true",
            "java.net.preferIPv4Stack": "true",
        }
        return ["java", f"-Xms{self.heap_mb}m", f"-Xmx{self.heap_mb}m", "-Xss512k", "-XX:+UseG1GC",
                "-XX:ActiveProcessorCount=2", *JPMS, *(f"-D{k}={v}" for k, v in props.items()),
                "-cp", self.classpath, "org.apache.cassandra.service.CassandraDaemon"]

    def ready(self) -> bool:
        if not port_open(self.host, self.port):
            return False
        try:  # the native protocol answers OPTIONS once the node accepts CQL
            with socket.create_connection((self.host, self.port), timeout=2) as s:
                s.sendall(bytes([0x04, 0, 0, 1, 0x05, 0, 0, 0, 0]))
                return len(s.recv(9)) == 9
        except OSError:
            return False


RAW_COLUMNS = ("device_id", "seq", "event_time", "battery_left", "battery_right", "battery_case", "in_ear_left",
               "in_ear_right", "charging", "playback_s", "interval_s", "noise_mode", "output_dba", "ambient_dba")


def cassandra_events(spec):
    """The raw events a Cassandra backend (``spec``: its storage config) holds, as the ``events``
    table of an in-memory DuckDB (session time zone UTC), to query them with SQL."""
    cluster = Cluster([*spec["hosts"]], port=spec.get("port", 9042))
    try:
        rows = list(cluster.connect().execute(
            f"SELECT {', '.join(RAW_COLUMNS)} FROM {spec.get('keyspace', 'podpulse')}.events"))
    finally:
        cluster.shutdown()
    columns = {c: [getattr(r, c) for r in rows] for c in RAW_COLUMNS}
    table = pa.table({**columns, "event_time": pa.array(columns["event_time"], pa.timestamp("ms", tz="UTC"))})
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.register("events_arrow", table)
    con.execute("CREATE TABLE events AS SELECT * FROM events_arrow")
    return con


if __name__ == "__main__":
    import signal
    import sys

    with CassandraNode(port=int(sys.argv[1]) if len(sys.argv) > 1 else 0) as node:
        print(f"{node.host}:{node.port}", flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
