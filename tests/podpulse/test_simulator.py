from datetime import datetime, timedelta, timezone

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from podpulse import geo
from podpulse.contract import decode_batch
from podpulse.simulator import (
    FAULT_SIZE,
    FIRMWARE,
    STRONG_FAULTS,
    SUBTLE_FAULTS,
    Fleet,
    FleetSpec,
    Summary,
    allocate,
    default_start,
    fault_mix,
    simulate,
)

UTC = timezone.utc


def run(spec: FleetSpec):
    fleet = Fleet.build(spec)
    summary = Summary(fleet)
    chunks = []
    for chunk in simulate(spec, fleet):
        summary.add(chunk)
        chunks.append(chunk)
    return fleet, summary, chunks


@pytest.fixture(scope="module")
def day():
    """2,000 devices over two weekdays, decoded once for all the checks below."""
    spec = FleetSpec(devices=2000, hours=48, seed=11)
    fleet, summary, chunks = run(spec)
    values = [v for c in chunks for v in c.values]
    decoded = decode_batch(values)
    return fleet, summary, chunks, decoded


def test_same_seed_same_bytes_other_seed_other_bytes():
    start = datetime(2026, 11, 1, 14, tzinfo=UTC)
    a = [v for c in run(FleetSpec(devices=300, hours=6, seed=1, start=start))[2] for v in c.values]
    b = [v for c in run(FleetSpec(devices=300, hours=6, seed=1, start=start))[2] for v in c.values]
    c = [v for c in run(FleetSpec(devices=300, hours=6, seed=2, start=start))[2] for v in c.values]
    assert a == b and a != c and len(a) > 1000


def test_default_start_is_the_monday_aest_at_or_before_now_minus_the_hours():
    now = datetime(2026, 12, 2, 4, 26, tzinfo=UTC)  # Wednesday 14:26 AEST
    assert default_start(24, now) == datetime(2026, 11, 29, 14, tzinfo=UTC)  # Monday 30 Nov, 00:00 AEST
    assert default_start(24 * 3, now) == datetime(2026, 11, 22, 14, tzinfo=UTC)  # back into last week
    sunday_14 = datetime(2026, 11, 29, 14, tzinfo=UTC)  # exactly Monday 00:00 AEST: that Monday
    assert default_start(6, sunday_14 + timedelta(hours=6)) == sunday_14
    assert default_start(6, sunday_14 + timedelta(hours=6, microseconds=-1)) == sunday_14 - timedelta(days=7)
    aest = timezone(timedelta(hours=10))
    assert default_start(24, now.astimezone(aest)) == default_start(24, now)  # any time zone, same instant
    with pytest.raises(ValueError, match="timezone-aware"):
        default_start(24, datetime(2026, 12, 2))
    with pytest.raises(ValueError, match="range"):
        default_start(1e12, now)


@given(st.datetimes(datetime(2020, 1, 1), datetime(2090, 1, 1), timezones=st.just(UTC)),
       st.floats(0.01, 24 * 400))
def test_default_start_property(now, hours):
    start = default_start(hours, now)
    local = start + timedelta(hours=10)
    assert local.weekday() == 0 and local.time() == datetime.min.time() and start.tzinfo is not None
    assert start + timedelta(hours=hours) <= now < start + timedelta(hours=hours, days=7)


def test_default_spec_ends_by_now_and_its_events_pass_the_event_time_window():
    before = datetime.now(UTC)
    spec = FleetSpec(devices=50, hours=0.01)  # one five-minute interval, longer than the hours asked for
    local = spec.start + timedelta(hours=10)
    assert local.weekday() == 0 and (local.hour, local.minute) == (0, 0)
    assert spec.start + timedelta(seconds=spec.steps * spec.interval_s) <= datetime.now(UTC)
    assert before - spec.start < timedelta(days=7, minutes=5)
    values = [v for c in simulate(spec) for v in c.values]
    decoded = decode_batch(values)  # the default window, around now
    assert values and decoded.rejected == []


