"""A private PostgreSQL cluster: ``initdb`` into a temporary directory, its own port, trust auth.

Debian's ``postgresql`` package provides the binaries (``make test`` installs it).
PostgreSQL refuses to run as root, so under root the cluster belongs to the
``postgres`` system user the package creates. Durability settings are relaxed
(``fsync=off``): the tests stop the server cleanly or kill it on purpose, and a
killed server still recovers from its WAL, which is all a fault test needs.

    python -m testbed.postgres [PORT]     # run one in the foreground, print its URL
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
from pathlib import Path

from testbed.process import ServerProcess, ServiceError, free_port, port_open

__all__ = ["PostgresCluster", "postgres_bindir"]


def postgres_bindir() -> Path:
    """The newest installed server's ``bin`` (Debian keeps it off the PATH)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(os.path.realpath(initdb)).parent
    raise ServiceError("PostgreSQL's server is not installed: apt-get install postgresql (make test does)")


class PostgresCluster(ServerProcess):
    name = "postgres"
    start_timeout_s = 30.0

    def __init__(self, root=None, port: int = 0, database: str = "test", listen: str = "127.0.0.1",
                 clients: str | None = None):
        """``listen``: the addresses it listens on besides loopback (the end-to-end cluster's node address);
        ``clients``: a network (CIDR) trusted besides loopback (the cluster's Pods)."""
        super().__init__(root)
        self.listen, self.clients = listen, clients
        self.port = port or free_port()
        self.database = database
        self.bindir = postgres_bindir()
        self.data = self.root / "data"
        self._user = pwd.getpwnam("postgres") if os.geteuid() == 0 else None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.database}"

    def preexec(self):
        if self._user is None:
            return None
        uid, gid = self._user.pw_uid, self._user.pw_gid

        def drop():
            os.setgid(gid)
            os.setuid(uid)
        return drop

    def prepare(self) -> None:
        if self._user is not None:
            os.chown(self.root, self._user.pw_uid, self._user.pw_gid)
        subprocess.run([str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                        "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync"],
                       check=True, capture_output=True, preexec_fn=self.preexec())
        if self.clients:
            with open(self.data / "pg_hba.conf", "a") as hba:
                hba.write(f"host all all {self.clients} trust\n")

    def command(self) -> list[str]:
        listen = ",".join(dict.fromkeys(["127.0.0.1", *self.listen.split(",")]))
        settings = {"listen_addresses": listen, "port": self.port, "unix_socket_directories": str(self.root),
                    "max_connections": 200, "shared_buffers": "256MB", "fsync": "off",
                    "synchronous_commit": "off", "full_page_writes": "off", "max_locks_per_transaction": 256,
                    "logging_collector": "off", "log_min_messages": "warning"}
        return [str(self.bindir / "postgres"), "-D", str(self.data),
                *(a for k, v in settings.items() for a in ("-c", f"{k}={v}"))]

    def ready(self) -> bool:
        if not port_open("127.0.0.1", self.port):
            return False
        probe = subprocess.run([str(self.bindir / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                                "-d", "postgres", "-Atc", "SELECT 1"], capture_output=True)
        return probe.returncode == 0

    def start(self) -> "PostgresCluster":
        super().start()
        self.psql(f"SELECT 'CREATE DATABASE {self.database}' WHERE NOT EXISTS "
                  f"(SELECT FROM pg_database WHERE datname = '{self.database}') \\gexec", database="postgres")
        return self

    def psql(self, sql: str, database: str | None = None) -> str:
        out = subprocess.run([str(self.bindir / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                              "-d", database or self.database, "-v", "ON_ERROR_STOP=1", "-At"],
                             input=sql, capture_output=True, text=True)
        if out.returncode:
            raise ServiceError(f"psql failed: {out.stderr.strip()}")
        return out.stdout

    def stop(self, timeout: float = 30.0, kill: bool = False) -> None:
        # SIGTERM is PostgreSQL's "smart" shutdown, which waits for every client to leave;
        # SIGINT ("fast") rolls them back and stops at once.
        if not kill and self.running:
            try:
                os.killpg(self._proc.pid, signal.SIGINT)
                self._proc.wait(timeout)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                pass
        super().stop(timeout, kill=True)


if __name__ == "__main__":
    import sys

    with PostgresCluster(port=int(sys.argv[1]) if len(sys.argv) > 1 else 0) as pg:
        print(pg.url, flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
