"""A deterministic simulator of an Australian AirPods Pro fleet.

The fleet is spread over the states in proportion to their population, each
device with a real postcode of its state and an urban/rural class. Time runs in
sample intervals (five minutes by default); each step is computed for all
devices at once with numpy, and a device emits one event per interval while it
is in an ear or on charge:

- usage follows the local hour and weekday: commuters peak at 7-9 and 17-19,
  desk workers listen through the working day, evening listeners after dinner;
  weekends are later and flatter;
- ambient noise is higher in cities and on commutes, and people choose noise
  cancellation more the louder it is (and turn the volume up);
- bud batteries drain faster with noise cancellation, higher output level and
  an aged battery; buds recharge from the case, and the case gets plugged in
  when low or at night;
- firmware versions roll out over time, one release falls inside the window (7A305, in the middle);
  ``regressed_firmware`` ships one version whose buds drain ``regression`` times as
  fast (:meth:`Fleet.firmware_truth`);
- a share of devices carries an injected fault, reported as ground truth by
  :meth:`Fleet.truth` (kind, bud, onset day, size). ``fault_mix`` chooses the
  kinds (:data:`FAULT_MIXES`). The strong ones act from the start:
  ``fast_drain`` (both buds ×2), ``imbalance`` (one bud ×1.7), ``stuck_sensor``
  (one bud reports the same level). The subtle ones begin on an onset day
  between a quarter and 60% into the window, as a real battery's fault would:
  ``subtle_drain`` (both buds +15% to +40%), ``growing_imbalance`` (one bud's
  drain grows linearly to +30% to +60% by the end), ``cycle_wear`` (drain
  grows by 1-3% with every full charge cycle of the buds), ``heat_drain`` (the
  buds run 3-6 °C warmer in the ear and drain 5% more per degree) and
  ``dropout`` (one bud's sensor reads 0% on 3% of samples, then recovers);
- v1 and v2 devices are mixed; malformed records can be injected at a rate.

``shape="upload"`` sends the same samples as device uploads instead of one
message each (``podpulse.contract``): a device's samples are buffered until
``upload_size`` of them (or a firmware update, or the end) close the upload. A
malformed sample is then a bad value inside an upload (battery 250, seq
"seven"), refused on its own.

The same seed and spec give the same events, byte for byte. Without an
explicit start the simulated range is the most recent one that starts on a
Monday 00:00 AEST and ends by now (:func:`default_start`), so its events fall
inside the decoder's event-time window whatever the date; two such starts are
whole weeks apart, and the events differ only in their times.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from enum import Enum
from typing import Iterator

import msgspec
import numpy as np

from podpulse import geo
from podpulse.contract import MAX_SAMPLES, SAMPLE_FIELDS, Event, Sample, Upload, encoder
from podpulse.localtime import AEST

__all__ = ["FleetSpec", "Fleet", "Chunk", "Shape", "SHAPES", "Summary", "simulate", "FAULTS", "STRONG_FAULTS", "SUBTLE_FAULTS",
           "FAULT_MIXES", "FAULT_SIZE", "fault_mix", "default_start"]

class Shape(str, Enum):
    """Message shapes of the event contract: one sample per message, or a device's samples in one."""

    event = "event"
    upload = "upload"


SHAPES = tuple(s.value for s in Shape)


def default_start(hours: float, now: datetime | None = None) -> datetime:
    """The Monday 00:00 AEST (Sunday 14:00 UTC) at or before ``now - hours``.

    A simulation of ``hours`` from there ends at or before ``now`` (the wall
    clock when None) and begins on a Monday, as the weekly patterns expect.
    """
    now = datetime.now(timezone.utc) if now is None else now
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    try:
        local = now.astimezone(timezone.utc) - timedelta(hours=hours) + AEST
    except OverflowError as e:
        raise ValueError(f"{hours} hours before {now.isoformat()} is out of the calendar's range") from e
    monday = local.date() - timedelta(days=local.weekday())
    return datetime(monday.year, monday.month, monday.day, tzinfo=timezone.utc) - AEST

