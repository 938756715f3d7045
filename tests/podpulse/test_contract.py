import json
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from podpulse import geo
from podpulse.contract import (
    ARROW_SCHEMA,
    CHARGING_STATES,
    DEFAULT_WINDOW,
    DEVICE_FIELDS,
    FIELDS,
    MAX_EVENT_TIME_MS,
    MAX_EXTRAS_BYTES,
    MIN_EVENT_TIME_MS,
    NOISE_MODES,
    SAMPLE_FIELDS,
    V1_DEFAULTS,
    V3_DEFAULTS,
    Event,
    EventWindow,
    Rejected,
    decode_batch,
    encode,
    upload_with,
)

NOW_MS = time.time_ns() // 1_000_000  # when this module was imported
DAY_MS = 86_400_000
Y2099_MS = 4_070_908_800_000  # 2099-01-01T00:00:00Z

known_postcodes = st.sampled_from([f"{p:04d}" for s in geo.STATES
                                   for lo, hi in s.urban + s.rural for p in (lo, hi)])
label = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=64)
dba = st.floats(0, 140, allow_nan=False)
celsius = st.floats(-20, 80, allow_nan=False)


@st.composite
def events(draw, version=st.sampled_from([1, 2, 3])):
    v = draw(version)
    v1 = dict(
        schema_version=v,
        device_id=draw(st.from_regex(r"\A[A-Za-z0-9_.-]{6,64}\Z")),
        seq=draw(st.integers(0, 2**62)),
        event_time_ms=draw(st.integers(MIN_EVENT_TIME_MS, MAX_EVENT_TIME_MS)),
        model=draw(label), firmware=draw(label),
        battery_left=draw(st.integers(0, 100)), battery_right=draw(st.integers(0, 100)),
        battery_case=draw(st.integers(0, 100)),
        charging=draw(st.sampled_from(CHARGING_STATES)),
        in_ear_left=draw(st.booleans()), in_ear_right=draw(st.booleans()),
        noise_mode=draw(st.sampled_from(NOISE_MODES)),
        playback_s=draw(st.floats(0, 300, allow_nan=False)),
        output_dba=draw(dba), ambient_dba=draw(dba),
        postcode=draw(known_postcodes), host_device=draw(label),
    )
    if v == 1:
        return Event(**v1)
    v3 = {"spatial_audio": draw(st.booleans())} if v >= 3 else {}
    return Event(**v1, interval_s=draw(st.integers(300, 3600)),
                 temp_left_c=draw(st.none() | celsius), temp_right_c=draw(st.none() | celsius),
                 conversation_awareness=draw(st.booleans()), **v3)


def expected_row(e: Event) -> dict:
    row = msgspec.structs.asdict(e)
    if e.schema_version == 1:
        row.update(V1_DEFAULTS)
    if e.schema_version < 3:
        row.update(V3_DEFAULTS)
    state, urban = geo.lookup([int(e.postcode)])
    row["event_time"] = datetime.fromtimestamp(row.pop("event_time_ms") / 1000, timezone.utc)
    row.update(extras=None, state=geo.STATE_CODES[state[0]], urban=bool(urban[0]))
    return row


def comparable(row: dict) -> dict:
    return {**row, "event_time": int(row["event_time"].timestamp() * 1000)}


@settings(max_examples=200, deadline=None)
@given(st.lists(events(), min_size=1, max_size=20))
def test_valid_events_round_trip_with_v1_upcast(batch):
    decoded = decode_batch([encode(e) for e in batch], window=None)  # any time in the static bounds
    assert decoded.rejected == []
    assert decoded.table.schema == ARROW_SCHEMA
    assert decoded.rows.tolist() == list(range(len(batch)))
    assert [comparable(r) for r in decoded.table.to_pylist()] == \
        [comparable(expected_row(e)) for e in batch]
    # with the window on, each event judged against a Kafka timestamp a day later: the same table
    windowed = decode_batch([encode(e) for e in batch], received_ms=[e.event_time_ms + DAY_MS for e in batch])
    assert windowed.rejected == [] and windowed.table.equals(decoded.table)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=600) | st.builds(encode, events()).map(
    lambda b: b[: len(b) // 2]) | st.none(), max_size=20), st.data())
def test_any_bytes_give_a_row_or_a_reason_never_an_exception(values, data):
    values.insert(data.draw(st.integers(0, len(values))), encode(data.draw(events())))
    received = data.draw(st.none() | st.lists(st.integers(-2**63, 2**63 - 1), min_size=len(values),
                                              max_size=len(values)))
    decoded = decode_batch(values, received_ms=received)
    rejected = {r.index for r in decoded.rejected}
    assert all(r.reason for r in decoded.rejected)
    assert sorted(rejected | set(decoded.rows.tolist())) == list(range(len(values)))
    assert rejected.isdisjoint(decoded.rows.tolist())


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=50),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=30)


