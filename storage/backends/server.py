"""What the server databases (PostgreSQL, Oracle) share: a SQLAlchemy engine from their settings,
and a reader on one of its connections."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, Callable

from sqlalchemy import create_engine
from sqlalchemy.exc import InterfaceError, OperationalError

from storage.base import Reader, StorageError

__all__ = ["ServerReader", "pooled_engine"]


def pooled_engine(url, size: int, wait_s: float):
    """At most ``size`` connections, a caller waiting ``wait_s`` for one; each checked before use."""
    return create_engine(url, pool_size=size, max_overflow=0, pool_timeout=wait_s, pool_pre_ping=True)


class ServerReader(Reader):
    """One connection, never committed; from ``engine``'s pool when given (it is then left open),
    else from an engine of its own on ``url``. A subclass names its session's UTC statement and how
    Ray Data opens connections of its own (:meth:`connection_factory`)."""

    SESSION_UTC: str

    def __init__(self, url, engine=None):
        self._own = engine is None
        self._engine = create_engine(url) if self._own else engine
        self.url = self._engine.url
        try:
            self._conn = self._engine.connect()
            self._conn.exec_driver_sql(self.SESSION_UTC)
        except (OperationalError, InterfaceError) as e:  # the server, not the query
            raise StorageError(f"cannot read {self.url.render_as_string()}: {e.orig or e}") from e

    def rows(self, sql: str) -> list[tuple]:
        try:
            return [tuple(r) for r in self._conn.exec_driver_sql(self.render(sql)).all()]
        except (OperationalError, InterfaceError) as e:
            raise StorageError(f"lost {self.url.render_as_string()}: {e.orig or e}") from e

    @abstractmethod
    def connection_factory(self) -> Callable[[], Any]:
        """DB-API connections in UTC, with this reader's URL (password included)."""

    def close(self) -> None:
        self._conn.close()  # back to the pool, rolled back
        if self._own:
            self._engine.dispose()
