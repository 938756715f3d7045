"""StorageConfig: its retention, and the keys a file may hold."""

import pickle

import pytest

from podpulse.errors import StorageError
from storage.config import StorageConfig

# ---- StorageConfig.retention: days kept per kind of record ------------------------------------------

CASSANDRA_RAW = {"backends": {"core": {"type": "postgresql", "url": "postgresql://u@h/db"},
                              "raw": {"type": "cassandra", "hosts": ["h"]}},
                 "routes": {"raw_events": "raw", "devices": "core", "rollups": "core", "offsets": "core",
                            "anomalies": "core"}}


def test_retention_is_days_per_expiring_kind_and_absent_means_forever(tmp_path):
    assert StorageConfig().retention == {}
    path = tmp_path / "storage.yaml"
    path.write_text("backends: {db: {type: duckdb, path: x.duckdb}}\n"
                    "retention: {raw_events: 30, rollups: 400, anomalies: 90}\n")
    config = StorageConfig.load(path)
    assert dict(config.retention) == {"raw_events": 30, "rollups": 400, "anomalies": 90}
    assert config.as_dict()["retention"] == {"raw_events": 30, "rollups": 400, "anomalies": 90}
    assert "retention" not in StorageConfig().as_dict()  # documents without it stay as they were
    assert dict(pickle.loads(pickle.dumps(config)).retention) == dict(config.retention)
    assert dict(config.with_retention({"raw_events": 7}).retention) == {"raw_events": 7, "rollups": 400,
                                                                         "anomalies": 90}


@pytest.mark.parametrize("retention, words", [
    ({"devices": 30}, "retention.devices: devices never expire"),
    ({"offsets": 30}, "retention.offsets: offsets never expire"),
    ({"events": 30}, "retention.events: unknown record kind"),
    ({"rollups": 0}, "retention.rollups: days must be a whole number of at least 1, got 0"),
    ({"anomalies": -5}, "retention.anomalies: days must be a whole number of at least 1, got -5"),
    ({"raw_events": 1.5}, "retention.raw_events: days must be a whole number of at least 1, got 1.5"),
    ({"raw_events": "30"}, "retention.raw_events: days must be a whole number of at least 1, got '30'"),
    ({"raw_events": True}, "retention.raw_events: days must be a whole number"),
    ([30], "retention: expected a mapping"),
])
def test_retention_refuses_what_cannot_expire_naming_the_key(retention, words):
    with pytest.raises(StorageError) as e:
        StorageConfig(retention=retention)
    assert words in str(e.value)


def test_raw_events_in_cassandra_are_kept_at_most_its_ttl_cap():
    assert StorageConfig(**CASSANDRA_RAW, retention={"raw_events": 7300}).retention["raw_events"] == 7300
    with pytest.raises(StorageError, match="retention.raw_events: Cassandra keeps a row at most 7300 days"):
        StorageConfig(**CASSANDRA_RAW, retention={"raw_events": 7301})


def test_a_config_file_with_an_unknown_key_is_refused(tmp_path):
    path = tmp_path / "storage.yaml"
    path.write_text("backends: {db: {type: duckdb}}\nretain: {raw_events: 3}\n")
    with pytest.raises(StorageError, match="expected the keys 'backends', 'routes' and \\(optional\\) 'retention'"):
        StorageConfig.load(path)
