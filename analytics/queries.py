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

from analytics.cohort import Cohort, named
from analytics.registry import latest
from podpulse.contract import DEVICE_ID
from podpulse.errors import ConfigError
from podpulse.localtime import LOCAL_OFFSET_MIN, REPORT_UTC_OFFSET_H
from podpulse.privacy import MIN_K
from storage.config import StorageConfig
from storage.reader import Reader, open_reader

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


def _days(start: date, end: date, column: str = "day") -> str:
    """The AEST days ``[start, end)`` of a DATE column (the daily rollups')."""
    return f"{column} >= DATE '{start.isoformat()}' AND {column} < DATE '{end.isoformat()}'"


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
    # device_daily holds one row per device, day, state and urban class: count(*) counts devices
    rows = r.rows(f"""
        SELECT day, state, urban, count(*) AS devices, sum(listening_s) / 3600.0 AS listening_h,
               sum(listening_s) / 3600.0 / count(*) AS hours_per_device
        FROM device_daily WHERE {_days(start, end)}{cohort.sql()}
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
        FROM device_daily WHERE {_days(start, end)} AND in_ear_s > 0{cohort.sql()}
        GROUP BY 1, 2 ORDER BY 1, 2 DESC""")
    return _suppress("mode_shares", ["state", "urban", "devices", "in_ear_h", "anc", "adaptive", "transparency",
                                     "off"], rows, k)


def _device_weeks(start: date, end: date, cohort: Cohort) -> str:
    """Each device-week's cell (its lowest state code, urban if ever) and dose, % of the weekly allowance."""
    return f"""weeks AS (
        SELECT device_id, min(state) AS state, bool_or(urban) AS urban, date_trunc('week', day) AS week,
               sum(dose_s) / {WEEKLY_ALLOWANCE_S} * 100 AS dose
        FROM device_daily WHERE {_days(start, end)}{cohort.sql()} GROUP BY device_id, 4)"""


def exposure(r: Reader, start: date, end: date, k: int = DEFAULT_K, cohort: Cohort = Cohort()) -> Result:
    """Weekly sound exposure against the WHO guide (80 dBA for 40 h a week), by region.

    Rows: state, urban, devices, device-weeks, share of device-weeks over the
    guide, median weekly dose (% of the allowance). ``distribution``: the count
    of device-weeks per 10% band of dose, fleet-wide.
    """
    weeks = _device_weeks(start, end, cohort)
    rows = r.rows(f"""
        WITH {weeks}
        SELECT state, urban, count(DISTINCT device_id) AS devices, count(*) AS device_weeks,
               avg(CASE WHEN dose >= 100 THEN 1.0 ELSE 0.0 END) AS share_over_guide,
               percentile_cont(0.5) WITHIN GROUP (ORDER BY dose) AS median_dose_pct
        FROM weeks GROUP BY state, urban""")
    result = _suppress("exposure", ["state", "urban", "devices", "device_weeks", "share_over_guide",
                                    "median_dose_pct"], sorted(rows, key=lambda row: (row[0], bool(row[1]))), k,
                       notes=["a week starts on Monday, AEST; partial weeks at the range's edges count "
                              "only the days inside it"])
    # Fleet-wide, but of the published cells only: with every device-week in it, the total less the
    # published cells' device-weeks would give away a lone suppressed cell's count (and its over-guide share).
    published = {(state, urban) for state, urban, *_ in result.rows}
    edges = list(range(0, 210, 10))
    counts, over = np.zeros(len(edges) - 1, dtype=np.int64), 0
    for state, urban, band, n, n_over in r.rows(f"""
            WITH {weeks}
            SELECT state, urban, least(floor(dose / 10), {len(edges) - 2}) AS band, count(*),
                   sum(CASE WHEN dose >= 100 THEN 1 ELSE 0 END)
            FROM weeks GROUP BY state, urban, 3"""):
        if (state, bool(urban)) in published:
            counts[int(band)] += n
            over += int(n_over)
    result.notes.append("distribution: " + ", ".join(
        f"{lo}-{lo + 10}%: {int(c)}" for lo, c in zip(edges, counts)))
    result.extra["distribution"] = {"edges_pct": edges, "device_weeks": [int(c) for c in counts],
                                    "over_guide": int(over), "total": int(counts.sum())}
    return result


