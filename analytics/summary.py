"""What an ingest run left in the relational store, as the demo prints it."""

from __future__ import annotations

from storage.config import StorageConfig
from storage.reader import run_queries

__all__ = ["store_summary"]

QUERIES = {
    "totals": "SELECT count(*), sum(events) FROM devices",
    "by_state": "SELECT state, count(*) FROM devices GROUP BY state ORDER BY count(*) DESC, state",
    "listening": ("SELECT urban, count(DISTINCT device_id), sum(listening_s) / 3600 "
                  "FROM device_hourly GROUP BY urban ORDER BY urban DESC"),
}


def store_summary(config: StorageConfig) -> dict:
    """Devices and events stored, devices by state, listening hours urban vs rural."""
    r = run_queries(config, QUERIES)
    devices, events = r["totals"][0]
    listening = {
        ("urban" if urban else "rural"): {"devices": n, "listening_hours": round(float(hours), 1),
                                          "hours_per_device": round(float(hours) / n, 2)}
        for urban, n, hours in r["listening"]}
    return {"events_stored": int(events or 0), "devices": devices,
            "devices_by_state": dict(r["by_state"]), "listening": listening}
