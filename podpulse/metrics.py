"""PodPulse's Prometheus metrics, pipeline and serving, in one place.

They are ``ray.util.metrics`` metrics: each Ray process records into its core
worker, and the node's metrics agent serves them all on the node's metrics
export port (``ray.nodes()[i]["MetricsExportPort"]``; ``ray start
--metrics-export-port=8080`` fixes it, and KubeRay exposes it as the container
port named ``metrics``, 8080). One scrape of that port per node sees every
actor and Serve replica on the node. Each metric object is created lazily, once
per process, on first use; calls are made once per batch, never per record.

Exported names (measured with Ray 2.60, OpenTelemetry exporter, the default):
Ray prefixes every name with ``ray_``; a counter named ``x_total`` is exported
as ``ray_x_total`` (no second suffix; also true with
``RAY_enable_open_telemetry=0``); a histogram ``x_seconds`` as
``ray_x_seconds_bucket`` (with ``le``), ``ray_x_seconds_sum`` and
``ray_x_seconds_count``. Ray adds the labels ``Component``, ``NodeAddress``,
``SessionName``, ``Version`` (Ray's), ``WorkerId`` and ``otel_scope_*``, so
each process is its own series: aggregate with ``sum by (...)``. A live
process re-reports its gauges every report interval (``metrics_report_interval_ms``,
10 s by default), so a gauge set once stays exported; a dead process's gauges
disappear about two intervals later, while its counters stay exported at
their last value (seen for 40 s and more; a restarted actor starts new series
from zero, which ``rate()`` copes with).

===========================================  =========  ==========================
exported name                                type       labels (besides Ray's)
===========================================  =========  ==========================
ray_podpulse_events_consumed_total           counter    topic, partition
ray_podpulse_events_stored_total             counter    topic, partition
ray_podpulse_events_dead_lettered_total      counter    topic, partition
ray_podpulse_consumer_lag                    gauge      topic, partition
ray_podpulse_batch_write_seconds_bucket      histogram  backend, le (+ _sum, _count)
ray_podpulse_events_written_total            counter    backend, outcome
ray_podpulse_write_errors_total              counter    backend
ray_podpulse_failures_total                  counter    component, cause
ray_podpulse_scoring_latency_seconds_bucket  histogram  endpoint, le (+ _sum, _count)
ray_podpulse_anomalous_devices               gauge      model, version, region
ray_podpulse_model_info                      gauge      model, version
ray_podpulse_feature_drift_psi               gauge      model, version, feature
ray_podpulse_firmware_regression             gauge      model, firmware, baseline
ray_podpulse_api_tokens_file_readable        gauge      (none)
ray_podpulse_exact_reads_total               counter    who, what
ray_podpulse_privacy_epsilon_spent_total     counter    token
ray_podpulse_privacy_budget_refused_total    counter    token
===========================================  =========  ==========================

Firmware regressions are exported by the API replicas from the store's latest
``podpulse detect`` findings (``firmware_findings``), on the drift schedule:
the relative drain change of each version found regressed against the one
before it, 0 for a finding no longer raised.

Consumer lag is measured by the IngestSupervisor: the partition's high
watermark minus the next offset stored with the data. **On the embedded Tansu
broker it under-reads**: Tansu reports the high watermark as the base offset of
the last record batch + 1, not the last offset + 1, so the lag it yields is too
small by the size of the partition's last record batch less one (1 while that
whole batch is still unread). On Apache Kafka it is exact.

Anomalous devices are counted where the version is served, not where it is
trained: the training job writes its flagged device-days to the ``anomalies``
table and ends (its metrics would vanish with it); each Serve replica, on
loading a battery-anomaly version, counts that version's distinct flagged
devices per region (``STATE-urban|rural``, from ``devices``) in one query and
sets the gauge, zeroing the version it replaced. Counts only, no device ids,
no k-anonymity suppression (an operational signal; a small count is the point).
"""

