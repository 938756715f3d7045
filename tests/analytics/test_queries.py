"""Every analytics query against a brute-force recomputation in plain Python from the raw events."""

from collections import defaultdict
from datetime import date, datetime, timedelta, timezone

import numpy as np
import pytest

from analytics import queries as analytics
from analytics.cohort import Cohort
from podpulse import geo
from podpulse.contract import decode_batch
from podpulse.simulator import Fleet, FleetSpec, simulate
from storage.config import StorageConfig
from storage.reader import open_reader
from testbed.stores import build_store

# a fixed Monday (2 November 2026, 00:00 AEST): the fixed_start fixture
SPEC = FleetSpec(devices=1500, hours=72, seed=41, start=datetime(2026, 11, 1, 14, tzinfo=timezone.utc))
START, END = date(2026, 11, 2), date(2026, 11, 5)
AEST = timedelta(hours=10)
TZ = {s.code: s.utc_offset_h for s in geo.STATES}


@pytest.fixture(scope="module")
def store_path(tmp_path_factory, fixed_start):
    assert fixed_start == SPEC.start
    path = tmp_path_factory.mktemp("analytics") / "a.duckdb"
    build_store(path, SPEC.devices, 3, seed=SPEC.seed, start=fixed_start)
    return path


@pytest.fixture(scope="module")
def store(store_path):
    path = store_path
    values = [v for c in simulate(SPEC, Fleet.build(SPEC)) for v in c.values]
    # fixed dates: no event-time window; ids as stored (build_store hashes them as ingest does)
    events = StorageConfig.embedded(path).pseudonyms().table(decode_batch(values, window=None).table).to_pylist()
    for e in events:
        e["t"] = e["event_time"].astimezone(timezone.utc)
    with open_reader(StorageConfig.embedded(path)) as reader:
        yield reader, events


def day_of(t: datetime) -> date:
    return (t + AEST).date()


def close(a, b, tol=1e-6):
    return abs(float(a) - float(b)) <= tol * max(1.0, abs(float(b)))


def compare(result, expected: dict, key_cols, value_cols, k):
    """Rows of a result against {key: (devices, *values)}; cells under k must be suppressed."""
    got = {tuple(r[c] for c in key_cols): r for r in result.records()}
    visible = {key: v for key, v in expected.items() if v[0] >= k}
    assert set(got) == {tuple(str(x) if isinstance(x, date) else x for x in key) for key in visible}
    assert result.suppressed == len(expected) - len(visible)
    # each suppressed cell by its key alone (under k, not absent), in the column order of the result
    hidden = {tuple(str(x) if isinstance(x, date) else x for x in key) for key, v in expected.items() if v[0] < k}
    assert len(result.suppressed_cells) == len(hidden)
    assert {tuple(cell) for cell in result.suppressed_cells} == hidden
    assert all(len(cell) == result.columns.index("devices") for cell in result.suppressed_cells)
    for key, v in visible.items():
        row = got[tuple(str(x) if isinstance(x, date) else x for x in key)]
        assert row["devices"] == v[0], key
        for col, value in zip(value_cols, v[1:]):
            assert close(row[col], value), (key, col, row[col], value)


def expected_usage(events) -> dict:
    cells = defaultdict(lambda: [set(), 0.0])
    for e in events:
        c = cells[(day_of(e["t"]), e["state"], e["urban"])]
        c[0].add(e["device_id"])
        c[1] += e["playback_s"]
    return {key: (len(d), s / 3600) for key, (d, s) in cells.items()}


@pytest.mark.parametrize("k", [1, 10])
def test_usage_trend(store, k):
    reader, events = store
    expected = expected_usage(events)
    result = analytics.usage_trend(reader, START, END, k)
    compare(result, expected, ["day", "state", "urban"], ["listening_h"], k)
    if k == 10:
        assert result.suppressed > 0  # NT and ACT rural cells are that small in a 1,500-device fleet


def device_hours(events):
    hours = defaultdict(list)
    for e in events:
        hours[(e["device_id"], e["t"].replace(minute=0, second=0, microsecond=0))].append(e)
    return hours


