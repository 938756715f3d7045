"""Feature drift: the population stability index on known distributions, and the report on a real store."""

import json

import numpy as np
import pytest

from jobs.drift import THRESHOLD, drift_report, psi, served_drift
from storage.config import StorageConfig
from testbed.stores import build_store


@pytest.fixture
def rng():
    return np.random.default_rng(3)


def test_identical_distributions_do_not_drift(rng):
    x = rng.normal(size=20_000)
    assert psi(x, x) == pytest.approx(0.0, abs=1e-12)
    assert psi(x, rng.normal(size=20_000)) < 0.01


def test_a_shifted_normal_drifts(rng):
    x = rng.normal(size=20_000)
    assert psi(x, rng.normal(0.1, size=20_000)) < 0.1  # a tenth of a standard deviation: stable
    assert psi(x, rng.normal(1.0, size=20_000)) > THRESHOLD
    assert psi(x, rng.normal(0.0, 2.0, size=20_000)) > THRESHOLD  # same mean, twice the spread


def test_psi_is_roughly_symmetric(rng):
    x, y = rng.normal(size=20_000), rng.normal(0.5, 1.2, size=20_000)
    forward, backward = psi(x, y), psi(y, x)
    assert forward > THRESHOLD and backward == pytest.approx(forward, rel=0.25)


def test_empty_bins_and_point_masses_stay_finite(rng):
    x = rng.normal(size=5_000)
    far = psi(x, x + 100)  # every actual value in the top bin, nine bins empty
    assert np.isfinite(far) and far > 1
    assert np.isfinite(psi(x, [0.0])) and np.isfinite(psi([1.0], [2.0]))
    zeros = np.zeros(1_000)
    assert psi(zeros, zeros[:10]) == 0.0 and np.isfinite(psi(zeros, np.ones(10))) and psi(zeros, np.ones(10)) > 1
    # a share with a point mass at 0: fewer zeros is drift, even though 0 is the lowest quantile
    share = np.where(rng.random(20_000) < 0.4, 0.0, rng.random(20_000))
    fewer = np.where(rng.random(20_000) < 0.15, 0.0, rng.random(20_000))
    assert psi(share, fewer) > THRESHOLD
    assert psi(np.append(x, np.nan), x) == pytest.approx(0.0, abs=1e-12)  # NaNs are left out
    with pytest.raises(ValueError):
        psi(x, [])


@pytest.fixture(scope="module")
def small_store(tmp_path_factory, fixed_start):
    root = tmp_path_factory.mktemp("drift")
    build_store(root / "s.duckdb", 300, 3, seed=9, start=fixed_start)  # AEST days 2026-11-02 .. 2026-11-04
    return root


def _model_dir(root, name, first, last):
    path = root / name
    path.mkdir()
    (path / "metadata.json").write_text(json.dumps({"data_window": {"from": first, "to": last}}))
    return path


def test_report_compares_newer_days_with_the_training_window(ray_local, small_store):
    config = StorageConfig.embedded(small_store / "s.duckdb")
    report = drift_report(config, _model_dir(small_store, "m1", "2026-11-02", "2026-11-03"))
    assert set(report["features"]) == {"playback_h", "anc", "adaptive", "transparency", "output_dba"}
    assert report["recent"]["from"] == report["recent"]["to"] == "2026-11-04" and "note" not in report
    assert report["max_psi"] == max(report["features"].values()) < THRESHOLD and report["retrain"] is False

    whole = drift_report(config, _model_dir(small_store, "m2", "2026-11-02", "2026-11-04"))
    assert "last 2 days" in whole["note"] and whole["recent"] == {
        "from": "2026-11-03", "to": "2026-11-04", "device_hours": whole["recent"]["device_hours"]}


def test_report_asks_for_retraining_after_a_shift(ray_local, small_store, tmp_path):
    import duckdb

    shifted = tmp_path / "shifted.duckdb"
    shifted.write_bytes((small_store / "s.duckdb").read_bytes())
    con = duckdb.connect(str(shifted))
    con.execute("SET TimeZone = 'UTC'")
    con.execute("UPDATE device_hourly SET output_dba_sum = output_dba_sum + 8 * output_samples "
                "WHERE CAST(hour + INTERVAL '10 hours' AS DATE) = DATE '2026-11-04'")  # 8 dB louder
    con.close()
    report = drift_report(StorageConfig.embedded(shifted), _model_dir(tmp_path, "m", "2026-11-02", "2026-11-03"))
    assert report["retrain"] is True and report["max_psi"] == report["features"]["output_dba"] > THRESHOLD


def test_a_replica_computes_the_same_drift_as_the_command(ray_local, small_store):
    """served_drift (a replica's reader, from the window's first day) and drift_report (Ray Data, the whole store)
    read the same device-hours and give the same PSI; a version without a window is a ConfigError."""
    from podpulse.errors import ConfigError

    config = StorageConfig.embedded(small_store / "s.duckdb")
    model = _model_dir(small_store, "m3", "2026-11-03", "2026-11-03")
    meta = json.loads((model / "metadata.json").read_text())
    assert served_drift(config, meta) == drift_report(config, model)
    with pytest.raises(ConfigError, match="training window"):
        served_drift(config, {"version": "v"})
    with pytest.raises(ConfigError, match="no device-hours"):
        served_drift(config, {"data_window": {"from": "2030-01-01", "to": "2030-01-02"}})
