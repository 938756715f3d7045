"""The national fleet's busiest hour, ingested live on this machine: is the lag bounded?

1. The peak rate: a sample fleet (``--sample-devices`` over a week) gives the
   simulator's busiest hour in events per device; times ``--devices`` (the
   fleet to size for) that is the events/s to sustain.
2. A producer paces simulated messages (single events or device uploads) at
   that rate into a new topic for ``--minutes``, while the ingest pipeline runs
   beside it on the same cores (embedded broker and store by default).
3. Every second: the lag, exact, as messages acknowledged by the broker less the
   offsets stored with the data. The result gives the lag's maximum, its last
   value, the slope of the second half (messages per minute: bounded is ~0)
   and the events/s achieved, beside the rate asked for.

    podpulse bench peak --devices 3000000 --minutes 10 --shape upload --json
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import ray
from confluent_kafka import Producer

from actors.config import IngestConfig
from actors.supervisor import IngestSupervisor
from podpulse.broker import EmbeddedBroker
from podpulse.kafka import client_config, ensure_topic, producer_config
from podpulse.runtime import init_ray
from podpulse.simulator import Fleet, FleetSpec, simulate
from storage.config import StorageConfig
from testbed.topics import first_events

DAY_H = 24


def peak_events_per_device_s(sample_devices: int, seed: int = 7) -> tuple[float, float]:
    """(busiest hour, mean hour) of a simulated week, in events per device per second."""
    spec = FleetSpec(devices=sample_devices, hours=7 * DAY_H, seed=seed, fault_share=0.0)
    per_hour = np.zeros(7 * DAY_H)
    steps_per_hour = 3600 // spec.interval_s
    for chunk in simulate(spec, Fleet.build(spec)):
        per_hour[chunk.step // steps_per_hour] += len(chunk.values)
    return per_hour.max() / 3600 / sample_devices, per_hour.mean() / 3600 / sample_devices


def messages(shape: str, events: int, seed: int = 8) -> tuple[list[tuple[bytes, bytes]], list[int]]:
    """At least ``events`` simulated events as (key, value) messages, with each message's event count."""
    out, sizes = [], []
    for keys, values, counts in first_events(events, shape, seed):
        out.extend(zip(keys, values))
        sizes.extend(counts.tolist())
    return out, sizes


class Pacer(threading.Thread):
    """Produces the messages at ``rate`` events/s (in 50 ms steps) and counts what the broker acknowledged."""

    def __init__(self, bootstrap: str, topic: str, batch: list[tuple[bytes, bytes]], sizes: list[int],
                 rate: float, seconds: float):
        super().__init__(daemon=True)
        self.producer = Producer(producer_config(bootstrap))
        self.topic, self.batch, self.sizes, self.rate, self.seconds = topic, batch, sizes, rate, seconds
        self.acked = self.events = self.sent = 0
        self.done = threading.Event()

    def _ack(self, err, _msg) -> None:
        if err is None:
            self.acked += 1

    def run(self) -> None:
        started, i = time.monotonic(), 0
        while i < len(self.batch) and (elapsed := time.monotonic() - started) < self.seconds:
            due = self.rate * elapsed  # events that should have been sent by now
            while i < len(self.batch) and self.events < due:
                key, value = self.batch[i]
                try:
                    self.producer.produce(self.topic, value, key, on_delivery=self._ack)
                except BufferError:
                    break
                self.events += self.sizes[i]
                i += 1
            self.producer.poll(0.05)
        self.sent = i
        self.producer.flush(60)
        self.done.set()


def run(devices: int = 3_000_000, minutes: float = 10.0, shape: str = "upload", sample_devices: int = 5_000,
        partitions: int = 8, consumers: int = 0, bootstrap: str | None = None) -> dict:
    peak, mean = peak_events_per_device_s(sample_devices)
    rate = peak * devices
    seconds = minutes * 60
    batch, sizes = messages(shape, int(rate * seconds * 1.02) + 1)
    broker = None if bootstrap else EmbeddedBroker().start()
    try:
        bootstrap = bootstrap or broker.bootstrap
        topic = f"bench-peak-{int(time.time())}"
        ensure_topic(client_config(bootstrap), topic, partitions)
        init_ray()
        with tempfile.TemporaryDirectory(prefix="podpulse-peak-") as tmp:
            config = IngestConfig(bootstrap=bootstrap, topic=topic, consumers=consumers,
                                  storage=StorageConfig.embedded(Path(tmp) / "peak.duckdb")).with_pseudonym_key()
            supervisor = IngestSupervisor.remote(config)
            done = supervisor.run.remote(until_caught_up=False)
            writer = None
            while writer is None:
                writer = ray.get(supervisor.handles.remote())["writer"]
                time.sleep(0.2)
            ray.get(writer.committed_offsets.remote(topic))  # the store is open: the pipeline is up
            pacer = Pacer(bootstrap, topic, batch, sizes, rate, seconds)
            started = time.monotonic()
            pacer.start()
            lag: list[tuple[float, int]] = []
            while not pacer.done.is_set() or (lag and lag[-1][1] > 0 and time.monotonic() - started < seconds + 120):
                time.sleep(1.0)
                stored = sum(ray.get(writer.committed_offsets.remote(topic)).values())
                lag.append((time.monotonic() - started, max(0, pacer.acked - stored)))
            ray.get(supervisor.stop.remote())
            summary = ray.get(done)
            ray.kill(supervisor)
        t, waiting = (np.array(c, dtype=np.float64) for c in zip(*lag))
        during = t <= seconds
        late = during & (t >= seconds / 2)
        slope = float(np.polyfit(t[late], waiting[late], 1)[0] * 60) if late.sum() >= 3 else None
        produced_events = pacer.events
        return {
            "devices": devices, "shape": shape, "minutes": minutes,
            "peak_events_per_device_hour": round(peak * 3600, 3), "mean_events_per_device_hour": round(mean * 3600, 3),
            "peak_factor": round(peak / mean, 2),
            "rate_asked_events_per_s": round(rate), "rate_produced_events_per_s": round(produced_events / seconds),
            "messages_produced": pacer.sent, "events_produced": produced_events,
            "lag_max_messages": int(waiting[during].max()), "lag_p50_messages": int(np.median(waiting[during])),
            "lag_slope_messages_per_min": None if slope is None else round(slope, 1),
            "lag_at_end_messages": int(waiting[-1]), "drained_s_after_end": round(float(t[-1] - seconds), 1),
            "dead_lettered": summary["dead_lettered"], "restarts": summary["restarts"],
            "stored_events": summary["writer"].get("applied", 0),
        }
    finally:
        if broker:
            broker.stop()
