"""Firmware regression detection (analytics.regressions) on simulated fleets: one whose mid-window
firmware drains 25% faster, and the same fleet without it."""

import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest

from analytics.regressions import Finding, detect, detect_rows, read_hours, record, recorded
from podpulse.simulator import Fleet, FleetSpec
from storage.config import StorageConfig
from testbed.stores import build_store

START = datetime(2026, 11, 1, 14, tzinfo=timezone.utc)  # Monday 00:00 AEST
DAYS, DEVICES, SEED = 14, 800, 23


@pytest.fixture(scope="module")
def fleets(tmp_path_factory):
    root = tmp_path_factory.mktemp("regressions")
    out = {}
    for name, extra in (("regressed", {"regressed_firmware": "7A305", "regression": 1.25}), ("clean", {})):
        build_store(root / f"{name}.duckdb", DEVICES, DAYS, seed=SEED, start=START, **extra)
        out[name] = StorageConfig.embedded(root / f"{name}.duckdb")
    return root, out


def test_the_simulator_ships_a_regressed_firmware_with_its_truth():
    spec = FleetSpec(devices=10, hours=24 * DAYS, seed=SEED, start=START, regressed_firmware="7A305")
    assert Fleet.build(spec).firmware_truth() == {
        "firmware": "7A305", "drain": 1.25, "release": (START + timedelta(hours=10 + 24 * DAYS / 2)).date().isoformat(),
        "models": ["AirPods Pro 2", "AirPods Pro 2 USB-C", "AirPods Pro 3"]}
    assert Fleet.build(FleetSpec(devices=10, seed=SEED)).firmware_truth() is None
    with pytest.raises(ValueError, match="regressed_firmware must be one of"):
        FleetSpec(regressed_firmware="9Z999")


def test_a_regressed_version_is_found_on_each_model_that_runs_it_with_its_size(fleets):
    _, stores = fleets
    found = detect(stores["regressed"])
    assert {(f.model, f.baseline_firmware, f.firmware) for f in found} == {
        (m, "7A294", "7A305") for m in ("AirPods Pro 2", "AirPods Pro 2 USB-C", "AirPods Pro 3")}
    for f in found:
        assert f.regression and f.devices >= 10 and f.p_value < 0.01
        assert f.ci_low <= 0.25 <= f.ci_high + 0.01 and abs(f.drain_change - 0.25) < 0.02, f
        assert abs(f.listening_change_h) < 0.3  # the firmware drains more, people listen as much
    # the same fleet without the regression: the same comparisons, none raised, intervals around 0
    clean = detect(stores["clean"])
    assert len(clean) == len(found) and not any(f.regression for f in clean)
    assert all(f.ci_low < 0.02 and f.ci_high > -0.02 for f in clean), clean


def test_what_was_known_before_the_rollout_finds_nothing_and_min_k_holds(fleets):
    _, stores = fleets
    rows = read_hours(stores["regressed"])
    release = (START + timedelta(hours=10 + 24 * DAYS / 2)).date()
    assert detect_rows(rows, until=release - timedelta(days=1)) == []
    soon = detect_rows(rows, until=release + timedelta(days=1))
    assert soon and all(f.firmware == "7A305" for f in soon)
    assert detect_rows(rows, min_k=DEVICES) == []  # no model has that many devices on both versions
    assert detect_rows({}) == []


def test_findings_are_kept_per_run_and_the_latest_run_is_served(store_config):
    assert recorded_after(store_config, []) == []
    f = Finding("AirPods Pro 2", "7A305", "7A294", 120, 0.25, 0.2, 0.3, 0.0005, -0.01, (-0.05, 0.03), "2026-11-08", True)
    g = Finding("AirPods Pro 3", "7A305", "7A294", 40, 0.01, -0.02, 0.04, 0.4, 0.02, (-0.1, 0.1), "2026-11-08", False)
    first = recorded_after(store_config, [g, f])
    assert [(r["model"], r["regression"]) for r in first] == [("AirPods Pro 2", True), ("AirPods Pro 3", False)]
    assert first[0]["drain_change"] == 0.25 and first[0]["devices"] == 120 and first[0]["first_day"] == "2026-11-08"
    assert [r["model"] for r in recorded_after(store_config, [g])] == ["AirPods Pro 3"]  # the later run only


def recorded_after(config, findings):
    record(config, findings)
    return recorded(config)


def test_podpulse_detect_prints_and_keeps_the_findings(fleets, tmp_path):
    root, _ = fleets
    db = tmp_path / "copy.duckdb"
    db.write_bytes((root / "regressed.duckdb").read_bytes())
    cli = [sys.executable, "-m", "cli.main"]
    proc = subprocess.run([*cli, "detect", "--db", str(db), "--json"], capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout)
    assert result["regressions"] == 3 and len(result["findings"]) == 3
    kept = recorded(StorageConfig.embedded(db))
    assert [r["drain_change"] for r in kept] == sorted((f["drain_change"] for f in result["findings"]), reverse=True)
    table = subprocess.run([*cli, "detect", "--db", str(db)], capture_output=True, text=True, check=True)
    assert "3 regression(s)" in table.stdout and "7A305" in table.stdout
    bad = subprocess.run([*cli, "detect", "--db", str(db), "--min-effect", "2"], capture_output=True, text=True)
    assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0 and "--min-effect" in bad.stderr