MODELS = ("AirPods Pro", "AirPods Pro 2", "AirPods Pro 2 USB-C", "AirPods Pro 3")
MODEL_SHARE = (0.15, 0.35, 0.30, 0.20)
HAS_ADAPTIVE = np.array([False, True, True, True])
FIRMWARE = ("6F21", "6F25", "6F29", "7A294", "7A305")
FIRMWARE_AGE_DAYS = (400, 260, 150, 60)  # released this long before the start; the last
MAX_FIRMWARE = np.array([2, 4, 4, 4])  # one mid-window. The first model stops at 6F29.
HOSTS = ("iphone", "ipad", "mac", "android", "watch")
HOST_SHARE = (0.80, 0.05, 0.07, 0.06, 0.02)
STRONG_FAULTS = ("fast_drain", "imbalance", "stuck_sensor")
SUBTLE_FAULTS = ("subtle_drain", "growing_imbalance", "cycle_wear", "heat_drain", "dropout")
FAULTS = STRONG_FAULTS + SUBTLE_FAULTS
FAULT_MIXES = {"strong": STRONG_FAULTS, "subtle": SUBTLE_FAULTS, "all": FAULTS}
# the size each subtle fault is drawn with, uniformly (what Fleet.truth reports as "size")
FAULT_SIZE = {"subtle_drain": (0.15, 0.40), "growing_imbalance": (0.30, 0.60), "cycle_wear": (0.01, 0.03),
              "heat_drain": (3.0, 6.0)}
HEAT_DRAIN_PER_C = 0.05
DROPOUT_RATE = 0.03
PROFILES = ("commuter", "desk", "evening")
PROFILE_SHARE = {True: (0.5, 0.3, 0.2), False: (0.2, 0.4, 0.4)}  # by urban


def _hourly(base: float, peaks: dict[range, float]) -> np.ndarray:
    rate = np.full(24, base)
    rate[0:6] = 0.01
    for hours, r in peaks.items():
        rate[list(hours)] = r
    return rate


# Sessions started per hour, by [profile, weekend, local hour].
SESSION_RATE = np.array([
    [_hourly(0.06, {range(7, 9): 0.7, range(12, 13): 0.2, range(17, 19): 0.7, range(20, 23): 0.2}),
     _hourly(0.05, {range(10, 18): 0.2, range(19, 23): 0.22})],
    [_hourly(0.05, {range(7, 8): 0.12, range(9, 17): 0.28, range(19, 23): 0.28}),
     _hourly(0.05, {range(10, 18): 0.18, range(19, 23): 0.25})],
    [_hourly(0.04, {range(18, 24): 0.5}),
     _hourly(0.05, {range(11, 17): 0.15, range(18, 24): 0.45})],
])
SESSION_MINUTES = 45.0


