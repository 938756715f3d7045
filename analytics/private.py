"""Differentially private answers: what a token without ``admin`` reads of the fleet analytics.

Each answer is one ``epsilon``-DP release (``podpulse.privacy``, OpenDP's Laplace mechanism) over the
devices of the range and cohort, its ε split evenly over its measures. What one device can add is
bounded first, in the SQL, and the bounds are part of each answer:

- ``usage_trend``: a device counts in one (state, urban) cell per day (where it listened most that day),
  so in at most ``days`` cells; its listening is clamped at 12 h a day.
- ``state_overview``: a device counts in one state (where it was seen on most days); its listening and
  in-ear time per day of the range are clamped at 12 h and 24 h.
- ``mode_shares``: a device counts in one (state, urban) cell (where it spent most time in ear), with
  its in-ear time per day of the range by noise-control mode (at most 24 h in all).
- ``firmware_adoption``: a device counts on one firmware per day (its latest that day); the versions
  are keys that come from the data, so a version is shown only over a threshold set for δ.

Days, states and urban/rural are keys known beforehand: every such cell gets noise, and a cell is
shown when its noisy device count reaches ``k`` (deciding on noisy figures spends nothing more).
Each answer gives how many cells it withheld, never which. Ratios (hours per device, shares) are
computed from the noisy figures; their intervals hold when both figures' 97.5% intervals do.
"""

from __future__ import annotations

from datetime import date, timedelta

from analytics.cohort import Cohort
from analytics.queries import _days
from podpulse.geo import STATE_CODES
from podpulse.privacy import CONFIDENCE, DELTA, Noise, half_width, laplace, thresholded
from storage.reader import Reader

__all__ = ["RELEASES", "release", "LISTENING_CLAMP_H", "IN_EAR_CLAMP_H"]

LISTENING_CLAMP_H = 12  # of one device's listening in one day
IN_EAR_CLAMP_H = 24
_RATIO = 0.975  # each side of a ratio: both hold together at least 95% of the time


def _round(x: float, places: int = 2) -> float:
    return round(float(x), places)


def _count_interval(value: float, noise: Noise) -> list[float]:
    h = half_width(noise.scale)
    return [_round(max(value - h, 0)), _round(value + h)]


def _ratio(num: float, num_noise: Noise, den: float, den_noise: Noise) -> tuple[float | None, list]:
    """num / den from noisy figures, with an interval from both figures' 97.5% intervals."""
    if den <= 0:
        return None, [None, None]
    hn, hd = half_width(num_noise.scale, _RATIO), half_width(den_noise.scale, _RATIO)
    low = max(num - hn, 0) / (den + hd)
    high = (num + hn) / (den - hd) if den > hd else None
    return max(num, 0) / den, [_round(low, 4), None if high is None else _round(high, 4)]


def _answer(name: str, columns: list[str], rows: list[list], intervals: list[dict], k: int, withheld: int | None,
            noise: list[Noise], bounds: str, notes: list[str], delta: float = 0.0) -> dict:
    return {"name": name, "columns": columns, "rows": rows, "k": k, "suppressed": withheld,
            "notes": notes + [f"a cell is shown when its noisy device count reaches {k}"
                              + ("" if withheld is None else f"; {withheld} cell(s) withheld")],
            "extra": {}, "intervals": intervals,
            "privacy": {"mechanism": "Laplace (OpenDP)", "epsilon": _round(sum(n.epsilon for n in noise), 6),
                        "delta": delta, "confidence": CONFIDENCE, "bounds": bounds,
                        "noise": [n.as_dict() for n in noise]}}


def usage_trend(r: Reader, start: date, end: date, k: int, cohort: Cohort, epsilon: float) -> dict:
    days = (end - start).days
    found = {(d, s, bool(u)): (n, h) for d, s, u, n, h in r.rows(f"""
        WITH d AS (SELECT day, state, urban, least(listening_s, {LISTENING_CLAMP_H * 3600}) AS s,
                          row_number() OVER (PARTITION BY device_id, day ORDER BY listening_s DESC, state, urban) AS n
                   FROM device_daily WHERE {_days(start, end)}{cohort.sql()})
        SELECT day, state, urban, count(*), sum(s) / 3600.0 FROM d WHERE n = 1 GROUP BY 1, 2, 3""")}
    keys = [(start + timedelta(days=i), s, u) for i in range(days) for s in STATE_CODES for u in (True, False)]
    exact = [found.get(key, (0, 0.0)) for key in keys]
    counts, n_noise = laplace("devices", [n for n, _ in exact], days, epsilon / 2)
    hours, h_noise = laplace("listening_h", [h for _, h in exact], days * LISTENING_CLAMP_H, epsilon / 2)
    rows, intervals, withheld = [], [], 0
    for (day, state, urban), n, h in zip(keys, counts, hours):
        if n < k:
            withheld += 1
            continue
        per, per_interval = _ratio(h, h_noise, n, n_noise)
        rows.append([day.isoformat(), state, urban, _round(n), _round(max(h, 0)), per and _round(per, 4)])
        intervals.append({"devices": _count_interval(n, n_noise), "listening_h": _count_interval(h, h_noise),
                          "hours_per_device": per_interval})
    return _answer("usage_trend", ["day", "state", "urban", "devices", "listening_h", "hours_per_device"], rows,
                   intervals, k, withheld, [n_noise, h_noise],
                   f"a device in one cell per day (at most {days}); listening at most {LISTENING_CLAMP_H} h a day",
                   ["days, states and urban/rural are every cell's key; each is noisy"])


