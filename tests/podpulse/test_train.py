"""The battery anomaly model, trained for real (TensorFlow, Ray Data) on a small simulated fleet."""

import json

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

    from podpulse.registry import versions

    assert [v["version"] for v in versions(config, "battery-anomaly")] == [result["version"]]


def test_without_truth_the_metrics_say_why(ray_local, fleet_store):
    root, config, _ = fleet_store
    result = train_battery_anomaly(config, registry=root / "models", epochs=1)
    assert result["auc"] is None and "truth" in result["note"]
