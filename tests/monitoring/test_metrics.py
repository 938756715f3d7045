"""podpulse.metrics without Ray running: names, labels, per-batch helpers."""

import re

import numpy as np

from podpulse import metrics
from storage.config import StorageConfig


def test_names_follow_prometheus_conventions():
    for spec in metrics.METRICS.values():
        assert re.fullmatch(r"podpulse_[a-z_]+", spec.name)
        if spec.kind == "counter":
            assert spec.name.endswith("_total")
        else:
            assert not spec.name.endswith("_total")
        if spec.kind == "histogram":
            assert spec.name.endswith("_seconds") and list(spec.boundaries) == sorted(spec.boundaries)
    write = metrics.METRICS["podpulse_batch_write_seconds"].boundaries
    assert write[0] == 0.001 and write[-1] == 10.0  # 1 ms to 10 s


def test_the_docstring_table_lists_every_exported_name_with_its_labels():
    rows = re.findall(r"^(ray_podpulse_\w+)\s+(counter|gauge|histogram)\s+(.+)$", metrics.__doc__, re.M)
    table = {name: (kind, labels.split(" (+")[0].replace(", le", "").replace("(none)", "").strip())
             for name, kind, labels in rows}
    expected = {}
    for s in metrics.METRICS.values():
        name = metrics.exported_name(s.name) + ("_bucket" if s.kind == "histogram" else "")
        expected[name] = (s.kind, ", ".join(s.tag_keys))
    assert table == expected


def test_partition_counts_and_the_backend_label():
    assert metrics.partition_counts(np.array([3, 1, 3, 3, 5], np.int32)) == {1: 1, 3: 3, 5: 1}
    assert metrics.partition_counts(np.array([], np.int32)) == {}
    assert metrics.backend_label(StorageConfig.embedded("/tmp/x.duckdb")) == "duckdb"
    split = StorageConfig(backends={"core": {"type": "postgresql", "url": "postgresql://u@h/db"},
                                    "raw": {"type": "cassandra", "hosts": ["c1"]}},
                          routes={"raw_events": "raw", "devices": "core", "rollups": "core",
                                  "offsets": "core", "anomalies": "core"})
    assert metrics.backend_label(split) == "cassandra+postgresql"


def test_recording_without_ray_running_is_harmless():
    """The Writer runs in plain processes too (tests, tools): its metric calls must not fail there."""
    metrics.events_consumed("t", {0: 10, 1: 0})
    metrics.batch_written("duckdb", 0.01, 10, 0)
    metrics.model_version("battery-anomaly", "v1")
    metrics.feature_drift("battery-anomaly", "v1", {"anc": 0.1})
    metrics.anomalous_devices("battery-anomaly", "v1", {"NSW-urban": 3})
    metrics.anomalous_devices("battery-anomaly", "v2", {})


def test_every_metric_is_named_and_described_in_ascii():
    """Ray's metrics (Cython) take ASCII only: a description with "ε" raised where the metric was made."""
    from podpulse.metrics import METRICS as ALL

    for spec in ALL.values():
        assert (spec.name + spec.description + "".join(spec.tag_keys)).isascii(), spec.name
