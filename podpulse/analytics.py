"""The questions a product team asks, as typed queries over the rollups.

Every query reads the rollups and the registry through a ``storage.reader.Reader``
(DuckDB, PostgreSQL; rendered for Oracle), over a
date range ``[start, end)`` of Australian Eastern Standard Time days (UTC+10).
Every regional result suppresses the cells with fewer than ``k`` distinct
devices and says how many it suppressed.

Definitions:

- listening hours: seconds of playback / 3600;
- sound exposure (WHO safe listening): each second of playback at L dBA counts
  ``2 ** ((L - 80) / 3)`` seconds at 80 dBA (3 dB exchange rate); a device-week
  is over the guide when that reaches 40 h (100% of the weekly allowance);
- battery drain: % a bud lost between consecutive samples with both buds in
  and nothing on charge, per hour of playback over those same samples; a
  device needs at least half an hour of such playback to be rated.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import date, timedelta

import numpy as np

from podpulse import geo
from podpulse.cohort import Cohort
from podpulse.contract import DEVICE_ID
from podpulse.config import MIN_K, StorageConfig
from podpulse.errors import ConfigError
from podpulse.registry import latest
from storage.reader import Reader, open_reader
from storage.rollups import REPORT_UTC_OFFSET_H

__all__ = ["Result", "usage_trend", "noise_habits", "mode_shares", "exposure", "battery_health",
           "firmware_adoption", "listening_by_hour", "state_overview", "device_timeline", "full_report", "data_range", "report_for", "QUERIES"]

DEFAULT_K = MIN_K
AEST = f"INTERVAL '{REPORT_UTC_OFFSET_H} hours'"
WEEKLY_ALLOWANCE_S = 40 * 3600  # 40 h at 80 dBA
MIN_DRAIN_PLAYBACK_S = 1800


@dataclass
class Result:
    name: str
    columns: list[str]
    rows: list[list]
    k: int | None = None  # the k-anonymity threshold applied, None when no cell is regional
    suppressed: int = 0  # cells left out for having fewer than k devices
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # what a query adds beside its table
    # The keys (the columns before "devices") of the suppressed cells, without their values: a cell
    # listed here has 1 to k-1 devices, a cell neither here nor in ``rows`` has none.
    suppressed_cells: list[list] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    def records(self) -> list[dict]:
        return [dict(zip(self.columns, r)) for r in self.rows]


def _window(start: date, end: date, column: str = "hour") -> str:
    return (f"{column} >= TIMESTAMP '{start.isoformat()} 00:00:00+00' - {AEST} "
            f"AND {column} < TIMESTAMP '{end.isoformat()} 00:00:00+00' - {AEST}")


def _local_day(column: str = "hour") -> str:
    return f"CAST({column} + {AEST} AS DATE)"


def _suppress(name: str, columns: list[str], rows: list[tuple], k: int, devices_col: str = "devices",
              notes: list[str] | None = None) -> Result:
    i = columns.index(devices_col)
    kept = [_clean(r) for r in rows if r[i] >= k]
    hidden = [_clean(r[:i]) for r in rows if r[i] < k]
    return Result(name, columns, kept, k, len(hidden), notes or [], suppressed_cells=hidden)


def _clean(row) -> list:
    out = []
    for v in row:
        if hasattr(v, "isoformat"):
            v = v.isoformat()
        elif v is not None and not isinstance(v, (int, str, bool)):
            v = float(v)  # Decimal from PostgreSQL
        out.append(v)
    return out


def usage_trend(r: Reader, start: date, end: date, k: int = DEFAULT_K, cohort: Cohort = Cohort()) -> Result:
    """Listening per AEST day, by state and urban/rural."""
    rows = r.rows(f"""
        SELECT {_local_day()} AS day, state, urban, count(DISTINCT device_id) AS devices,
               sum(listening_s) / 3600.0 AS listening_h,
               sum(listening_s) / 3600.0 / count(DISTINCT device_id) AS hours_per_device
        FROM device_hourly WHERE {_window(start, end)}{cohort.sql()}
        GROUP BY 1, 2, 3 ORDER BY 1, 2, 3 DESC""")
    return _suppress("usage_trend", ["day", "state", "urban", "devices", "listening_h", "hours_per_device"],
                     rows, k)


AMBIENT_BANDS = ((0, 45), (45, 55), (55, 65), (65, 75), (75, 200))


def noise_habits(r: Reader, start: date, end: date, k: int = DEFAULT_K, cohort: Cohort = Cohort()) -> Result:
    """Noise-control mode shares of in-ear time, by the device-hour's mean ambient level."""
    band = " ".join(f"WHEN ambient_dba_sum / ambient_samples < {hi} THEN '{lo}-{hi}'"
                    for lo, hi in AMBIENT_BANDS[:-1])
    rows = r.rows(f"""
        SELECT CASE {band} ELSE '75+' END AS ambient_band, urban,
               count(DISTINCT device_id) AS devices, sum(in_ear_s) / 3600.0 AS in_ear_h,
               sum(anc_s) / sum(in_ear_s) AS anc, sum(adaptive_s) / sum(in_ear_s) AS adaptive,
               sum(transparency_s) / sum(in_ear_s) AS transparency, sum(off_s) / sum(in_ear_s) AS off
        FROM device_hourly WHERE {_window(start, end)} AND ambient_samples > 0{cohort.sql()}
        GROUP BY 1, 2 ORDER BY min(ambient_dba_sum / ambient_samples), 2 DESC""")
    return _suppress("noise_habits", ["ambient_band", "urban", "devices", "in_ear_h", "anc", "adaptive",
                                      "transparency", "off"], rows, k)


