"""Serving latency: POST /v1/battery/score through Ray Serve at a fixed request rate.

Setup (not timed): a small simulated fleet in a temporary store, a battery-anomaly
model trained on it, the PodPulse Serve application on a free local port. Then,
in the same run:

- baseline: the same one-row scoring called in-process (``direct_p50_ms``);
- figure: ``rate`` requests a second for ``seconds`` seconds, each sent on its
  schedule from a thread pool; p50/p99 latency and the rate achieved.

    podpulse bench serve --json
"""

from __future__ import annotations

import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests

ROW = {"model": "AirPods Pro 2", "firmware": "7A294", "playback_h": 0.8, "anc": 0.5, "adaptive": 0.1,
       "transparency": 0.1, "output_dba": 70.0, "drain_left_pct": 18.0, "drain_right_pct": 17.0}
TOKEN = "bench-token"


def run(rate: int = 200, seconds: float = 10.0, devices: int = 300, days: int = 3) -> dict:
    from ray import serve

    from bench.report import build_store
    from deployments.app import build
    from podpulse.battery_model import load, score_rows
    from podpulse.broker import free_port
    from podpulse.ingest import init_ray
    from podpulse.train import train_battery_anomaly
    from storage.router import StorageConfig

    with tempfile.TemporaryDirectory(prefix="podpulse-bench-serve-") as tmp:
        storage = StorageConfig.embedded(Path(tmp) / "s.duckdb")
        build_store(Path(tmp) / "s.duckdb", devices, days)
        trained = train_battery_anomaly(storage, registry=Path(tmp) / "models", epochs=2)
        model = load(trained["path"])
        direct = []
        for _ in range(200):
            t = time.perf_counter()
            score_rows(model, [ROW])
            direct.append(time.perf_counter() - t)

        init_ray()
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build(storage.as_dict(), registry=str(Path(tmp) / "models"),
                        env={"PODPULSE_API_TOKEN": TOKEN}), name="podpulse-bench", route_prefix="/")
        url = f"http://127.0.0.1:{port}/v1/battery/score"
        session = requests.Session()
        headers = {"Authorization": f"Bearer {TOKEN}"}
        for _ in range(20):  # warm up
            session.post(url, json={"rows": [ROW]}, headers=headers).raise_for_status()

        def one(at: float) -> tuple[float, bool]:
            time.sleep(max(0.0, at - time.perf_counter()))
            t = time.perf_counter()
            ok = requests.post(url, json={"rows": [ROW]}, headers=headers, timeout=30).status_code == 200
            return time.perf_counter() - t, ok

        n = int(rate * seconds)
        start = time.perf_counter() + 0.2
        with ThreadPoolExecutor(max_workers=64) as pool:
            results = list(pool.map(one, [start + i / rate for i in range(n)]))
        elapsed = time.perf_counter() - start
        serve.delete("podpulse-bench")
    latencies = np.array([r[0] for r in results]) * 1000
    return {
        "rate_requested": rate, "requests": n, "errors": int(sum(not r[1] for r in results)),
        "p50_ms": round(float(np.percentile(latencies, 50)), 2),
        "p99_ms": round(float(np.percentile(latencies, 99)), 2),
        "rps": round(n / elapsed, 1),
        "direct_p50_ms": round(float(np.percentile(np.array(direct) * 1000, 50)), 2),
        "model_version": trained["version"],
    }
