"""Ingest throughput: Kafka → durable store with offsets stored, beside the raw consume ceiling.

In one run:

1. preload a topic (default 1,000,000 simulated events, 8 partitions) on the
   embedded broker (or ``--bootstrap``);
2. baseline: confluent-kafka reads the same topic with no processing at all;
3. the whole pipeline (Ray supervisor, partition consumers, storage writer)
   into a fresh embedded store, until every event is durable and its offset
   stored;
4. lost and duplicated events: distinct (device_id, seq) in the store against
   what was produced; peak RSS of the driver plus every Ray process; their CPU
   seconds per million events, and bytes per event on the wire and in the store
   (the figures that carry across machines).

    podpulse bench ingest --events 1000000 --json
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import psutil
from confluent_kafka import Consumer, Producer, TopicPartition

from actors.config import IngestConfig
from jobs.ingest import run_ingest
from podpulse.broker import EmbeddedBroker
from podpulse.kafka import client_config, ensure_topic, flush, produce, producer_config
from podpulse.runtime import init_ray
from storage.config import StorageConfig
from storage.reader import run_queries
from storage.router import count_events, scratch
from testbed.topics import first_events


def preload(bootstrap: str, topic: str, events: int, partitions: int, seed: int = 7, shape: str = "event") -> dict:
    """Produce ``events`` simulated events (for uploads: the whole uploads that hold the first ``events``),
    each a distinct (device_id, seq); returns the events, messages and bytes of keys and values produced."""
    ensure_topic(client_config(bootstrap), topic, partitions)
    producer = Producer(producer_config(bootstrap))
    made = {"events": 0, "messages": 0, "bytes": 0}
    for keys, values, per in first_events(events, shape, seed):
        produce(producer, topic, keys, values)
        made["bytes"] += sum(map(len, keys)) + sum(map(len, values))
        made["messages"] += len(values)
        made["events"] += int(per.sum())
    flush(producer)
    return made


def raw_consume(bootstrap: str, topic: str, partitions: int, events: int) -> float:
    """Messages/s of confluent-kafka reading the topic's first ``events`` messages with no processing."""
    consumer = Consumer({**client_config(bootstrap), "group.id": "bench-raw",
                         "enable.auto.commit": False, "fetch.max.bytes": 64 * 1024 * 1024})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    seen, started = 0, time.perf_counter()
    while seen < events:
        seen += len(consumer.consume(20_000, 1.0))
    elapsed = time.perf_counter() - started
    consumer.close()
    return events / elapsed


class Usage:
    """Samples this process and all its descendants (Ray's included), minus excluded pids: the peak of
    their summed RSS, and the CPU seconds (user + system) they spent while sampled. A process's CPU is
    its last sample's less its first (0 for one born meanwhile): one that ends between two samples
    loses at most a period's worth.

    The RSS is also split, per sample, into the pipeline's (the driver and the ingest actors' processes,
    which Ray titles ``ray::ROLE``) and Ray's own (raylet, GCS, dashboard, idle workers): ``series``
    holds (seconds since start, pipeline bytes, Ray's bytes) per sample."""

    def __init__(self, exclude: set[int], period_s: float = 0.2):
        self.exclude, self.period_s, self.peak = exclude, period_s, 0
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._pipeline: set[int] = {os.getpid()}
        self.series: list[tuple[float, int, int]] = []
        self._t0 = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _is_pipeline(self, p: psutil.Process) -> bool:
        if p.pid not in self._pipeline:
            title = " ".join(p.cmdline())
            if not any(title.startswith(f"ray::{r}") for r in ROLES):
                return False
            self._pipeline.add(p.pid)  # an actor's process stays its actor's
        return True

    def _sample(self, first: bool = False) -> int:
        me = psutil.Process()
        total = pipeline = 0
        for p in [me, *me.children(recursive=True)]:
            if p.pid in self.exclude:
                continue
            try:
                with p.oneshot():
                    rss = p.memory_info().rss
                    times = p.cpu_times()
                ours = self._is_pipeline(p)
            except psutil.Error:
                continue
            total += rss
            pipeline += rss if ours else 0
            cpu = times.user + times.system
            self._first.setdefault(p.pid, cpu if first else 0.0)
            self._last[p.pid] = cpu
        self.series.append((time.perf_counter() - self._t0, pipeline, total - pipeline))
        return total

    @property
    def cpu_s(self) -> float:
        return sum(self._last[pid] - self._first[pid] for pid in self._last)

    def memory(self, until_s: float) -> dict:
        """Peaks of the pipeline's RSS and of Ray's own (MB), and the pipeline's slope (MB per minute,
        least squares over the second half of the first ``until_s`` seconds: after start-up, while the
        backlog drains, before the shutdown)."""
        t, pipeline, ray_own = (np.array(c, dtype=np.float64) for c in zip(*self.series))
        late = (t >= until_s / 2) & (t <= until_s)
        slope = np.polyfit(t[late], pipeline[late], 1)[0] * 60 / 2**20 if late.sum() >= 3 else None
        return {"pipeline_peak_rss_mb": round(pipeline.max() / 2**20), "ray_peak_rss_mb": round(ray_own.max() / 2**20),
                "pipeline_rss_slope_mb_per_min": None if slope is None else round(float(slope), 1)}

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.peak = max(self.peak, self._sample())

    def __enter__(self) -> "Usage":
        self._t0 = time.perf_counter()
        self.peak = self._sample(first=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())