def mode_shares(r: Reader, start: date, end: date, k: int = DEFAULT_K, cohort: Cohort = Cohort()) -> Result:
    """Noise-control mode shares of in-ear time by state and urban/rural."""
    rows = r.rows(f"""
        SELECT state, urban, count(DISTINCT device_id) AS devices, sum(in_ear_s) / 3600.0 AS in_ear_h,
               sum(anc_s) / sum(in_ear_s) AS anc, sum(adaptive_s) / sum(in_ear_s) AS adaptive,
               sum(transparency_s) / sum(in_ear_s) AS transparency, sum(off_s) / sum(in_ear_s) AS off
        FROM device_hourly WHERE {_window(start, end)} AND in_ear_s > 0{cohort.sql()}
        GROUP BY 1, 2 ORDER BY 1, 2 DESC""")
    return _suppress("mode_shares", ["state", "urban", "devices", "in_ear_h", "anc", "adaptive", "transparency",
                                     "off"], rows, k)


def _device_weeks(r: Reader, start: date, end: date, cohort: Cohort) -> list[tuple]:
    return r.rows(f"""
        SELECT device_id, min(state), bool_or(urban), date_trunc('week', hour + {AEST}) AS week,
               sum(dose_s) AS dose_s
        FROM device_hourly WHERE {_window(start, end)}{cohort.sql()}
        GROUP BY device_id, 4""")


def exposure(r: Reader, start: date, end: date, k: int = DEFAULT_K, cohort: Cohort = Cohort()) -> Result:
    """Weekly sound exposure against the WHO guide (80 dBA for 40 h a week), by region.

    Rows: state, urban, devices, device-weeks, share of device-weeks over the
    guide, median weekly dose (% of the allowance). ``distribution``: the count
    of device-weeks per 10% band of dose, fleet-wide.
    """
    weeks = _device_weeks(r, start, end, cohort)
    cells: dict[tuple, list] = {}
    for device, state, urban, _, dose in weeks:
        cells.setdefault((state, bool(urban)), []).append((device, float(dose) / WEEKLY_ALLOWANCE_S * 100))
    rows = []
    for (state, urban), items in sorted(cells.items()):
        doses = np.array([d for _, d in items])
        rows.append((state, urban, len({dev for dev, _ in items}), len(items),
                     float((doses >= 100).mean()), float(np.median(doses))))
    result = _suppress("exposure", ["state", "urban", "devices", "device_weeks", "share_over_guide",
                                    "median_dose_pct"], rows, k,
                       notes=["a week starts on Monday, AEST; partial weeks at the range's edges count "
                              "only the days inside it"])
    # Fleet-wide, but of the published cells only: with every device-week in it, the total less the
    # published cells' device-weeks would give away a lone suppressed cell's count (and its over-guide share).
    published = {(state, urban) for state, urban, *_ in result.rows}
    all_doses = np.array([float(d) / WEEKLY_ALLOWANCE_S * 100 for _, state, urban, _, d in weeks
                          if (state, bool(urban)) in published])
    edges = list(range(0, 210, 10))
    counts = np.histogram(np.clip(all_doses, 0, 199.999), bins=edges)[0] if len(all_doses) else []
    result.notes.append("distribution: " + ", ".join(
        f"{lo}-{lo + 10}%: {int(c)}" for lo, c in zip(edges, counts)))
    result.extra["distribution"] = {"edges_pct": edges, "device_weeks": [int(c) for c in counts],
                           "over_guide": int((all_doses >= 100).sum()), "total": int(len(all_doses))}
    return result


