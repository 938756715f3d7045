"""The battery anomaly model, trained for real (TensorFlow, Ray Data) on a small simulated fleet."""

import json
from collections import Counter

import pytest

from jobs.train import train_battery_anomaly
from podpulse.simulator import Fleet, FleetSpec
from storage.config import StorageConfig
from testbed.stores import build_store

SPEC = FleetSpec(devices=1500, hours=24 * 5, seed=51)


@pytest.fixture(scope="module")
def fleet_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    build_store(root / "s.duckdb", SPEC.devices, 5, seed=SPEC.seed)
    truth = root / "truth.json"
    truth.write_text(json.dumps(Fleet.build(SPEC).truth()))
    return root, StorageConfig.embedded(root / "s.duckdb"), truth


def test_battery_anomaly_flags_the_injected_faults(ray_local, fleet_store):
    root, config, truth = fleet_store
    result = train_battery_anomaly(config, truth_path=truth, registry=root / "models", epochs=6)
    assert result["auc"] >= 0.9, result
    assert result["baseline_auc"] is not None and result["precision"] > 0.5 and result["recall"] > 0.5
    saved = root / "models" / "battery-anomaly" / result["version"]
    assert (saved / "model.keras").exists()
    metadata = json.loads((saved / "metadata.json").read_text())
    assert metadata["metrics"]["auc"] == result["auc"] and metadata["feature_schema"]["numeric"]

    from analytics.battery_model import metadata as battery_metadata
    from analytics.registry import latest, versions

    assert [v["version"] for v in versions(config, "battery-anomaly")] == [result["version"]]
    # what Serve is given: the row training registered, naming the directory it saved
    assert latest(config, "battery-anomaly") == {"version": result["version"], "path": str(saved.resolve()),
                                                 "metrics": metadata["metrics"], "metadata": metadata}
    assert battery_metadata(saved) == metadata
    assert_flagged_device_days_are_in_the_anomalies_table(root, config, truth, result)


def test_training_reads_postgresql_through_the_storage_reader_as_it_reads_duckdb(ray_local, pg_url, tmp_path,
                                                                                 fixed_start):
    """The same fleet in DuckDB and in PostgreSQL: Ray Data reads the same feature rows from both (the
    reader's connection factories), and a version trained on PostgreSQL is registered there."""
    from analytics.registry import latest
    from jobs.data import read_features

    pg = StorageConfig(backends={"pg": {"type": "postgresql", "url": pg_url}})
    for target in (pg, tmp_path / "same.duckdb"):
        build_store(target, 300, 4, seed=53, start=fixed_start)
    a, b = read_features(pg), read_features(StorageConfig.embedded(tmp_path / "same.duckdb"))
    assert set(a) == set(b) and len(a["device_id"]) == len(b["device_id"]) > 0
    def rows(features: dict) -> list[tuple]:  # order-free: Ray Data may read in any order
        columns = [[f"{float(v):.6g}" if f.dtype.kind == "f" else str(v) for v in f] for f in features.values()]
        return sorted(zip(*columns))

    assert rows(a) == rows(b)
    result = train_battery_anomaly(pg, registry=tmp_path / "models", epochs=1)
    assert latest(pg, "battery-anomaly")["version"] == result["version"]


def test_without_truth_the_metrics_say_why(ray_local, fleet_store):
    root, config, _ = fleet_store
    result = train_battery_anomaly(config, registry=root / "models", epochs=1)
    assert result["auc"] is None and "truth" in result["note"]


