"""The backends: one module per store (``duckdb``, ``postgres``, ``oracle``, ``cassandra``), each
ending with its :class:`storage.base.Backend`: its typed settings (``storage.config``), its store,
its reader and its scratch namespace. The rest of ``storage`` looks a backend up here by its
settings' ``type``; nothing above ``storage`` imports this package (``.importlinter``)."""

from __future__ import annotations

from storage.backends import cassandra, duckdb, oracle, postgres
from storage.base import Backend, StorageError

__all__ = ["BACKENDS", "of", "open_store", "scratch"]

BACKENDS: dict[str, Backend] = {b.settings.type: b for b in (duckdb.BACKEND, postgres.BACKEND, oracle.BACKEND,
                                                              cassandra.BACKEND)}


def of(settings) -> Backend:
    """The backend of these settings."""
    return BACKENDS[settings.type]


def open_store(settings, raw_events_days: int | None = None):
    """The store of one backend; ``raw_events_days``: the raw events' retention, for a store that
    applies it as it writes (Cassandra's TTL per row)."""
    return of(settings).store(settings, raw_events_days)


def scratch(settings, name: str, directory: str):
    """An empty namespace beside these settings' (``Backend.scratch``), dropped when it ends."""
    make = of(settings).scratch
    if make is None:
        raise StorageError(f"{settings.type} has no scratch namespace here: measure on DuckDB, PostgreSQL "
                           "or Cassandra")
    return make(settings, name, directory)