from __future__ import annotations

import threading
from collections import Counter as _Tally
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np
from ray.util import metrics as rm

__all__ = [
    "PREFIX", "METRICS", "MetricSpec", "exported_name", "exported_series",
    "events_consumed", "events_stored", "events_dead_lettered", "consumer_lag", "partition_counts",
    "backend_label", "batch_written", "write_failed", "failure",
    "scoring_latency", "anomalous_devices", "model_version", "feature_drift", "firmware_regressions",
    "tokens_file_readable", "exact_read", "epsilon_spent", "budget_refused",
]

PREFIX = "ray_"  # added by Ray's exporter to every application metric
WRITE_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SCORING_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class MetricSpec:
    name: str  # as given to Ray; counters end in _total already
    kind: str  # counter | gauge | histogram
    description: str
    tag_keys: tuple[str, ...]
    boundaries: tuple[float, ...] = ()


METRICS: dict[str, MetricSpec] = {s.name: s for s in (
    # -- the ingest pipeline --------------------------------------------------------------
    MetricSpec("podpulse_events_consumed_total", "counter",
               "Kafka messages read by the partition consumers (valid and rejected; re-read after a rewind).",
               ("topic", "partition")),
    MetricSpec("podpulse_events_stored_total", "counter",
               "Valid events in batches the storage writer acknowledged as durable with their offsets.",
               ("topic", "partition")),
    MetricSpec("podpulse_events_dead_lettered_total", "counter",
               "Records sent to the dead-letter topic (undecodable or invalid).", ("topic", "partition")),
    MetricSpec("podpulse_consumer_lag", "gauge",
               "High watermark minus the next offset stored with the data. Under-reads on the embedded "
               "Tansu broker (its high watermark is the last record batch's base offset + 1).",
               ("topic", "partition")),
    MetricSpec("podpulse_batch_write_seconds", "histogram",
               "Time to write one coalesced batch and its offsets (one transaction) to the store.",
               ("backend",), WRITE_BUCKETS_S),
    MetricSpec("podpulse_events_written_total", "counter",
               "Rows of written batches: outcome=applied (newly stored) or replayed (offsets already stored).",
               ("backend", "outcome")),
    MetricSpec("podpulse_write_errors_total", "counter",
               "Batch writes that raised (store error, refused offset gap); their consumers rewind.",
               ("backend",)),
    MetricSpec("podpulse_failures_total", "counter",
               "Failures by root cause (the exception type; the log line has the message): a write, a "
               "dead-letter delivery, waiting for the store or the broker. component=consumer|writer|supervisor.",
               ("component", "cause")),
    # -- serving -----------------------------------------------------------------------------
    MetricSpec("podpulse_scoring_latency_seconds", "histogram",
               "Time to answer a scoring request, per endpoint.", ("endpoint",), SCORING_BUCKETS_S),
    MetricSpec("podpulse_anomalous_devices", "gauge",
               "Distinct devices a served battery-anomaly version flagged in its training window, per region "
               "(STATE-urban|rural); 0 for the version it replaced.", ("model", "version", "region")),
    MetricSpec("podpulse_model_info", "gauge",
               "1 for the model version a serving replica uses, 0 for the one it replaced.",
               ("model", "version")),
    MetricSpec("podpulse_feature_drift_psi", "gauge",
               "Population stability index of a model feature, recent days against the training window.",
               ("model", "version", "feature")),
    MetricSpec("podpulse_firmware_regression", "gauge",
               "Relative battery drain change of a firmware version found regressed against the version "
               "before it on a model (podpulse detect's latest findings); 0 once no longer found.",
               ("model", "firmware", "baseline")),
    MetricSpec("podpulse_api_tokens_file_readable", "gauge",
               "1 while a serving replica reads its API tokens file ($PODPULSE_API_TOKENS_FILE), 0 while it "
               "cannot (its tokens are refused meanwhile).", ()),
    MetricSpec("podpulse_exact_reads_total", "counter",
               "Exact (not differentially private) analytics answers, by who read them (an admin token's name) "
               "and what; each is also a row of the exact_reads table.", ("who", "what")),
    MetricSpec("podpulse_privacy_epsilon_spent_total", "counter",
               "Epsilon a token spent on new private answers (its daily budget: user_config daily_epsilon).",
               ("token",)),
    MetricSpec("podpulse_privacy_budget_refused_total", "counter",
               "Private answers refused (429) because the token's daily epsilon budget was spent.", ("token",)),
)}