def test_state_shares_follow_population_within_two_points():
    fleet = Fleet.build(FleetSpec(devices=10_000))
    total = sum(s.population for s in geo.STATES)
    counts = np.bincount(fleet.state, minlength=len(geo.STATES))
    for s, n in zip(geo.STATES, counts):
        assert abs(n / 10_000 - s.population / total) < 0.02, s.code
    urban_share = fleet.urban.mean()
    assert 0.7 < urban_share < 0.8


def test_allocate_is_exact():
    counts = allocate(7, [1, 1, 1])
    assert counts.sum() == 7 and sorted(counts.tolist()) == [2, 2, 3]


def test_every_simulated_event_is_valid_and_postcodes_match_the_fleet(day):
    fleet, summary, chunks, decoded = day
    assert decoded.rejected == []
    assert decoded.table.num_rows == summary.events > 50_000
    device_index = np.concatenate([c.device for c in chunks])
    ids = decoded.table["device_id"].to_numpy(zero_copy_only=False)
    assert (ids == fleet.device_id[device_index]).all()
    states = np.array(geo.STATE_CODES)[fleet.state[device_index]]
    assert (decoded.table["state"].to_numpy(zero_copy_only=False) == states).all()
    assert (decoded.table["urban"].to_numpy(zero_copy_only=False) == fleet.urban[device_index]).all()


def test_sequence_numbers_and_time_increase_per_device(day):
    _, _, _, decoded = day
    t = decoded.table.select(["device_id", "seq", "event_time"]).sort_by(
        [("device_id", "ascending"), ("seq", "ascending")])
    dev = t["device_id"].to_numpy(zero_copy_only=False)
    seq = t["seq"].to_numpy()
    ts = t["event_time"].cast(pa.int64()).to_numpy()
    same = dev[1:] == dev[:-1]
    assert (seq[1:][same] == seq[:-1][same] + 1).all()
    assert (ts[1:][same] > ts[:-1][same]).all()
    first = np.concatenate([[True], ~same])
    assert (seq[first] == 1).all()


def test_both_schema_versions_and_both_classes_appear(day):
    _, summary, _, decoded = day
    versions = pc.value_counts(decoded.table["schema_version"]).to_pylist()
    assert {v["values"] for v in versions} == {1, 2}
    assert set(summary.events_by_class) == {"urban", "rural"}


def in_ear(decoded):
    t = decoded.table
    return t.filter(pc.and_(t["in_ear_left"], pc.greater(t["playback_s"], 0)))


def test_noise_cancellation_is_chosen_more_where_it_is_loud(day):
    t = in_ear(day[3])
    amb = t["ambient_dba"].to_numpy()
    cancelling = pc.is_in(t["noise_mode"], pa.array(["anc", "adaptive"])).to_numpy(zero_copy_only=False)
    loud, quiet = amb >= 65, amb < 50
    assert cancelling[loud].mean() > cancelling[quiet].mean() + 0.3
    urban = t["urban"].to_numpy(zero_copy_only=False)
    assert amb[urban].mean() > amb[~urban].mean() + 5


def test_listening_peaks_at_commute_and_evening_not_at_night(day):
    t = in_ear(day[3])
    local_hour = ((t["event_time"].cast(pa.int64()).to_numpy() / 3_600_000 + 10) % 24).astype(int)
    per_hour = np.bincount(local_hour, minlength=24)
    assert per_hour[7:9].mean() > 5 * per_hour[2:5].mean()
    assert per_hour[19:22].mean() > 5 * per_hour[2:5].mean()