@settings(max_examples=200, deadline=None)
@given(events(), st.sampled_from(FIELDS + ("unknown_field",)), json_values)
def test_any_json_in_any_field_gives_a_row_or_a_reason(event, field, value):
    """Huge numbers, nesting, control characters, wrong types: never an exception."""
    record = msgspec.structs.asdict(event) | {field: value}
    decoded = decode_batch([msgspec.json.encode(record)])
    assert len(decoded) == 1 and all(r.reason for r in decoded.rejected)
    if decoded.table.num_rows:  # what is accepted is writable by every store
        row = decoded.table.to_pylist()[0]
        texts = [v for v in row.values() if isinstance(v, str)]
        assert all("\x00" not in v and v.encode("utf-8", "surrogatepass").decode("utf-8") for v in texts)
        assert row["extras"] is None or len(row["extras"].encode()) <= MAX_EXTRAS_BYTES


@settings(max_examples=100, deadline=None)
@given(events(version=st.integers(3, 9)),
       st.dictionaries(st.from_regex(r"\Anew_[a-z]{1,8}\Z"),
                       st.integers() | st.text(max_size=5) | st.lists(st.booleans(), max_size=3),
                       min_size=1, max_size=4))
def test_newer_versions_keep_unknown_fields_in_extras(event, unknown):
    record = msgspec.structs.asdict(event) | unknown
    decoded = decode_batch([msgspec.json.encode(record)], window=None)
    assert decoded.rejected == []
    row = decoded.table.to_pylist()[0]
    assert row["schema_version"] == event.schema_version
    assert msgspec.json.decode(row["extras"]) == unknown


def good(**change) -> bytes:
    record = dict(schema_version=2, device_id="ap-0011223344556677", seq=3,
                  event_time_ms=NOW_MS - 3_600_000, model="AirPods Pro 2", firmware="7A294",
                  battery_left=80, battery_right=79, battery_case=50, charging="none",
                  in_ear_left=True, in_ear_right=True, noise_mode="anc", playback_s=250.0,
                  output_dba=70.5, ambient_dba=62.0, postcode="2000", host_device="iphone",
                  interval_s=300, temp_left_c=32.1, temp_right_c=32.0, conversation_awareness=True)
    record.update(change)
    return msgspec.json.encode({k: v for k, v in record.items() if v is not ...})