def exported_name(name: str) -> str:
    """The name Ray exports a metric under (histograms: the base of _bucket/_sum/_count)."""
    return PREFIX + name


def exported_series() -> set[str]:
    """Every series name a Prometheus scraping Ray sees for PodPulse's metrics."""
    names = set()
    for s in METRICS.values():
        base = exported_name(s.name)
        names |= {base + x for x in ("_bucket", "_sum", "_count")} if s.kind == "histogram" else {base}
    return names


_lock = threading.Lock()
_made: dict = {}


def _metric(name: str):
    """The process's one metric object for ``name``, created on first use."""
    m = _made.get(name)
    if m is None:
        with _lock:
            m = _made.get(name)
            if m is None:
                s = METRICS[name]
                if s.kind == "counter":
                    m = rm.Counter(s.name, s.description, s.tag_keys)
                elif s.kind == "gauge":
                    m = rm.Gauge(s.name, s.description, s.tag_keys)
                else:
                    m = rm.Histogram(s.name, s.description, list(s.boundaries), s.tag_keys)
                _made[name] = m
    return m


# -- the ingest pipeline (one call per batch) --------------------------------------------------

def partition_counts(partitions: np.ndarray) -> dict[int, int]:
    """How many of a batch's messages each partition holds."""
    counts = np.bincount(partitions) if len(partitions) else np.zeros(0, np.int64)
    return {p: n for p, n in enumerate(counts.tolist()) if n}


def _per_partition(name: str, topic: str, counts: Mapping[int, int]) -> None:
    m = _metric(name)
    for p, n in counts.items():
        if n > 0:
            m.inc(n, {"topic": topic, "partition": str(p)})


def events_consumed(topic: str, counts: Mapping[int, int]) -> None:
    _per_partition("podpulse_events_consumed_total", topic, counts)


def events_stored(topic: str, counts: Mapping[int, int]) -> None:
    _per_partition("podpulse_events_stored_total", topic, counts)


def events_dead_lettered(topic: str, partitions: Iterable[int]) -> None:
    """``partitions``: the source partition of each dead letter."""
    _per_partition("podpulse_events_dead_lettered_total", topic, _Tally(partitions))


def consumer_lag(topic: str, lag: Mapping[int, int]) -> None:
    m = _metric("podpulse_consumer_lag")
    for p, n in lag.items():
        m.set(n, {"topic": topic, "partition": str(p)})


def backend_label(config) -> str:
    """``backend`` label of a storage configuration: its backend types, time-series store first,
    e.g. ``duckdb`` or ``cassandra+postgresql``."""
    types = [config.type_of(k) for k in ("raw_events", "offsets")]
    return types[0] if types[0] == types[1] else "+".join(types)


def batch_written(backend: str, seconds: float, applied: int, replayed: int) -> None:
    _metric("podpulse_batch_write_seconds").observe(seconds, {"backend": backend})
    written = _metric("podpulse_events_written_total")
    for outcome, n in (("applied", applied), ("replayed", replayed)):
        if n > 0:
            written.inc(n, {"backend": backend, "outcome": outcome})


def write_failed(backend: str) -> None:
    _metric("podpulse_write_errors_total").inc(1, {"backend": backend})


def failure(component: str, cause: str) -> None:
    _metric("podpulse_failures_total").inc(1, {"component": component, "cause": cause})