def _device_drain(r: Reader, start: date, end: date, cohort: Cohort) -> list[tuple]:
    return r.rows(f"""
        SELECT h.device_id, d.model, d.firmware,
               sum(h.drain_left_pct) / (sum(h.drain_playback_s) / 3600.0) AS left_per_h,
               sum(h.drain_right_pct) / (sum(h.drain_playback_s) / 3600.0) AS right_per_h,
               sum(h.drain_playback_s) / 3600.0 AS rated_h
        FROM device_hourly h JOIN devices d USING (device_id)
        WHERE {_window(start, end, 'h.hour')}{cohort.sql('h.device_id')}
        GROUP BY h.device_id, d.model, d.firmware
        HAVING sum(h.drain_playback_s) >= {MIN_DRAIN_PLAYBACK_S}""")


def battery_health(r: Reader, start: date, end: date, k: int = DEFAULT_K, cohort: Cohort = Cohort(),
                   outliers: int = 10) -> Result:
    """Drain per hour of playback by model and firmware; the devices furthest from their cohort.

    A device's drain is the mean of its two buds; its distance is the robust
    z-score against its model-and-firmware cohort ((x - median) / (1.4826 MAD)),
    on the worse bud. Cohorts with fewer than k devices are suppressed.
    """
    devices = _device_drain(r, start, end, cohort)
    cohorts: dict[tuple, list] = {}
    for dev, model, fw, left, right, _ in devices:
        cohorts.setdefault((model, fw), []).append((dev, float(left), float(right)))
    rows, scored = [], []
    for (model, fw), items in sorted(cohorts.items()):
        mean = np.array([(a + b) / 2 for _, a, b in items])
        rows.append((model, fw, len(items), *(float(np.percentile(mean, q)) for q in (10, 50, 90))))
        if len(items) < k:
            continue
        both = np.array([[a, b] for _, a, b in items])
        median = np.median(both)
        mad = 1.4826 * np.median(np.abs(both - median)) or 1e-9
        z = np.abs(both - median).max(axis=1) / mad
        scored += [(dev, model, fw, a, b, float(zi)) for (dev, a, b), zi in zip(items, z)]
    result = _suppress("battery_health", ["model", "firmware", "devices", "p10_pct_per_h",
                                          "p50_pct_per_h", "p90_pct_per_h"], rows, k)
    scored.sort(key=lambda s: -s[5])
    result.extra["outliers"] = [dict(zip(["device_id", "model", "firmware", "left_pct_per_h",
                                 "right_pct_per_h", "z"], _clean(s))) for s in scored[:outliers]]
    return result


def firmware_adoption(r: Reader, start: date, end: date, k: int = DEFAULT_K, cohort: Cohort = Cohort()) -> Result:
    """Share of each day's devices on each firmware, among the versions shown (from the firmware
    rollup, so it needs no raw events: they may live in Cassandra).

    The shares are of the published cells' devices: shares of all devices would give away the
    day's total, and with it a lone suppressed cell (15 devices at 0.882 make 17, so the hidden
    version has 2)."""
    daily = r.rows(f"""
        SELECT day, firmware, count(DISTINCT device_id) AS devices FROM device_firmware_daily
        WHERE day >= DATE '{start.isoformat()}' AND day < DATE '{end.isoformat()}'{cohort.sql()}
        GROUP BY 1, 2 ORDER BY 1, 2""")
    shown: dict = {}
    for day, _, devices in daily:
        if devices >= k:
            shown[day] = shown.get(day, 0) + devices
    rows = [(day, fw, devices, devices / shown[day] if devices >= k else None) for day, fw, devices in daily]
    return _suppress("firmware_adoption", ["day", "firmware", "devices", "share"], rows, k,
                     notes=["a device that updated during a day counts on both versions that day",
                            f"shares are of the devices on the versions shown (each with at least {k})"])


