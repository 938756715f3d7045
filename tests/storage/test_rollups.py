"""The hourly rollup's temperature and charge columns (since migration 10) against a brute-force
recomputation from the events, one Python loop per device."""

from collections import defaultdict
from datetime import datetime, timezone

import pytest

from podpulse.contract import decode_batch
from podpulse.simulator import FleetSpec, simulate
from storage.rollups import hourly_rollup


def test_temperature_and_charge_per_device_hour_are_the_events():
    spec = FleetSpec(devices=60, hours=8, seed=4, start=datetime(2026, 11, 2, 22, tzinfo=timezone.utc), v2_share=0.5)  # 08:00 AEST
    events = decode_batch([v for c in simulate(spec) for v in c.values], window=None).table
    rows = hourly_rollup(events).to_pylist()
    got = {(r["device_id"], r["hour"]): r for r in rows}
    temp, samples, charge = defaultdict(float), defaultdict(int), defaultdict(float)
    by_device = defaultdict(list)
    for e in events.to_pylist():
        by_device[e["device_id"]].append(e)
        key = (e["device_id"], e["event_time"].replace(minute=0, second=0, microsecond=0))
        if (e["in_ear_left"] and e["in_ear_right"] and e["playback_s"] > 0
                and e["temp_left_c"] is not None and e["temp_right_c"] is not None):
            temp[key] += (e["temp_left_c"] + e["temp_right_c"]) / 2
            samples[key] += 1
    for device, seen in by_device.items():
        seen.sort(key=lambda e: e["seq"])
        for before, after in zip(seen, seen[1:]):
            if after["seq"] == before["seq"] + 1:
                key = (device, after["event_time"].replace(minute=0, second=0, microsecond=0))
                charge[key] += (max(after["battery_left"] - before["battery_left"], 0)
                                + max(after["battery_right"] - before["battery_right"], 0))
    assert sum(samples.values()) > 100 and sum(charge.values()) > 100  # both happen in these 8 hours
    for key, r in got.items():
        assert r["temp_samples"] == samples[key] and r["temp_c_sum"] == pytest.approx(temp[key])
        assert r["charge_pct"] == pytest.approx(charge[key])
