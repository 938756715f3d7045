"""Backend-independent batch work: replay filtering, hourly rollups, device registry.

Every backend computes the same rows here, with pyarrow, then merges them with
its own upsert. Each rollup column has a merge rule (:data:`HOURLY_MERGE`), so
applying two batches one after the other gives the same row as applying their
union: that is what lets late events update their hour.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from podpulse.localtime import LOCAL_OFFSET_MIN, REPORT_UTC_OFFSET_H
from storage.base import OffsetGap

__all__ = ["KAFKA_COLUMNS", "HOURLY_KEY", "HOURLY_MERGE", "DEVICE_KEY", "DEVICE_MERGE", "LAST_SAMPLE",
           "FIRMWARE_KEY", "FIRMWARE_MERGE", "firmware_days", "DAILY_KEY", "DAILY_MERGE",
           "daily_rollup", "report_days",
           "SINCE_MIGRATION_4", "SINCE_MIGRATION_10", "LAST_SAMPLE_QUERY", "last_sample_table",
           "drop_replayed", "drop_erased", "check_follows", "first_sightings", "hourly_rollup", "device_updates"]

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
    # since migration 4:
    "dose_s": "sum",  # seconds at 80 dBA equivalent: playback_s * 2 ** ((output_dba - 80) / 3)
    "drain_left_pct": "sum", "drain_right_pct": "sum",  # % dropped between consecutive samples,
    "drain_playback_s": "sum",  # both buds in, nothing charging; and the playback over those pairs
    "drain_case_pct": "sum",  # % the case dropped between consecutive samples while not on charge
    # since migration 10:
    "temp_c_sum": "sum", "temp_samples": "sum",  # the buds' mean temperature while both in and playing (v2)
    "charge_pct": "sum",  # % the buds rose between consecutive samples, both together: / 200 = charge cycles
}
SINCE_MIGRATION_10 = ("temp_c_sum", "temp_samples", "charge_pct")
SINCE_MIGRATION_4 = ("dose_s", "drain_left_pct", "drain_right_pct", "drain_playback_s", "drain_case_pct",
                     "last_seq", "last_battery_left", "last_battery_right", "last_battery_case",
                     "last_in_ear_left", "last_in_ear_right", "last_charging")

# Which firmware each device ran on each report day: what firmware adoption needs, kept here so
# that it is answered wherever the raw events live (Cassandra included). Since migration 6.
FIRMWARE_KEY = ("device_id", "day", "firmware")
FIRMWARE_MERGE = {"events": "sum"}

# Each device's day (AEST) per state and urban class (since migration 11): the hourly rows summed, so that
# the reports' distinct devices per region-day, device-weeks and per-device drain read ~6x fewer rows.
# A row's state and urban class are its hours' own: the device-hours of one device-day that a batch
# saw in another state make another row (a device that crossed a border counts in both, as in
# device_hourly). The sums are exact; the one place the two tables can part is an hour split between
# two batches with a border crossed between them: device_hourly keeps the hour's first state, this
# table files the later batch's share under the new one.
DAILY_KEY = ("device_id", "day", "state", "urban")
DAILY_MERGE = {
    **{c: "sum" for c in ("events", "listening_s", "in_ear_s", "anc_s", "adaptive_s", "transparency_s", "off_s",
                          "dose_s", "drain_left_pct", "drain_right_pct", "drain_playback_s")},
    # bit h set: the device has an hour of that day starting at local hour h (its state's standard time,
    # half-hour zones rounded down): who was active at each hour of the day, without device_hourly
    "local_hours": "bitor",
}

DEVICE_KEY = ("device_id",)
DEVICE_MERGE = {
    "model": "latest", "firmware": "latest", "postcode": "latest", "state": "latest",
    "urban": "latest", "host_device": "latest", "schema_version": "latest",
    "first_seen": "min", "last_seen": "max", "events": "sum",
    # the latest sample, so the next batch can measure battery drain from it (migration 4)
    "last_seq": "latest", "last_battery_left": "latest", "last_battery_right": "latest",
    "last_battery_case": "latest", "last_in_ear_left": "latest", "last_in_ear_right": "latest",
    "last_charging": "latest",
}
LAST_SAMPLE = {"last_seq": "seq", "last_battery_left": "battery_left", "last_battery_right": "battery_right",
               "last_battery_case": "battery_case", "last_in_ear_left": "in_ear_left",
               "last_in_ear_right": "in_ear_right", "last_charging": "charging"}


LAST_SAMPLE_QUERY = f"SELECT device_id, {', '.join(LAST_SAMPLE)} FROM devices"


LAST_SAMPLE_SCHEMA = pa.schema([
    ("device_id", pa.string()), ("last_seq", pa.int64()), ("last_battery_left", pa.int16()),
    ("last_battery_right", pa.int16()), ("last_battery_case", pa.int16()), ("last_in_ear_left", pa.bool_()),
    ("last_in_ear_right", pa.bool_()), ("last_charging", pa.string())])


def last_sample_table(rows: list[tuple]) -> pa.Table:
    """Rows of :data:`LAST_SAMPLE_QUERY` (any driver) → the ``last`` table of :func:`hourly_rollup`.

    Devices registered before migration 4 have no last sample (nulls): they are left out.
    """
    columns = list(zip(*rows)) if rows else [[] for _ in LAST_SAMPLE_SCHEMA]
    table = pa.table([pa.array(list(c), f.type) for c, f in zip(columns, LAST_SAMPLE_SCHEMA)],
                     schema=LAST_SAMPLE_SCHEMA)
    return table.filter(table["last_seq"].is_valid())


def check_follows(stored: dict[int, int], start_offsets: dict[int, int | None] | None) -> None:
    """Refuse a batch that starts past the stored offset of a partition.

    Batches of a partition reach the writer in order, but one can fail while the
    next succeeds (a lost connection, a writer restart): storing the later one
    would move the offset past events never stored. Its consumer rewinds instead.
    """
    for p, start in (start_offsets or {}).items():
        if start is None:  # the consumer began at the partition's beginning
            continue
        have = stored.get(p)
        if have is None or start > have:
            raise OffsetGap(f"partition {p}: the batch starts at offset {start} but the store holds "
                            f"{'nothing' if have is None else have}: an earlier batch is missing")


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


def drop_erased(events: pa.Table, erased: Iterable[str]) -> tuple[pa.Table, pa.Table]:
    """Split off the rows of erased devices: (the rows kept, the rows dropped)."""
    gone = pa.array(list(erased), pa.string())
    if events.num_rows == 0 or len(gone) == 0:
        return events, events.slice(0, 0)
    mask = pc.is_in(events["device_id"], value_set=gone)
    return events.filter(pc.invert(mask)), events.filter(mask)


def first_sightings(events: pa.Table, last: pa.Table | None,
                    stored: Callable[[pa.Table], Iterable[tuple[str, int]]]) -> pa.Table:
    """The rows whose event identity ``(device_id, seq)`` is new: not stored, not earlier in the batch.

    An event its producer sent twice (a retry, a phone uploading again) arrives at a
    new offset, so the offset check cannot see it. In steady state a device's events
    arrive in seq order, so only rows at or below the device's last stored ``seq``
    (``last``: the registry's latest samples) can have been seen before: just those
    are looked up, with ``stored(rows)`` → the ``(device_id, seq)`` pairs of those rows
    (all columns) already stored. Keeps each identity's first row, in batch order.
    """
    n = events.num_rows
    if n == 0:
        return events
    codes = pc.dictionary_encode(events["device_id"]).combine_chunks().indices.to_numpy()
    seq = events["seq"].to_numpy()
    order = np.lexsort((seq, codes))  # stable: the first of equal keys is the batch's first
    c, s = codes[order], seq[order]
    keep = np.ones(n, dtype=bool)
    keep[order[1:][(c[1:] == c[:-1]) & (s[1:] == s[:-1])]] = False
    if last is not None and last.num_rows:
        last = last.filter(last["last_seq"].is_valid())
        where = pc.index_in(events["device_id"], value_set=last["device_id"]).fill_null(-1).to_numpy()
        last_seq = np.append(last["last_seq"].to_numpy(), -1)  # index -1: not registered
        suspect = keep & (where >= 0) & (seq <= last_seq[where])
        if suspect.any():
            rows = np.flatnonzero(suspect)
            keys = events.take(rows)
            seen = set(stored(keys))
            if seen:
                ids = keys["device_id"].to_pylist()
                for i, row in enumerate(rows.tolist()):
                    if (ids[i], int(seq[row])) in seen:
                        keep[row] = False
    return events if keep.all() else events.filter(pa.array(keep))


def _seconds_if(mask: pa.Array, seconds: pa.Array) -> pa.Array:
    return pc.if_else(mask, seconds, 0).cast(pa.float64())


def _pair_columns(table: pa.Table, names: dict[str, str]) -> dict[str, np.ndarray]:
    """Numeric numpy columns for pairing: batteries, in-ear flags, and the charging state as two flags."""
    charging = table[names["charging"]]
    return {
        "seq": table[names["seq"]].to_numpy().astype(np.int64),
        "battery_left": table[names["battery_left"]].to_numpy().astype(np.float64),
        "battery_right": table[names["battery_right"]].to_numpy().astype(np.float64),
        "battery_case": table[names["battery_case"]].to_numpy().astype(np.float64),
        "in_ear": pc.and_(table[names["in_ear_left"]], table[names["in_ear_right"]]).to_numpy(
            zero_copy_only=False).astype(bool),
        "idle": pc.equal(charging, "none").to_numpy(zero_copy_only=False).astype(bool),
        "case_off": pc.invert(pc.is_in(charging, pa.array(["case", "both"]))).to_numpy(
            zero_copy_only=False).astype(bool),
    }


def _drain(events: pa.Table, last: pa.Table | None) -> dict[str, np.ndarray]:
    """Battery drops between consecutive samples of a device, on the later sample's row.

    A pair counts when its seq numbers follow each other. A row whose predecessor
    is not in the batch pairs with ``last`` (the registry's latest sample of the
    device) when that is its predecessor. Bud drain: both buds in an ear in both
    samples and nothing on charge. Case drain: the case not plugged in.
    """
    n = events.num_rows
    codes = pc.dictionary_encode(events["device_id"]).combine_chunks().indices.to_numpy()
    cur = _pair_columns(events, {c: c for c in LAST_SAMPLE.values()})
    order = np.lexsort((cur["seq"], codes))
    cur = {c: v[order] for c, v in cur.items()}
    device = codes[order]
    prev = {c: np.zeros_like(v) for c, v in cur.items()}
    has_prev = np.zeros(n, dtype=bool)
    if n:
        for c in cur:
            prev[c][1:] = cur[c][:-1]
        has_prev[1:] = device[1:] == device[:-1]
    follows = has_prev & (cur["seq"] == prev["seq"] + 1)
    if last is not None and last.num_rows and n:
        last = last.filter(last["last_seq"].is_valid())
        where = pc.index_in(events["device_id"], value_set=last["device_id"]).fill_null(-1).to_numpy()[order]
        reg = _pair_columns(last, {v: k for k, v in LAST_SAMPLE.items()})
        loose = np.flatnonzero(~follows & (where >= 0))  # no predecessor in the batch, but registered
        rows = where[loose]
        successor = reg["seq"][rows] + 1 == cur["seq"][loose]
        loose, rows = loose[successor], rows[successor]
        for c in cur:
            prev[c][loose] = reg[c][rows]
        has_prev[loose] = True
        follows = has_prev & (cur["seq"] == prev["seq"] + 1)
    worn = follows & cur["in_ear"] & prev["in_ear"] & cur["idle"] & prev["idle"]
    case_off = follows & cur["case_off"] & prev["case_off"]

    def drop(c: str, mask: np.ndarray) -> np.ndarray:
        return np.where(mask, np.maximum(prev[c] - cur[c], 0.0), 0.0)

    def rise(c: str) -> np.ndarray:
        return np.where(follows, np.maximum(cur[c] - prev[c], 0.0), 0.0)

    out = {"drain_left_pct": drop("battery_left", worn), "drain_right_pct": drop("battery_right", worn),
           "drain_playback_s": np.where(worn, events["playback_s"].to_numpy()[order], 0.0),
           "drain_case_pct": drop("battery_case", case_off),
           "charge_pct": rise("battery_left") + rise("battery_right")}
    back = np.empty(n, dtype=np.int64)
    back[order] = np.arange(n)  # to the batch's own row order
    return {k: v[back] for k, v in out.items()}


def hourly_rollup(events: pa.Table, last: pa.Table | None = None) -> pa.Table:
    """One row per (device, hour) of the batch, with the columns of :data:`HOURLY_MERGE`.

    ``last``: the registry's latest sample of the batch's devices (columns of
    :data:`LAST_SAMPLE`), to measure drain across batch boundaries.
    """
    interval = events["interval_s"].cast(pa.float64())
    in_ear = pc.or_(events["in_ear_left"], events["in_ear_right"])
    playing = pc.greater(events["playback_s"], 0)
    mode = events["noise_mode"]
    hour = pc.floor_temporal(events["event_time"], unit="hour")
    temp = pc.divide(pc.add(events["temp_left_c"], events["temp_right_c"]), 2.0)  # null unless both known
    both_in = pc.and_(events["in_ear_left"], events["in_ear_right"])
    warm = pc.fill_null(pc.and_(pc.and_(both_in, playing), pc.is_valid(temp)), False)
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
        "dose_s": pc.multiply(events["playback_s"], pc.power(
            2.0, pc.divide(pc.subtract(events["output_dba"], 80.0), 3.0))),
        "temp_c_sum": pc.if_else(warm, temp, 0.0),
        "temp_samples": warm.cast(pa.int64()),
        **_drain(events, last),
    })
    rule = {"sum": "sum", "max": "max", "min": "min"}
    aggs = [(name, rule[how]) for name, how in HOURLY_MERGE.items() if how in rule and name != "events"]
    # state and urban come from the postcode: the hour's first one, if a device moved mid-hour
    grouped = work.group_by(["device_id", "hour"], use_threads=False).aggregate(
        [*aggs, ("device_id", "count"), ("state", "first"), ("urban", "first")])
    names = {f"{name}_{how}": name for name, how in aggs} | {
        "device_id_count": "events", "state_first": "state", "urban_first": "urban"}
    grouped = grouped.rename_columns([names.get(c, c) for c in grouped.column_names])
    return grouped.select(["device_id", "hour", *HOURLY_MERGE])


def report_days(times: pa.ChunkedArray) -> pa.ChunkedArray:
    """UTC instants → the AEST days (:data:`REPORT_UTC_OFFSET_H`) they fall on."""
    ms = times.cast(pa.timestamp("ms", tz="UTC")).cast(pa.int64())
    return pc.divide(pc.add(ms, REPORT_UTC_OFFSET_H * 3_600_000), 86_400_000).cast(pa.int32()).cast(pa.date32())


def firmware_days(events: pa.Table) -> pa.Table:
    """One row per (device, AEST day, firmware) of the batch, with its event count."""
    work = pa.table({"device_id": events["device_id"], "day": report_days(events["event_time"]),
                     "firmware": events["firmware"]})
    grouped = work.group_by(list(FIRMWARE_KEY), use_threads=False).aggregate([("device_id", "count")])
    return grouped.rename_columns([*FIRMWARE_KEY, "events"]).select([*FIRMWARE_KEY, "events"])


def daily_rollup(hourly: pa.Table) -> pa.Table:
    """One row per (device, AEST day, state, urban) of a batch's :func:`hourly_rollup`, its sums summed."""
    minutes = hourly["hour"].cast(pa.timestamp("s", tz="UTC")).cast(pa.int64()).to_numpy() // 60
    codes = pa.array(list(LOCAL_OFFSET_MIN), pa.string())
    where = pc.index_in(hourly["state"], value_set=codes).fill_null(len(codes)).to_numpy()
    offset = np.append(np.array(list(LOCAL_OFFSET_MIN.values()), np.int64), REPORT_UTC_OFFSET_H * 60)[where]
    # one row per device-hour, so a group's bits are distinct and their sum is their OR
    bits = np.left_shift(1, (minutes + offset) // 60 % 24)
    work = hourly.select(["device_id", "state", "urban", *(c for c in DAILY_MERGE if c != "local_hours")])
    work = work.append_column("day", report_days(hourly["hour"])).append_column("local_hours", pa.array(bits))
    grouped = work.group_by(list(DAILY_KEY), use_threads=False).aggregate([(c, "sum") for c in DAILY_MERGE])
    return grouped.rename_columns([c.removesuffix("_sum") for c in grouped.column_names]).select(
        [*DAILY_KEY, *DAILY_MERGE])


def device_updates(events: pa.Table) -> pa.Table:
    """One row per device of the batch: its latest attributes and its time span."""
    latest = [c for c, how in DEVICE_MERGE.items() if how == "latest"]
    renamed = events.select(["device_id", "event_time", *(c for c in latest if c not in LAST_SAMPLE),
                             *LAST_SAMPLE.values()])
    renamed = renamed.rename_columns([*renamed.column_names[:-len(LAST_SAMPLE)], *LAST_SAMPLE])
    ordered = renamed.sort_by([("event_time", "ascending"), ("last_seq", "ascending")])
    grouped = ordered.group_by("device_id", use_threads=False).aggregate(
        [*((c, "last") for c in latest), ("event_time", "min"), ("event_time", "max"),
         ("device_id", "count")])
    names = {f"{c}_last": c for c in latest} | {
        "event_time_min": "first_seen", "event_time_max": "last_seen", "device_id_count": "events"}
    grouped = grouped.rename_columns([names.get(c, c) for c in grouped.column_names])
    return grouped.select(["device_id", *DEVICE_MERGE])