def listening_by_hour(r: Reader, start: date, end: date, k: int = DEFAULT_K, cohort: Cohort = Cohort()) -> Result:
    """Mean listening minutes per active device by local hour of day, urban vs rural."""
    offset = "CASE state " + " ".join(
        f"WHEN '{s.code}' THEN {int(s.utc_offset_h * 60)}" for s in geo.STATES) + " ELSE 600 END"
    rows = r.rows(f"""
        WITH local AS (
            SELECT device_id, urban, listening_s,
                   CAST(extract(hour FROM hour + {offset} * INTERVAL '1 minute') AS INTEGER) AS local_hour
            FROM device_hourly WHERE {_window(start, end)}{cohort.sql()})
        SELECT local_hour, urban, count(DISTINCT device_id) AS devices,
               sum(listening_s) / 60.0 / count(DISTINCT device_id) AS minutes_per_device
        FROM local GROUP BY 1, 2 ORDER BY 1, 2 DESC""")
    return _suppress("listening_by_hour", ["local_hour", "urban", "devices", "minutes_per_device"], rows, k,
                     notes=["local time is each state's standard time; half-hour zones round down"])


def state_overview(r: Reader, start: date, end: date, k: int = DEFAULT_K, cohort: Cohort = Cohort()) -> Result:
    """Per state: devices, listening per device-day, cancellation share, exposure, drain."""
    days = max((end - start).days, 1)
    rows = r.rows(f"""
        SELECT state, count(DISTINCT device_id) AS devices,
               sum(listening_s) / 3600.0 / count(DISTINCT device_id) / {days} AS listening_h_per_day,
               sum(anc_s + adaptive_s) / nullif(sum(in_ear_s), 0) AS cancelling_share,
               sum(drain_left_pct + drain_right_pct) / 2 / nullif(sum(drain_playback_s) / 3600.0, 0)
                   AS drain_pct_per_h,
               avg(CASE WHEN urban THEN 1.0 ELSE 0.0 END) AS urban_share
        FROM device_hourly WHERE {_window(start, end)}{cohort.sql()}
        GROUP BY state ORDER BY devices DESC""")
    return _suppress("state_overview", ["state", "devices", "listening_h_per_day", "cancelling_share",
                                        "drain_pct_per_h", "urban_share"], rows, k,
                     notes=["listening per device per day of the range; urban_share is of device-hours"])


TIMELINE_MAX_DAYS = 92
TIMELINE_HOURLY = ["hour", "state", "urban", "events", "listening_s", "in_ear_s", "anc_s", "adaptive_s",
                   "transparency_s", "off_s", "output_dba", "output_dba_max", "ambient_dba", "dose_s",
                   "battery_left_min", "battery_right_min", "battery_case_min"]


