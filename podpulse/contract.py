"""The event contract: one JSON object per Kafka message, keyed by device id.

Versions
--------
v1  the fields every version carries (see :class:`Event`, "v1" block).
v2  adds ``interval_s`` (sample interval length), ``temp_left_c`` /
    ``temp_right_c`` (bud temperature, °C) and ``conversation_awareness``.
v3  adds ``spatial_audio`` (spatial audio with head tracking was on).

Upcasting v1 → v2 uses these documented defaults (:data:`V1_DEFAULTS`):

- ``interval_s = 300``: v1 firmware sampled on a fixed five-minute interval;
- ``conversation_awareness = False``: v1 firmware did not have the feature;
- ``temp_left_c = temp_right_c = null``: not measured, so unknown, never invented.

and v1/v2 → v3: ``spatial_audio = null`` (not reported, so unknown).

A record with a ``schema_version`` newer than :data:`CURRENT_VERSION` is
accepted when its known fields are valid; every field this reader does not
know (of any version) is kept, as a JSON object in the ``extras`` column
(at most :data:`MAX_EXTRAS_FIELDS` fields in :data:`MAX_EXTRAS_BYTES` bytes:
more is a reject with the reason).

Decoding
--------
:func:`decode_batch` turns a whole batch of message values into one pyarrow
table. Each value is parsed and type/range-checked in C by msgspec against
:class:`Event`; columns are then built per field (``map`` + ``attrgetter``, no
per-record Python code) and the cross-field rules are checked vectorised.
Every value comes out either as a row of the table or as a :class:`Rejected`
with a human-readable reason: no input makes it raise.

Event-time window
-----------------
Besides the static bounds (2019-10-30 .. 2100), ``event_time_ms`` must fall in
an :class:`EventWindow` around the time its record reached Kafka (the message
timestamp, passed as ``received_ms``): at most ``max_age_s`` before it and at
most ``max_future_skew_s`` after it. One event dated 2099 would otherwise pin
its device's attributes in the registry and create far-future partitions.
"""

from __future__ import annotations

import numbers
import re
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from operator import attrgetter
from typing import Annotated, Literal, Sequence

import msgspec
import numpy as np
import pyarrow as pa

from podpulse import geo

__all__ = [
    "CURRENT_VERSION", "V1_DEFAULTS", "V3_DEFAULTS", "NOISE_MODES", "CHARGING_STATES", "Event",
    "ARROW_SCHEMA", "FIELDS", "MAX_EXTRAS_BYTES", "MAX_EXTRAS_FIELDS", "Rejected", "DecodedBatch", "decode_batch", "encode", "encoder",
    "EventWindow", "DEFAULT_WINDOW", "WINDOW_REASON", "DEVICE_ID",
]

CURRENT_VERSION = 3
NOISE_MODES = ("off", "anc", "transparency", "adaptive")
CHARGING_STATES = ("none", "buds", "case", "both")  # what is on charge right now
V1_DEFAULTS = {"interval_s": 300, "conversation_awareness": False,
               "temp_left_c": None, "temp_right_c": None}
REQUIRED_SINCE = {"interval_s": 2, "conversation_awareness": 2, "spatial_audio": 3}
V3_DEFAULTS = {"spatial_audio": None}

# AirPods Pro launched on 2019-10-30; nothing earlier can be a real reading.
MIN_EVENT_TIME_MS = 1_572_393_600_000
MAX_EVENT_TIME_MS = 4_102_444_800_000  # 2100-01-01
_FAR_MS = 2**53  # ~285,000 years: caps references and window bounds, so int64 arithmetic cannot wrap

Percent = Annotated[int, msgspec.Meta(ge=0, le=100)]
Dba = Annotated[float, msgspec.Meta(ge=0.0, le=140.0)]
Celsius = Annotated[float, msgspec.Meta(ge=-20.0, le=80.0)]
# Printable text: no control characters (C0, DEL, C1; NUL is refused by PostgreSQL) and no lone surrogates
# (which no UTF-8 encoder can write).
Label = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f-\x9f\ud800-\udfff]+$")]
MAX_EXTRAS_BYTES = 4000  # the relational stores keep extras in a 4,000-character column
MAX_EXTRAS_FIELDS = 64  # unknown fields a record may carry: a newer version adds a few, not hundreds
INT64_MAX = 2**63 - 1


