"""Reading the relational store: one reader per backend, used by analytics, the report, training,
the model registry and Serve.

Queries are written once, in PostgreSQL's dialect (which DuckDB reads as it is),
and rendered for the backend by :meth:`Reader.render` (sqlglot, for Oracle).
Every session reads in UTC: the queries add the report's offset themselves.
Readers are read-only: DuckDB opens the file ``read_only``; the others run in
a connection that never commits.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping

import duckdb
import psycopg
import sqlglot
from sqlalchemy import create_engine
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlglot import exp

from storage.base import StorageError
from storage.oracle_store import oracle_url
from storage.postgres_store import engine_url
from storage.router import DEFAULT_DUCKDB_PATH, StorageConfig, password

__all__ = ["Reader", "ReaderPool", "open_reader", "run_queries", "config_of", "QUERY_DIALECT"]

QUERY_DIALECT = "postgres"  # what PodPulse's SQL is written in (sqlglot's name)


class Reader(ABC):
    """Read-only SQL on one relational backend, session time zone UTC."""

    dialect = QUERY_DIALECT  # sqlglot's name for the backend's dialect

    def render(self, sql: str) -> str:
        """``sql`` (PostgreSQL's dialect) as this backend reads it."""
        if self.dialect in (QUERY_DIALECT, "duckdb"):
            return sql
        return render_for_oracle(sql)

    @abstractmethod
    def rows(self, sql: str) -> list[tuple]:
        """Run one query (PostgreSQL's dialect); all its rows."""

    @abstractmethod
    def connection_factory(self) -> Callable[[], Any]:
        """DB-API connections in UTC for Ray Data's ``read_sql`` (give it :meth:`render`'s SQL)."""

    def close(self) -> None:
        """Release the connection."""

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def render_for_oracle(sql: str) -> str:
    """sqlglot's transpilation, plus what Oracle needs beyond it: GROUP BY names its expressions
    (no positions) and interval units are singular (``INTERVAL '10' HOUR``). Parsed in the tests,
    never run here (no Oracle server)."""
    tree = sqlglot.parse_one(sql, read=QUERY_DIALECT)
    for select in tree.find_all(exp.Select):
        group = select.args.get("group")
        if group is not None:
            group.set("expressions", [
                select.expressions[int(e.name) - 1].unalias().copy() if isinstance(e, exp.Literal) and e.is_int
                else e for e in group.expressions])
    for interval in tree.find_all(exp.Interval):
        unit = interval.args.get("unit")
        if unit is not None and unit.name.upper().endswith("S"):
            interval.set("unit", exp.var(unit.name.upper()[:-1]))
    return tree.sql(dialect="oracle")


class DuckDBReader(Reader):
    dialect = "duckdb"

    def __init__(self, path: str):
        self.path = path
        try:
            self._con = self.connection_factory()()
        except duckdb.Error as e:
            raise StorageError(f"cannot read DuckDB at {path}: {e}") from e

    def rows(self, sql: str) -> list[tuple]:
        return self._con.execute(sql).fetchall()

    def connection_factory(self) -> Callable[[], Any]:
        path = self.path

        def connect():
            con = duckdb.connect(path, read_only=True)
            con.execute("SET TimeZone = 'UTC'")
            return con

        return connect

    def close(self) -> None:
        self._con.close()


def sql_url(spec: Mapping):
    """SQLAlchemy's URL of a PostgreSQL or Oracle backend, password included."""
    if spec["type"] == "postgresql":
        return engine_url(spec["url"], password(spec))
    return oracle_url(spec["url"], password(spec))


class SQLAlchemyReader(Reader):
    """PostgreSQL (psycopg 3) and Oracle (python-oracledb): one connection, never committed;
    from ``engine``'s pool when given (it is then left open), else from an engine of its own."""

    SESSION_UTC = {"postgres": "SET TIME ZONE 'UTC'", "oracle": "ALTER SESSION SET TIME_ZONE = 'UTC'"}

    def __init__(self, spec: Mapping, engine=None):
        self.dialect = "postgres" if spec["type"] == "postgresql" else "oracle"
        self._own = engine is None
        self._engine = create_engine(sql_url(spec)) if self._own else engine
        self.url = self._engine.url
        try:
            self._conn = self._engine.connect()
            self._conn.exec_driver_sql(self.SESSION_UTC[self.dialect])
        except (OperationalError, InterfaceError) as e:  # the server, not the query
            raise StorageError(f"cannot read {self.url.render_as_string()}: {e.orig or e}") from e

    def rows(self, sql: str) -> list[tuple]:
        try:
            return [tuple(r) for r in self._conn.exec_driver_sql(self.render(sql)).all()]
        except (OperationalError, InterfaceError) as e:
            raise StorageError(f"lost {self.url.render_as_string()}: {e.orig or e}") from e

    def connection_factory(self) -> Callable[[], Any]:
        url, session = self.url, self.SESSION_UTC[self.dialect]
        if self.dialect == "postgres":
            dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)

            def connect():
                con = psycopg.connect(dsn, autocommit=True)
                con.execute(session)
                return con
        else:
            params = dict(user=url.username, password=url.password, host=url.host, port=url.port or 1521,
                          service_name=url.query.get("service_name") or url.database)

            def connect():
                import oracledb  # lazy: only an Oracle store loads its driver

                con = oracledb.connect(**params)
                con.cursor().execute(session)
                return con

        return connect

    def close(self) -> None:
        self._conn.close()  # back to the pool, rolled back
        if self._own:
            self._engine.dispose()


def _sql_spec(config: StorageConfig, kind: str) -> Mapping:
    spec = config.backends[config.routes[kind]]
    if spec["type"] not in ("duckdb", "postgresql", "oracle"):
        raise StorageError(f"{kind} are routed to {spec['type']}, which has no SQL reader")
    return spec


def open_reader(config: StorageConfig, kind: str = "rollups") -> Reader:
    """A reader of the backend that keeps ``kind`` (rollups, devices and offsets share one)."""
    spec = _sql_spec(config, kind)
    if spec["type"] == "duckdb":
        return DuckDBReader(spec.get("path", DEFAULT_DUCKDB_PATH))
    return SQLAlchemyReader(spec)


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

    @contextmanager
    def reader(self, kind: str = "rollups") -> Iterator[Reader]:
        backend = self.config.routes[kind]
        spec = _sql_spec(self.config, kind)
        with self._lock:
            slots = self._slots.setdefault(backend, threading.BoundedSemaphore(self.size))
        if not slots.acquire(timeout=self.wait_s):
            raise StorageError(f"all {self.size} read connections to {backend} are busy (waited {self.wait_s:g} s)")
        try:
            reader = (DuckDBReader(spec.get("path", DEFAULT_DUCKDB_PATH)) if spec["type"] == "duckdb"
                      else SQLAlchemyReader(spec, self._engine(backend, spec)))
            with reader:
                yield reader
        finally:
            slots.release()

    def _engine(self, backend: str, spec: Mapping):
        with self._lock:
            if backend not in self._engines:
                self._engines[backend] = create_engine(sql_url(spec), pool_size=self.size, max_overflow=0,
                                                       pool_timeout=self.wait_s, pool_pre_ping=True)
            return self._engines[backend]

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