def battery_health(r: Reader, start: date, end: date, k: int = DEFAULT_K, cohort: Cohort = Cohort(),
                   outliers: int = 10) -> Result:
    """Drain per hour of playback by model and firmware; the devices furthest from their cohort.

    A device's drain is the mean of its two buds; its distance is the robust
    z-score against its model-and-firmware cohort ((x - median) / (1.4826 MAD)),
    on the worse bud, among the cohorts of at least k devices. Cohorts with fewer
    than k devices are suppressed.
    """
    drain = f"""rated AS (
            SELECT device_id, sum(drain_left_pct) / (sum(drain_playback_s) / 3600.0) AS lft,
                   sum(drain_right_pct) / (sum(drain_playback_s) / 3600.0) AS rgt
            FROM device_daily WHERE {_days(start, end)}{cohort.sql()}
            GROUP BY device_id HAVING sum(drain_playback_s) >= {MIN_DRAIN_PLAYBACK_S}),
        drain AS (SELECT r.device_id, d.model, d.firmware, r.lft, r.rgt FROM rated r JOIN devices d USING (device_id))"""
    rows = r.rows(f"""
        WITH {drain}
        SELECT model, firmware, count(*) AS devices,
               {", ".join(f"percentile_cont({q}) WITHIN GROUP (ORDER BY (lft + rgt) / 2)" for q in (0.1, 0.5, 0.9))}
        FROM drain GROUP BY model, firmware""")
    result = _suppress("battery_health", ["model", "firmware", "devices", "p10_pct_per_h",
                                          "p50_pct_per_h", "p90_pct_per_h"], sorted(rows), k)
    # both buds of a cohort's devices pooled: their median, then the median distance from it (MAD)
    scored = r.rows(f"""
        WITH {drain},
        buds AS (SELECT model, firmware, lft AS x FROM drain UNION ALL SELECT model, firmware, rgt FROM drain),
        mid AS (SELECT model, firmware, percentile_cont(0.5) WITHIN GROUP (ORDER BY x) AS m FROM buds
                GROUP BY model, firmware HAVING count(*) >= {2 * k}),
        spread AS (SELECT b.model, b.firmware, 1.4826 * percentile_cont(0.5) WITHIN GROUP (ORDER BY abs(b.x - mid.m))
                          AS mad
                   FROM buds b JOIN mid ON b.model = mid.model AND b.firmware = mid.firmware
                   GROUP BY b.model, b.firmware)
        SELECT d.device_id, d.model, d.firmware, d.lft, d.rgt,
               greatest(abs(d.lft - mid.m), abs(d.rgt - mid.m))
                   / (CASE WHEN spread.mad = 0 THEN 1e-9 ELSE spread.mad END) AS z
        FROM drain d JOIN mid ON d.model = mid.model AND d.firmware = mid.firmware
        JOIN spread ON d.model = spread.model AND d.firmware = spread.firmware
        ORDER BY z DESC, d.device_id LIMIT {int(outliers)}""")
    result.extra["outliers"] = [dict(zip(["device_id", "model", "firmware", "left_pct_per_h",
                                 "right_pct_per_h", "z"], _clean(s))) for s in scored]
    return result


def firmware_adoption(r: Reader, start: date, end: date, k: int = DEFAULT_K, cohort: Cohort = Cohort()) -> Result:
    """Share of each day's devices on each firmware, among the versions shown (from the firmware
    rollup, so it needs no raw events: they may live in Cassandra).

    The shares are of the published cells' devices: shares of all devices would give away the
    day's total, and with it a lone suppressed cell (15 devices at 0.882 make 17, so the hidden
    version has 2)."""
    # one row per device, day and firmware (the table's key): count(*) counts devices
    daily = r.rows(f"""
        SELECT day, firmware, count(*) AS devices FROM device_firmware_daily
        WHERE {_days(start, end)}{cohort.sql()}
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
    # who was active at each local hour: the bits of device_daily.local_hours, OR'd over the range per device
    bits = ", ".join(f"sum(mod(CAST(floor(hours / {2 ** h}) AS BIGINT), 2))" for h in range(24))
    active = r.rows(f"""
        WITH m AS (SELECT urban, bit_or(local_hours) AS hours FROM device_daily
                   WHERE {_days(start, end)}{cohort.sql()} GROUP BY device_id, urban)
        SELECT urban, {bits} FROM m GROUP BY urban""")
    devices = {(h, bool(urban)): int(n) for urban, *counts in active for h, n in enumerate(counts)}
    # the listening: summed per UTC hour of day and state (a few hundred rows), then moved to local time
    minutes: dict[tuple, float] = {}
    for utc_hour, state, urban, seconds in r.rows(f"""
            SELECT CAST(extract(hour FROM hour) AS INTEGER), state, urban, sum(listening_s) FROM device_hourly
            WHERE {_window(start, end)}{cohort.sql()} GROUP BY 1, 2, 3"""):
        local = (utc_hour * 60 + LOCAL_OFFSET_MIN.get(state, REPORT_UTC_OFFSET_H * 60)) // 60 % 24
        minutes[(local, bool(urban))] = minutes.get((local, bool(urban)), 0.0) + float(seconds) / 60
    rows = [(h, urban, n, minutes.get((h, urban), 0.0) / n)
            for (h, urban), n in sorted(devices.items(), key=lambda c: (c[0][0], not c[0][1])) if n]
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
               count(DISTINCT CASE WHEN urban THEN device_id END) * 1.0 / count(DISTINCT device_id) AS urban_share
        FROM device_daily WHERE {_days(start, end)}{cohort.sql()}
        GROUP BY state ORDER BY devices DESC""")
    return _suppress("state_overview", ["state", "devices", "listening_h_per_day", "cancelling_share",
                                        "drain_pct_per_h", "urban_share"], rows, k,
                     notes=["listening per device per day of the range; urban_share: the share of the "
                            "state's devices seen at an urban postcode"])


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
    lo, hi = r.rows("SELECT min(day), max(day) FROM device_daily")[0]
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
        f"SELECT coalesce(sum(events), 0) FROM device_daily WHERE {_days(start, end)}{cohort.sql()}")[0][0])
    return out


def report_for(config: StorageConfig, first: date | None = None, last: date | None = None,
               k: int = DEFAULT_K, cohort: Cohort = Cohort(), saved: str | None = None) -> dict:
    """:func:`full_report` over the AEST days ``first`` to ``last`` (both included; each defaults to
    the end the store covers), read from the store that keeps the rollups, for the devices of
    ``cohort`` (every device by default) or of the cohort ``saved`` under that name."""
    if saved is not None:
        cohort = named(config, saved)
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