# A device id as the stores and the API take it (pseudonyms included), matched whole: what may reach SQL.
DEVICE_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


class Event(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, gc=False):
    """One telemetry sample from one pair of AirPods Pro (wire form, all versions)."""

    # --- v1: carried by every version -------------------------------------
    schema_version: Annotated[int, msgspec.Meta(ge=1, le=1000)]
    device_id: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{6,64}$")]  # stored as its pseudonym
    seq: Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)]  # per-device sequence number
    event_time_ms: Annotated[int, msgspec.Meta(ge=MIN_EVENT_TIME_MS, le=MAX_EVENT_TIME_MS)]
    model: Label
    firmware: Label
    battery_left: Percent
    battery_right: Percent
    battery_case: Percent
    charging: Literal["none", "buds", "case", "both"]
    in_ear_left: bool
    in_ear_right: bool
    noise_mode: Literal["off", "anc", "transparency", "adaptive"]
    playback_s: Annotated[float, msgspec.Meta(ge=0.0, le=3600.0)]  # within the interval
    output_dba: Dba  # 0 when nothing plays
    ambient_dba: Dba
    postcode: Annotated[str, msgspec.Meta(pattern=r"^[0-9]{4}$")]
    host_device: Label
    # --- v2 ------------------------------------------------------------------
    interval_s: Annotated[int, msgspec.Meta(gt=0, le=3600)] | None = None
    temp_left_c: Celsius | None = None
    temp_right_c: Celsius | None = None
    conversation_awareness: bool | None = None
    # --- v3 ------------------------------------------------------------------
    spatial_audio: bool | None = None


class _EventAllowingExtras(Event, forbid_unknown_fields=False):
    """Same checks, but fields this reader does not know are ignored (then kept aside)."""


FIELDS: tuple[str, ...] = Event.__struct_fields__
_KNOWN = frozenset(FIELDS)

ARROW_SCHEMA = pa.schema([
    ("schema_version", pa.int16()),
    ("device_id", pa.string()),
    ("seq", pa.int64()),
    ("event_time", pa.timestamp("ms", tz="UTC")),
    ("model", pa.string()),
    ("firmware", pa.string()),
    ("battery_left", pa.int8()),
    ("battery_right", pa.int8()),
    ("battery_case", pa.int8()),
    ("charging", pa.string()),
    ("in_ear_left", pa.bool_()),
    ("in_ear_right", pa.bool_()),
    ("noise_mode", pa.string()),
    ("playback_s", pa.float64()),
    ("output_dba", pa.float64()),
    ("ambient_dba", pa.float64()),
    ("postcode", pa.string()),
    ("host_device", pa.string()),
    ("interval_s", pa.int16()),
    ("temp_left_c", pa.float64()),
    ("temp_right_c", pa.float64()),
    ("conversation_awareness", pa.bool_()),
    ("spatial_audio", pa.bool_()),
    ("extras", pa.string()),  # JSON object of fields unknown to this reader, or null
    ("state", pa.string()),  # enrichment: from the postcode
    ("urban", pa.bool_()),  # enrichment: from the postcode
])
"""Columns of a decoded, upcast and enriched batch."""

_ARROW_TYPE = {f.name: f.type for f in ARROW_SCHEMA}
_ARROW_TYPE["event_time_ms"] = pa.int64()

encoder = msgspec.json.Encoder()
_strict = msgspec.json.Decoder(Event)
_lenient = msgspec.json.Decoder(_EventAllowingExtras)
_any = msgspec.json.Decoder()


def encode(event: Event) -> bytes:
    return encoder.encode(event)