def drain_per_hour(decoded, fleet):
    """Mean drop of the left bud between consecutive in-ear samples, % per hour, by device."""
    t = decoded.table.select(["device_id", "seq", "battery_left", "in_ear_left"]).sort_by(
        [("device_id", "ascending"), ("seq", "ascending")])
    dev = t["device_id"].to_numpy(zero_copy_only=False)
    level = t["battery_left"].to_numpy().astype(float)
    ear = t["in_ear_left"].to_numpy(zero_copy_only=False)
    ok = (dev[1:] == dev[:-1]) & ear[1:] & ear[:-1]
    drop = (level[:-1] - level[1:])[ok] * 12
    owners = dev[1:][ok]
    order = {d: i for i, d in enumerate(fleet.device_id)}
    idx = np.array([order[d] for d in owners])
    sums = np.bincount(idx, weights=drop, minlength=len(fleet))
    counts = np.bincount(idx, minlength=len(fleet))
    return np.where(counts > 5, sums / np.maximum(counts, 1), np.nan)


def test_fast_drain_faults_drain_faster_and_are_in_the_truth(day):
    fleet, _, _, decoded = day
    truth = fleet.truth()
    assert len(truth) == 40 and {t["fault"] for t in truth} == set(STRONG_FAULTS)
    rate = drain_per_hour(decoded, fleet)
    fast = fleet.fault == 0
    healthy = fleet.fault == -1
    assert np.nanmean(rate[fast]) > 1.5 * np.nanmean(rate[healthy])


def test_noise_cancellation_and_volume_drain_faster(day):
    t = day[3].table.select(["device_id", "seq", "battery_left", "in_ear_left", "noise_mode",
                             "output_dba", "playback_s"]).sort_by(
        [("device_id", "ascending"), ("seq", "ascending")])
    dev = t["device_id"].to_numpy(zero_copy_only=False)
    level = t["battery_left"].to_numpy().astype(float)
    ear = t["in_ear_left"].to_numpy(zero_copy_only=False)
    mode = t["noise_mode"].to_numpy(zero_copy_only=False)
    out = t["output_dba"].to_numpy()
    pairs = (dev[1:] == dev[:-1]) & ear[1:] & ear[:-1] & (level[1:] > 0)
    drop = (level[:-1] - level[1:])
    mode2, out2 = mode[1:], out[1:]
    anc = pairs & (mode2 == "anc")
    off = pairs & (mode2 == "off")
    assert drop[anc].mean() > drop[off].mean()
    loud, soft = pairs & (out2 > 75), pairs & (out2 > 0) & (out2 < 60)
    assert drop[loud].mean() > drop[soft].mean()


def test_firmware_rolls_out_during_the_window(day):
    t = day[3].table
    newest = pc.equal(t["firmware"], FIRMWARE[-1]).to_numpy(zero_copy_only=False)
    ts = t["event_time"].cast(pa.int64()).to_numpy()
    assert not newest[ts < np.median(ts) - 6 * 3_600_000].any()
    late = ts > ts.max() - 6 * 3_600_000
    assert newest[late].mean() > 0.1


def test_malformed_records_are_injected_at_the_rate_and_all_rejected():
    spec = FleetSpec(devices=1000, hours=12, seed=5, malformed_rate=0.02)
    _, summary, chunks = run(spec)
    values = [v for c in chunks for v in c.values]
    malformed = np.concatenate([c.malformed for c in chunks])
    decoded = decode_batch(values)
    assert abs(malformed.mean() - 0.02) < 0.005
    assert sorted(r.index for r in decoded.rejected) == np.flatnonzero(malformed).tolist()
    assert summary.malformed == int(malformed.sum())


def test_spec_rejects_nonsense():
    with pytest.raises(ValueError, match="devices"):
        FleetSpec(devices=0)
    with pytest.raises(ValueError, match="malformed_rate"):
        FleetSpec(malformed_rate=2)