def assert_flagged_device_days_are_in_the_anomalies_table(root, config, truth, result):
    """What training wrote to ``anomalies`` for ``result``'s version (a trained battery-anomaly model): one
    definition of a flagged device, for its figures, the table and the metric's counts."""
    import duckdb

    from analytics.battery_model import STATISTICS
    from analytics.registry import flagged_devices_by_region

    con = duckdb.connect(str(root / "s.duckdb"), read_only=True)
    try:
        con.execute("SET TimeZone = 'UTC'")
        rows = con.execute("SELECT device_id, CAST(day + INTERVAL '10 hours' AS DATE), hour(day), flagged, reason, "
                           "score FROM anomalies WHERE model_version = ?", [result["version"]]).fetchall()
        region = {d: f"{s}-{'urban' if u else 'rural'}"
                  for d, s, u in con.execute("SELECT device_id, state, urban FROM devices").fetchall()}
    finally:
        con.close()
    # the flagged devices' days, one row each, as the AEST day that begins at 14:00 UTC
    assert 0 < len(rows) == result["flagged_device_days"] < result["device_days"]
    assert len({(d, day) for d, day, *_ in rows}) == len(rows)
    assert all(hour == 14 and flagged and reason in STATISTICS and score >= result["threshold"]
               for _, _, hour, flagged, reason, score in rows)
    flagged = {d for d, *_ in rows}
    assert len(flagged) == result["flagged_devices"]
    # training's precision and recall count the same devices
    fault = config.pseudonyms().keys({t["device_id"]: t["fault"] for t in json.loads(truth.read_text())})
    hits = len(flagged & set(fault))
    assert result["recall"] == hits / len(fault) and result["precision"] == hits / len(flagged)
    metadata = json.loads((root / "models" / "battery-anomaly" / result["version"] / "metadata.json").read_text())
    window = metadata["data_window"]
    assert all(window["from"] <= str(day) <= window["to"] for _, day, *_ in rows)
    # a fast drain departs from the expected drain all along; a stuck sensor is one bud that never drains
    reason = {d: r for d, _, _, _, r, _ in rows}
    assert [reason[d] for d in flagged if fault.get(d) == "fast_drain"].count("drain") >= 0.8 * sum(
        1 for d in flagged if fault.get(d) == "fast_drain") > 0
    assert {reason[d] for d in flagged if fault.get(d) == "stuck_sensor"} == {"imbalance"}
    # what a serving replica exports: distinct devices per region, for regions of at least k devices
    expected: dict[str, int] = {}
    for d in flagged:
        expected[region[d]] = expected.get(region[d], 0) + 1
    assert flagged_devices_by_region(config, result["version"], k=1) == expected
    assert sum(expected.values()) == result["flagged_devices"]
    size = Counter(region.values())
    assert flagged_devices_by_region(config, result["version"], k=12) == {r: n for r, n in expected.items()
                                                                          if size[r] >= 12}


def _days(series: dict[str, list[tuple[float, float]]], expected: float = 20.0) -> dict:
    """Device-days as BatteryModel.device_days gives them: each device's (left, right) observed drains over
    a constant expected drain, on consecutive days."""
    import numpy as np

    ids, day, obs = [], [], []
    for device, values in series.items():
        for i, pair in enumerate(values):
            ids.append(device)
            day.append(f"2026-03-{i + 1:02d}")
            obs.append(pair)
    n = len(ids)
    return {"device_id": np.array(ids), "day": np.array(day), "observed": np.array(obs, dtype=float),
            "expected": np.full((n, 2), expected), "jumps": np.zeros(n), "temp": np.full(n, np.nan)}


def test_devices_are_flagged_by_the_statistic_their_fault_moves_and_from_the_day_it_shows():
    """score_devices on made-up device-days: a healthy fleet with day-to-day noise and one device per fault."""
    import numpy as np

    from analytics.battery_model import BatteryModel

    rng = np.random.default_rng(3)
    days = 20
    series = {}
    for i in range(300):  # healthy: each its own level (battery health), noise of a few % a day
        level = 20 * rng.uniform(1.0, 1.4)
        noise = rng.normal(0, 0.04, days)
        series[f"h{i:03d}"] = [(level * np.exp(e), level * np.exp(e)) for e in noise]
    noise = rng.normal(0, 0.04, days)
    series["fast"] = [(2.2 * 20 * np.exp(e), 2.2 * 20 * np.exp(e)) for e in noise]
    series["step"] = [(24 * np.exp(e) * (1.25 if d >= 12 else 1), 24 * np.exp(e) * (1.25 if d >= 12 else 1))
                      for d, e in enumerate(noise)]
    series["lopsided"] = [(34 * np.exp(e), 20 * np.exp(e)) for e in noise]
    series["growing"] = [(22 * np.exp(e) * (1 + 0.5 * max(d - 8, 0) / 11), 22 * np.exp(e)) for d, e in enumerate(noise)]
    device_days = _days(series)
    warm = np.flatnonzero(device_days["device_id"] == "h100")
    device_days["temp"][np.flatnonzero(device_days["device_id"] == "h099")] = 32 + rng.normal(0, 0.2, days)
    device_days["temp"][warm] = 32 + rng.normal(0, 0.2, days) + 4 * (np.arange(days) >= 10)  # 4 °C warmer from day 11
    device_days["jumps"][device_days["device_id"] == "h007"] = 0  # a healthy device, no jumps
    device_days["jumps"][np.flatnonzero(device_days["device_id"] == "h042")[[3, 9, 15]]] = 1  # a sensor dropping out
    model = BatteryModel([], [], None, None)
    scored = model.score_devices(device_days)
    reason = dict(zip(scored["device_id"].tolist(), scored["reason"].tolist()))
    flagged = set(scored["device_id"][scored["flagged"]].tolist())
    assert {"fast", "step", "lopsided", "growing", "h042", "h100"} <= flagged and len(flagged) <= 6 + 3
    assert "h099" not in flagged  # its temperature is steady
    assert (reason["fast"], reason["step"], reason["lopsided"], reason["growing"], reason["h042"], reason["h100"]) == (
        "drain", "drain_shift", "imbalance", "imbalance_shift", "sensor_jumps", "temp_shift")
    since = dict(zip(scored["device_id"].tolist(), scored["since"].tolist()))
    assert (since["step"], since["h100"], since["fast"]) == ("2026-03-13", "2026-03-11", "2026-03-01")
    rows = model.flagged_rows(device_days, scored)
    assert set(rows["device_id"].tolist()) == flagged  # the table's devices are the flagged ones
    step_days = rows["day"][rows["device_id"] == "step"].tolist()
    assert step_days == [f"2026-03-{d:02d}" for d in range(13, 21)]  # from the day the step shows


