"""What an ingest run left in the embedded store, as the demo prints it."""

from __future__ import annotations

import duckdb

__all__ = ["store_summary"]


def store_summary(path: str) -> dict:
    """Events stored, devices by state, listening hours urban vs rural (read-only)."""
    con = duckdb.connect(path, read_only=True)
    try:
        events, distinct = con.execute(
            "SELECT count(*), count(DISTINCT (device_id, seq)) FROM events").fetchone()
        by_state = dict(con.execute(
            "SELECT state, count(*) FROM devices GROUP BY state ORDER BY count(*) DESC").fetchall())
        listening = {
            ("urban" if urban else "rural"): {"devices": devices, "listening_hours": round(hours, 1),
                                              "hours_per_device": round(hours / devices, 2)}
            for urban, devices, hours in con.execute(
                "SELECT urban, count(DISTINCT device_id), sum(listening_s) / 3600 "
                "FROM device_hourly GROUP BY urban ORDER BY urban DESC").fetchall()}
        return {"events_stored": events, "distinct_events": distinct,
                "devices": sum(by_state.values()), "devices_by_state": by_state,
                "listening": listening}
    finally:
        con.close()
