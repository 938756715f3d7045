"""The servers a run needs, each started once on first use and stopped at its end (unless given)."""

from __future__ import annotations

import sys

from podpulse.broker import EmbeddedBroker
from testbed.kafka import KafkaBroker
from testbed.postgres import PostgresCluster

__all__ = ["Servers"]

STARTERS = {"tansu": EmbeddedBroker, "kafka": KafkaBroker, "postgres": PostgresCluster}


class Servers:
    """``get("tansu" | "kafka" | "postgres")``: the server, started on first use unless one was given."""

    def __init__(self, tansu=None, kafka=None, postgres=None):
        self._servers = {"tansu": tansu, "kafka": kafka, "postgres": postgres}
        self._started: list = []

    def get(self, name: str):
        if self._servers[name] is None:
            server = STARTERS[name]().start()
            self._servers[name] = server
            self._started.append(server)
        return self._servers[name]

    def close(self) -> None:
        for server in reversed(self._started):
            try:
                server.remove() if hasattr(server, "remove") else server.stop()
            except Exception as e:  # keep stopping the others
                print(f"testbed: stopping {type(server).__name__} failed: {e}", file=sys.stderr)