@pytest.mark.parametrize("value, words", [
    (good(battery_left=300), ["battery_left", "<= 100"]),
    (good(noise_mode="loud"), ["noise_mode"]),
    (good(seq="7"), ["seq", "int"]),
    (good(device_id=...), ["device_id", "missing"]),
    (good(postcode="0001"), ["postcode", "0001"]),
    (good(postcode=2000), ["postcode", "str"]),
    (good(interval_s=...), ["interval_s", "schema_version 2"]),
    (good(schema_version=3), ["spatial_audio", "schema_version 3"]),
    (good(playback_s=301.0), ["playback_s", "interval_s"]),
    (good(event_time_ms=1000), ["event_time_ms"]),
    (good()[:-5], ["truncated"]),
    (b"", ["empty"]),
    (None, ["empty"]),
    (b"[1, 2]", ["object", "array"]),
    (b"\xff\xfe", ["malformed"]),
    # hostile values that once crashed the consumer or were refused later by a store
    (good(seq=2**63), ["seq", "<= 9223372036854775807"]),
    (good(seq=10**30), ["seq"]),
    (good()[:-1] + b', "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", ["nested too deeply"]),
    (good(model="AirPods\x00Pro"), ["model"]),
    (good(firmware="LONE").replace(b"LONE", b"\\ud800"), ["surrogate"]),  # a lone surrogate
    (good()[:-1] + b', "note": "' + b"x" * 5000 + b'"}', ["unknown fields take", "over 4000"]),
    (good(**{f"x{i}": 0 for i in range(65)}), ["65 unknown fields, over 64 - at `$`"]),  # small, but many
    # inside the static bounds, outside the event-time window around now (no Kafka timestamp given)
    (good(event_time_ms=Y2099_MS), ["event_time_out_of_window: 2099-01-01T00:00:00Z is ", " days after the record "
                                    "reached Kafka (max future skew 1 day, exceeded by ", "$.event_time_ms"]),
    (good(event_time_ms=MIN_EVENT_TIME_MS), ["event_time_out_of_window: 2019-10-30T00:00:00Z is ",
                                             " days before the record reached Kafka (max age 60 days, exceeded by "]),
])
def test_rejections_name_the_problem(value, words):
    decoded = decode_batch([good(), value, good(seq=4)])
    assert decoded.rows.tolist() == [0, 2]
    [rejected] = decoded.rejected
    assert rejected.index == 1
    for word in words:
        assert word in rejected.reason, rejected.reason


def test_v1_record_gets_documented_defaults():
    v1 = good(schema_version=1, interval_s=..., temp_left_c=..., temp_right_c=...,
              conversation_awareness=...)
    row = decode_batch([v1]).table.to_pylist()[0]
    assert {k: row[k] for k in V1_DEFAULTS} == V1_DEFAULTS
    assert row["spatial_audio"] is None
    assert row["schema_version"] == 1 and row["state"] == "NSW" and row["urban"] is True


def test_v3_record_keeps_its_new_field():
    row = decode_batch([good(schema_version=3, spatial_audio=True)]).table.to_pylist()[0]
    assert row["spatial_audio"] is True and row["extras"] is None


# --- the event-time window ----------------------------------------------------------------

RECEIVED = 1_793_541_806_253  # 2026-11-01T14:03:26.253Z, as a Kafka timestamp
W = DEFAULT_WINDOW


def window_case(offset_ms: int, **kw):
    return decode_batch([good(event_time_ms=RECEIVED + offset_ms)], received_ms=[RECEIVED], **kw)


@pytest.mark.parametrize("offset_ms, words", [
    (-W.max_age_ms, None),  # both edges are inside
    (W.max_future_skew_ms, None),
    (0, None),
    (-W.max_age_ms - 1, ["2026-09-02T14:03:26.252Z is 60 days before the record reached Kafka",
                         "(max age 60 days, exceeded by 1 ms)"]),
    (W.max_future_skew_ms + 1, ["2026-11-02T14:03:26.254Z is 1 day after the record reached Kafka",
                                "(max future skew 1 day, exceeded by 1 ms)"]),
    (W.max_future_skew_ms + 2 * 3_600_000, ["is 1.083 days after", "exceeded by 2 hours"]),
    (-W.max_age_ms - 61_000, ["is 60.001 days before", "exceeded by 1.017 minutes"]),
])
def test_window_edges_are_inside_and_a_millisecond_beyond_is_rejected(offset_ms, words):
    decoded = window_case(offset_ms)
    if words is None:
        assert decoded.rejected == [] and decoded.table.num_rows == 1
        return
    [rejected] = decoded.rejected
    assert decoded.table.num_rows == 0 and decoded.rows.tolist() == [] and rejected.index == 0
    assert rejected.reason.startswith("event_time_out_of_window: "), rejected.reason
    for word in words:
        assert word in rejected.reason, rejected.reason


def test_default_window_is_sixty_days_back_and_one_day_ahead():
    assert (W.max_age_s, W.max_future_skew_s) == (60 * 86400, 86400) == (EventWindow().max_age_s, 86400)
    assert (W.max_age_ms, W.max_future_skew_ms) == (60 * DAY_MS, DAY_MS)


def test_a_2099_event_is_rejected_by_default_and_accepted_without_the_window():
    value = good(event_time_ms=Y2099_MS)
    [rejected] = decode_batch([value]).rejected
    assert rejected.reason.startswith("event_time_out_of_window: 2099-01-01T00:00:00Z is "), rejected.reason
    days = float(rejected.reason.split(" is ")[1].split(" days after the record reached Kafka")[0].replace(",", ""))
    assert abs(days - (Y2099_MS - NOW_MS) / DAY_MS) < 1  # against the wall clock: no Kafka timestamp given
    off = decode_batch([value], window=None)
    assert off.rejected == [] and off.table.column("event_time").cast("int64").to_pylist() == [Y2099_MS]
    old = good(event_time_ms=MIN_EVENT_TIME_MS)
    assert decode_batch([old], received_ms=[NOW_MS], window=None).rejected == []


def test_each_record_is_judged_against_its_own_kafka_timestamp():
    t = RECEIVED
    values = [good(event_time_ms=t, seq=i) for i in range(5)]
    received = [t, t + 61 * DAY_MS, t - 2 * DAY_MS, t - DAY_MS, t + 60 * DAY_MS]
    for as_given in (received, np.array(received, dtype=np.int64), tuple(received)):
        decoded = decode_batch(values, received_ms=as_given)
        assert decoded.rows.tolist() == [0, 3, 4]
        assert decoded.table["seq"].to_pylist() == [0, 3, 4]  # rows and table agree
        assert [(r.index, r.reason.split(" is ")[1].split(" the ")[0]) for r in decoded.rejected] == [
            (1, "61 days before"), (2, "2 days after")]


def test_window_rejects_keep_their_place_among_other_rejects():
    t = RECEIVED
    values = [good(event_time_ms=t), b"not json", good(event_time_ms=Y2099_MS), None,
              good(event_time_ms=t, postcode="0001"), good(event_time_ms=t + 1)]
    decoded = decode_batch(values, received_ms=np.full(len(values), t))
    assert decoded.rows.tolist() == [0, 5] and len(decoded) == len(values)
    assert [r.index for r in decoded.rejected] == [1, 2, 3, 4]
    assert decoded.rejected[1].reason.startswith("event_time_out_of_window: 2099-01-01T00:00:00Z")
    assert "postcode" in decoded.rejected[3].reason


def test_unknown_kafka_timestamps_fall_back_to_now():
    now = time.time_ns() // 1_000_000  # not the module's NOW_MS: the suite may run for many minutes
    recent, old = good(event_time_ms=now - DAY_MS), good(event_time_ms=now - 61 * DAY_MS)
    for unknown in (0, -1, -(2**63)):
        decoded = decode_batch([recent, old, old], received_ms=[unknown, unknown, now - 30 * DAY_MS])
        assert decoded.rows.tolist() == [0, 2]
        [rejected] = decoded.rejected
        assert rejected.index == 1 and re.search(r"is 61(\.0\d*)? days before", rejected.reason)  # against now
    assert decode_batch([recent, old]).rows.tolist() == [0]  # None: now for all


def test_a_custom_window_and_no_window():
    hour = EventWindow(max_age_s=3600, max_future_skew_s=60)
    assert window_case(-3_600_000, window=hour).rejected == []
    [r] = window_case(-3_600_001, window=hour).rejected
    assert "(max age 1 hour, exceeded by 1 ms)" in r.reason
    [r] = window_case(61_000, window=hour).rejected
    assert "1.017 minutes after" in r.reason and "(max future skew 1 minute, exceeded by 1 second)" in r.reason
    assert window_case(-1000 * DAY_MS, window=None).rejected == []
    assert window_case(10**9 * DAY_MS, window=None).rejected  # the static bound still holds
    wide = EventWindow(max_age_s=float("inf"), max_future_skew_s=1e300)  # effectively unbounded, no overflow
    assert window_case(-1000 * DAY_MS, window=wide).rejected == []
    far = decode_batch([good(event_time_ms=RECEIVED)], received_ms=[2**63 - 1])  # a broken broker clock
    assert "before the record reached Kafka" in far.rejected[0].reason


@pytest.mark.parametrize("kw", [dict(max_age_s=0), dict(max_age_s=-1), dict(max_future_skew_s=0),
                                dict(max_future_skew_s=float("nan")), dict(max_age_s="60"),
                                dict(max_age_s=True)])
def test_event_window_must_be_positive(kw):
    with pytest.raises(ValueError, match="positive"):
        EventWindow(**kw)


def test_received_ms_must_have_one_integer_per_value():
    with pytest.raises(ValueError, match="one entry per value"):
        decode_batch([good(), good()], received_ms=[NOW_MS])
    with pytest.raises(ValueError, match="integers"):
        decode_batch([good()], received_ms=["yesterday"])
    assert len(decode_batch([], received_ms=[])) == 0 and len(decode_batch([])) == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(MIN_EVENT_TIME_MS, MAX_EVENT_TIME_MS),
                          st.integers(-10, 2**62) | st.integers(MIN_EVENT_TIME_MS, MAX_EVENT_TIME_MS)),
                min_size=1, max_size=30),
       st.integers(1, 10**9), st.integers(1, 10**9))
