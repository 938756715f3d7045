"""Report latency: the full JSON report over a 20,000-device × 7-day fleet in the embedded store
(or in a throwaway PostgreSQL schema, ``--storage-config``, raw events in PostgreSQL too).

Setup (not timed): simulate the fleet, decode it and commit it straight into a
fresh store in 100k-event transactions (the pipeline's own write path,
without Kafka and Ray). Then, in the same run:

- baseline: one scan of every raw event (``SELECT sum(playback_s) FROM events``);
- figure: every analytics query, serialised to JSON, as ``podpulse report --format json``.

    podpulse bench report [--devices 200000] [--storage-config examples/postgres.yaml] --json
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np

from analytics.queries import data_range, device_timeline, full_report
from bench.ingest import bench_storage
from podpulse.errors import StorageError
from storage.config import StorageConfig
from storage.reader import open_reader
from testbed.stores import build_store


def run(devices: int = 20_000, days: int = 7, repeat: int = 3, storage_file: str | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="podpulse-bench-report-") as tmp, \
            bench_storage(storage_file, tmp) as config:
        if config.routes["raw_events"] != config.routes["rollups"]:
            raise StorageError("bench report scans the raw events beside the report: keep them in the same store")
        config = StorageConfig(**{**config.as_dict(), "pseudonym_key_file": str(Path(tmp) / "pseudonym.key")})
        started = time.perf_counter()
        events = build_store(config, devices, days)
        setup = time.perf_counter() - started
        with open_reader(config) as reader:
            start, end = data_range(reader)
            scans, reports = [], []
            for _ in range(repeat):
                t = time.perf_counter()
                reader.rows("SELECT sum(playback_s) FROM events")
                scans.append(time.perf_counter() - t)
                t = time.perf_counter()
                report = json.dumps(full_report(reader, start, end), default=str)
                reports.append(time.perf_counter() - t)
            covered = json.loads(report)["events_covered"]
            # one device's last 30 days hour by hour (GET /v1/devices/{id}/timeline), beside the same
            # device's raw events read by key
            ids = [d for (d,) in reader.rows("SELECT device_id FROM devices ORDER BY device_id LIMIT 20")]
            timelines, raw_reads = [], []
            for device in ids:
                t = time.perf_counter()
                device_timeline(reader, device)
                timelines.append(time.perf_counter() - t)
                t = time.perf_counter()
                reader.rows(f"SELECT count(*), sum(playback_s) FROM events WHERE device_id = '{device}'")
                raw_reads.append(time.perf_counter() - t)
    return {
        "devices": devices, "days": days, "events_scanned": covered,
        "seconds": round(float(np.median(reports)), 3),  # median of `repeat` runs
        "raw_scan_seconds": round(float(np.median(scans)), 3),
        "timeline_ms_p50": round(float(np.median(timelines)) * 1000, 1),  # median over 20 devices
        "device_raw_read_ms_p50": round(float(np.median(raw_reads)) * 1000, 1),
        "setup_seconds": round(setup, 1), "events_stored": events, "report_bytes": len(report),
        "store": "embedded DuckDB" if storage_file is None else str(storage_file),
    }
