"""Backend-independent batch work: replay filtering, hourly rollups, device registry.

Every backend computes the same rows here, with pyarrow, then merges them with
its own upsert. Each rollup column has a merge rule (:data:`HOURLY_MERGE`), so
applying two batches one after the other gives the same row as applying their
union: that is what lets late events update their hour.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["KAFKA_COLUMNS", "HOURLY_KEY", "HOURLY_MERGE", "DEVICE_KEY", "DEVICE_MERGE",
           "drop_replayed", "hourly_rollup", "device_updates"]

KAFKA_COLUMNS = [("kafka_partition", pa.int32()), ("kafka_offset", pa.int64())]

HOURLY_KEY = ("device_id", "hour")
# column → how a stored value and a new one merge
HOURLY_MERGE = {
    "state": "keep", "urban": "keep",
    "events": "sum",
    "listening_s": "sum",  # seconds of playback
    "in_ear_s": "sum",  # seconds with at least one bud in an ear
    "anc_s": "sum", "adaptive_s": "sum", "transparency_s": "sum", "off_s": "sum",  # in-ear, by mode
    "output_dba_sum": "sum", "output_samples": "sum", "output_dba_max": "max",  # while playing
    "ambient_dba_sum": "sum", "ambient_samples": "sum",  # while in an ear
    "battery_left_min": "min", "battery_right_min": "min", "battery_case_min": "min",
}

DEVICE_KEY = ("device_id",)
DEVICE_MERGE = {
    "model": "latest", "firmware": "latest", "postcode": "latest", "state": "latest",
    "urban": "latest", "host_device": "latest", "schema_version": "latest",
    "first_seen": "min", "last_seen": "max", "events": "sum",
}


def drop_replayed(events: pa.Table, stored: dict[int, int]) -> tuple[pa.Table, int]:
    """Keep the rows whose offset is at or past the stored next offset of their partition."""
    if not stored or events.num_rows == 0:
        return events, 0
    parts = events["kafka_partition"].to_numpy()
    floor = np.zeros(int(parts.max()) + 1, dtype=np.int64)
    for p, offset in stored.items():
        if p < len(floor):
            floor[p] = offset
    keep = events["kafka_offset"].to_numpy() >= floor[parts]
    if keep.all():
        return events, 0
    return events.filter(pa.array(keep)), int((~keep).sum())


def _seconds_if(mask: pa.Array, seconds: pa.Array) -> pa.Array:
    return pc.if_else(mask, seconds, 0).cast(pa.float64())


def hourly_rollup(events: pa.Table) -> pa.Table:
    """One row per (device, hour) of the batch, with the columns of :data:`HOURLY_MERGE`."""
    interval = events["interval_s"].cast(pa.float64())
    in_ear = pc.or_(events["in_ear_left"], events["in_ear_right"])
    playing = pc.greater(events["playback_s"], 0)
    mode = events["noise_mode"]
    hour = pc.floor_temporal(events["event_time"], unit="hour")
    work = pa.table({
        "device_id": events["device_id"], "hour": hour,
        "state": events["state"], "urban": events["urban"],
        "listening_s": events["playback_s"],
        "in_ear_s": _seconds_if(in_ear, interval),
        **{f"{m}_s": _seconds_if(pc.and_(in_ear, pc.equal(mode, m)), interval)
           for m in ("anc", "adaptive", "transparency", "off")},
        "output_dba_sum": pc.if_else(playing, events["output_dba"], 0.0),
        "output_samples": playing.cast(pa.int64()),
        "output_dba_max": pc.if_else(playing, events["output_dba"], None),
        "ambient_dba_sum": pc.if_else(in_ear, events["ambient_dba"], 0.0),
        "ambient_samples": in_ear.cast(pa.int64()),
        "battery_left_min": events["battery_left"],
        "battery_right_min": events["battery_right"],
        "battery_case_min": events["battery_case"],
    })
    rule = {"sum": "sum", "max": "max", "min": "min"}
    aggs = [(name, rule[how]) for name, how in HOURLY_MERGE.items() if how in rule and name != "events"]
    grouped = work.group_by(["device_id", "hour", "state", "urban"], use_threads=False).aggregate(
        [*aggs, ("device_id", "count")])
    names = {f"{name}_{how}": name for name, how in aggs} | {"device_id_count": "events"}
    grouped = grouped.rename_columns([names.get(c, c) for c in grouped.column_names])
    return grouped.select(["device_id", "hour", *HOURLY_MERGE])


def device_updates(events: pa.Table) -> pa.Table:
    """One row per device of the batch: its latest attributes and its time span."""
    latest = [c for c, how in DEVICE_MERGE.items() if how == "latest"]
    ordered = events.select(["device_id", "event_time", *latest]).sort_by("event_time")
    grouped = ordered.group_by("device_id", use_threads=False).aggregate(
        [*((c, "last") for c in latest), ("event_time", "min"), ("event_time", "max"),
         ("device_id", "count")])
    names = {f"{c}_last": c for c in latest} | {
        "event_time_min": "first_seen", "event_time_max": "last_seen", "device_id_count": "events"}
    grouped = grouped.rename_columns([names.get(c, c) for c in grouped.column_names])
    return grouped.select(["device_id", *DEVICE_MERGE])