def test_subtle_faults_begin_at_their_onset_with_their_documented_size():
    """Each subtle kind's signature, before and after the onset the truth reports, on a small fleet."""
    start = datetime(2026, 3, 1, 14, tzinfo=UTC)  # Monday 00:00 AEST
    spec = FleetSpec(devices=500, hours=24 * 6, seed=5, start=start, fault_share=0.2, fault_mix="subtle", v2_share=1.0)
    fleet, _, chunks = run(spec)
    truth = fleet.truth()
    assert len(truth) == 100 and {t["fault"] for t in truth} == set(SUBTLE_FAULTS)
    days = {(start + timedelta(hours=10 + 24 * d)).date().isoformat() for d in range(1, 5)}
    assert {t["onset"] for t in truth} <= days  # a quarter to 60% into the window
    for t in truth:
        low, high = FAULT_SIZE.get(t["fault"], (None, None))
        assert t["size"] is None if low is None else low <= t["size"] <= high
        assert (t["bud"] is None) == (t["fault"] in ("subtle_drain", "cycle_wear", "heat_drain"))
    t = decode_batch([v for c in chunks for v in c.values], window=None).table
    row = pc.index_in(t["device_id"], value_set=pa.array(fleet.device_id.tolist())).to_numpy()
    ms = t["event_time"].cast(pa.timestamp("ms", tz="UTC")).cast(pa.int64()).to_numpy()
    after, of = ms >= fleet.fault_onset_ms[row], fleet.fault[row]
    in_ear = pc.and_(t["in_ear_left"], t["in_ear_right"]).to_numpy(zero_copy_only=False).astype(bool)
    temp = t["temp_left_c"].to_numpy(zero_copy_only=False)
    heat, healthy = of == 3 + SUBTLE_FAULTS.index("heat_drain"), of == -1
    warmer = np.nanmean(temp[heat & after & in_ear]) - np.nanmean(temp[heat & ~after & in_ear])
    # before the onset, as warm as the healthy buds (whose onset is the start: they have no "before")
    assert 2.5 < warmer < 6.5 and abs(np.nanmean(temp[heat & ~after & in_ear]) - np.nanmean(temp[healthy & in_ear])) < 0.5
    dropout = of == 3 + SUBTLE_FAULTS.index("dropout")
    zero = (t["battery_left"].to_numpy() == 0) | (t["battery_right"].to_numpy() == 0)
    assert (zero & dropout & after & in_ear).sum() > 20 and (zero & dropout & ~after & in_ear).sum() == 0


def test_a_fault_mix_is_a_name_or_known_kinds():
    assert fault_mix("subtle") == SUBTLE_FAULTS and fault_mix("dropout, fast_drain") == ("dropout", "fast_drain")
    for bad in ("", "slow_leak", "fast_drain,nope"):
        with pytest.raises(ValueError, match="fault mix"):
            FleetSpec(fault_mix=bad)


def test_uploads_carry_the_same_samples_as_single_events():
    """The upload shape regroups the very same samples (the same ones corrupted): decoded, they make the
    same rows; a bad sample is refused on its own; an upload holds at most upload_size samples."""
    spec = dict(devices=300, hours=36, seed=4, malformed_rate=0.01)
    _, events, event_chunks = run(FleetSpec(**spec))
    _, uploads, upload_chunks = run(FleetSpec(**spec, shape="upload", upload_size=20))
    assert uploads.events == events.events and uploads.malformed == events.malformed > 0
    assert uploads.messages < events.events / 10 and uploads.events_by_state == events.events_by_state
    single = decode_batch([v for c in event_chunks for v in c.values])
    values = [v for c in upload_chunks for v in c.values]
    grouped = decode_batch(values)
    assert all(r.sample is not None for r in grouped.rejected) and len(grouped.rejected) == uploads.malformed
    key = [("device_id", "ascending"), ("seq", "ascending")]
    assert grouped.table.sort_by(key).equals(single.table.sort_by(key))
    sizes = [len(msgspec.json.decode(v)["samples"]) for v in values]
    assert max(sizes) == 20 and min(sizes) >= 1 and sum(sizes) == uploads.events
