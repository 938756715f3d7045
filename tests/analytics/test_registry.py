"""The model registry's source of truth, the ``model_versions`` table (``analytics.registry.latest``), and
the model modules reading what a saved version's metadata means (``metadata``, ``week_ahead``)."""

import json

import pytest

from analytics.registry import latest, register, versions
from podpulse.errors import ConfigError, StorageError
from storage.config import StorageConfig


def test_latest_is_the_version_registered_last_on_duckdb_and_postgresql(store_config, tmp_path):
    register(store_config, "usage-forecast", "fc-1", tmp_path / "fc-1", {"mape": 9.5}, {"next_week": {"k": 5}})
    assert latest(store_config, "battery-anomaly") is None  # another model's version is not this one's
    # registered last wins, whatever the names' order: "zz-first" sorts after "aa-second"
    register(store_config, "battery-anomaly", "zz-first", tmp_path / "zz-first", {"auc": 0.9}, {"threshold": 3.5})
    register(store_config, "battery-anomaly", "aa-second", tmp_path / "aa-second", {"auc": 0.95},
             {"threshold": 3.0, "feature_schema": {"models": ["AirPods Pro"]}})
    assert latest(store_config, "battery-anomaly") == {
        "version": "aa-second", "path": str(tmp_path / "aa-second"), "metrics": {"auc": 0.95},
        "metadata": {"threshold": 3.0, "feature_schema": {"models": ["AirPods Pro"]}}}
    assert latest(store_config, "usage-forecast")["version"] == "fc-1"
    assert [v["version"] for v in versions(store_config, "battery-anomaly")] == ["aa-second", "zz-first"]
    with pytest.raises(ValueError, match="not a model name"):
        latest(store_config, "x' OR '1'='1")


def test_a_store_that_cannot_be_read_raises_rather_than_answering_none(tmp_path):
    with pytest.raises(StorageError):
        latest(StorageConfig.embedded(tmp_path / "none.duckdb"), "battery-anomaly")
    assert not (tmp_path / "none.duckdb").exists()  # read only


def battery_metadata(**changes) -> dict:
    return {"name": "battery-anomaly", "version": "v1", "threshold": 3.5,
            "feature_schema": {"numeric": ["playback_h"], "models": ["AirPods Pro"], "firmwares": ["6F29"],
                               "mean": [0.1], "scale": [0.2]}, **changes}


def forecast_metadata(**changes) -> dict:
    """As ``jobs.train.train_usage_forecast`` writes it."""
    return {"name": "usage-forecast", "version": "fc-7",
            "metrics": {"mape": 8.0, "held_out": {"from": "2026-11-23", "to": "2026-11-29"}},
            "parameters": {"lookback": 14, "horizon": 7, "epochs": 5},
            "next_week": {"from": "2026-11-30", "to": "2026-12-06", "k": 10, "suppressed": 3,
                          "regions": [{"state": "NSW", "urban": True, "hours": [1.5, 2, 3, 4, 5, 6, 7.25]},
                                      {"state": "WA", "urban": False, "hours": [0.5] * 7}]}, **changes}


def saved(path, meta: dict):
    path.mkdir(parents=True, exist_ok=True)
    (path / "metadata.json").write_text(json.dumps(meta))
    return path


def test_the_battery_model_reads_and_checks_its_metadata(tmp_path):
    from analytics.battery_model import metadata

    assert metadata(saved(tmp_path / "ok", battery_metadata())) == battery_metadata()
    with pytest.raises(ConfigError, match="not a battery-anomaly version's metadata.*feature_schema"):
        metadata(saved(tmp_path / "no-schema", battery_metadata(feature_schema=None)))
    with pytest.raises(ConfigError, match="not a battery-anomaly version's metadata"):
        metadata(saved(tmp_path / "forecast", forecast_metadata()))
    with pytest.raises(ConfigError, match="cannot read the battery-anomaly metadata"):
        metadata(tmp_path / "missing")


def test_the_forecast_model_reads_the_week_a_version_publishes(tmp_path):
    from datetime import date

    from analytics.forecast_model import metadata, week_ahead

    week = week_ahead(saved(tmp_path / "ok", forecast_metadata()))
    assert (week.version, week.start, week.k, week.suppressed) == ("fc-7", date(2026, 11, 30), 10, 3)
    assert week.held_out == {"from": "2026-11-23", "to": "2026-11-29"}
    assert week.days("NSW", True) == [("2026-11-30", 1.5), ("2026-12-01", 2.0), ("2026-12-02", 3.0),
                                      ("2026-12-03", 4.0), ("2026-12-04", 5.0), ("2026-12-05", 6.0),
                                      ("2026-12-06", 7.25)]
    assert week.days("NSW", False) is None and week.days("VIC", True) is None
    assert metadata(tmp_path / "ok")["parameters"]["lookback"] == 14
    with pytest.raises(ConfigError, match="no usable next_week"):
        week_ahead(saved(tmp_path / "no-week", forecast_metadata(next_week=None)))
    with pytest.raises(ConfigError, match="not a usage-forecast version's metadata"):
        week_ahead(saved(tmp_path / "battery", battery_metadata()))
