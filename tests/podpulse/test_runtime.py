"""The environment a local Ray starts with (podpulse.runtime)."""

import os
import socket
import subprocess
import sys

import pytest

from podpulse.runtime import HA_PROXY_ENV, SERVE_ENV, local_ray_env

HOST_PORTS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
              "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT")
HOST_KEYS = (*HOST_PORTS, "SERVE_SOCKET_REUSE_PORT_ENABLED")
DEFAULT_PORTS = {8404, 9101, 8500, 9500}


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


@pytest.fixture
def clean_env(monkeypatch):
    for key in [*HOST_KEYS, *SERVE_ENV, *HA_PROXY_ENV]:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_under_haproxy_a_local_ray_gets_ports_of_its_own_that_a_child_process_does_not_inherit(clean_env):
    """Two local Rays serving through HAProxy on one host (a demo beside a test session's Serve)
    collided on HAProxy's fixed stats port, and shared the fallback proxy's port 8500 through
    SO_REUSEPORT: a request reached the other Ray's application."""
    clean_env.setenv("RAY_SERVE_ENABLE_HA_PROXY", "1")
    with local_ray_env():
        seen = {key: os.environ[key] for key in [*HOST_KEYS, *SERVE_ENV]}
        child = subprocess.run([sys.executable, "-c", "import os; print(os.environ['RAY_SERVE_HAPROXY_STATS_PORT'])"],
                               capture_output=True, text=True, check=True).stdout.strip()
    assert {key: seen[key] for key in SERVE_ENV} == SERVE_ENV
    ports = [int(seen[key]) for key in HOST_PORTS]
    assert len(set(ports)) == len(ports) and not DEFAULT_PORTS & set(ports) and all(map(_bindable, ports))
    assert seen["SERVE_SOCKET_REUSE_PORT_ENABLED"] == "0"  # a clash fails instead of sharing connections
    assert child == seen["RAY_SERVE_HAPROXY_STATS_PORT"]  # what the Ray starting then inherits
    assert not any(key in os.environ for key in HOST_KEYS)  # a child started afterwards picks its own
    assert {key: os.environ[key] for key in SERVE_ENV} == SERVE_ENV  # drivers read these too


def test_with_serves_own_proxy_only_the_serve_settings_are_set(clean_env):
    with local_ray_env():
        assert not any(key in os.environ for key in HOST_KEYS)
        assert {key: os.environ[key] for key in SERVE_ENV} == SERVE_ENV


def test_a_setting_already_made_is_left_alone(clean_env):
    clean_env.setenv("RAY_SERVE_ENABLE_HA_PROXY", "1")
    clean_env.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "18404")
    clean_env.setenv("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", "1")
    with local_ray_env():
        assert os.environ["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404"
        assert os.environ["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] == "1"
    assert os.environ["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404"