def test_noise_habits(store):
    reader, events = store
    cells = defaultdict(lambda: [set(), defaultdict(float)])
    for (device, _), rows in device_hours(events).items():
        worn = [e for e in rows if e["in_ear_left"] or e["in_ear_right"]]
        if not worn:
            continue
        mean = sum(e["ambient_dba"] for e in worn) / len(worn)
        band = next((f"{lo}-{hi}" for lo, hi in analytics.AMBIENT_BANDS[:-1] if mean < hi), "75+")
        c = cells[(band, rows[0]["urban"])]
        c[0].add(device)
        for e in worn:
            c[1][e["noise_mode"]] += e["interval_s"]
            c[1]["all"] += e["interval_s"]
    expected = {key: (len(d), s["anc"] / s["all"], s["off"] / s["all"], s["transparency"] / s["all"])
                for key, (d, s) in cells.items()}
    compare(analytics.noise_habits(reader, START, END, 10), expected, ["ambient_band", "urban"],
            ["anc", "off", "transparency"], 10)


def test_exposure_against_the_who_guide(store):
    reader, events = store
    weeks = defaultdict(float)
    where = {}
    for e in events:
        d = day_of(e["t"])
        week = d - timedelta(days=d.weekday())
        weeks[(e["device_id"], week)] += e["playback_s"] * 2 ** ((e["output_dba"] - 80) / 3)
        where[e["device_id"]] = (e["state"], e["urban"])
    cells = defaultdict(list)
    for (device, _), dose in weeks.items():
        cells[where[device]].append((device, dose / (40 * 3600) * 100))
    expected = {key: (len({d for d, _ in v}), float(np.mean([x >= 100 for _, x in v])),
                      float(np.median([x for _, x in v]))) for key, v in cells.items()}
    result = analytics.exposure(reader, START, END, 10)
    compare(result, expected, ["state", "urban"], ["share_over_guide", "median_dose_pct"], 10)
    dist = result.extra["distribution"]
    shown = [v for v in cells.values() if len({d for d, _ in v}) >= 10]  # the distribution is of these only
    over = sum(1 for v in shown for _, x in v if x >= 100)
    assert dist["over_guide"] == over > 0 and dist["total"] == sum(map(len, shown)) < len(weeks)
    bands = np.histogram(np.clip([x for v in shown for _, x in v], 0, 199.999), bins=dist["edges_pct"])[0]
    assert dist["device_weeks"] == bands.tolist()


def test_battery_health_cohorts_and_outliers(store, store_path):
    reader, events = store
    by_device = defaultdict(list)
    for e in events:
        by_device[e["device_id"]].append(e)
    drains = {}
    for device, rows in by_device.items():
        rows.sort(key=lambda e: e["seq"])
        left = right = playback = 0.0
        for p, c in zip(rows, rows[1:]):
            if (c["seq"] == p["seq"] + 1 and c["in_ear_left"] and c["in_ear_right"] and p["in_ear_left"]
                    and p["in_ear_right"] and c["charging"] == "none" and p["charging"] == "none"):
                left += max(p["battery_left"] - c["battery_left"], 0)
                right += max(p["battery_right"] - c["battery_right"], 0)
                playback += c["playback_s"]
        if playback >= analytics.MIN_DRAIN_PLAYBACK_S:
            last = max(rows, key=lambda e: e["t"])
            drains[device] = (last["model"], last["firmware"], left / (playback / 3600), right / (playback / 3600))
    cohorts = defaultdict(list)
    for device, (model, fw, l, r) in drains.items():
        cohorts[(model, fw)].append((l + r) / 2)
    expected = {key: (len(v), *(float(np.percentile(v, q)) for q in (10, 50, 90))) for key, v in cohorts.items()}
    result = analytics.battery_health(reader, START, END, 10)
    compare(result, expected, ["model", "firmware"], ["p10_pct_per_h", "p50_pct_per_h", "p90_pct_per_h"], 10)
    top = result.extra["outliers"][0]
    assert close(top["left_pct_per_h"], drains[top["device_id"]][2])
    # the injected fast-drain devices are the ones the cohort comparison puts first
    fleet = Fleet.build(SPEC)
    pseudonyms = StorageConfig.embedded(store_path).pseudonyms()
    faulty = {pseudonyms.of(d) for d, f in zip(fleet.device_id, fleet.fault) if f in (0, 1)}
    assert sum(o["device_id"] in faulty for o in result.extra["outliers"][:5]) >= 4


