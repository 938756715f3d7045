"""podpulse bench without the bench extra: one line naming what to install."""

import importlib

import pytest

import bench.cli
from podpulse.errors import ConfigError


def test_a_missing_benchmark_library_is_named_with_the_extra_that_brings_it(monkeypatch):
    real = importlib.import_module

    def without_aiohttp(name, *args):
        if name == "bench.serve":
            raise ModuleNotFoundError("No module named 'aiohttp'", name="aiohttp")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_aiohttp)
    with pytest.raises(ConfigError, match=r"podpulse bench serve needs aiohttp: pip install 'podpulse\[bench\]'"):
        bench.cli._module("serve")
    assert bench.cli._module("simulate").run  # the others still load