@dataclass(frozen=True, slots=True)
class EventWindow:
    """How far an event time may lie from the time its record reached Kafka.

    Accepted: ``received - max_age_s <= event_time <= received + max_future_skew_s``
    (both ends included). The defaults fit a fleet backfilling a few weeks of
    buffered samples, with a day of slack for clocks set ahead.
    """

    max_age_s: float = 60 * 86400
    max_future_skew_s: float = 86400

    def __post_init__(self) -> None:
        for name in ("max_age_s", "max_future_skew_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
                raise ValueError(f"EventWindow.{name} must be a positive number of seconds, got {value!r}")

    @property
    def max_age_ms(self) -> int:
        return int(min(self.max_age_s * 1000, _FAR_MS))

    @property
    def max_future_skew_ms(self) -> int:
        return int(min(self.max_future_skew_s * 1000, _FAR_MS))


DEFAULT_WINDOW = EventWindow()
WINDOW_REASON = "event_time_out_of_window"  # how every reason of a row outside the window begins


@dataclass(frozen=True, slots=True)
class Rejected:
    index: int  # position of the value in the input batch
    reason: str


@dataclass(frozen=True, slots=True)
class DecodedBatch:
    table: pa.Table  # ARROW_SCHEMA, one row per accepted value
    rows: np.ndarray  # int64: input position of each table row
    rejected: list[Rejected]

    def __len__(self) -> int:
        return self.table.num_rows + len(self.rejected)


def _parse_one(value: bytes | None) -> tuple[Event, str | None] | str:
    """(event, extras JSON or None) for a valid value, otherwise the reason. Never raises."""
    if not value:
        return "empty message"
    try:
        return _parse_checked(value)
    except RecursionError:
        return "JSON nested too deeply - at `$`"
    except Exception as e:  # anything else a hostile value finds: a reason, never a crash
        return f"undecodable value ({type(e).__name__}: {str(e)[:200]})"


def _parse_checked(value: bytes) -> tuple[Event, str | None] | str:
    try:
        return _strict.decode(value), None
    except msgspec.ValidationError as e:
        if "unknown field" not in str(e):
            return str(e)
    except msgspec.DecodeError as e:
        return str(e)
    try:
        event = _lenient.decode(value)
    except msgspec.DecodeError as e:  # ValidationError is a DecodeError
        return str(e)
    unknown = {k: v for k, v in _any.decode(value).items() if k not in _KNOWN}
    if len(unknown) > MAX_EXTRAS_FIELDS:
        return f"{len(unknown)} unknown fields, over {MAX_EXTRAS_FIELDS} - at `$`"
    extras = encoder.encode(unknown).decode()
    if len(extras.encode()) > MAX_EXTRAS_BYTES:
        return f"unknown fields take {len(extras.encode())} bytes, over {MAX_EXTRAS_BYTES} - at `$`"
    return event, extras


def _parse(values: Sequence[bytes | None]):
    """Parse every value; the common all-valid case runs without a Python loop."""
    try:
        events = list(map(_strict.decode, values))
        return events, None, np.arange(len(values), dtype=np.int64), []
    except Exception:  # some value is not a valid event: sort them out one by one
        pass
    events, extras, rows, rejected = [], [], [], []
    for i, value in enumerate(values):
        parsed = _parse_one(value)
        if isinstance(parsed, str):
            rejected.append(Rejected(i, parsed))
        else:
            events.append(parsed[0])
            extras.append(parsed[1])
            rows.append(i)
    has_extras = any(x is not None for x in extras)
    return events, extras if has_extras else None, np.asarray(rows, dtype=np.int64), rejected


def _column(events: list[Event], name: str) -> pa.Array:
    return pa.array(list(map(attrgetter(name), events)), type=_ARROW_TYPE[name])


def _references(received_ms, count: int) -> np.ndarray:
    """One reference time (ms) per value: the record's Kafka timestamp, or now where unknown (<= 0)."""
    now = time.time_ns() // 1_000_000
    if received_ms is None:
        return np.full(count, now, dtype=np.int64)
    try:
        ref = np.asarray(received_ms, dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as e:
        raise ValueError(f"received_ms must be integers (ms since the epoch): {e}") from e
    if ref.shape != (count,):
        raise ValueError(f"received_ms has shape {ref.shape}, expected one entry per value ({count},)")
    return np.where(ref > 0, np.minimum(ref, _FAR_MS), now)


def _iso(ms: int) -> str:
    t = datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(milliseconds=int(ms))
    return t.strftime("%Y-%m-%dT%H:%M:%S") + (f".{t.microsecond // 1000:03d}Z" if t.microsecond else "Z")


_UNITS = ((86_400_000, "day"), (3_600_000, "hour"), (60_000, "minute"), (1000, "second"), (1, "ms"))


def _duration(ms: int) -> str:
    """A length of time, readable: ``1 day``, ``26,326.408 days``, ``90 minutes``... ``1 ms``."""
    size, unit = next((size, unit) for size, unit in _UNITS if ms >= size or size == 1)
    number = f"{ms / size:,.3f}".rstrip("0").rstrip(".")
    return f"{number} {unit}" if unit == "ms" or number == "1" else f"{number} {unit}s"


def _window_reason(event_ms: int, received_ms: int, window: EventWindow) -> str:
    if event_ms < received_ms:
        distance, side, bound, name = received_ms - event_ms, "before", window.max_age_ms, "max age"
    else:
        distance, side, bound, name = event_ms - received_ms, "after", window.max_future_skew_ms, "max future skew"
    return (f"{WINDOW_REASON}: {_iso(event_ms)} is {_duration(distance)} {side} the record reached Kafka "
            f"({name} {_duration(bound)}, exceeded by {_duration(distance - bound)}) - at `$.event_time_ms`")


def decode_batch(values: Sequence[bytes | None], *, received_ms: Sequence[int] | np.ndarray | None = None,
                 window: EventWindow | None = DEFAULT_WINDOW) -> DecodedBatch:
    """Decode, validate, upcast and enrich a batch of message values.

    ``received_ms`` gives, per value, the time its record reached Kafka (the
    message timestamp, ms since the epoch; an entry <= 0 means unknown, and
    ``None`` unknown for all): the wall clock now stands in where it is
    unknown. A row whose event time lies outside ``window`` around it is
    rejected with a reason starting ``event_time_out_of_window:``;
    ``window=None`` leaves only the static bounds (2019-10-30 .. 2100).

    Never raises for any value; raises ValueError only when ``received_ms``
    does not hold one integer per value.
    """
    reference = _references(received_ms, len(values))
    events, extras, rows, rejected = _parse(values)
    n = len(events)
    cols = {name: _column(events, name) for name in FIELDS}
    event_ms = cols["event_time_ms"].to_numpy()  # int64, never null
    cols["event_time"] = cols.pop("event_time_ms").cast(ARROW_SCHEMA.field("event_time").type)
    cols["extras"] = pa.array(extras if extras is not None else [None] * n, pa.string())

    version = cols["schema_version"].to_numpy()
    bad = np.zeros(n, dtype=object)  # reason per row, 0 when the row is fine

    def reject(mask: np.ndarray, why) -> None:
        for i in np.flatnonzero(mask & (bad == 0)):
            bad[i] = why(i)

    for name, since in REQUIRED_SINCE.items():  # a version carries the fields it introduced
        missing = cols[name].is_null().to_numpy(zero_copy_only=False) & (version >= since)
        reject(missing, lambda i, name=name: (
            f"Object missing required field `{name}` (schema_version {version[i]}) - at `$`"))

    # Upcast v1 → v2: only v1 rows can still be null here (newer ones were rejected above).
    for name, default in V1_DEFAULTS.items():
        if default is not None:
            cols[name] = cols[name].fill_null(default).cast(_ARROW_TYPE[name])

    interval = cols["interval_s"].to_numpy(zero_copy_only=False).astype(np.float64)
    playback = cols["playback_s"].to_numpy()
    reject(playback > interval, lambda i: (
        f"playback_s {playback[i]} exceeds interval_s {interval[i]:.0f} - at `$.playback_s`"))

    postcode = cols["postcode"].to_numpy(zero_copy_only=False)
    state_idx, urban = geo.lookup(np.asarray(postcode, dtype=np.int64) if n else np.zeros(0))
    reject(state_idx < 0, lambda i: (
        f"postcode {postcode[i]} is not a known Australian delivery postcode - at `$.postcode`"))
    codes = np.asarray(geo.STATE_CODES + ("",), dtype=object)
    cols["state"] = pa.array(codes[state_idx], pa.string())
    cols["urban"] = pa.array(urban, pa.bool_())

    if window is not None:  # int64 throughout: references and bounds are capped at 2**53 ms
        received = reference[rows]
        outside = ((event_ms < received - window.max_age_ms)
                   | (event_ms > received + window.max_future_skew_ms))
        reject(outside, lambda i: _window_reason(int(event_ms[i]), int(received[i]), window))

    table = pa.table([cols[f.name] for f in ARROW_SCHEMA], schema=ARROW_SCHEMA)
    keep = bad == 0
    if not keep.all():
        rejected = sorted(rejected + [Rejected(int(rows[i]), str(bad[i]))
                                      for i in np.flatnonzero(~keep)], key=attrgetter("index"))
        table, rows = table.filter(pa.array(keep)), rows[keep]
    return DecodedBatch(table, rows, rejected)
