"""Reading the relational store: one reader per backend, used by analytics, the report, training,
the model registry and Serve.

Queries are written once, in PostgreSQL's dialect (which DuckDB reads as it is),
and rendered for the backend by its reader's ``render`` (sqlglot, for Oracle).
Every session reads in UTC: the queries add the report's offset themselves.
Readers are read-only: DuckDB opens the file ``read_only``; the others run in
a connection that never commits. Which reader a backend has, its module says
(``storage.backends``).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Iterator

from storage import backends
from storage.base import QUERY_DIALECT, Reader, StorageError
from storage.config import StorageConfig

__all__ = ["Reader", "ReaderPool", "open_reader", "run_queries", "config_of", "committed_offsets", "QUERY_DIALECT"]


def _relational(config: StorageConfig, kind: str):
    settings = config.settings_for(kind)
    if backends.of(settings).reader is None:
        raise StorageError(f"{kind} are routed to {settings.type}, which has no SQL reader")
    return settings


def open_reader(config: StorageConfig, kind: str = "rollups") -> Reader:
    """A reader of the backend that keeps ``kind`` (rollups, devices and offsets share one)."""
    settings = _relational(config, kind)
    return backends.of(settings).reader(settings, None)


class ReaderPool:
    """At most ``size`` readers open at once per backend, for a process that reads on every request
    (a Serve replica): a burst of reads waits for a free one (at most ``wait_s``, then
    :class:`StorageError`) instead of opening the connections the writer needs. PostgreSQL and
    Oracle connections stay open in a bounded SQLAlchemy pool; a DuckDB reader is opened per use
    (a read-only handle held open would keep the writer out of the file)."""

    def __init__(self, config: StorageConfig, size: int = 4, wait_s: float = 10.0):
        self.config, self.size, self.wait_s = config, size, wait_s
        self._lock = threading.Lock()
        self._slots: dict[str, threading.BoundedSemaphore] = {}
        self._engines: dict[str, Any] = {}
        self._turns = threading.Condition()  # an embedded file's readers, and its one writer
        self._reading, self._writing = 0, False

    @contextmanager
    def reader(self, kind: str = "rollups") -> Iterator[Reader]:
        name = self.config.routes[kind]
        settings = _relational(self.config, kind)
        with self._lock:
            slots = self._slots.setdefault(name, threading.BoundedSemaphore(self.size))
        if not slots.acquire(timeout=self.wait_s):
            raise StorageError(f"all {self.size} read connections to {name} are busy (waited {self.wait_s:g} s)")
        try:
            with self._read_turn(settings.embedded):
                with backends.of(settings).reader(settings, self._engine(name, settings)) as reader:
                    yield reader
        finally:
            slots.release()

    @contextmanager
    def _read_turn(self, embedded: bool) -> Iterator[None]:
        if not embedded:
            yield
            return
        with self._turns:
            if not self._turns.wait_for(lambda: not self._writing, timeout=self.wait_s):
                raise StorageError(f"a write held the store for {self.wait_s:g} s")
            self._reading += 1
        try:
            yield
        finally:
            with self._turns:
                self._reading -= 1
                self._turns.notify_all()

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Around a write to the store from this process: an embedded file (DuckDB) cannot be open for
        reading and writing at once in one process, so the write waits for the reads in flight (new ones
        wait for it). A server database needs no turn."""
        if not any(self.config.settings(name).embedded for name in set(self.config.routes.values())):
            yield
            return
        with self._turns:
            if not self._turns.wait_for(lambda: not self._writing, timeout=self.wait_s):
                raise StorageError(f"another write held the store for {self.wait_s:g} s")
            self._writing = True
            if not self._turns.wait_for(lambda: self._reading == 0, timeout=self.wait_s):
                self._writing = False
                self._turns.notify_all()
                raise StorageError(f"the reads in flight held the store for {self.wait_s:g} s")
        try:
            yield
        finally:
            with self._turns:
                self._writing = False
                self._turns.notify_all()

    def _engine(self, name: str, settings):
        """The backend's pooled connections, made on first use; None for a backend without a pool."""
        make = backends.of(settings).engine
        if make is None:
            return None
        with self._lock:
            if name not in self._engines:
                self._engines[name] = make(settings, self.size, self.wait_s)
            return self._engines[name]

    def close(self) -> None:
        with self._lock:
            for engine in self._engines.values():
                engine.dispose()
            self._engines.clear()


def config_of(source: StorageConfig | ReaderPool) -> StorageConfig:
    return source.config if isinstance(source, ReaderPool) else source


def run_queries(source: StorageConfig | ReaderPool, queries: dict[str, str],
                kind: str = "rollups") -> dict[str, list[tuple]]:
    """Run read-only queries (PostgreSQL's dialect) on the backend that keeps ``kind``: on a reader of
    its own, or one of the pool's."""
    readers = source.reader(kind) if isinstance(source, ReaderPool) else open_reader(source, kind)
    with readers as reader:
        return {name: reader.rows(sql) for name, sql in queries.items()}


def committed_offsets(source: StorageConfig | ReaderPool, topic: str) -> dict[int, int]:
    """The next offset per partition of ``topic``, as stored with the data (a DuckDB file its writer
    holds cannot be read: ask the writer, ``StorageWriter.committed_offsets``)."""
    quoted = topic.replace("'", "''")
    rows = run_queries(source, {"o": "SELECT kafka_partition, next_offset FROM kafka_offsets "
                                     f"WHERE topic = '{quoted}'"}, kind="offsets")["o"]
    return {int(p): int(o) for p, o in rows}