def device_timeline(r: Reader, device_id: str, start: date | None = None, end: date | None = None) -> dict | None:
    """One device, hour by hour, over the AEST days ``[start, end)`` (default: its last 30 days of data):
    listening, in-ear time by noise-control mode, mean output and ambient level, sound dose, the lowest
    battery of each bud and the case; the device-days an anomaly model scored; the days its firmware
    changed. From the rollups, read by the device's key. None when the store knows no such device.
    A personal record, not an aggregate: no k applies (the API asks for ``read:devices``)."""
    if not DEVICE_ID.fullmatch(device_id):
        raise ValueError(f"not a device id: {device_id!r}")
    where = f"device_id = '{device_id}'"  # matched whole against DEVICE_ID: no quote can reach the SQL
    seen = r.rows(f"SELECT {_local_day('last_seen')} FROM devices WHERE {where}")
    if not seen or seen[0][0] is None:
        return None
    end = end or seen[0][0] + timedelta(days=1)
    start = start or end - timedelta(days=30)
    if not timedelta(days=1) <= end - start <= timedelta(days=TIMELINE_MAX_DAYS):
        raise ConfigError(f"a timeline covers 1 to {TIMELINE_MAX_DAYS} days, not {(end - start).days}")
    hours = r.rows(f"""
        SELECT hour, state, urban, events, listening_s, in_ear_s, anc_s, adaptive_s, transparency_s, off_s,
               output_dba_sum / nullif(output_samples, 0), output_dba_max,
               ambient_dba_sum / nullif(ambient_samples, 0), dose_s,
               battery_left_min, battery_right_min, battery_case_min
        FROM device_hourly WHERE {where} AND {_window(start, end)} ORDER BY hour""")
    scored = r.rows(f"""
        SELECT {_local_day('day')}, model_version, score, flagged, reason FROM anomalies
        WHERE {where} AND {_window(start, end, 'day')} ORDER BY 1, 2""")
    firmware = r.rows(f"""
        SELECT day, firmware FROM device_firmware_daily
        WHERE {where} AND day >= DATE '{start.isoformat()}' AND day < DATE '{end.isoformat()}'
        ORDER BY day, firmware""")
    changes, running = [], None
    for day, fw in firmware:
        if fw != running:
            changes.append({"day": day.isoformat(), "firmware": fw})
            running = fw
    return {"device_id": device_id, "from": start.isoformat(), "to": (end - timedelta(days=1)).isoformat(),
            "days": "AEST (UTC+10), both ends included",
            "hours": [dict(zip(TIMELINE_HOURLY, _clean(row))) for row in hours],
            "anomalies": [dict(zip(["day", "model_version", "score", "flagged", "reason"], _clean(row)))
                          for row in scored],
            "firmware": changes}


QUERIES = {q.__name__: q for q in (usage_trend, noise_habits, mode_shares, exposure, battery_health, firmware_adoption,
                                   listening_by_hour, state_overview)}


def data_range(r: Reader) -> tuple[date, date] | None:
    """The AEST days the store covers: [first, last + 1)."""
    lo, hi = r.rows(f"SELECT min({_local_day()}), max({_local_day()}) FROM device_hourly")[0]
    if lo is None:
        return None
    return lo, hi + timedelta(days=1)


def full_report(r: Reader, start: date, end: date, k: int = DEFAULT_K, cohort: Cohort = Cohort()) -> dict:
    """Every query, as one JSON-ready object."""
    out = {"range": {"from": start.isoformat(), "to": (end - timedelta(days=1)).isoformat(),
                     "days": "AEST (UTC+10), both ends included"}, "k": k}
    if cohort:
        out["cohort"] = cohort.as_dict() | {"label": cohort.label()}
    for name, query in QUERIES.items():
        out[name] = query(r, start, end, k, cohort).as_dict()
    out["events_covered"] = int(r.rows(
        f"SELECT coalesce(sum(events), 0) FROM device_hourly WHERE {_window(start, end)}{cohort.sql()}")[0][0])
    return out


def report_for(config: StorageConfig, first: date | None = None, last: date | None = None,
               k: int = DEFAULT_K, cohort: Cohort = Cohort()) -> dict:
    """:func:`full_report` over the AEST days ``first`` to ``last`` (both included; each defaults to
    the end the store covers), read from the store that keeps the rollups, for the devices of
    ``cohort`` (every device by default)."""
    with open_reader(config) as reader:
        covered = data_range(reader)
        if covered is None:
            raise ConfigError("the store holds no rollups yet")
        start = first or covered[0]
        end = last + timedelta(days=1) if last else covered[1]
        if end <= start:
            raise ConfigError(f"the last day ({end - timedelta(days=1)}) is before the first ({start})")
        report = full_report(reader, start, end, k, cohort)
    report["segments"] = segments_section(config)
    return report


def segments_section(config: StorageConfig) -> dict | None:
    """The latest listening-segments version's summary (its own data window and k, whole fleet, not the
    report's range or cohort), or None when none is registered."""
    entry = latest(config, "listening-segments")
    if entry is None:
        return None
    meta = entry["metadata"]
    return {"version": entry["version"], "data_window": meta.get("data_window"), **meta.get("summary", {}),
            "evaluation": entry["metrics"]}
