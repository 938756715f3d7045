"""The usage forecast: its yardsticks on known series, and the model trained for real on a small fleet."""

import json

import numpy as np
import pytest

from analytics.forecast_model import RegionSeries, UsageForecaster, holdout, mape, seasonal_naive, series_from_rows
from analytics.registry import versions
from jobs.data import read_usage
from jobs.train import train_usage_forecast
from podpulse.errors import ConfigError
from storage.config import StorageConfig
from testbed.stores import build_store

WEEK = np.array([10.0, 10, 10, 10, 10, 6, 4])  # Monday .. Sunday


def test_seasonal_naive_repeats_last_week():
    history = np.tile(WEEK, 3) * np.repeat([1.0, 1.0, 2.0], 7)  # the last week doubled
    assert np.array_equal(seasonal_naive(history), WEEK * 2)
    assert np.array_equal(seasonal_naive(history, horizon=10), np.concatenate([WEEK, WEEK[:3]]) * 2)
    both = seasonal_naive(np.vstack([history, history + 1]))
    assert both.shape == (2, 7) and np.array_equal(both[1], WEEK * 2 + 1)


def test_mape_on_a_known_error():
    actual = np.tile(WEEK, 2)
    assert mape(actual, actual) == 0
    assert mape(actual, actual * 1.1) == pytest.approx(10.0)
    assert mape([100, 50], [90, 60]) == pytest.approx(15.0)  # (10% + 20%) / 2
    assert mape([0, 10], [5, 12]) == pytest.approx(20.0)  # a zero actual has no percentage: left out
    # seasonal naive on a pure weekly series is exact; one week late on a level shift, off by the shift
    assert mape(WEEK * 1.25, seasonal_naive(np.tile(WEEK, 2))) == pytest.approx(20.0)


def test_series_drop_incomplete_edge_days_and_fill_gaps():
    day = np.datetime64("2026-11-02")
    rows = {"day": np.array([day, day, day + 1, day + 3, day + 3]),
            "state": np.array(["NSW", "VIC", "NSW", "NSW", "VIC"]),
            "urban": np.array([True, False, True, True, False]),
            "hours": np.array([5.0, 1.0, 6.0, 7.0, 2.0]), "hours_seen": np.array([24, 20, 24, 12, 3]),
            "devices": np.array([40, 3, 41, 39, 2])}
    s = series_from_rows(rows)
    assert s.regions == [("NSW", True), ("VIC", False)] and s.dropped_days == ["2026-11-05"]
    assert s.days == 3 and s.hours.tolist() == [[5, 6, 0], [1, 0, 0]] and s.devices.tolist() == [41, 3]


def test_holdout_on_a_known_weekly_series():
    """Noise-free weekly series: seasonal naive is exact, and the network learns the shape closely.
    A region of half an hour a day is left out, by name."""
    rng = np.random.default_rng(0)
    level = np.append(rng.uniform(5, 200, size=12), 0.5)
    hours = level[:, None] * np.tile(WEEK / WEEK.mean(), 5)[None, :]
    regions = [(f"S{i}", bool(i % 2)) for i in range(13)]
    s = RegionSeries(regions, np.datetime64("2026-11-02"), hours, np.full(13, 50), [])
    _, m = holdout(s, epochs=60)
    assert m["baseline_mape"] == pytest.approx(0.0, abs=1e-9)
    assert m["mape"] < 10 and m["regions"] == 13 and m["evaluated_regions"] == 12 and m["days"] == 35
    assert m["note"].endswith("left out: S12/rural") and m["held_out"] == {"from": "2026-11-30", "to": "2026-12-06"}


def test_holdout_needs_enough_days():
    s = RegionSeries([("NSW", True)], np.datetime64("2026-11-02"), np.ones((1, 27)), np.ones(1), [])
    with pytest.raises(ConfigError, match="at least 28 complete days"):
        holdout(s)


@pytest.fixture(scope="module")
def fleet_store(tmp_path_factory, fixed_start):
    root = tmp_path_factory.mktemp("forecast")
    build_store(root / "s.duckdb", 800, 28, seed=5, start=fixed_start)  # four weeks: two of history, one of targets, one held out
    return root, StorageConfig.embedded(root / "s.duckdb")


def test_usage_forecast_beats_seasonal_naive(ray_local, fleet_store):
    root, config = fleet_store
    result = train_usage_forecast(config, registry=root / "models", epochs=60)
    assert result["mape"] < result["baseline_mape"], result
    assert result["days"] == 28 and result["evaluated_regions"] >= 10 and "mean of at least" in result["note"]
    saved = root / "models" / "usage-forecast" / result["version"]
    assert (saved / "model.keras").exists()
    metadata = json.loads((saved / "metadata.json").read_text())
    assert metadata["metrics"]["mape"] == result["mape"]
    assert metadata["next_week"]["from"] == "2026-11-30" and metadata["next_week"]["suppressed"] >= 1
    assert all(len(r["hours"]) == 7 and min(r["hours"]) > 0 for r in metadata["next_week"]["regions"])
    assert [v["version"] for v in versions(config, "usage-forecast")] == [result["version"]]

    loaded = UsageForecaster.load(saved / "model.keras", metadata["parameters"]["lookback"])
    series = series_from_rows(read_usage(config))
    forecast = loaded.predict(series, series.days)
    shown = {(r["state"], r["urban"]): r["hours"] for r in metadata["next_week"]["regions"]}
    for i, region in enumerate(series.regions):
        if region in shown:
            assert np.allclose(forecast[i], shown[region], atol=0.01)
