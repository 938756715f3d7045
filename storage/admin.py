"""``podpulse db``: schema migrations of a relational store, addressed by URL (storage administration).

URLs: ``postgresql://user@host:5432/db``, ``oracle://user@host:1521/?service_name=X``,
``duckdb:///path/to/file.duckdb``. Passwords come from ``PODPULSE_DB_PASSWORD``
or a file, never from the URL.
"""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import create_engine

from storage.backends.duckdb import open_for_writing
from storage.backends.oracle import oracle_url
from storage.backends.postgres import engine_url
from storage.base import StorageError
from storage.migrations import LATEST, MIGRATIONS, applied_versions, migrate_duckdb, migrate_engine

__all__ = ["migrate", "status", "db_password"]

DUCKDB_LOCK_WAIT_S = 120.0


def _duckdb(path: str):
    """Open the file for writing, waiting while another process holds its lock."""
    return open_for_writing(path, DUCKDB_LOCK_WAIT_S)


def _engine(url: str, password: str | None):
    if url.startswith("oracle"):
        return create_engine(oracle_url(url, password))
    if url.startswith("postgres"):
        return create_engine(engine_url(url, password))
    raise StorageError(f"unsupported database URL {url!r}: use postgresql://, oracle:// or duckdb:///PATH")


def db_password(password_file: Path | None = None) -> str | None:
    """The database password: the file's first line if a file is given, else $PODPULSE_DB_PASSWORD."""
    if password_file:
        try:
            return Path(password_file).read_text().strip()
        except OSError as e:
            raise StorageError(f"cannot read {password_file}: {e.strerror}") from e
    return os.environ.get("PODPULSE_DB_PASSWORD")


def _duckdb_path(url: str) -> str | None:
    return url[len("duckdb:///"):] if url.startswith("duckdb:///") else None


def migrate(url: str, target: int | None = None, password: str | None = None) -> list[int]:
    """Apply pending migrations; returns the versions applied by this call."""
    path = _duckdb_path(url)
    if path is not None:
        with _duckdb(path) as con:
            return migrate_duckdb(con, target)
    engine = _engine(url, password)
    try:
        return migrate_engine(engine, target)
    except StorageError:
        raise
    except Exception as e:
        raise StorageError(f"migration failed on {engine.url.render_as_string(hide_password=True)}: "
                           f"{str(e).splitlines()[0]}") from e
    finally:
        engine.dispose()


def status(url: str, password: str | None = None) -> dict:
    path = _duckdb_path(url)
    if path is not None:
        with _duckdb(path) as con:
            found = con.execute("SELECT count(*) FROM information_schema.tables "
                                "WHERE table_name = 'podpulse_schema_version'").fetchone()[0]
            applied = {v for (v,) in con.execute(
                "SELECT version FROM podpulse_schema_version").fetchall()} if found else set()
    else:
        engine = _engine(url, password)
        try:
            with engine.connect() as conn:
                applied = applied_versions(conn)
        except Exception as e:
            raise StorageError(f"cannot read the schema version: {str(e).splitlines()[0]}") from e
        finally:
            engine.dispose()
    return {"current": max(applied, default=0), "latest": LATEST,
            "pending": [{"version": m.version, "description": m.description}
                        for m in MIGRATIONS if m.version not in applied]}