def test_window_agrees_with_a_record_by_record_check(pairs, age_s, skew_s):
    """The vectorised check against the rule written out for one record at a time."""
    window = EventWindow(max_age_s=age_s, max_future_skew_s=skew_s)
    values = [good(event_time_ms=t, seq=i) for i, (t, _) in enumerate(pairs)]
    before = time.time_ns() // 1_000_000
    decoded = decode_batch(values, received_ms=[r for _, r in pairs], window=window)
    after = time.time_ns() // 1_000_000
    for i, (t, r) in enumerate(pairs):
        refs = [r] if r > 0 else [before, after]  # now lies between the two
        inside = [min(ref, 2**53) - age_s * 1000 <= t <= min(ref, 2**53) + skew_s * 1000 for ref in refs]
        if all(inside):
            assert i in decoded.rows.tolist()
        elif not any(inside):
            assert i not in decoded.rows.tolist()
    assert all(r.reason.startswith("event_time_out_of_window: ") for r in decoded.rejected)
    assert sorted(decoded.rows.tolist() + [r.index for r in decoded.rejected]) == list(range(len(values)))


# --- the fuzz target (bench/fuzz_contract.py, atheris) --------------------------------------

FUZZ = Path(__file__).resolve().parents[2] / "bench" / "fuzz_contract.py"