def state_overview(r: Reader, start: date, end: date, k: int, cohort: Cohort, epsilon: float) -> dict:
    days = max((end - start).days, 1)
    found = {s: rest for s, *rest in r.rows(f"""
        WITH d AS (SELECT device_id, state, count(*) AS seen,
                          least(sum(listening_s) / 3600.0 / {days}, {LISTENING_CLAMP_H}) AS listening,
                          least(sum(in_ear_s) / 3600.0 / {days}, {IN_EAR_CLAMP_H}) AS in_ear,
                          sum(anc_s + adaptive_s) / nullif(sum(in_ear_s), 0) AS cancelling,
                          max(CASE WHEN urban THEN 1 ELSE 0 END) AS urban
                   FROM device_daily WHERE {_days(start, end)}{cohort.sql()} GROUP BY device_id, state),
             one AS (SELECT *, row_number() OVER (PARTITION BY device_id ORDER BY seen DESC, state) AS n FROM d)
        SELECT state, count(*), sum(listening), sum(in_ear * coalesce(cancelling, 0)),
               sum(in_ear * (1 - coalesce(cancelling, 0))), sum(urban)
        FROM one WHERE n = 1 GROUP BY state""")}
    exact = [found.get(s, [0, 0.0, 0.0, 0.0, 0]) for s in STATE_CODES]
    share = epsilon / 6  # half of ε for listening, the headline figure; a sixth for each of the others
    counts, n_noise = laplace("devices", [e[0] for e in exact], 1, share)
    listening, l_noise = laplace("listening_h_per_day", [e[1] for e in exact], LISTENING_CLAMP_H, 3 * share)
    # in ear, cancelling and not: one device adds at most 24 h a day to the two together
    ear, e_noise = laplace("in_ear_h_per_day (cancelling, not)", [x for e in exact for x in (e[2], e[3])],
                           IN_EAR_CLAMP_H, share)
    urban, u_noise = laplace("urban_devices", [e[4] for e in exact], 1, share)
    ear_noise = Noise(e_noise.measure, e_noise.epsilon, 0.0, e_noise.scale * 2, e_noise.sensitivity)  # a sum of two
    rows, intervals, withheld = [], [], 0
    for i, state in enumerate(STATE_CODES):
        n = counts[i]
        if n < k:
            withheld += 1
            continue
        per_day, per_day_i = _ratio(listening[i], l_noise, n, n_noise)
        cancelling, in_ear = max(ear[2 * i], 0), max(ear[2 * i], 0) + max(ear[2 * i + 1], 0)
        cancel_share, cancel_i = _ratio(cancelling, e_noise, in_ear, ear_noise)
        urban_share, urban_i = _ratio(min(max(urban[i], 0), n), u_noise, n, n_noise)
        rows.append([state, _round(n), per_day and _round(per_day, 4), cancel_share and _round(min(cancel_share, 1), 4),
                     None, urban_share and _round(min(urban_share, 1), 4)])
        intervals.append({"devices": _count_interval(n, n_noise), "listening_h_per_day": per_day_i,
                          "cancelling_share": cancel_i, "urban_share": urban_i})
    return _answer("state_overview", ["state", "devices", "listening_h_per_day", "cancelling_share",
                                      "drain_pct_per_h", "urban_share"], rows, intervals, k, withheld,
                   [n_noise, l_noise, e_noise, u_noise],
                   f"a device in one state; at most {LISTENING_CLAMP_H} h of listening and {IN_EAR_CLAMP_H} h in "
                   "ear a day",
                   ["listening per device per day of the range", "drain needs an admin token: it has no "
                    "private release yet"])


MODES = ("anc", "adaptive", "transparency", "off")


