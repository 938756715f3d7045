"""What an ingest run left in the relational store, as the demo prints it."""

from __future__ import annotations

from storage.router import StorageConfig, password

__all__ = ["store_summary", "relational_query"]

QUERIES = {
    "totals": "SELECT count(*), sum(events) FROM devices",
    "by_state": "SELECT state, count(*) FROM devices GROUP BY state ORDER BY count(*) DESC, state",
    "listening": ("SELECT urban, count(DISTINCT device_id), sum(listening_s) / 3600 "
                  "FROM device_hourly GROUP BY urban ORDER BY urban DESC"),
}


def relational_query(config: StorageConfig, queries: dict[str, str]) -> dict[str, list[tuple]]:
    """Run read-only SQL on the backend that holds devices and rollups (session time zone UTC)."""
    spec = config.backends[config.routes["rollups"]]
    if spec["type"] == "duckdb":
        import duckdb

        con = duckdb.connect(spec["path"], read_only=True)
        try:
            con.execute("SET TimeZone = 'UTC'")
            return {k: con.execute(sql).fetchall() for k, sql in queries.items()}
        finally:
            con.close()
    from sqlalchemy import create_engine

    from storage.postgres_store import engine_url

    engine = create_engine(engine_url(spec["url"], password(spec)))
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "postgresql":
                conn.exec_driver_sql("SET TIME ZONE 'UTC'")
            return {k: [tuple(r) for r in conn.exec_driver_sql(sql).all()] for k, sql in queries.items()}
    finally:
        engine.dispose()


def store_summary(config: StorageConfig) -> dict:
    """Devices and events stored, devices by state, listening hours urban vs rural."""
    r = relational_query(config, QUERIES)
    devices, events = r["totals"][0]
    listening = {
        ("urban" if urban else "rural"): {"devices": n, "listening_hours": round(float(hours), 1),
                                          "hours_per_device": round(float(hours) / n, 2)}
        for urban, n, hours in r["listening"]}
    return {"events_stored": int(events or 0), "devices": devices,
            "devices_by_state": dict(r["by_state"]), "listening": listening}