@pytest.mark.fuzz
def test_fuzz_target_runs_clean_for_a_few_thousand_inputs():
    pytest.importorskip("atheris", reason="atheris is not installed (pip install -e .[dev])")
    proc = subprocess.run([sys.executable, str(FUZZ), "--runs", "3000", "--json"],
                          capture_output=True, text=True, timeout=120, cwd=FUZZ.parent.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["runs"] == 3000 and summary["failures"] == 0, summary
    assert summary["values"] > summary["runs"] and summary["values_per_s"] > 0 and summary["seconds"] > 0


# --- device uploads -------------------------------------------------------------------------------------


def as_upload(batch: list[Event], **extra) -> bytes:
    """The events as one upload: the first one's device fields, each event's others."""
    first = msgspec.structs.asdict(batch[0])
    envelope = {k: first[k] for k in DEVICE_FIELDS} | extra
    samples = [{k: v for k, v in msgspec.structs.asdict(e).items() if k in SAMPLE_FIELDS and v is not None}
               for e in batch]
    return msgspec.json.encode(envelope | {"samples": samples})


def same_device(batch: list[Event]) -> list[Event]:
    first = batch[0]
    return [msgspec.structs.replace(e, **{k: getattr(first, k) for k in DEVICE_FIELDS}) for e in batch]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from([1, 2, 3]).flatmap(  # one schema version per upload: it is a device field
    lambda v: st.lists(events(version=st.just(v)), min_size=1, max_size=8)), min_size=1, max_size=4), st.booleans())
def test_an_upload_decodes_to_the_rows_of_its_samples_sent_one_by_one(groups, with_an_event):
    groups = [same_device(g) for g in groups]
    values = [as_upload(g) for g in groups] + ([encode(groups[0][0])] if with_an_event else [])
    decoded = decode_batch(values, window=None)
    singles = decode_batch([encode(e) for g in groups for e in g] + ([encode(groups[0][0])] if with_an_event else []),
                           window=None)
    assert decoded.rejected == [] and decoded.table.equals(singles.table)
    assert decoded.rows.tolist() == [i for i, g in enumerate(groups) for _ in g] + ([len(groups)] if with_an_event else [])
    assert decoded.samples.tolist() == [k for g in groups for k in range(len(g))] + ([-1] if with_an_event else [])


def an_upload(n: int = 4, **changes) -> tuple[dict, list[dict]]:
    event = msgspec.structs.asdict(Event(**(GOOD | changes)))
    envelope = {k: event[k] for k in DEVICE_FIELDS}
    sample = {k: v for k, v in event.items() if k in SAMPLE_FIELDS and v is not None}
    return envelope, [sample | {"seq": sample["seq"] + k} for k in range(n)]