def expected_adoption(events) -> dict:
    cells = defaultdict(set)
    for e in events:
        cells[(day_of(e["t"]), e["firmware"])].add(e["device_id"])
    totals = defaultdict(int)
    for (d, _), devs in cells.items():
        totals[d] += len(devs)
    return {key: (len(v), len(v) / totals[key[0]]) for key, v in cells.items()}


def test_firmware_adoption(store):
    reader, events = store
    compare(analytics.firmware_adoption(reader, START, END, 1), expected_adoption(events), ["day", "firmware"],
            ["share"], 1)


def expected_listening_by_hour(events) -> dict:
    cells = defaultdict(lambda: [set(), 0.0])
    for (device, hour), rows in device_hours(events).items():
        local = int(((hour + timedelta(minutes=int(TZ[rows[0]["state"]] * 60))).hour))
        c = cells[(local, rows[0]["urban"])]
        c[0].add(device)
        c[1] += sum(e["playback_s"] for e in rows)
    return {key: (len(d), s / 60 / len(d)) for key, (d, s) in cells.items()}


def test_listening_by_local_hour(store):
    reader, events = store
    compare(analytics.listening_by_hour(reader, START, END, 10), expected_listening_by_hour(events),
            ["local_hour", "urban"], ["minutes_per_device"], 10)


# A cohort is chosen by what each device last reported (the devices table); in the simulator a
# device keeps its model, state and area, so its events say the same. Firmware changes mid-range.
COHORTS = {
    "rural-QLD": (Cohort(state="QLD", urban=False), lambda e, last: e["state"] == "QLD" and not e["urban"]),
    "Pro-2": (Cohort(model="AirPods Pro 2"), lambda e, last: e["model"] == "AirPods Pro 2"),
    "on-7A305": (Cohort(firmware="7A305"), lambda e, last: last[e["device_id"]]["firmware"] == "7A305"),
    "Pro-2-urban-NSW-iphone": (Cohort.parse({"model": "AirPods Pro 2", "state": "nsw", "urban": "urban",
                                             "host_device": "iphone"}),
                               lambda e, last: (e["model"], e["state"], e["urban"], e["host_device"])
                               == ("AirPods Pro 2", "NSW", True, "iphone")),
}


@pytest.mark.parametrize("name", COHORTS)
def test_a_cohort_counts_its_devices_and_no_others(store, name):
    """Each query over a cohort equals the brute force over the cohort's devices' own events."""
    reader, events = store
    cohort, member = COHORTS[name]
    last = {}
    for e in sorted(events, key=lambda e: e["t"]):
        last[e["device_id"]] = e
    mine = [e for e in events if member(e, last)]
    assert 0 < len({e["device_id"] for e in mine}) < len(last)
    compare(analytics.usage_trend(reader, START, END, 1, cohort), expected_usage(mine), ["day", "state", "urban"],
            ["listening_h"], 1)
    compare(analytics.firmware_adoption(reader, START, END, 1, cohort), expected_adoption(mine),
            ["day", "firmware"], ["share"], 1)
    compare(analytics.listening_by_hour(reader, START, END, 1, cohort), expected_listening_by_hour(mine),
            ["local_hour", "urban"], ["minutes_per_device"], 1)
    report = analytics.full_report(reader, START, END, 1, cohort)
    assert report["cohort"]["label"] == cohort.label()
    assert report["events_covered"] == len(mine)


def test_complementary_cohorts_add_up_to_the_fleet(store):
    reader, events = store
    both = [analytics.full_report(reader, START, END, 1, Cohort(urban=u))["events_covered"] for u in (True, False)]
    assert sum(both) == analytics.full_report(reader, START, END, 1)["events_covered"] == len(events)
    nobody = analytics.full_report(reader, START, END, 1, Cohort(model="AirPods Max"))
    assert nobody["events_covered"] == 0
    assert all(not nobody[q]["rows"] and not nobody[q]["suppressed_cells"] for q in analytics.QUERIES)


