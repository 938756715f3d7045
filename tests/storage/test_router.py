"""The storage configuration: defaults, YAML files, and the mistakes it refuses."""

import pickle
from pathlib import Path

import pytest
import yaml

from storage.base import StorageError
from storage.config import KINDS, StorageConfig

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_the_default_is_one_embedded_duckdb_for_every_kind():
    c = StorageConfig()
    assert dict(c.backends) == {"embedded": {"type": "duckdb", "path": "podpulse-data/podpulse.duckdb"}}
    assert dict(c.routes) == {k: "embedded" for k in KINDS}


@pytest.mark.parametrize("name", ["embedded.yaml", "postgres.yaml", "cassandra-postgres.yaml",
                                  "oracle-cassandra.yaml"])
def test_every_example_loads_and_survives_pickling(name):
    c = StorageConfig.load(EXAMPLES / name)
    assert set(c.routes) == set(KINDS)
    assert pickle.loads(pickle.dumps(c)).as_dict() == c.as_dict()


@pytest.mark.parametrize("name", ["embedded.yaml", "postgres.yaml", "cassandra-postgres.yaml",
                                  "oracle-cassandra.yaml"])
def test_every_shipped_config_sets_a_retention(name):
    c = StorageConfig.load(EXAMPLES / name)
    assert dict(c.retention) == {"raw_events": 90, "rollups": 730, "anomalies": 365}


def test_the_deployed_storage_configs_set_a_retention():
    root = EXAMPLES.parent
    base = yaml.safe_load(yaml.safe_load((root / "deploy/base/storage.yaml").read_text().split("---")[0])
                          ["data"]["storage.yaml"])
    chart = yaml.safe_load((root / "charts/podpulse/values.yaml").read_text())["storage"]["config"]
    for config in (base, chart):
        assert StorageConfig(**config).retention == {"raw_events": 90, "rollups": 730, "anomalies": 365}


def test_the_fleet_example_puts_raw_events_in_cassandra_and_the_rest_in_oracle():
    c = StorageConfig.load(EXAMPLES / "oracle-cassandra.yaml")
    assert c.backends[c.routes["raw_events"]]["type"] == "cassandra"
    assert {c.backends[c.routes[k]]["type"] for k in KINDS if k != "raw_events"} == {"oracle"}


PG = {"type": "postgresql", "url": "postgresql://u@h/db"}


@pytest.mark.parametrize("backends, routes, words", [
    ({"a": {"type": "mysql"}}, {}, "type must be one of"),
    ({"a": {**PG, "password": "x"}}, {}, "never from the configuration"),
    ({"a": PG, "b": {"type": "duckdb", "path": "x"}},
     {"raw_events": "a", "devices": "a", "rollups": "b", "offsets": "a", "anomalies": "a"},
     "same backend"),
    ({"a": PG, "c": {"type": "cassandra", "hosts": ["h"]}},
     {"raw_events": "a", "devices": "c", "rollups": "c", "offsets": "c", "anomalies": "a"},
     "not a relational backend"),
    ({"a": PG}, {"raw_events": "a", "devices": "a", "rollups": "a", "offsets": "a"}, "no backend for anomalies"),
    ({"a": PG}, {k: "a" for k in [*KINDS, "gossip"]}, "unknown record kind"),
    ({"a": PG}, {**{k: "a" for k in KINDS}, "rollups": "zz"}, "no backend named 'zz'"),
])
def test_bad_configurations_are_refused_with_a_reason(backends, routes, words):
    with pytest.raises(StorageError, match=words):
        StorageConfig(backends=backends, routes=routes)


def test_a_bad_file_is_a_one_line_error(tmp_path):
    (tmp_path / "bad.yaml").write_text("backends: [unclosed")
    with pytest.raises(StorageError, match="not valid YAML"):
        StorageConfig.load(tmp_path / "bad.yaml")
    with pytest.raises(StorageError, match="cannot read"):
        StorageConfig.load(tmp_path / "missing.yaml")
    (tmp_path / "odd.yaml").write_text("storage: {}")
    with pytest.raises(StorageError, match="expected the keys"):
        StorageConfig.load(tmp_path / "odd.yaml")


def test_passwords_come_from_the_environment_or_a_file(tmp_path, monkeypatch):
    from storage.config import PostgresSettings

    def password(**given):
        return PostgresSettings(url="postgresql://podpulse@db/podpulse", **given).password()

    monkeypatch.setenv("PG_PW", "s3cret")
    assert password(password_env="PG_PW") == "s3cret"
    (tmp_path / "pw").write_text("filed\n")
    assert password(password_file=str(tmp_path / "pw")) == "filed"
    with pytest.raises(StorageError, match="NOPE is not set"):
        password(password_env="NOPE")
