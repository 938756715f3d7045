"""The battery anomaly model, trained for real (TensorFlow, Ray Data) on a small simulated fleet."""

import json
from collections import Counter

import pytest

from bench.report import build_store
from podpulse.simulator import Fleet, FleetSpec
from podpulse.train import train_battery_anomaly
from storage.router import StorageConfig

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

    from podpulse.battery_model import metadata as battery_metadata
    from podpulse.registry import latest, versions

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
    from podpulse.registry import latest
    from podpulse.train import read_features

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
    """What training wrote to ``anomalies`` for ``result``'s version (a trained battery-anomaly model)."""
    import duckdb

    from podpulse.registry import flagged_devices_by_region

    con = duckdb.connect(str(root / "s.duckdb"), read_only=True)
    try:
        con.execute("SET TimeZone = 'UTC'")
        rows = con.execute("SELECT device_id, CAST(day + INTERVAL '10 hours' AS DATE), hour(day), flagged, reason, "
                           "score FROM anomalies WHERE model_version = ?", [result["version"]]).fetchall()
        region = {d: f"{s}-{'urban' if u else 'rural'}"
                  for d, s, u in con.execute("SELECT device_id, state, urban FROM devices").fetchall()}
    finally:
        con.close()
    # only the flagged device-days, one row each, as the AEST day that begins at 14:00 UTC
    assert 0 < len(rows) == result["flagged_device_days"] < result["device_days"]
    assert len({(d, day) for d, day, *_ in rows}) == len(rows)
    assert all(hour == 14 and flagged and reason in ("departure", "imbalance") and score >= 3.5
               for _, _, hour, flagged, reason, score in rows)
    metadata = json.loads((root / "models" / "battery-anomaly" / result["version"] / "metadata.json").read_text())
    window = metadata["data_window"]
    assert all(window["from"] <= str(day) <= window["to"] for _, day, *_ in rows)
    # a fast drain departs from the expected drain (which reason wins is tested on its own below)
    fault = config.pseudonyms().keys({t["device_id"]: t["fault"] for t in json.loads(truth.read_text())})
    fast = [r for d, _, _, _, r, _ in rows if fault.get(d) == "fast_drain"]
    assert fast and fast.count("departure") > 0.8 * len(fast)
    # what a serving replica exports: distinct devices per region, for regions of at least k devices
    expected: dict[str, int] = {}
    for d in {d for d, *_ in rows}:
        expected[region[d]] = expected.get(region[d], 0) + 1
    assert flagged_devices_by_region(config, result["version"], k=1) == expected
    size = Counter(region.values())
    assert flagged_devices_by_region(config, result["version"], k=12) == {r: n for r, n in expected.items()
                                                                          if size[r] >= 12}


def test_the_flagged_days_carry_the_reason_that_dominates_their_score():
    import numpy as np

    from podpulse.battery_model import robust_z
    from podpulse.train import flagged_days

    rng = np.random.default_rng(3)
    departure, imbalance = rng.normal(0.1, 0.02, 200), rng.normal(0.05, 0.01, 200)
    departure[[3, 7]] = 0.5  # two drain departures
    imbalance[[5, 9]] = 0.4  # two left/right imbalances
    score = np.maximum(robust_z(departure), robust_z(imbalance))
    days = {"device_id": np.array([f"d{i}" for i in range(200)]), "day": np.array(["2025-03-01"] * 200),
            "departure": departure, "imbalance": imbalance, "score": score, "flagged": score >= 3.5}
    out = flagged_days(days)
    assert dict(zip(out["device_id"].tolist(), out["reason"].tolist())) == {
        "d3": "departure", "d7": "departure", "d5": "imbalance", "d9": "imbalance"}
    assert out["score"].tolist() == score[[3, 5, 7, 9]].tolist()


def test_anomalies_are_written_and_counted_by_region_on_duckdb_and_postgresql(store_config):
    """record_anomalies and flagged_devices_by_region on both backends, against the simulator's own regions."""
    import numpy as np
    import pyarrow as pa

    from podpulse import geo
    from podpulse.contract import decode_batch
    from podpulse.registry import flagged_devices_by_region, record_anomalies
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