def test_state_overview(store):
    reader, events = store
    cells = defaultdict(lambda: [set(), 0.0, 0.0, 0.0, set()])
    for e in events:
        c = cells[e["state"]]
        c[0].add(e["device_id"])
        c[1] += e["playback_s"]
        if e["in_ear_left"] or e["in_ear_right"]:
            c[2] += e["interval_s"]
            c[3] += e["interval_s"] if e["noise_mode"] in ("anc", "adaptive") else 0
        if e["urban"]:
            c[4].add(e["device_id"])
    days = (END - START).days
    expected = {(s,): (len(d), p / 3600 / len(d) / days, anc / worn, len(urban) / len(d))
                for s, (d, p, worn, anc, urban) in cells.items()}
    compare(analytics.state_overview(reader, START, END, 10), expected, ["state"],
            ["listening_h_per_day", "cancelling_share", "urban_share"], 10)


def test_full_report_has_a_key_per_query_and_says_what_it_suppressed(store):
    reader, _ = store
    report = analytics.full_report(reader, START, END)
    assert set(analytics.QUERIES) <= set(report)
    for name in analytics.QUERIES:
        assert report[name]["k"] == 10 and report[name]["suppressed"] >= 0
    assert report["events_covered"] > 100_000


def test_mode_shares_by_state(store):
    reader, events = store
    cells = defaultdict(lambda: [set(), defaultdict(float)])
    for e in events:
        if e["in_ear_left"] or e["in_ear_right"]:
            c = cells[(e["state"], e["urban"])]
            c[0].add(e["device_id"])
            c[1][e["noise_mode"]] += e["interval_s"]
            c[1]["all"] += e["interval_s"]
    expected = {key: (len(d), *(s[m] / s["all"] for m in ("anc", "adaptive", "transparency", "off")))
                for key, (d, s) in cells.items()}
    compare(analytics.mode_shares(reader, START, END, 10), expected, ["state", "urban"],
            ["anc", "adaptive", "transparency", "off"], 10)


def _a_k_that_hides_some(counts) -> int:
    """A floor above the median cell: about half the cells are suppressed."""
    return int(np.median(sorted(counts))) + 1


def test_firmware_shares_do_not_give_away_a_suppressed_cell(store):
    """The attack the shares allowed: devices / share = the day's total, less the shown cells = the hidden."""
    reader, events = store
    cells = defaultdict(set)
    for e in events:
        cells[(str(day_of(e["t"])), e["firmware"])].add(e["device_id"])
    k = _a_k_that_hides_some(len(v) for v in cells.values())
    result = analytics.firmware_adoption(reader, START, END, k)
    assert result.suppressed > 0
    shown = defaultdict(list)
    for row in result.records():
        shown[row["day"]].append(row)
    hidden_days = 0
    for day, rows in shown.items():
        hidden = sum(len(v) for (d, _), v in cells.items() if d == day and len(v) < k)
        inferred = [row["devices"] / row["share"] - sum(r["devices"] for r in rows) for row in rows]
        if hidden:
            hidden_days += 1
            assert all(abs(x - hidden) > 0.5 for x in inferred), (day, hidden, inferred)
        assert close(sum(r["share"] for r in rows), 1.0)
    assert hidden_days > 0


def test_the_exposure_distribution_counts_only_the_published_cells(store):
    reader, events = store
    devices = defaultdict(set)
    for e in events:
        devices[(e["state"], e["urban"])].add(e["device_id"])
    k = _a_k_that_hides_some(len(v) for v in devices.values())
    result = analytics.exposure(reader, START, END, k)
    assert result.suppressed > 0
    dist = result.extra["distribution"]
    # total less the published cells' device-weeks was the suppressed cells' device-weeks
    assert dist["total"] == sum(r["device_weeks"] for r in result.records())
    assert dist["over_guide"] == round(sum(r["share_over_guide"] * r["device_weeks"] for r in result.records()))
    assert sum(dist["device_weeks"]) == dist["total"]


