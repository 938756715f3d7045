"""Driver side of the ingest pipeline: start Ray, run the supervisor, report progress."""

from __future__ import annotations

from typing import Callable

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.config import IngestConfig
from actors.supervisor import IngestSupervisor
from podpulse.runtime import init_ray

__all__ = ["run_ingest"]


def run_ingest(config: IngestConfig, *, until_caught_up: bool,
               on_status: Callable[[dict], None] | None = None, poll_s: float = 1.0) -> dict:
    """Run the pipeline; returns the supervisor's final summary. Ctrl-C stops it cleanly."""
    config = config.with_pseudonym_key()  # a missing or bad key fails here, before Ray starts
    init_ray()
    # beside this driver: a worker node lost takes consumers and writers, which the supervisor
    # replaces, never the supervisor itself (it asks for no CPU, so Ray could put it anywhere)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    supervisor = IngestSupervisor.options(scheduling_strategy=here).remote(config)
    done = supervisor.run.remote(until_caught_up=until_caught_up)
    try:
        while True:
            ready, _ = ray.wait([done], timeout=poll_s)
            if ready:
                return ray.get(done)
            if on_status:
                on_status(ray.get(supervisor.status.remote()))
    except KeyboardInterrupt:
        ray.get(supervisor.stop.remote())
        return ray.get(done)
    finally:
        ray.kill(supervisor)