ROLES = ("ShardConsumer", "Writer", "Supervisor")  # the ingest actors' classes (actors/), which py-spy records


class Profiles:
    """py-spy (``record --nonblocking``, speedscope format) on the driver and on each ingest actor's
    process as it appears (Ray titles it ``ray::ROLE...``), into ``directory``; stopped with SIGINT on
    exit, which makes py-spy write its file. ``top()``: each file's functions by own samples."""

    def __init__(self, directory: Path, period_s: float = 0.2):
        self.directory, self.period_s = Path(directory), period_s
        self.recorders: dict[int, tuple[str, subprocess.Popen, Path]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _start(self, pid: int, role: str) -> None:
        out = self.directory / f"{role}-{pid}.speedscope.json"
        proc = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(pid),
                                 "--format", "speedscope", "--rate", "100", "--nonblocking", "-o", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.recorders[pid] = (role, proc, out)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            for child in psutil.Process().children(recursive=True):
                if child.pid in self.recorders:
                    continue
                try:
                    title = " ".join(child.cmdline())
                except psutil.Error:
                    continue
                role = next((r for r in ROLES if title.startswith(f"ray::{r}")), None)
                if role:
                    self._start(child.pid, role)

    def __enter__(self) -> "Profiles":
        self.directory.mkdir(parents=True, exist_ok=True)
        self._start(os.getpid(), "driver")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        for _, proc, _ in self.recorders.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for _, proc, _ in self.recorders.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()

    def top(self, n: int = 6) -> list[dict]:
        """Per recorded process: its role, file, the seconds py-spy saw its threads active (idle ones are
        not sampled), and the ``n`` functions with the largest share of them as the innermost frame."""
        out = []
        for role, _, path in self.recorders.values():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            frames = data["shared"]["frames"]
            own: dict[str, float] = {}
            total = 0.0
            for profile in data["profiles"]:
                for stack, weight in zip(profile["samples"], profile["weights"]):
                    total += weight
                    if stack:
                        f = frames[stack[-1]]
                        key = f"{f['name']} ({Path(f.get('file', '?')).name}:{f.get('line', '?')})"
                        own[key] = own.get(key, 0.0) + weight
            best = sorted(own.items(), key=lambda kv: -kv[1])[:n]
            out.append({"role": role, "file": str(path), "active_s": round(total, 1),
                        "top_own": [{"function": k, "share": round(v / total, 3)} for k, v in best] if total else []})
        return sorted(out, key=lambda r: (r["role"], r["file"]))


@contextmanager
def bench_storage(storage_file, tmp: str):
    """The store to measure, empty: a temporary DuckDB file, or beside each backend of ``--storage-config``
    a scratch namespace (a DuckDB file with its settings, a PostgreSQL schema, a Cassandra keyspace;
    ``storage.router.scratch``), dropped at the end."""
    if storage_file is None:
        yield StorageConfig.embedded(Path(tmp) / "bench.duckdb")
        return
    with scratch(StorageConfig.load(storage_file), tmp, prefix="podpulse_bench") as config:
        yield config


def stored_events(storage: StorageConfig) -> tuple[int, int, int]:
    """Raw event rows, distinct (device_id, seq) among them, and the events the rollups counted."""
    rows, distinct = count_events(storage)
    counted = run_queries(storage, {"devices": "SELECT sum(events) FROM devices"})["devices"][0][0]
    return rows, distinct, int(counted or 0)


def run(events: int = 1_000_000, partitions: int = 8, consumers: int = 0, writers: int = 1, batch_size: int = 20_000,
        bootstrap: str | None = None, storage_file: str | None = None, profile: Path | None = None,
        shape: str = "event") -> dict:
    """``shape``: ``event`` (one sample per message) or ``upload`` (50-sample device uploads; the raw
    consume baseline then counts the same uploads' samples). ``profile``: a directory for py-spy's speedscope files of the driver and each ingest actor (the
    result then names their busiest functions; sampling costs the pipeline a little CPU)."""
    broker = None if bootstrap else EmbeddedBroker().start()
    try:
        bootstrap = bootstrap or broker.bootstrap
        topic = f"bench-ingest-{int(time.time())}"
        # in a child process that exits before measuring: the driver's RSS is then the pipeline's
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            made = pool.submit(preload, bootstrap, topic, events, partitions, shape=shape).result()
        events, messages = made["events"], made["messages"]
        raw_messages = raw_consume(bootstrap, topic, partitions, messages)
        raw = raw_messages * events / messages  # events/s: the samples those messages carry
        init_ray()
        with tempfile.TemporaryDirectory(prefix="podpulse-bench-") as tmp, \
                bench_storage(storage_file, tmp) as storage:
            config = IngestConfig(bootstrap=bootstrap, topic=topic, consumers=consumers, writers=writers,
                                  batch_size=batch_size, storage=storage)
            exclude = {broker._proc.pid} if broker else set()
            first_progress = []

            def watch(status: dict) -> None:
                if not first_progress and 0 < status["total_lag"] < events:
                    first_progress.append(time.perf_counter())

            profiles = Profiles(profile) if profile else None
            with Usage(exclude) as rss, (profiles or nullcontext()):
                started, wall_started = time.perf_counter(), time.time()
                result = run_ingest(config, until_caught_up=True, poll_s=0.5, on_status=watch)
                total = time.perf_counter() - started
            # until every event was durable with its offsets (the shutdown after it is not ingest)
            elapsed = result["caught_up_at"] - wall_started
            startup = (first_progress[0] if first_progress else started) - started
            rows, distinct, counted = stored_events(storage)
            store_file = Path(tmp) / "bench.duckdb"
            stored_bytes = (store_file.stat().st_size + (store_file.with_name(store_file.name + ".wal").stat().st_size
                            if store_file.with_name(store_file.name + ".wal").exists() else 0)
                            if storage_file is None else None)
        return {
            "shape": shape,
            "events": events,
            "messages": messages,
            "events_per_s": round(events / elapsed),
            "messages_per_s": round(messages / elapsed),
            "raw_consume_events_per_s": round(raw),
            "raw_consume_messages_per_s": round(raw_messages),
            "ratio": round(events / elapsed / raw, 3),
            "lost": events - distinct,
            "duplicated": rows - distinct,
            "double_counted": counted - distinct,  # events the rollups counted more than once
            "peak_rss_mb": round(rss.peak / 2**20),
            **rss.memory(until_s=elapsed),
            # what carries across machines: CPU per million events (the driver and every Ray process, the
            # broker left out, over the run and its shutdown), and bytes per event on the wire and stored
            "cpu_s_per_million_events": round(rss.cpu_s / events * 1e6, 1),
            "message_bytes_per_event": round(made["bytes"] / events, 1),
            "stored_bytes_per_event": round(stored_bytes / events, 1) if stored_bytes is not None else None,
            "seconds": round(elapsed, 2),
            "seconds_with_shutdown": round(total, 2),
            "startup_s": round(startup, 2),  # until the first batch was durable (Ray actors starting)
            "partitions": partitions,
            "consumers": result["consumers"],
            "writers": writers,
            "batch_size": batch_size,
            "write_seconds": result["writer"]["write_seconds"],
            "store": "embedded DuckDB" if storage_file is None else str(storage_file),
            "broker": "embedded Tansu" if broker else bootstrap,
        } | ({"profiles": profiles.top()} if profiles else {})
    finally:
        if broker:
            broker.stop()