def mode_shares(r: Reader, start: date, end: date, k: int, cohort: Cohort, epsilon: float) -> dict:
    days = max((end - start).days, 1)
    per_day = ", ".join(f"sum({m}_s) / 3600.0 / {days} AS {m}" for m in MODES)
    total = " + ".join(MODES)
    found = {(s, bool(u)): rest for s, u, *rest in r.rows(f"""
        WITH d AS (SELECT device_id, state, urban, {per_day}
                   FROM device_daily WHERE {_days(start, end)} AND in_ear_s > 0{cohort.sql()}
                   GROUP BY device_id, state, urban),
             one AS (SELECT *, row_number() OVER (PARTITION BY device_id ORDER BY {total} DESC, state, urban) AS n,
                            least(1, {IN_EAR_CLAMP_H} / nullif({total}, 0)) AS clamp FROM d)
        SELECT state, urban, count(*), {", ".join(f"sum({m} * coalesce(clamp, 0))" for m in MODES)}
        FROM one WHERE n = 1 GROUP BY 1, 2""")}
    keys = [(s, u) for s in STATE_CODES for u in (True, False)]
    exact = [found.get(key, [0] + [0.0] * len(MODES)) for key in keys]
    counts, n_noise = laplace("devices", [e[0] for e in exact], 1, epsilon / 2)
    modes, m_noise = laplace("in_ear_h_per_day by mode", [x for e in exact for x in e[1:]], IN_EAR_CLAMP_H,
                             epsilon / 2)
    total_noise = Noise(m_noise.measure, m_noise.epsilon, 0.0, m_noise.scale * len(MODES), m_noise.sensitivity)
    rows, intervals, withheld = [], [], 0
    for i, (state, urban) in enumerate(keys):
        if counts[i] < k:
            withheld += 1
            continue
        mine = [max(m, 0) for m in modes[len(MODES) * i:len(MODES) * (i + 1)]]
        in_ear = sum(mine)
        shares = [_ratio(m, m_noise, in_ear, total_noise) for m in mine]
        rows.append([state, urban, _round(counts[i]), _round(in_ear * days)]
                    + [s and _round(s, 4) for s, _ in shares])
        intervals.append({"devices": _count_interval(counts[i], n_noise)}
                         | {m: interval for m, (_, interval) in zip(MODES, shares)})
    return _answer("mode_shares", ["state", "urban", "devices", "in_ear_h", *MODES], rows, intervals, k, withheld,
                   [n_noise, m_noise], f"a device in one cell; at most {IN_EAR_CLAMP_H} h in ear a day",
                   ["shares of in-ear time by noise-control mode"])


def firmware_adoption(r: Reader, start: date, end: date, k: int, cohort: Cohort, epsilon: float) -> dict:
    days = (end - start).days
    found = {f"{d.isoformat()} {fw}": n for d, fw, n in r.rows(f"""
        WITH d AS (SELECT day, firmware, row_number() OVER (PARTITION BY device_id, day ORDER BY firmware DESC) AS n
                   FROM device_firmware_daily WHERE {_days(start, end)}{cohort.sql()})
        SELECT day, firmware, count(*) FROM d WHERE n = 1 GROUP BY 1, 2""")}
    kept, noise, threshold = thresholded("devices", found, days, epsilon, k, DELTA)
    shown: dict[str, float] = {}
    for key, n in kept.items():
        shown[key.split(" ")[0]] = shown.get(key.split(" ")[0], 0.0) + n
    rows, intervals = [], []
    for key in sorted(kept):
        day, fw = key.split(" ", 1)
        n = kept[key]
        rows.append([day, fw, _round(n), _round(n / shown[day], 4)])
        intervals.append({"devices": _count_interval(n, noise)})
    # how many version-days were not shown is not given: it would say which versions exist
    answer = _answer("firmware_adoption", ["day", "firmware", "devices", "share"], rows, intervals, k, None, [noise],
                     f"a device on one firmware per day (at most {days} cells)",
                     [f"firmware versions come from the data: a version-day is shown only when its noisy count "
                      f"passes {threshold:g} (set for δ = {DELTA:g})",
                      "shares are of the noisy devices on the versions shown"], delta=noise.delta)
    return answer


RELEASES = {q.__name__: q for q in (usage_trend, state_overview, mode_shares, firmware_adoption)}


def release(r: Reader, name: str, start: date, end: date, k: int, cohort: Cohort, epsilon: float) -> dict:
    """The private answer of the query ``name`` over the AEST days ``[start, end)``."""
    return RELEASES[name](r, start, end, k, cohort, epsilon)