# -- serving -------------------------------------------------------------------------------------

def scoring_latency(endpoint: str, seconds: float) -> None:
    """``endpoint``: the route, e.g. ``/v1/battery/score``."""
    _metric("podpulse_scoring_latency_seconds").observe(seconds, {"endpoint": endpoint})


_anomalous: dict[str, tuple[str, set[str]]] = {}  # model -> (version, regions set)


def anomalous_devices(model: str, version: str, counts: Mapping[str, int]) -> None:
    """``counts``: distinct flagged devices of the version this process serves now, per region
    (``NSW-urban``, ...). The series set for the version it served before go to 0."""
    m = _metric("podpulse_anomalous_devices")
    with _lock:
        old = _anomalous.get(model)
        _anomalous[model] = (version, set(counts))
    if old is not None:
        old_version, old_regions = old
        for region in old_regions - (set(counts) if old_version == version else set()):
            m.set(0, {"model": model, "version": old_version, "region": region})
    for region, n in counts.items():
        m.set(int(n), {"model": model, "version": version, "region": region})


_current_version: dict[str, str] = {}


def model_version(model: str, version: str) -> None:
    """The version this process serves now: 1 for it, 0 for the one it replaces."""
    m = _metric("podpulse_model_info")
    with _lock:
        old = _current_version.get(model)
        _current_version[model] = version
    if old is not None and old != version:
        m.set(0, {"model": model, "version": old})
    m.set(1, {"model": model, "version": version})


_regressed: set[tuple[str, str, str]] = set()  # (model, firmware, baseline) set above 0


def firmware_regressions(findings) -> None:
    """The regressions among ``findings`` (mappings with model, firmware, baseline_firmware,
    drain_change, regression): their drain change; the ones set before and not found now go to 0."""
    m = _metric("podpulse_firmware_regression")
    now = {(f["model"], f["firmware"], f["baseline_firmware"]): float(f["drain_change"]) for f in findings
           if f["regression"]}
    with _lock:
        gone = _regressed - set(now)
        _regressed.clear()
        _regressed.update(now)
    for model, firmware, baseline in gone:
        m.set(0.0, {"model": model, "firmware": firmware, "baseline": baseline})
    for (model, firmware, baseline), change in now.items():
        m.set(change, {"model": model, "firmware": firmware, "baseline": baseline})


_drifted: dict[str, tuple[str, set[str]]] = {}  # model -> (version, features) of feature_drift's last call


def feature_drift(model: str, version: str, psi: Mapping[str, float]) -> None:
    """PSI per feature of a model version (``drift_report(...)["features"]``).

    Call it from a process that stays up (a Serve replica, a detached actor): a
    process's gauges disappear about two report intervals after it ends, so a
    short-lived CLI process (``podpulse drift``) is the wrong place to set them. The series of the
    version set before for ``model`` go to 0: the alert must not fire for a version no longer served."""
    m = _metric("podpulse_feature_drift_psi")
    with _lock:
        old = _drifted.get(model)
        _drifted[model] = (version, set(psi))
    if old is not None and old[0] != version:
        for feature in old[1]:
            m.set(0.0, {"model": model, "version": old[0], "feature": feature})
    for feature, value in psi.items():
        m.set(float(value), {"model": model, "version": version, "feature": feature})


def tokens_file_readable(ok: bool) -> None:
    _metric("podpulse_api_tokens_file_readable").set(1 if ok else 0)


def exact_read(who: str, what: str) -> None:
    _metric("podpulse_exact_reads_total").inc(1, {"who": who, "what": what})


def epsilon_spent(token: str, epsilon: float) -> None:
    _metric("podpulse_privacy_epsilon_spent_total").inc(epsilon, {"token": token})


def budget_refused(token: str) -> None:
    _metric("podpulse_privacy_budget_refused_total").inc(1, {"token": token})
