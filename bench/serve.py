"""Serving latency: POST /v1/battery/score through Ray Serve at a fixed request rate.

Setup (not timed): a small simulated fleet in a temporary store, a battery-anomaly
model trained on it, the PodPulse Serve application on a free local port. Then,
in the same run:

- baseline: the same one-row scoring called in-process (``direct_p50_ms``);
- figure: ``rate`` requests a second for ``seconds`` seconds, open loop: each request
  is sent at its scheduled time whether or not earlier ones have answered, and its
  latency runs from that scheduled time (a slow server cannot hide queueing by
  slowing the client down). p50/p99 latency and the rate achieved;
- batch scoring: requests of ``batch_rows`` rows (1,000, the most a request may carry)
  from ``batch_clients`` senders back to back for as long, rows/s, beside the same
  rows scored in-process (``direct_batch_rows_per_s``).

The client (one asyncio loop, keep-alive connections) runs on the same 2-core
machine as Ray Serve, so its CPU is part of what is measured.

    podpulse bench serve --json
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np
import ray
from ray import serve

from analytics.battery_model import load, score_rows
from deployments.app import run_local
from jobs.train import train_battery_anomaly
from podpulse.broker import free_port
from podpulse.runtime import HA_PROXY_ENV, init_ray
from storage.config import StorageConfig
from testbed.api import ROW
from testbed.stores import build_store

TOKEN = "bench-admin-token-of-24-characters-or-more"


async def open_loop(url: str, body: dict, headers: dict, rate: float, seconds: float) -> tuple[np.ndarray, int, float]:
    """Latencies (s, from each request's scheduled time), errors, and the wall time it took."""
    n = int(rate * seconds)
    latencies, errors = np.zeros(n), 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=512)) as session:
        async def one(i: int, at: float) -> None:
            nonlocal errors
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            try:
                async with session.post(url, json=body, headers=headers) as r:
                    await r.read()
                    errors += r.status != 200
            except aiohttp.ClientError:
                errors += 1
            latencies[i] = time.perf_counter() - at

        start = time.perf_counter() + 0.1
        await asyncio.gather(*(one(i, start + i / rate) for i in range(n)))
        return latencies, errors, time.perf_counter() - start


async def closed_loop(url: str, body: dict, headers: dict, clients: int, seconds: float) -> tuple[np.ndarray, int, float]:
    """``clients`` senders, each posting ``body`` again as soon as it is answered, for ``seconds``: the
    latencies of the requests answered, the errors, and the wall time."""
    latencies, errors = [], 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:
        async def sender(end: float) -> None:
            nonlocal errors
            while time.perf_counter() < end:
                t = time.perf_counter()
                try:
                    async with session.post(url, json=body, headers=headers) as r:
                        await r.read()
                        errors += r.status != 200
                except aiohttp.ClientError:
                    errors += 1
                latencies.append(time.perf_counter() - t)

        start = time.perf_counter()
        await asyncio.gather(*(sender(start + seconds) for _ in range(clients)))
        return np.array(latencies), errors, time.perf_counter() - start


def run(rate: int = 200, seconds: float = 10.0, devices: int = 300, days: int = 3, batch_rows: int = 1000,
        batch_clients: int = 4) -> dict:
    # HAProxy as the RayService runs it (RAY_SERVE_ENABLE_HA_PROXY=0 measures Serve's own proxy); before
    # anything starts Ray (training does): Ray's processes read it when they start
    for key, value in HA_PROXY_ENV.items():
        os.environ.setdefault(key, value)
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
        ingress = _ingress()
        base = run_local(storage.as_dict(), str(Path(tmp) / "models"), TOKEN, port=free_port(),
                         name="podpulse-bench")
        url, headers = f"{base}/v1/battery/score", {"Authorization": f"Bearer {TOKEN}"}
        asyncio.run(open_loop(url, {"rows": [ROW]}, headers, 20, 2))  # warm up: connections, first batches
        latencies, errors, elapsed = asyncio.run(open_loop(url, {"rows": [ROW]}, headers, rate, seconds))
        # batch scoring: requests of batch_rows rows from batch_clients senders, beside the same rows in-process
        rows = [dict(ROW, drain_left_pct=ROW["drain_left_pct"] + i % 7) for i in range(batch_rows)]
        t = time.perf_counter()
        for _ in range(5):
            score_rows(model, rows)
        direct_batch = 5 * batch_rows / (time.perf_counter() - t)
        batch, batch_errors, batch_elapsed = asyncio.run(
            closed_loop(url, {"rows": rows}, headers, batch_clients, seconds))
        serve.delete("podpulse-bench")
    ms = latencies * 1000
    return {
        "rate_requested": rate, "requests": len(ms), "errors": errors,
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "rps": round(len(ms) / elapsed, 1),
        "direct_p50_ms": round(float(np.percentile(np.array(direct) * 1000, 50)), 2),
        "batch_rows": batch_rows, "batch_clients": batch_clients, "batch_requests": len(batch),
        "batch_errors": batch_errors, "batch_rows_per_s": round(len(batch) * batch_rows / batch_elapsed),
        "batch_p50_ms": round(float(np.percentile(batch * 1000, 50)), 1) if len(batch) else None,
        "direct_batch_rows_per_s": round(direct_batch),
        "model_version": trained["version"], "ingress": ingress,
    }


def _ingress() -> str:
    """The HTTP ingress of the running Ray's Serve, as its processes see it (not this driver: once
    training started Ray before the setting was made, and HAProxy was silently not measured)."""
    setting = ray.get(ray.remote(num_cpus=0)(lambda: os.environ.get("RAY_SERVE_ENABLE_HA_PROXY")).remote())
    return "HAProxy" if setting == "1" else "Serve's proxy"
