from datetime import datetime, timezone

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from podpulse import geo
from podpulse.contract import (ARROW_SCHEMA, CHARGING_STATES, FIELDS, MAX_EVENT_TIME_MS, MAX_EXTRAS_BYTES,
                               MIN_EVENT_TIME_MS, NOISE_MODES, V1_DEFAULTS, V3_DEFAULTS, Event, decode_batch,
                               encode)

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
    decoded = decode_batch([encode(e) for e in batch])
    assert decoded.rejected == []
    assert decoded.table.schema == ARROW_SCHEMA
    assert decoded.rows.tolist() == list(range(len(batch)))
    assert [comparable(r) for r in decoded.table.to_pylist()] == \
        [comparable(expected_row(e)) for e in batch]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=600) | st.builds(encode, events()).map(
    lambda b: b[: len(b) // 2]) | st.none(), max_size=20), st.data())
def test_any_bytes_give_a_row_or_a_reason_never_an_exception(values, data):
    values.insert(data.draw(st.integers(0, len(values))), encode(data.draw(events())))
    decoded = decode_batch(values)
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
    decoded = decode_batch([msgspec.json.encode(record)])
    assert decoded.rejected == []
    row = decoded.table.to_pylist()[0]
    assert row["schema_version"] == event.schema_version
    assert msgspec.json.decode(row["extras"]) == unknown


def good(**change) -> bytes:
    record = dict(schema_version=2, device_id="ap-0011223344556677", seq=3,
                  event_time_ms=1_793_541_806_253, model="AirPods Pro 2", firmware="7A294",
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