@dataclass(frozen=True, kw_only=True)
class FleetSpec:
    devices: int = 2_000
    hours: float = 24.0
    start: datetime | None = None  # None → default_start(the simulated hours): the latest Monday that fits
    seed: int = 7
    interval_s: int = 300
    fault_share: float = 0.02
    fault_mix: tuple[str, ...] = STRONG_FAULTS  # the kinds, assigned in turn to the faulty devices
    regressed_firmware: str | None = None  # a FIRMWARE version whose buds drain `regression` times as fast
    regression: float = 1.25
    malformed_rate: float = 0.0
    v2_share: float = 0.6
    shape: str = "event"  # or "upload": a device's samples in messages of upload_size
    upload_size: int = 50

    def __post_init__(self) -> None:
        checks = [
            (self.devices >= 1, "devices must be at least 1"),
            (self.hours > 0, "hours must be positive"),
            (60 <= self.interval_s <= 3600, "interval_s must be between 60 and 3600"),
            (0 <= self.fault_share <= 1, "fault_share must be between 0 and 1"),
            (0 <= self.malformed_rate <= 1, "malformed_rate must be between 0 and 1"),
            (0 <= self.v2_share <= 1, "v2_share must be between 0 and 1"),
            (self.regressed_firmware in (None, *FIRMWARE),
             f"regressed_firmware must be one of {', '.join(FIRMWARE)}, got {self.regressed_firmware!r}"),
            (0.5 <= self.regression <= 3, "regression must be a drain multiplier from 0.5 to 3"),
            (self.shape in SHAPES, f"shape must be one of {', '.join(SHAPES)}, got {self.shape!r}"),
            (1 <= self.upload_size <= MAX_SAMPLES, f"upload_size must be between 1 and {MAX_SAMPLES}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        object.__setattr__(self, "fault_mix", fault_mix(self.fault_mix))
        if self.start is None:  # the whole simulated range (whole intervals) ends by now
            object.__setattr__(self, "start", default_start(self.steps * self.interval_s / 3600))
        if self.start.tzinfo is None:
            raise ValueError("start must be timezone-aware")

    @property
    def steps(self) -> int:
        return max(1, round(self.hours * 3600 / self.interval_s))

    @property
    def start_ms(self) -> int:
        return int(self.start.timestamp() * 1000)


def fault_mix(kinds: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """A fault mix: a name of :data:`FAULT_MIXES`, or kinds of :data:`FAULTS` (a comma-separated string
    or a sequence), in the order they are dealt to the faulty devices."""
    if isinstance(kinds, str):
        kinds = FAULT_MIXES.get(kinds) or tuple(k.strip() for k in kinds.split(",") if k.strip())
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in FAULTS]
    if not kinds or unknown:
        raise ValueError(f"a fault mix is one of {', '.join(FAULT_MIXES)} or kinds among {', '.join(FAULTS)}"
                         + (f"; not {', '.join(map(repr, unknown))}" if unknown else ""))
    return kinds


def allocate(total: int, weights) -> np.ndarray:
    """Split ``total`` over ``weights`` by largest remainder: shares as exact as whole devices allow."""
    w = np.asarray(weights, dtype=np.float64)
    exact = total * w / w.sum()
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(-(exact - counts), kind="stable")[: total - counts.sum()]] += 1
    return counts


def _draw_postcodes(rng: np.random.Generator, ranges: tuple[tuple[int, int], ...], n: int) -> np.ndarray:
    lo = np.array([r[0] for r in ranges])
    size = np.array([r[1] - r[0] + 1 for r in ranges])
    which = rng.choice(len(ranges), size=n, p=size / size.sum())
    return lo[which] + (rng.random(n) * size[which]).astype(np.int64)


@dataclass
class Fleet:
    """The static attributes of every device, one numpy array per attribute."""

    spec: FleetSpec
    device_id: np.ndarray
    state: np.ndarray  # index into geo.STATES
    urban: np.ndarray
    postcode: np.ndarray
    model: np.ndarray
    v2: np.ndarray
    host: np.ndarray
    profile: np.ndarray
    intensity: np.ndarray  # multiplies the session rate
    volume: np.ndarray  # preferred output level, dBA
    anc_affinity: np.ndarray
    health: np.ndarray  # battery capacity left, 0.7-1.0
    fw_delay_ms: np.ndarray  # how long after a release this device installs it
    jitter_ms: np.ndarray  # offset of its samples inside the interval
    fault: np.ndarray  # -1 or index into FAULTS
    fault_bud: np.ndarray  # 0 left, 1 right (the one-bud faults)
    conversation: np.ndarray  # conversation awareness switched on (reported by v2)
    fault_onset_ms: np.ndarray  # when the fault begins (the start for the strong ones)
    fault_size: np.ndarray  # FAULT_SIZE's draw, 0 where the kind has none

    @classmethod
    def build(cls, spec: FleetSpec) -> "Fleet":
        rng = np.random.default_rng(spec.seed)
        n = spec.devices
        per_state = allocate(n, [s.population for s in geo.STATES])
        state, urban, postcode = [], [], []
        for i, (s, count) in enumerate(zip(geo.STATES, per_state)):
            n_urban = int(round(count * s.urban_share))
            state.append(np.full(count, i, dtype=np.int8))
            urban.append(np.arange(count) < n_urban)
            postcode.append(np.concatenate([_draw_postcodes(rng, s.urban, n_urban),
                                            _draw_postcodes(rng, s.rural, count - n_urban)]))
        state, urban, postcode = map(np.concatenate, (state, urban, postcode))
        order = rng.permutation(n)  # interleave states so device ids carry no order
        state, urban, postcode = state[order], urban[order], postcode[order]

        profile = np.where(urban, rng.choice(3, n, p=PROFILE_SHARE[True]),
                           rng.choice(3, n, p=PROFILE_SHARE[False]))
        fault = np.full(n, -1, dtype=np.int8)
        faulty = rng.permutation(n)[: int(round(n * spec.fault_share))]
        kinds = np.array([FAULTS.index(k) for k in spec.fault_mix], dtype=np.int8)
        fault[faulty] = kinds[np.arange(len(faulty)) % len(kinds)]
        ids = rng.integers(0, 2**63, n, dtype=np.int64)
        # drawn apart from the rest, so that a fleet's other attributes do not depend on its fault mix
        details = np.random.default_rng([spec.seed, 2])
        length_ms = spec.steps * spec.interval_s * 1000
        onset = spec.start_ms + details.uniform(0.25, 0.60, n) * length_ms
        onset = np.where(np.isin(fault, [FAULTS.index(k) for k in SUBTLE_FAULTS]), onset, spec.start_ms)
        low_high = np.array([FAULT_SIZE.get(k, (0.0, 0.0)) for k in FAULTS] + [(0.0, 0.0)])
        u = details.random(n)
        size = low_high[fault, 0] + u * (low_high[fault, 1] - low_high[fault, 0])  # fault -1: the zero row
        return cls(
            spec=spec,
            device_id=np.array([f"ap-{x:016x}" for x in ids.tolist()], dtype=object),
            state=state, urban=urban, postcode=postcode,
            model=rng.choice(len(MODELS), n, p=MODEL_SHARE),
            v2=rng.random(n) < spec.v2_share,
            host=rng.choice(len(HOSTS), n, p=HOST_SHARE),
            profile=profile,
            intensity=rng.lognormal(0.0, 0.35, n),
            # about one listener in ten plays loud enough to pass the WHO weekly guide
            volume=np.clip(np.where(rng.random(n) < 0.1, rng.normal(87.0, 3.0, n),
                                    rng.normal(66.0, 5.0, n)), 50.0, 100.0),
            anc_affinity=rng.normal(0.0, 0.8, n),
            health=rng.uniform(0.7, 1.0, n),
            fw_delay_ms=rng.exponential(2 * 86_400_000, n),
            jitter_ms=rng.integers(0, spec.interval_s * 1000, n),
            fault=fault,
            fault_bud=rng.integers(0, 2, n),
            conversation=rng.random(n) < 0.4,
            fault_onset_ms=onset.astype(np.int64),
            fault_size=size,
        )

    def __len__(self) -> int:
        return len(self.device_id)

    def firmware_truth(self) -> dict | None:
        """The regressed firmware, if the spec ships one: its version, drain multiplier, release (the
        AEST day its rollout starts; releases before the window started before it) and the models that
        can run it."""
        spec = self.spec
        if spec.regressed_firmware is None:
            return None
        i = FIRMWARE.index(spec.regressed_firmware)
        release_ms = (spec.start_ms - FIRMWARE_AGE_DAYS[i] * 86_400_000 if i < len(FIRMWARE_AGE_DAYS)
                      else spec.start_ms + int(spec.hours * 3_600_000 / 2))
        release = datetime.fromtimestamp(release_ms / 1000, timezone.utc) + AEST
        return {"firmware": spec.regressed_firmware, "drain": spec.regression, "release": release.date().isoformat(),
                "models": [m for m, top in zip(MODELS, MAX_FIRMWARE.tolist()) if top >= i]}

    def profiles(self) -> dict[str, str]:
        """Each device's behaviour profile (``commuter``, ``desk``, ``evening``): the truth segments meet."""
        return {d: PROFILES[p] for d, p in zip(self.device_id.tolist(), self.profile.tolist())}

    def truth(self) -> list[dict]:
        """Ground truth of the injected faults: one dict per faulty device (the AEST day of its onset;
        ``bud`` for the one-bud kinds; ``size`` as :data:`FAULT_SIZE` draws it, else null)."""
        bud = ("left", "right")
        one_bud = {"imbalance", "stuck_sensor", "growing_imbalance", "dropout"}
        out = []
        for i in np.flatnonzero(self.fault >= 0).tolist():
            kind = FAULTS[self.fault[i]]
            onset = datetime.fromtimestamp(self.fault_onset_ms[i] / 1000, timezone.utc) + AEST
            out.append({"device_id": self.device_id[i], "fault": kind,
                        "bud": bud[self.fault_bud[i]] if kind in one_bud else None,
                        "onset": onset.date().isoformat(),
                        "size": round(float(self.fault_size[i]), 4) if kind in FAULT_SIZE else None})
        return out


@dataclass
class Chunk:
    """The messages of one interval, ready to produce: key = device id."""

    step: int  # index of the interval
    keys: list[bytes]
    values: list[bytes]
    device: np.ndarray  # fleet index of each message
    malformed: np.ndarray  # per message: samples corrupted on purpose (0 or 1 for an event)
    samples: np.ndarray | None = None  # per upload: its samples; None: one event per message

    @property
    def events(self) -> int:
        return len(self.values) if self.samples is None else int(self.samples.sum())


class _Uploads:
    """Buffers each device's samples until ``size`` of them, or a firmware update, close its upload."""

    def __init__(self, devices: int, size: int):
        self.size = size
        self.open: list[list] = [[] for _ in range(devices)]  # per device: [(Event, corruption or -1)]

    def add(self, step: int, devices: list[int], events: list[Event], corrupt: dict[int, int],
            keys: list[bytes]) -> Chunk | None:
        closed = []
        for i, (d, event) in enumerate(zip(devices, events)):
            buffered = self.open[d]
            if buffered and buffered[0][0].firmware != event.firmware:
                closed.append((d, buffered))
                buffered = self.open[d] = []
            buffered.append((event, corrupt.get(i, -1)))
            if len(buffered) == self.size:
                closed.append((d, buffered))
                self.open[d] = []
        return self._chunk(step, closed, keys)

    def rest(self, step: int, keys: list[bytes]) -> Chunk | None:
        return self._chunk(step, [(d, b) for d, b in enumerate(self.open) if b], keys)

    @staticmethod
    def _chunk(step: int, closed: list, keys: list[bytes]) -> Chunk | None:
        if not closed:
            return None
        values = [_encode_upload(buffered) for _, buffered in closed]
        return Chunk(step, [keys[d] for d, _ in closed], values, np.array([d for d, _ in closed]),
                     np.array([sum(c >= 0 for _, c in b) for _, b in closed]),
                     np.array([len(b) for _, b in closed]))


_SAMPLE_AT = [Event.__struct_fields__.index(f) for f in SAMPLE_FIELDS]  # a Sample's fields in an Event


def _encode_upload(buffered: list[tuple[Event, int]]) -> bytes:
    first = buffered[0][0]
    samples = []
    for event, corruption in buffered:
        fields = msgspec.structs.astuple(event)
        sample = Sample(*(fields[i] for i in _SAMPLE_AT))
        if corruption >= 0:  # a bad value inside the upload: refused on its own, the others kept
            sample = msgspec.structs.replace(sample, **({"battery_left": 250} if corruption % 2 else {"seq": "seven"}))
        samples.append(sample)
    return encoder.encode(Upload(first.schema_version, first.device_id, first.model, first.firmware, first.postcode,
                                 first.host_device, samples))


def _corrupt(value: bytes, kind: int) -> bytes:
    if kind == 0:
        return value[: len(value) // 2]  # truncated
    if kind == 1:
        return b"\x00\x01 not json " + value[:8]
    record = msgspec.json.decode(value)
    if kind == 2:
        record["battery_left"] = 250
    elif kind == 3:
        record["seq"] = "seven"
    elif kind == 4:
        record["postcode"] = "0000"
    else:
        del record["device_id"]
    return msgspec.json.encode(record)


def simulate(spec: FleetSpec, fleet: Fleet | None = None) -> Iterator[Chunk]:
    """Yield the fleet's events interval by interval, in event-time order."""
    fleet = fleet or Fleet.build(spec)
    rng = np.random.default_rng([spec.seed, 1])
    rng_faults = np.random.default_rng([spec.seed, 3])  # apart: a fleet without dropouts draws the same
    n, step_s = len(fleet), spec.interval_s
    step_h = step_s / 3600.0
    tz_h = np.array([s.utc_offset_h for s in geo.STATES])[fleet.state]
    releases = [spec.start_ms - d * 86_400_000 for d in FIRMWARE_AGE_DAYS]
    releases.append(spec.start_ms + int(spec.hours * 3_600_000 / 2))
    max_fw = MAX_FIRMWARE[fleet.model]
    regressed = None if spec.regressed_firmware is None else FIRMWARE.index(spec.regressed_firmware)
    adaptive_ok = HAS_ADAPTIVE[fleet.model]
    drain_mult = np.ones((2, n)) / fleet.health
    drain_mult[:, fleet.fault == 0] *= 2.0  # fast_drain: both buds
    imbalance = fleet.fault == 1
    drain_mult[fleet.fault_bud[imbalance], np.flatnonzero(imbalance)] *= 1.7
    stuck = fleet.fault == 2
    subtle = {k: np.flatnonzero(fleet.fault == FAULTS.index(k)) for k in SUBTLE_FAULTS}
    end_ms = spec.start_ms + spec.steps * step_s * 1000
    growth_span = np.maximum(end_ms - fleet.fault_onset_ms, 1)
    cycles = np.zeros(n)  # full charge cycles of the buds since the fault's onset (cycle_wear)
    dropout_bud = fleet.fault_bud
    heat = np.zeros(n)  # °C the buds run warmer in the ear (heat_drain)

    battery = np.vstack([rng.uniform(40, 100, (2, n)), rng.uniform(20, 100, (1, n))])  # L, R, case
    stuck_value = np.round(battery[0]).astype(np.int64)
    in_use = np.zeros(n, dtype=bool)
    plugged = np.zeros(n, dtype=bool)
    seq = np.zeros(n, dtype=np.int64)
    ids = fleet.device_id
    keys_all = [d.encode() for d in ids]
    models = np.array(MODELS, dtype=object)[fleet.model]
    hosts = np.array(HOSTS, dtype=object)[fleet.host]
    postcodes = np.array([f"{p:04d}" for p in fleet.postcode.tolist()], dtype=object)
    modes = np.array(("off", "anc", "transparency", "adaptive"), dtype=object)
    charging_names = np.array(("none", "buds", "case", "both"), dtype=object)
    firmware = np.array(FIRMWARE, dtype=object)
    uploads = _Uploads(n, spec.upload_size) if spec.shape == "upload" else None

    for step in range(spec.steps):
        t_ms = spec.start_ms + step * step_s * 1000
        started = t_ms >= fleet.fault_onset_ms
        fw_all = np.maximum(np.minimum(sum((t_ms >= r + fleet.fw_delay_ms).astype(np.int64) for r in releases) - 1,
                                       max_fw), 0)
        mult = drain_mult
        if regressed is not None:
            mult = np.where(fw_all == regressed, drain_mult * spec.regression, drain_mult)
        if any(i.size for i in subtle.values()):
            mult = mult.copy()
            i = subtle["subtle_drain"][started[subtle["subtle_drain"]]]
            mult[:, i] *= 1.0 + fleet.fault_size[i]
            i = subtle["growing_imbalance"][started[subtle["growing_imbalance"]]]
            mult[fleet.fault_bud[i], i] *= 1.0 + fleet.fault_size[i] * (t_ms - fleet.fault_onset_ms[i]) / growth_span[i]
            i = subtle["cycle_wear"]
            mult[:, i] *= 1.0 + fleet.fault_size[i] * cycles[i]
            i = subtle["heat_drain"][started[subtle["heat_drain"]]]
            heat[i] = fleet.fault_size[i]
            mult[:, i] *= 1.0 + HEAT_DRAIN_PER_C * heat[i]
        local_h = t_ms / 3_600_000 + tz_h
        hour = (local_h % 24).astype(np.int64)
        weekend = ((local_h // 24).astype(np.int64) + 3) % 7 >= 5  # 1970-01-01 was a Thursday
        u = rng.random((8, n))

        # Sessions start by the local hour's rate and end after ~45 minutes or on a flat bud.
        p_start = SESSION_RATE[fleet.profile, weekend.astype(np.int64), hour] * fleet.intensity * step_h
        level = battery[:2].min(axis=0)
        starts = ~in_use & (u[0] < p_start) & (level > 15)
        stops = in_use & ((u[1] < step_s / 60.0 / SESSION_MINUTES) | (level < 3))
        in_use = (in_use | starts) & ~stops

        # Context of the ones in use: ambient noise, mode, playback, output level.
        commuting = ~weekend & np.isin(hour, (7, 8, 17, 18)) & (fleet.profile == 0)
        ambient = np.where(fleet.urban, np.where(commuting, 72.0, 54.0), np.where(commuting, 63.0, 44.0))
        ambient = np.clip(ambient + rng.normal(0.0, 5.0, n), 25.0, 100.0)
        p_anc = 1.0 / (1.0 + np.exp(-(0.18 * (ambient - 58.0) + fleet.anc_affinity)))
        mode = np.where(u[3] < p_anc, np.where(adaptive_ok & (u[4] < 0.35), 3, 1),
                        np.where(u[3] < p_anc + 0.12, 2, 0))
        listening = in_use & (u[5] < 0.88)
        playback = np.where(listening, step_s * (0.55 + 0.45 * u[6]), 0.0)
        cancelling = (mode == 1) | (mode == 3)
        output = np.where(listening, fleet.volume + 0.35 * (ambient - 55.0) - 4.0 * cancelling
                          + rng.normal(0.0, 1.5, n), 0.0)
        output = np.clip(output, 0.0, 110.0)
        right_in = in_use & (u[7] > 0.04)  # a few listen with one bud

        # Battery: drain in the ear, recharge in the case, the case from the wall.
        rate_h = (7.0 + (playback / step_s) * (6.0 + 0.45 * (output - 60.0))
                  + np.select([mode == 1, mode == 3, mode == 2], [3.5, 2.8, 2.0], 0.0))
        ear = np.vstack([in_use, right_in]).astype(np.float64)
        battery[:2] -= np.maximum(rate_h * step_h, 0.0) * mult * (0.1 + 0.9 * ear) * in_use
        battery[:2] = np.maximum(battery[:2], 0.0)
        in_case = ~in_use
        room = np.where(in_case & (battery[2] > 0), np.minimum(100.0 - battery[:2], 11.0), 0.0)
        charging_buds = room.sum(axis=0) > 0.05
        battery[:2] += room
        cycles += np.where(started, room.sum(axis=0) / 200.0, 0.0)
        battery[2] = np.maximum(battery[2] - room.sum(axis=0) / 2 / 4.5, 0.0)
        plug_now = ~plugged & (((battery[2] < 20) & (u[2] < 0.08))
                               | ((hour >= 21) & (battery[2] < 80) & (u[2] < 0.03)))
        plugged = (plugged | plug_now) & (battery[2] < 99.5)
        battery[2] = np.where(plugged, np.minimum(battery[2] + 12.0, 100.0), battery[2])

        active = np.flatnonzero(in_use | charging_buds | plugged)
        if active.size == 0:
            continue
        seq[active] += 1
        fw_idx = fw_all[active]
        reported = np.round(battery[:, active]).astype(np.int64)
        reported[0] = np.where(stuck[active] & (fleet.fault_bud[active] == 0), stuck_value[active], reported[0])
        reported[1] = np.where(stuck[active] & (fleet.fault_bud[active] == 1), stuck_value[active], reported[1])
        if subtle["dropout"].size:
            out = (fleet.fault[active] == FAULTS.index("dropout")) & started[active]
            out &= rng_faults.random(active.size) < DROPOUT_RATE
            reported[dropout_bud[active][out], np.flatnonzero(out)] = 0
        charging = np.where(in_use[active], 0, charging_buds[active].astype(np.int64) + 2 * plugged[active])
        v2 = fleet.v2[active]
        temp = np.where(in_use[active], 32.0 + 0.6 * cancelling[active] + 0.03 * (output[active] - 60.0)
                        + heat[active], 28.0 + 2.0 * charging_buds[active]) + rng.normal(0.0, 0.3, (2, active.size))
        temp = np.round(temp, 1).tolist()
        v2_list = v2.tolist()

        events = map(
            Event,
            np.where(v2, 2, 1).tolist(), ids[active].tolist(), seq[active].tolist(),
            (t_ms + fleet.jitter_ms[active]).tolist(), models[active].tolist(),
            firmware[fw_idx].tolist(), reported[0].tolist(), reported[1].tolist(), reported[2].tolist(),
            charging_names[charging].tolist(), in_use[active].tolist(), right_in[active].tolist(),
            modes[mode[active]].tolist(), np.round(playback[active], 1).tolist(),
            np.round(output[active], 1).tolist(), np.round(ambient[active], 1).tolist(),
            postcodes[active].tolist(), hosts[active].tolist(),
            [step_s if x else None for x in v2_list],
            [t if x else None for t, x in zip(temp[0], v2_list)],
            [t if x else None for t, x in zip(temp[1], v2_list)],
            [c if x else None for c, x in zip(fleet.conversation[active].tolist(), v2_list)],
        )
        hit, kinds = np.zeros(0, np.int64), np.zeros(0, np.int64)
        if spec.malformed_rate > 0:
            hit = np.flatnonzero(rng.random(active.size) < spec.malformed_rate)
            kinds = rng.integers(0, 6, hit.size)
        if uploads is not None:
            chunk = uploads.add(step, active.tolist(), list(events), dict(zip(hit.tolist(), kinds.tolist())), keys_all)
            if chunk is not None:
                yield chunk
            continue
        values = list(map(encoder.encode, events))
        malformed = np.zeros(active.size, dtype=np.int64)
        for i, kind in zip(hit.tolist(), kinds.tolist()):
            values[i] = _corrupt(values[i], kind)
        malformed[hit] = 1
        yield Chunk(step, [keys_all[i] for i in active.tolist()], values, active, malformed)
    if uploads is not None:
        chunk = uploads.rest(spec.steps - 1, keys_all)
        if chunk is not None:
            yield chunk


@dataclass
class Summary:
    """Counts of what a simulation produced, for the CLI's closing table."""

    fleet: Fleet
    events: int = 0
    messages: int = 0
    malformed: int = 0
    events_by_state: Counter = field(default_factory=Counter)
    events_by_class: Counter = field(default_factory=Counter)
    events_by_version: Counter = field(default_factory=Counter)

    def add(self, chunk: Chunk) -> None:
        f = self.fleet
        self.events += chunk.events
        self.messages += len(chunk.values)
        self.malformed += int(chunk.malformed.sum())
        for counter, attr, names in ((self.events_by_state, f.state, geo.STATE_CODES),
                                     (self.events_by_class, f.urban.astype(np.int8), ("rural", "urban")),
                                     (self.events_by_version, f.v2.astype(np.int8), ("v1", "v2"))):
            counts = np.bincount(attr[chunk.device], weights=chunk.samples, minlength=len(names)).astype(np.int64)
            counter.update({names[i]: int(c) for i, c in enumerate(counts) if c})

    def devices_by_state(self) -> dict[str, int]:
        counts = np.bincount(self.fleet.state, minlength=len(geo.STATES))
        return {s.code: int(c) for s, c in zip(geo.STATES, counts)}

    def as_dict(self) -> dict:
        f = self.fleet
        return {
            "devices": len(f),
            "events": self.events,
            "messages": self.messages,
            "malformed": self.malformed,
            "faulty_devices": int((f.fault >= 0).sum()),
            "devices_by_state": self.devices_by_state(),
            "devices_by_class": {"urban": int(f.urban.sum()), "rural": int((~f.urban).sum())},
            "devices_by_version": {"v1": int((~f.v2).sum()), "v2": int(f.v2.sum())},
            "events_by_state": dict(self.events_by_state),
            "events_by_class": dict(self.events_by_class),
            "events_by_version": dict(self.events_by_version),
        }