GOOD = dict(schema_version=3, device_id="ap-0011223344556677", seq=10, event_time_ms=NOW_MS - 3_600_000,
            model="AirPods Pro 2", firmware="7A305", battery_left=80, battery_right=79, battery_case=50,
            charging="none", in_ear_left=True, in_ear_right=True, noise_mode="anc", playback_s=250.0,
            output_dba=70.5, ambient_dba=62.0, postcode="2000", host_device="iphone", interval_s=300,
            conversation_awareness=True, spatial_audio=False)


def test_a_bad_sample_is_refused_with_its_index_and_path_and_the_others_are_kept():
    envelope, samples = an_upload(6)
    samples[1]["battery_left"] = 101
    samples[3]["playback_s"] = 301.0  # over interval_s: a cross-field rule, checked after parsing
    samples[4] = 7
    samples[5] = samples[5] | {"firmware": "7A305"}  # a device field inside a sample
    decoded = decode_batch([msgspec.json.encode(envelope | {"samples": samples})])
    assert decoded.table["seq"].to_pylist() == [10, 12] and decoded.samples.tolist() == [0, 2]
    assert [(r.index, r.sample) for r in decoded.rejected] == [(0, 1), (0, 3), (0, 4), (0, 5)]
    reasons = [r.reason for r in decoded.rejected]
    assert reasons[0] == "Expected `int` <= 100 - at `$.samples[1].battery_left`"
    assert reasons[1] == "playback_s 301.0 exceeds interval_s 300 - at `$.samples[3].playback_s`"
    assert reasons[2] == "Expected `object`, got `int` - at `$.samples[4]`"
    assert reasons[3] == "`firmware` belongs in the upload's envelope, not in a sample - at `$.samples[5]`"


@pytest.mark.parametrize("change, reason", [
    (lambda e, s: e | {"samples": []}, "an upload carries 1 to 1000 samples, this one 0 - at `$.samples`"),
    (lambda e, s: e | {"samples": s * 251}, "an upload carries 1 to 1000 samples, this one 1004 - at `$.samples`"),
    (lambda e, s: e | {"samples": {"seq": 1}}, "Expected `array`, got `object` - at `$.samples`"),
    (lambda e, s: {k: v for k, v in e.items() if k != "device_id"} | {"samples": s},
     "Object missing required field `device_id`"),
    (lambda e, s: e | {"seq": 3, "samples": s}, "`seq` belongs in each sample, not in the upload's envelope - at `$.seq`"),
    (lambda e, s: e | {"model": "", "samples": s}, "Expected `str` of length >= 1 - at `$.model`"),
])
def test_a_bad_envelope_refuses_the_whole_upload_once(change, reason):
    envelope, samples = an_upload()
    decoded = decode_batch([msgspec.json.encode(change(envelope, samples)), encode(Event(**GOOD))])
    assert decoded.table.num_rows == 1 and decoded.rows.tolist() == [1]
    assert decoded.rejected == [Rejected(0, reason)]


def test_an_unknown_postcode_refuses_every_sample_at_the_envelope_path():
    envelope, samples = an_upload(3, postcode="0001")
    decoded = decode_batch([msgspec.json.encode(envelope | {"samples": samples})])
    assert decoded.table.num_rows == 0
    assert [(r.sample, r.reason) for r in decoded.rejected] == [
        (k, "postcode 0001 is not a known Australian delivery postcode - at `$.postcode`") for k in range(3)]


def test_unknown_fields_of_the_envelope_and_of_each_sample_are_kept_in_extras():
    envelope, samples = an_upload(2)
    samples[1]["case_lid"] = "open"
    value = msgspec.json.encode(envelope | {"schema_version": 4, "region_hint": 7, "samples": samples})
    decoded = decode_batch([value])
    assert decoded.rejected == []
    assert [json.loads(x) for x in decoded.table["extras"].to_pylist()] == [
        {"region_hint": 7}, {"region_hint": 7, "case_lid": "open"}]


def test_upload_with_keeps_the_envelope_and_the_chosen_samples_verbatim():
    envelope, samples = an_upload(3)
    value = msgspec.json.encode(envelope | {"extra": [1, 2], "samples": samples}).replace(b'"seq":11', b'"seq" : 11')
    cut = upload_with(value, [1, 2])
    assert b'"seq" : 11' in cut  # as sent, not re-encoded
    assert json.loads(cut) == envelope | {"extra": [1, 2], "samples": samples[1:]}