def test_the_daily_rollup_holds_each_device_day_s_sums_and_local_hours(store, store_path):
    """device_daily against the raw events; written over several commits (build_store commits 100k events
    at a time), so device-days and device-hours split between commits were merged."""
    reader, events = store
    days = defaultdict(lambda: [0, 0.0, 0.0, set()])
    for e in events:
        d = days[(e["device_id"], day_of(e["t"]), e["state"], e["urban"])]
        d[0] += 1
        d[1] += e["playback_s"]
        d[2] += e["playback_s"] * 2 ** ((e["output_dba"] - 80) / 3)
        hour = e["t"].replace(minute=0, second=0, microsecond=0)  # a device-hour's local hour: where it starts
        d[3].add((hour + timedelta(minutes=int(TZ[e["state"]] * 60))).hour)
    stored = {(dev, day, state, urban): (n, listening, dose, hours) for dev, day, state, urban, n, listening, dose, hours
              in reader.rows("SELECT device_id, day, state, urban, events, listening_s, dose_s, local_hours "
                             "FROM device_daily")}
    assert set(stored) == set(days)
    for key, (n, listening, dose, hours) in days.items():
        got = stored[key]
        assert got[0] == n and close(got[1], listening) and close(got[2], dose, 1e-9), key
        assert got[3] == sum(1 << h for h in hours), key


def _daily(reader) -> list[tuple]:
    return sorted(reader.rows("SELECT * FROM device_daily"))


def test_the_migration_backfills_the_daily_rollup_as_the_writer_keeps_it(store_path, tmp_path):
    """Migration 11 on a store that had only hourly rollups gives the rows the writer keeps."""
    import shutil

    import duckdb

    from storage.migrations import MIGRATIONS, statements

    copy = tmp_path / "copy.duckdb"
    shutil.copy(store_path, copy)
    with open_reader(StorageConfig.embedded(store_path)) as reader:
        kept = _daily(reader)
    con = duckdb.connect(str(copy))
    con.execute("DELETE FROM device_daily")
    (backfill,) = [s for s in statements(MIGRATIONS[10], "duckdb") if s.startswith("INSERT")]
    con.execute(backfill)
    con.close()
    with open_reader(StorageConfig.embedded(copy)) as reader:
        assert len(_daily(reader)) == len(kept) > 1000
        for got, want in zip(_daily(reader), kept):
            assert got[:4] == want[:4] and got[-1] == want[-1] and all(close(a, b, 1e-9) for a, b in zip(got[4:], want[4:]))


def _same(got, want, path="$"):
    """Reports equal but for floating-point noise."""
    if isinstance(want, dict):
        assert set(got) == set(want), path
        for key in want:
            _same(got[key], want[key], f"{path}.{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for i, (a, b) in enumerate(zip(got, want)):
            _same(a, b, f"{path}[{i}]")
    elif isinstance(want, float) or isinstance(got, float):
        assert close(got, want, 1e-9), (path, got, want)
    else:
        assert got == want, (path, got, want)


def test_postgresql_answers_every_query_as_the_embedded_store_does(store, store_path, pg_url):
    reader, _ = store
    config = StorageConfig(backends={"pg": {"type": "postgresql", "url": pg_url}},
                           pseudonym_key_file=str(StorageConfig.embedded(store_path).key_file()))
    build_store(config, SPEC.devices, 3, seed=SPEC.seed, start=SPEC.start)
    with open_reader(config) as pg:
        assert analytics.data_range(pg) == analytics.data_range(reader)
        assert _daily(pg) == _daily(reader) or all(  # the same device-days, sums equal but for rounding
            a[:4] == b[:4] and a[-1] == b[-1] and all(close(x, y, 1e-9) for x, y in zip(a[4:], b[4:]))
            for a, b in zip(_daily(pg), _daily(reader)))
        for k in (1, 10):
            _same(analytics.full_report(pg, START, END, k), analytics.full_report(reader, START, END, k))
