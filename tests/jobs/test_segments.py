"""Listening segments (jobs.segments): the device-week features against a brute-force count, the
names, and a version trained for real (TensorFlow, Ray Data) on a small simulated fleet, scored against
the simulator's behaviour profiles beside k-means on the raw features."""

import json
from collections import defaultdict
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from jobs.segments import FEATURES, HOURLY_SQL, NAME, WINDOWS, name, train_segments, week_features
from podpulse.simulator import Fleet, FleetSpec
from storage.config import StorageConfig
from storage.reader import run_queries
from testbed.stores import build_store

START = datetime(2026, 11, 1, 14, tzinfo=timezone.utc)  # Monday 00:00 AEST
SPEC = FleetSpec(devices=600, hours=24 * 14, seed=31, start=START)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("segments")
    build_store(root / "s.duckdb", SPEC.devices, 14, seed=SPEC.seed, start=START)
    return root, StorageConfig.embedded(root / "s.duckdb")


def test_device_week_features_are_the_hours_they_come_from(store):
    _, config = store
    rows = run_queries(config, {"h": HOURLY_SQL})["h"]
    columns = ("device_id", "state", "urban", "hour", "listening_s", "in_ear_s", "anc_s", "adaptive_s",
               "transparency_s", "off_s", "ambient_dba_sum", "ambient_samples", "dose_s", "output_dba_sum",
               "output_samples")
    weeks = week_features({c: np.array(v) for c, v in zip(columns, zip(*rows))})
    assert weeks["x"].shape == (len(weeks["device_id"]), len(FEATURES)) and len(weeks["device_id"]) > 500
    # brute force: each device-week's listening per AEST weekday/weekend hour, and its ANC share
    listening, in_ear, anc = defaultdict(lambda: np.zeros(48)), defaultdict(float), defaultdict(float)
    for r in map(dict, (zip(columns, row) for row in rows)):
        local = r["hour"].astimezone(timezone.utc) + timedelta(hours=10)
        monday = (local - timedelta(days=local.weekday())).date().isoformat()
        listening[(r["device_id"], monday)][local.hour + 24 * (local.weekday() >= 5)] += r["listening_s"]
        in_ear[(r["device_id"], monday)] += r["in_ear_s"]
        anc[(r["device_id"], monday)] += r["anc_s"]
    for i in range(0, len(weeks["device_id"]), 37):
        key = (weeks["device_id"][i], weeks["week"][i])
        profile = listening[key]
        assert profile.sum() >= 1800  # a week with less listening is left out
        assert np.allclose(weeks["x"][i, :48], profile / profile.sum())
        assert weeks["x"][i, FEATURES.index("anc_share")] == pytest.approx(anc[key] / in_ear[key])
        assert weeks["x"][i, FEATURES.index("log_listening_h")] == pytest.approx(np.log1p(profile.sum() / 3600))


def test_a_segment_is_named_by_the_window_where_it_stands_out():
    fleet = np.full(48, 1 / 48)
    commute = np.zeros(48)
    commute[[7, 8, 17, 18]] = 0.25
    desk = np.zeros(48)
    desk[9:17] = 1 / 8
    evening = np.zeros(48)
    evening[[20, 21, 44, 45]] = 0.25
    weekend = np.zeros(48)
    weekend[30:40] = 0.1
    assert [name(p, fleet) for p in (commute, desk, evening, weekend)] == list(WINDOWS)


def test_segments_are_trained_evaluated_and_registered(ray_local, store):
    from analytics.registry import latest

    root, config = store
    profiles = config.pseudonyms().keys(Fleet.build(SPEC).profiles())
    result = train_segments(config, registry=root / "models", epochs=10, profiles=profiles)
    assert 3 <= result["k"] <= 6 and len(result["names"]) == result["k"] == len(set(result["names"]))
    # the simulator's three profiles are what the segments should find; k-means on the raw features too
    assert result["profiles_ari"] > 0.2 and result["baseline_profiles_ari"] > 0.2, result
    assert -1 <= result["silhouette"] <= 1 and 0 < result["stability_ari"] <= 1
    served = result["summary"]
    assert sum(s["share"] for s in served["segments"]) == pytest.approx(1.0)
    assert all(r["devices"] >= 10 for r in served["by_region"]) and served["by_region"]
    for region in served["by_region"]:
        assert sum(region["shares"].values()) == pytest.approx(1.0)
    for segment in served["segments"]:  # noise control follows the surroundings: more cancelling where louder
        shares = [b["cancelling_share"] for b in segment["cancelling_by_ambient"] if b["cancelling_share"] is not None]
        assert shares == sorted(shares), segment
    entry = latest(config, NAME)
    assert entry["version"] == result["version"] and entry["metadata"]["summary"] == json.loads(json.dumps(served))
    from analytics.queries import report_for

    assert report_for(config)["segments"]["version"] == result["version"]