def test_a_mostly_zero_feature_keeps_a_scale_of_its_own():
    """robust_z on a feature that is 0 for most devices: the MAD is 0, the scale falls back to the mean
    absolute deviation (not 1.0, which made such a feature unable to decide a flag)."""
    import numpy as np

    from analytics.battery_model import robust_scale, robust_z

    x = np.zeros(100)
    x[:10] = 0.02
    assert robust_scale(x) == 1.2533 * 0.002 and robust_z(x)[0] > 5
    assert (robust_z(np.full(5, 3.0)) == 0).all() and robust_z(x, floor=1.0)[0] == 0.02


def test_anomalies_are_written_and_counted_by_region_on_duckdb_and_postgresql(store_config):
    """record_anomalies and flagged_devices_by_region on both backends, against the simulator's own regions."""
    import numpy as np
    import pyarrow as pa

    from analytics.registry import flagged_devices_by_region, record_anomalies
    from podpulse import geo
    from podpulse.contract import decode_batch
    from podpulse.simulator import simulate
    from storage.router import open_storage

    spec = FleetSpec(devices=60, hours=2, seed=5)
    fleet = Fleet.build(spec)
    storage = open_storage(store_config)
    storage.setup()
    values = [v for chunk in simulate(spec, fleet) for v in chunk.values]
    table = decode_batch(values).table
    n = table.num_rows
    table = table.append_column("kafka_partition", pa.array(np.zeros(n, np.int32))).append_column(
        "kafka_offset", pa.array(np.arange(n), pa.int64()))
    storage.commit("anomalies-test", table, {0: n})
    storage.close()

    picked = fleet.device_id[:25]
    days = np.array(["2025-03-01", "2025-03-02"] * 25)[:25]
    written = record_anomalies(store_config, "v-test", {
        "device_id": picked, "day": days, "score": np.linspace(3.5, 9.0, 25),
        "reason": np.where(np.arange(25) % 2 == 0, "departure", "imbalance")})
    assert written == 25
    # the same devices on another day, and another version: neither changes v-test's count
    record_anomalies(store_config, "v-test", {"device_id": picked[:5], "day": np.array(["2025-03-03"] * 5),
                                              "score": np.full(5, 4.0), "reason": np.array(["imbalance"] * 5)})
    record_anomalies(store_config, "v-other", {"device_id": fleet.device_id[30:40],
                                               "day": np.array(["2025-03-01"] * 10), "score": np.full(10, 4.0),
                                               "reason": np.array(["departure"] * 10)})
    expected: dict[str, int] = {}
    for i in range(25):
        r = f"{geo.STATES[fleet.state[i]].code}-{'urban' if fleet.urban[i] else 'rural'}"
        expected[r] = expected.get(r, 0) + 1
    assert flagged_devices_by_region(store_config, "v-test", k=1) == expected
    size = Counter(f"{geo.STATES[s].code}-{'urban' if u else 'rural'}" for s, u in zip(fleet.state, fleet.urban))
    assert any(size[r] < 5 for r in expected) and any(size[r] >= 5 for r in expected)
    assert flagged_devices_by_region(store_config, "v-test", k=5) == {r: n for r, n in expected.items() if size[r] >= 5}
    assert sum(flagged_devices_by_region(store_config, "v-other", k=1).values()) == 10
    assert flagged_devices_by_region(store_config, "v-none") == {}
    assert record_anomalies(store_config, "v-empty", {"device_id": np.array([]), "day": np.array([]),
                                                      "score": np.array([]), "reason": np.array([])}) == 0
    with pytest.raises(ValueError):
        flagged_devices_by_region(store_config, "x' OR '1'='1")

    from storage.reader import run_queries

    [(first_day,)] = run_queries(store_config, {"d": "SELECT min(day) FROM anomalies"})["d"]
    assert first_day.isoformat().startswith("2025-02-28T14:00:00")  # 1 March AEST begins at 14:00 UTC
