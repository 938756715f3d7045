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

Message shapes
--------------
A message is either one event (an :class:`Event` object) or a device upload:
one device's buffered samples, as a phone sends them when the buds reconnect::

    {"schema_version": 3, "device_id": "...", "model": "...", "firmware": "...",
     "postcode": "2000", "host_device": "...",
     "samples": [{"seq": 1, "event_time_ms": ..., "battery_left": 80, ...}, ...]}

The envelope carries the device's fields (:data:`DEVICE_FIELDS`), each sample
the rest (:data:`SAMPLE_FIELDS`), with the same types, bounds and versions as
an event. An upload holds 1 to :data:`MAX_SAMPLES` samples under one firmware
and postcode: a phone starts a new upload when either changes. A message is an
upload when it is a JSON object with a ``samples`` key. Each sample is judged
on its own: a bad one is rejected with its index (``Rejected.sample``, paths
``$.samples[3].battery_left``) and the others are kept; a bad envelope rejects
the whole message. :func:`upload_with` cuts an upload down to some of its
samples, verbatim (a dead letter holds the envelope and its one sample).

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
from itertools import chain
from operator import attrgetter
from typing import Annotated, Literal, Sequence, get_args, get_origin, get_type_hints

import msgspec
import numpy as np
import pyarrow as pa

from podpulse import geo

