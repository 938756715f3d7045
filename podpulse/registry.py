"""The model registry: versioned artefacts in a directory, indexed in the relational store.

A version is a directory ``<root>/<name>/<version>/`` holding the model
(``model.keras``) and ``metadata.json`` (version, data window, metrics, feature
schema, parameters); the ``model_versions`` table indexes every version.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from storage.router import StorageConfig
from storage.schema import model_versions

__all__ = ["new_version", "register", "versions"]


def new_version() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")


def register(config: StorageConfig, name: str, version: str, path: Path, metrics: dict, metadata: dict) -> None:
    """Index a saved version in the relational store (migrated first if needed)."""
    row = {"name": name, "version": version, "path": str(path), "created_at": datetime.now(timezone.utc),
           "metrics": json.dumps(metrics), "metadata": json.dumps(metadata, default=str)}
    spec = config.backends[config.routes["anomalies"]]
    if spec["type"] == "duckdb":
        from storage.duckdb_store import DuckDBStore

        store = DuckDBStore(spec["path"])
        try:
            store.setup()
            store.con.execute("INSERT INTO model_versions VALUES (?, ?, ?, ?, ?, ?)", list(row.values()))
        finally:
            store.close()
        return
    from storage.router import open_backend

    store = open_backend(spec)
    try:
        store.setup()
        with store.engine.begin() as conn:
            conn.execute(model_versions.insert().values(**row))
    finally:
        store.close()


def versions(config: StorageConfig, name: str) -> list[dict]:
    from podpulse.summary import relational_query

    if not name.replace("-", "").isalpha():
        raise ValueError(f"not a model name: {name!r}")
    rows = relational_query(config, {"v": "SELECT version, path, metrics FROM model_versions "
                                          f"WHERE name = '{name}' ORDER BY version"})["v"]
    return [{"version": v, "path": p, "metrics": json.loads(m)} for v, p, m in rows]