__all__ = [
    "CURRENT_VERSION", "V1_DEFAULTS", "V3_DEFAULTS", "NOISE_MODES", "CHARGING_STATES", "Event",
    "ARROW_SCHEMA", "FIELDS", "MAX_EXTRAS_BYTES", "MAX_EXTRAS_FIELDS", "Rejected", "DecodedBatch", "decode_batch", "encode", "encoder",
    "EventWindow", "DEFAULT_WINDOW", "WINDOW_REASON", "DEVICE_ID", "DEVICE_FIELDS", "SAMPLE_FIELDS", "MAX_SAMPLES",
    "Sample", "Upload", "upload_with", "uploads_of_each",
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

# Device uploads: the same fields, split into the envelope's and each sample's.
DEVICE_FIELDS = ("schema_version", "device_id", "model", "firmware", "postcode", "host_device")
SAMPLE_FIELDS = tuple(f for f in FIELDS if f not in DEVICE_FIELDS)
MAX_SAMPLES = 1000  # samples in one upload: about three days of five-minute samples
_HINTS = get_type_hints(Event, include_extras=True)
_DEFAULTS = dict(zip(FIELDS[len(FIELDS) - len(Event.__struct_defaults__):], Event.__struct_defaults__))


def _struct(name: str, fields, strict: bool, types: dict | None = None, **extra) -> type:
    """A Struct with some of Event's fields (same types, bounds and defaults), plus ``extra``."""
    types = types or _HINTS
    spec = [(f, types[f], _DEFAULTS[f]) if f in _DEFAULTS else (f, types[f]) for f in fields]
    return msgspec.defstruct(name, spec + list(extra.items()), forbid_unknown_fields=strict, omit_defaults=True,
                             gc=False, module=__name__)


Sample = _struct("Sample", SAMPLE_FIELDS, True)
Envelope = _struct("Envelope", DEVICE_FIELDS, False)  # an upload's device fields, unknown ones set aside
Upload = _struct("Upload", DEVICE_FIELDS, True,
                 samples=Annotated[list[Sample], msgspec.Meta(min_length=1, max_length=MAX_SAMPLES)])
_SampleAllowingExtras = _struct("_SampleAllowingExtras", SAMPLE_FIELDS, False)


def _without_pattern(hint) -> tuple[object, re.Pattern | None]:
    """``hint`` without its regex, and the regex (None when it has none)."""
    if get_origin(hint) is not Annotated:
        return hint, None
    base, *metas = get_args(hint)
    pattern = next((m.pattern for m in metas if m.pattern), None)
    if pattern is None:
        return hint, None
    lengths = (msgspec.Meta(min_length=m.min_length, max_length=m.max_length) for m in metas)
    return Annotated[(base, *lengths)], re.compile(pattern)


# The fast path decodes events without the regexes (msgspec runs each one per value: 60% of decoding),
# then checks each distinct value once; any miss sends the batch to the strict decoder, which says why.
_PATTERNS: dict[str, re.Pattern] = {}
_UNMATCHED_HINTS: dict[str, object] = {}
for _name, _hint in _HINTS.items():
    _UNMATCHED_HINTS[_name], _pattern = _without_pattern(_hint)
    if _pattern is not None:
        _PATTERNS[_name] = _pattern
_EventUnmatched = _struct("_EventUnmatched", FIELDS, True, _UNMATCHED_HINTS)

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
_unmatched = msgspec.json.Decoder(_EventUnmatched)
_lenient = msgspec.json.Decoder(_EventAllowingExtras)
_any = msgspec.json.Decoder()
_upload = msgspec.json.Decoder(Upload)
_envelope = msgspec.json.Decoder(Envelope)
_sample = msgspec.json.Decoder(Sample)
_sample_lenient = msgspec.json.Decoder(_SampleAllowingExtras)
_shell = msgspec.json.Decoder(dict[str, msgspec.Raw])  # an object's fields, each value left as JSON
_raw_list = msgspec.json.Decoder(list[msgspec.Raw])


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
    sample: int | None = None  # for one sample of an upload: its index in ``samples``; None: the whole value


@dataclass(frozen=True, slots=True)
class DecodedBatch:
    table: pa.Table  # ARROW_SCHEMA, one row per accepted event or sample
    rows: np.ndarray  # int64: input position of each table row (an upload's samples share theirs)
    samples: np.ndarray  # int32: each row's index in its upload's samples, -1 for an event message
    rejected: list[Rejected]

    def __len__(self) -> int:
        return self.table.num_rows + len(self.rejected)


@dataclass(slots=True)
class _Parsed:
    """What parsing a batch found: the device fields come from ``owners`` (an Event or an upload's
    envelope, taken per row by ``owner``; None: one row each), the others from ``parts`` (an Event or
    a Sample per row)."""

    owners: list
    owner: np.ndarray | None
    parts: list
    rows: np.ndarray
    samples: np.ndarray
    extras: list | None
    rejected: list[Rejected]


def _parse(values: Sequence[bytes | None]) -> _Parsed:
    """Parse every value; a batch of valid messages of one shape runs without a Python loop."""
    first = values[0] if len(values) else None
    uploads_first = isinstance(first, bytes) and b'"samples"' in first
    for whole in ((_all_uploads, _all_events) if uploads_first else (_all_events, _all_uploads)):
        try:
            return whole(values)
        except Exception:  # some value is not a valid message of this shape: sort them out one by one
            pass
    return _one_by_one(values)


def _all_events(values: Sequence[bytes]) -> _Parsed:
    events = list(map(_unmatched.decode, values))
    for name, pattern in _PATTERNS.items():
        if not all(map(pattern.search, set(map(attrgetter(name), events)))):
            raise ValueError(f"a {name} does not match {pattern.pattern}")  # the strict decoder says which
    n = len(events)
    return _Parsed(events, None, events, np.arange(n, dtype=np.int64), np.full(n, -1, np.int32), None, [])


def _all_uploads(values: Sequence[bytes]) -> _Parsed:
    uploads = list(map(_upload.decode, values))
    counts = np.fromiter(map(len, map(attrgetter("samples"), uploads)), np.int64, len(uploads))
    rows = np.repeat(np.arange(len(uploads), dtype=np.int64), counts)
    samples = (np.arange(len(rows)) - (np.cumsum(counts) - counts)[rows]).astype(np.int32)
    parts = list(chain.from_iterable(map(attrgetter("samples"), uploads)))
    return _Parsed(uploads, rows, parts, rows, samples, None, [])


def _one_by_one(values: Sequence[bytes | None]) -> _Parsed:
    owners, owner, parts, rows, samples, extras, rejected = [], [], [], [], [], [], []
    for i, value in enumerate(values):
        parsed = _parse_one(value)
        if isinstance(parsed, str):
            rejected.append(Rejected(i, parsed))
            continue
        device, kept, bad = parsed
        rejected.extend(Rejected(i, reason, k) for k, reason in bad)
        if kept:
            owner.extend([len(owners)] * len(kept))
            owners.append(device)
            for k, part, extra in kept:
                parts.append(part)
                rows.append(i)
                samples.append(k)
                extras.append(extra)
    has_extras = any(x is not None for x in extras)
    return _Parsed(owners, np.asarray(owner, np.int64), parts, np.asarray(rows, np.int64),
                   np.asarray(samples, np.int32), extras if has_extras else None, rejected)


def _parse_one(value: bytes | None):
    """For a valid value (device fields, [(sample index or -1, fields, extras JSON or None)],
    [(sample index, reason)] for an upload's refused samples); otherwise the reason. Never raises."""
    if not value:
        return "empty message"
    try:
        try:
            fields = _shell.decode(value)
        except msgspec.DecodeError:
            fields = None  # not a JSON object: the event decoder says why
        if fields is not None and "samples" in fields:
            return _parse_upload(value, fields)
        parsed = _parse_event(value)
        return parsed if isinstance(parsed, str) else (parsed[0], [(-1, *parsed)], [])
    except RecursionError:
        return "JSON nested too deeply - at `$`"
    except Exception as e:  # anything else a hostile value finds: a reason, never a crash
        return f"undecodable value ({type(e).__name__}: {str(e)[:200]})"


def _extras(unknown: dict) -> tuple[str | None, str | None]:
    """(fields this reader does not know as a JSON object, or None; None) or (None, why refused)."""
    if not unknown:
        return None, None
    if len(unknown) > MAX_EXTRAS_FIELDS:
        return None, f"{len(unknown)} unknown fields, over {MAX_EXTRAS_FIELDS} - at `$`"
    extras = encoder.encode(unknown)
    if len(extras) > MAX_EXTRAS_BYTES:
        return None, f"unknown fields take {len(extras)} bytes, over {MAX_EXTRAS_BYTES} - at `$`"
    return extras.decode(), None


def _parse_event(value: bytes) -> tuple[Event, str | None] | str:
    return _parse_keeping_extras(value, _strict, _lenient)


def _parse_upload(value: bytes, fields: dict[str, msgspec.Raw]):
    try:
        upload = _upload.decode(value)
        return upload, [(k, sample, None) for k, sample in enumerate(upload.samples)], []
    except msgspec.DecodeError:
        pass  # say what is wrong, sample by sample
    try:
        samples = _raw_list.decode(fields["samples"])
    except msgspec.DecodeError as e:
        return f"{e} - at `$.samples`"
    if not 1 <= len(samples) <= MAX_SAMPLES:
        return f"an upload carries 1 to {MAX_SAMPLES} samples, this one {len(samples)} - at `$.samples`"
    envelope = {k: v for k, v in fields.items() if k != "samples"}
    misplaced = [k for k in envelope if k in SAMPLE_FIELDS]
    if misplaced:
        return f"`{misplaced[0]}` belongs in each sample, not in the upload's envelope - at `$.{misplaced[0]}`"
    try:
        device = _envelope.decode(encoder.encode(envelope))
    except msgspec.DecodeError as e:
        return str(e)
    unknown = {k: _any.decode(v) for k, v in envelope.items() if k not in _KNOWN}
    kept, bad = [], []
    for k, sample in enumerate(samples):
        parsed = _parse_sample(sample, unknown)
        if isinstance(parsed, str):
            bad.append((k, _at_sample(parsed, k)))
        else:
            kept.append((k, *parsed))
    return device, kept, bad


def _parse_sample(value: bytes, unknown: dict) -> tuple[Sample, str | None] | str:
    """One sample of an upload; ``unknown``: the envelope's fields this reader does not know."""
    return _parse_keeping_extras(value, _sample, _sample_lenient, unknown, misplaced=_ENVELOPE_ONLY)


_ENVELOPE_ONLY = frozenset({*DEVICE_FIELDS, "samples"})


def _parse_keeping_extras(value: bytes, strict: msgspec.json.Decoder, lenient: msgspec.json.Decoder,
                          inherited: dict | None = None, misplaced: frozenset = frozenset()):
    """``(record, extras)`` or why ``value`` is refused. Decoded strictly; a record with fields this reader
    does not know is decoded leniently, and those fields (after ``inherited``: its envelope's) kept as
    ``extras``, unless one of them is in ``misplaced`` (a device field inside a sample)."""
    try:
        record, own = strict.decode(value), {}
    except msgspec.ValidationError as e:
        if "unknown field" not in str(e):
            return str(e)
        try:
            record = lenient.decode(value)
        except msgspec.DecodeError as e:  # ValidationError is a DecodeError
            return str(e)
        fields = _shell.decode(value)
        wrong = [k for k in fields if k in misplaced]
        if wrong:
            return f"`{wrong[0]}` belongs in the upload's envelope, not in a sample - at `$`"
        own = {k: _any.decode(v) for k, v in fields.items() if k not in _KNOWN}
    except msgspec.DecodeError as e:
        return str(e)
    extras, why = _extras({**(inherited or {}), **own})
    return why or (record, extras)


_PATH = " - at `$"
_FIELD = re.compile(r"\.([A-Za-z_]\w*)")


def _at_sample(reason: str, k: int) -> str:
    """A reason about a sample read alone, with its path in the upload (``$.seq`` -> ``$.samples[3].seq``);
    a path to a device field stays where it is."""
    at = reason.rfind(_PATH)
    if at < 0:
        return f"{reason}{_PATH}.samples[{k}]`"
    path = reason[at + len(_PATH):]
    field = _FIELD.match(path)
    if field is not None and field.group(1) in DEVICE_FIELDS:
        return reason
    return f"{reason[:at]}{_PATH}.samples[{k}]{path}"


def upload_with(value: bytes, samples: Sequence[int]) -> bytes:
    """The upload ``value`` with only the given samples (by index), each verbatim, and its envelope."""
    return uploads_of_each(value, [samples])[0]


def uploads_of_each(value: bytes, groups: Sequence[Sequence[int]]) -> list[bytes]:
    """:func:`upload_with` for each group of samples, parsing ``value`` once."""
    fields = _shell.decode(value)
    raw = _raw_list.decode(fields["samples"])
    return [encoder.encode({**fields, "samples": [raw[k] for k in samples]}) for samples in groups]


# Required numbers and booleans go through numpy in one pass (half the time of a list, then pa.array);
# their values are validated, so they fit the column's type.
_NUMPY = {name: _ARROW_TYPE[name].to_pandas_dtype() for name in FIELDS
          if name not in _DEFAULTS and (pa.types.is_integer(_ARROW_TYPE[name]) or pa.types.is_floating(_ARROW_TYPE[name])
                                        or pa.types.is_boolean(_ARROW_TYPE[name]))}


def _column(events: list, name: str) -> pa.Array:
    if name in _NUMPY:
        return pa.array(np.fromiter(map(attrgetter(name), events), _NUMPY[name], len(events)), type=_ARROW_TYPE[name])
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
    parsed = _parse(values)
    rows, samples, rejected = parsed.rows, parsed.samples, parsed.rejected
    n = len(parsed.parts)
    cols = {name: _column(parsed.parts, name) for name in SAMPLE_FIELDS}
    owner = None if parsed.owner is None else pa.array(parsed.owner, pa.int64())
    for name in DEVICE_FIELDS:
        cols[name] = _column(parsed.owners, name) if owner is None else _column(parsed.owners, name).take(owner)
    event_ms = cols["event_time_ms"].to_numpy()  # int64, never null
    cols["event_time"] = cols.pop("event_time_ms").cast(ARROW_SCHEMA.field("event_time").type)
    cols["extras"] = pa.array(parsed.extras if parsed.extras is not None else [None] * n, pa.string())

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
        rejected = rejected + [Rejected(int(rows[i]), str(bad[i])) if samples[i] < 0 else
                               Rejected(int(rows[i]), _at_sample(str(bad[i]), int(samples[i])), int(samples[i]))
                               for i in np.flatnonzero(~keep)]
        table, rows, samples = table.filter(pa.array(keep)), rows[keep], samples[keep]
    if rejected:
        rejected.sort(key=lambda r: (r.index, -1 if r.sample is None else r.sample))
    return DecodedBatch(table, rows, samples, rejected)
