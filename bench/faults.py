"""Fault matrix: each fault injected into the real pipeline, and what it cost.

For every fault, a fresh topic (4 partitions) receives ``--events`` simulated
valid events (each a distinct (device_id, seq)); the pipeline as users run it
(``IngestSupervisor`` in local Ray, 2 consumers, batches of at most 500
messages, 50 ms linger, one batch in flight per consumer, so that a fault can
land mid-stream) ingests them into a fresh store while the fault happens. Then
the topic, the store and the dead-letter topic are read back and compared.
Servers start once per run: the embedded Tansu broker, Apache Kafka 4 and a
private PostgreSQL cluster (``testbed``; needs a checkout with ``make infra``
done); each PostgreSQL store is a fresh schema, each DuckDB store a fresh file.

Faults (``--only`` takes these names, comma-separated):

=================== ================= ===================================================
name                broker + store    what happens
=================== ================= ===================================================
poison              Tansu + DuckDB    17 kinds of poison record (:data:`POISON_KINDS`), 3 of
poison-kafka        Kafka + PostgreSQL each, mixed into the valid traffic: one row per kind
resend              Tansu + DuckDB    the same valid events produced again at new offsets
                                      (10% at once, then all of them after a first ingest)
consumer-kill       Tansu + DuckDB    ``ray.kill`` of a consumer at 25% stored
writer-kill         Tansu + DuckDB    ``ray.kill(writer, no_restart=False)`` at 25% stored
driver-kill         Tansu + PostgreSQL ``podpulse ingest --until-caught-up`` in a subprocess
                                      (at least 100,000 events), SIGKILL at 25% stored, then run
                                      again to the end; the note says how long the killed run's
                                      actors went on storing after the kill
db-down-at-start    Kafka + PostgreSQL PostgreSQL stopped before ingest starts, started 5 s later
db-restart          Kafka + PostgreSQL PostgreSQL restarted at 25% stored
broker-restart      Kafka + DuckDB    Apache Kafka stopped at 25% stored, started 3 s later; the
                                      second half of the events is produced after it
disk-full           Tansu + DuckDB    the DuckDB file on a 24 MB tmpfs until ingest fills it
                                      (at least 100,000 events), then remounted at 512 MB
=================== ================= ===================================================

One row per fault (per poison kind), keys:

- ``produced``: distinct (device_id, seq) among the valid records read back from the topic;
- ``stored``: distinct (device_id, seq) in the store's ``events`` table;
- ``dead_lettered``: distinct source (partition, offset) in the dead-letter topic (for a
  poison kind: those of its own records); ``expected_dead_letters``: poison records produced;
- ``lost``: valid identities produced but not stored, plus poison records not in the
  dead-letter topic;
- ``duplicated``: ``events`` rows beyond one per identity, plus ``sum(devices.events)`` −
  ``stored`` (events the rollups counted twice; negative if they counted fewer);
- ``recovery_s``: seconds from the fault's injection (a kill), or its end (an outage: the
  server answering again, the disk given space), until the offsets stored with the data
  covered every record of the topic, polled every 0.1 s (from PostgreSQL directly; for DuckDB,
  whose file the writer locks, through the writer's ``committed_offsets``); null for faults with no
  injection time (poison, resend) or when that never happened (then ``note`` says why);
- ``note``: how the fault went: share stored at injection, restarts, root causes of
  failures as the pipeline counted them, a timeout.

Poison rows come from one run per broker + store: their ``produced``, ``stored``,
``duplicated`` and the valid-event part of ``lost`` are that run's, repeated on each
of its 17 rows. Every number is read from the topic, the store or the dead-letter
topic after the run; nothing is inferred from what the pipeline reports.

    podpulse bench faults [--events 20000] [--only poison,writer-kill] [--json]

``--json`` prints one JSON object per row, one per line (JSON Lines), each as soon as
its fault is done; without it, a table at the end. The whole matrix took 209 s on 2 cores
with the defaults (2026-12-02).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import msgspec
import psutil
import ray

from actors.config import IngestConfig
from actors.supervisor import IngestSupervisor
from podpulse.dead_letters import read_dead_letters
from podpulse.errors import ConfigError
from podpulse.runtime import init_ray
from storage.config import StorageConfig
from storage.reader import run_queries
from testbed.servers import Servers
from testbed.stores import postgres_store
from testbed.topics import Traffic, first_records, produce, read_topic
from testbed.watch import POLL_S, Watch, store_offsets, writer_offsets

__all__ = ["FAULTS", "POISON_KINDS", "Servers", "run", "select"]

PARTITIONS = 4
PIPELINE = {"consumers": 2, "batch_size": 500, "linger_ms": 50, "max_in_flight": 1}
POISON_COPIES = 3
MID_STREAM_SHARE = 0.25  # kills and restarts happen once this share of the records is stored
START_TIMEOUT_S = 120.0  # until the share above is stored
RECOVERY_TIMEOUT_S = 240.0  # after the fault, until everything is stored
DISK_MB, DISK_FULL_EVENTS, DISK_GROWN_MB = 24, 100_000, 512
# A SIGKILLed driver's actors go on for ~2-3 s (until they notice their raylet is gone), storing ~15k
# events/s: the topic must hold more than that for the second run to have anything left to resume.
DRIVER_KILL_EVENTS = 100_000
KEYS = ("fault", "store", "broker", "produced", "stored", "dead_lettered", "expected_dead_letters",
        "lost", "duplicated", "recovery_s", "note")


# -- poison ------------------------------------------------------------------------------

def _with(base: dict, **changes) -> bytes:
    return json.dumps({**base, **changes}).encode()


def _without(base: dict, name: str) -> bytes:
    return json.dumps({k: v for k, v in base.items() if k != name}).encode()


def _deep(base: dict, depth: int = 5000) -> bytes:
    text = json.dumps(base)
    return (text[:-1] + ', "nested": ' + '{"a": ' * depth + "1" + "}" * depth + "}").encode()


def _ms(year: int) -> int:
    return int(datetime(year, 6, 1, tzinfo=timezone.utc).timestamp() * 1000)


POISON_KINDS: dict[str, Callable[[dict], bytes]] = {
    "seq_2_64": lambda b: _with(b, seq=2**64),
    "nested_5000_deep": _deep,
    "nul_in_model": lambda b: _with(b, model="AirPods\x00Pro"),
    "extras_over_4000_bytes": lambda b: _with(b, **{f"vendor_{i}": "x" * 1000 for i in range(5)}),
    "event_time_2099": lambda b: _with(b, event_time_ms=_ms(2099)),
    "event_time_2015": lambda b: _with(b, event_time_ms=_ms(2015)),
    "lone_surrogate_in_model": lambda b: _with(b, model="\ud800"),
    "record_900kb": lambda b: _with(b, blob="x" * 900_000),
    "not_json": lambda b: b"\x00\x01 not json {" + json.dumps(b).encode()[:40],
    "json_array": lambda b: b"[" + json.dumps(b).encode() + b"]",
    "json_null": lambda b: b"null",
    "empty_value": lambda b: b"",
    "wrong_type_battery": lambda b: _with(b, battery_left="high"),
    "missing_field": lambda b: _without(b, "firmware"),
    "battery_101": lambda b: _with(b, battery_left=101),
    "schema_version_0": lambda b: _with(b, schema_version=0),
    "firmware_10000_chars": lambda b: _with(b, firmware="7" * 10_000),
}
"""Each kind makes one record from a valid event (its own device id, so an accepted one shows)."""


def poison_records(template: bytes, copies: int = POISON_COPIES) -> list[tuple[bytes, bytes]]:
    """(key, value) of every poison record; the key ``poison/KIND/i`` says which kind it is."""
    base = msgspec.json.decode(template)
    out = []
    for kind, make in POISON_KINDS.items():
        for i in range(copies):
            device = f"poison_{kind}_{i}"[:64]
            out.append((f"poison/{kind}/{i}".encode(), make({**base, "device_id": device, "seq": i})))
    return out


# -- stores ---------------------------------------------------------------------------------------

def fresh_store(servers: Servers, kind: str, name: str, where: Path) -> StorageConfig:
    if kind == "duckdb":
        return StorageConfig.embedded(where / f"{name}-{uuid.uuid4().hex[:6]}.duckdb")
    return postgres_store(servers.get("postgres"), f"fault_{name}")


@dataclass
class Measured:
    stored: int | None = None
    rows: int | None = None
    counted: int | None = None  # sum(devices.events)
    stored_ids: set = field(default_factory=set)
    letters: set = field(default_factory=set)  # distinct source (partition, offset)
    reasons: dict = field(default_factory=dict)  # (partition, offset) → first reason
    error: str | None = None
    pseudonym: Callable[[str], str] = str  # a device id as sent → as stored (the store's pseudonym key)

    def lost_valid(self, traffic: Traffic) -> int:
        return len({(self.pseudonym(d), s) for d, s in traffic.valid} - self.stored_ids)

    @property
    def duplicated(self) -> int | None:
        return None if self.stored is None else (self.rows - self.stored) + (self.counted - self.stored)


def measure(storage: StorageConfig, bootstrap: str, topic: str) -> Measured:
    """The store's events and rollup count, and the dead-letter topic's sources."""
    m = Measured(pseudonym=storage.pseudonyms(create=True).of)  # the key ingest hashed the ids with
    deadline = time.monotonic() + 30
    while True:
        try:  # a killed writer's process may hold DuckDB's file lock for a moment
            r = run_queries(storage, {"ids": "SELECT device_id, seq, count(*) FROM events GROUP BY 1, 2",
                                           "counted": "SELECT sum(events) FROM devices"})
            break
        except Exception as e:
            if time.monotonic() > deadline:
                m.error = f"the store could not be read: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                r = None
                break
            time.sleep(1)
    if r is not None:
        m.stored_ids = {(d, int(s)) for d, s, _ in r["ids"]}
        m.stored, m.rows = len(m.stored_ids), sum(int(n) for *_, n in r["ids"])
        m.counted = int(r["counted"][0][0] or 0)
    for letter in read_dead_letters(bootstrap, f"{topic}.dlq"):
        source = (letter["partition"], letter["offset"])
        m.letters.add(source)
        m.reasons.setdefault(source, letter["reason"])
    return m


# -- running the pipeline --------------------------------------------------------------------------

class Pipeline:
    """One IngestSupervisor run in local Ray."""

    def __init__(self, config: IngestConfig, until_caught_up: bool = True):
        self.topic = config.topic
        self.supervisor = IngestSupervisor.remote(config)
        self.done = self.supervisor.run.remote(until_caught_up=until_caught_up)
        self.summary: dict = {}
        self.notes: list[str] = []

    def handles(self) -> dict:
        return ray.get(self.supervisor.handles.remote(), timeout=30)

    def running(self) -> bool:
        return not ray.wait([self.done], timeout=0)[0]

    def finish(self, timeout: float, stop: bool = False) -> None:
        """Wait for the run (``stop``: stop it first), at most ``timeout`` s; then kill what is left."""
        if stop:
            ray.get(self.supervisor.stop.remote(), timeout=30)
        if not ray.wait([self.done], timeout=timeout)[0]:
            self.notes.append(f"timed out: the run had not ended after {timeout:.0f}s more, so it was stopped")
            try:
                ray.get(self.supervisor.stop.remote(), timeout=30)
            except ray.exceptions.RayError:
                pass
        try:
            self.summary = ray.get(self.done, timeout=180)
        except Exception as e:
            self.notes.append(f"the run failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        finally:
            self.kill()
        if self.summary:
            self.notes.append(_summary_note(self.summary))

    def kill(self) -> None:
        try:
            h = ray.get(self.supervisor.handles.remote(), timeout=10)
            for actor in [*h["consumers"], *([h["writer"]] if h["writer"] else [])]:
                ray.kill(actor, no_restart=True)
        except Exception:  # ended: the supervisor already killed them
            pass
        ray.kill(self.supervisor)


def _summary_note(summary: dict) -> str:
    failures = sorted(summary.get("failures", {}).items(), key=lambda kv: -kv[1])
    text = f"restarts {summary.get('restarts', 0)}, rewinds {summary.get('rewinds', 0)}"
    if failures:
        text += "; failures: " + "; ".join(f"{n}× {cause[:160]}" for cause, n in failures[:3])
        if len(failures) > 3:
            text += f"; +{len(failures) - 3} more causes"
    return text


def ingest_config(bootstrap: str, topic: str, storage: StorageConfig) -> IngestConfig:
    return IngestConfig(bootstrap=bootstrap, topic=topic, storage=storage, **PIPELINE)


# -- rows ---------------------------------------------------------------------------------------

@dataclass
class Context:
    servers: Servers
    events: int
    tmp: Path
    seed: int = 7

    def topic(self, fault: str) -> str:
        self.seed += 1
        return f"faults-{fault}-{uuid.uuid4().hex[:8]}"


def make_row(fault: str, store: str, broker: str, traffic: Traffic | None, m: Measured | None,
             recovery_s: float | None, notes: list[str]) -> dict:
    row = dict.fromkeys(KEYS)
    row.update(fault=fault, store=store, broker=broker, expected_dead_letters=0)
    if traffic is not None:
        row["produced"] = len(traffic.valid)
        row["expected_dead_letters"] = len(traffic.poison)
    if traffic is not None and m is not None:
        row["dead_lettered"] = len(m.letters)
        if m.stored is not None:
            row["stored"] = m.stored
            row["lost"] = m.lost_valid(traffic) + len(set(traffic.poison) - m.letters)
            row["duplicated"] = m.duplicated
            notes = notes + _oddities(traffic, m)
        if m.error:
            notes = notes + [m.error]
    row["recovery_s"] = None if recovery_s is None else round(recovery_s, 2)
    row["note"] = "; ".join(n for n in notes if n)
    return row


def _oddities(traffic: Traffic, m: Measured) -> list[str]:
    out = []
    strangers = m.stored_ids - traffic.valid
    if strangers:
        out.append(f"{len(strangers)} stored identities were never produced as valid events, e.g. "
                   f"{sorted(strangers)[0]}")
    valid_letters = m.letters - set(traffic.poison)
    if valid_letters:
        example = sorted(valid_letters)[0]
        out.append(f"{len(valid_letters)} valid records dead-lettered, e.g. {example}: "
                   f"{(m.reasons.get(example) or '')[:160]}")
    if m.counted is not None and m.counted < m.stored:
        out.append(f"the rollups counted {m.stored - m.counted} fewer events than stored")
    return out


def _recovery(watch: Watch, at: float, notes: list[str]) -> float | None:
    if watch.complete_at is None:
        notes.append(f"never stored everything: {watch.stored:,} of {watch.total:,} records' offsets stored")
        return None
    if watch.complete_at < at:
        notes.append("everything was stored before the fault took effect")
        return 0.0
    return watch.complete_at - at


def _finish(run) -> None:
    """Wait for the run to end, then a little longer for the last offsets to be polled."""
    run.finish(RECOVERY_TIMEOUT_S)
    time.sleep(2 * POLL_S)


def _row(fault: str, store: str, broker: str, traffic: Traffic | None, watch: Watch, at: float | None,
         notes: list[str], storage: StorageConfig, bootstrap: str, topic: str) -> list[dict]:
    """The fault's one row: recovery since ``at``, lost and duplicated counted in the store and the topic."""
    recovery = _recovery(watch, at, notes) if at else None
    return [make_row(fault, store, broker, traffic, measure(storage, bootstrap, topic), recovery, notes)]


def _injected(watch: Watch, reached: bool, what: str) -> str:
    share = watch.stored / watch.total if watch.total else 0
    if not reached:
        return f"{what} at {share:.0%} stored: the share {MID_STREAM_SHARE:.0%} was not reached in time"
    if watch.stored >= watch.total:
        return f"{what} after everything was stored (not mid-stream)"
    return f"{what} at {share:.0%} stored"


# -- the faults --------------------------------------------------------------------------------

def fault_poison(ctx: Context, broker_kind: str, store_kind: str) -> list[dict]:
    broker = ctx.servers.get(broker_kind)
    topic = ctx.topic(f"poison-{broker_kind}")
    valid = first_records(ctx.events, ctx.seed)
    poison = poison_records(valid[0][1])
    records = list(valid)
    rng = random.Random(ctx.seed)
    for record in poison:  # at random places in the stream
        records.insert(rng.randrange(len(records) + 1), record)
    traffic = read_topic(broker.bootstrap, topic, produce(broker.bootstrap, topic, records, PARTITIONS))
    storage = fresh_store(ctx.servers, store_kind, "poison", ctx.tmp)
    run = Pipeline(ingest_config(broker.bootstrap, topic, storage))
    run.finish(RECOVERY_TIMEOUT_S)
    m = measure(storage, broker.bootstrap, topic)
    shared = (f"one run: {len(POISON_KINDS)} kinds × {POISON_COPIES} mixed into {traffic.valid_records:,} valid "
              f"records; produced, stored, duplicated and valid losses are that run's")
    rows = []
    for kind in POISON_KINDS:
        sources = {s for s, k in traffic.poison.items() if k == kind}
        row = make_row(f"poison/{kind}", store_kind, broker_kind, traffic, m, None, [shared, *run.notes])
        row["expected_dead_letters"] = len(sources)  # this kind's records, and its dead letters
        row["dead_lettered"] = len(sources & m.letters)
        if m.stored is not None:
            row["lost"] = m.lost_valid(traffic) + len(sources - m.letters)
        reasons = [m.reasons[s] for s in sorted(sources) if s in m.reasons]
        if reasons:
            row["note"] = f"reason: {reasons[0][:120]}; " + row["note"]
        rows.append(row)
    return rows


def fault_resend(ctx: Context) -> list[dict]:
    broker = ctx.servers.get("tansu")
    topic = ctx.topic("resend")
    valid = first_records(ctx.events, ctx.seed)
    again = valid[::10]  # sent twice at once (same or next batch)
    produce(broker.bootstrap, topic, valid + again, PARTITIONS)
    storage = fresh_store(ctx.servers, "duckdb", "resend", ctx.tmp)
    first = Pipeline(ingest_config(broker.bootstrap, topic, storage))
    first.finish(RECOVERY_TIMEOUT_S)
    before = measure(storage, broker.bootstrap, topic)
    ends = produce(broker.bootstrap, topic, valid, PARTITIONS)  # all of them again, after they were stored
    traffic = read_topic(broker.bootstrap, topic, ends)
    second = Pipeline(ingest_config(broker.bootstrap, topic, storage))
    second.finish(RECOVERY_TIMEOUT_S)
    m = measure(storage, broker.bootstrap, topic)
    notes = [f"{len(valid):,} valid events, {len(again):,} of them re-sent at once and all re-sent after a first "
             f"ingest ({traffic.total:,} records); stored {before.stored} after the first ingest "
             f"({before.rows} rows), {m.stored} after the re-send ({m.rows} rows)"]
    if before.stored is not None and m.stored is not None and m.rows > before.rows:
        notes.append(f"the re-send added {m.rows - before.rows} rows")
    notes += [f"first run: {n}" for n in first.notes] + [f"second run: {n}" for n in second.notes]
    return [make_row("resend", "duckdb", "tansu", traffic, m, None, notes)]


def _prepared(ctx: Context, fault: str, broker_kind: str, store_kind: str, events: int | None = None,
              where: Path | None = None):
    broker = ctx.servers.get(broker_kind)
    topic = ctx.topic(fault)
    ends = produce(broker.bootstrap, topic, first_records(events or ctx.events, ctx.seed), PARTITIONS)
    traffic = read_topic(broker.bootstrap, topic, ends)
    return broker, topic, traffic, fresh_store(ctx.servers, store_kind, fault, where or ctx.tmp)


def fault_actor_kill(ctx: Context, which: str) -> list[dict]:
    fault = f"{which}-kill"
    broker, topic, traffic, storage = _prepared(ctx, fault, "tansu", "duckdb")
    run = Pipeline(ingest_config(broker.bootstrap, topic, storage))
    watch = Watch(writer_offsets(run.supervisor, topic), traffic.ends)
    try:
        reached = watch.wait(MID_STREAM_SHARE, START_TIMEOUT_S, run.done)
        handles = run.handles()
        if which == "consumer":
            ray.kill(handles["consumers"][0])
        else:
            ray.kill(handles["writer"], no_restart=False)
        at = time.time()
        notes = [_injected(watch, reached, f"ray.kill of the {which}")]
        _finish(run)
    finally:
        watch.close()
    return _row(fault, "duckdb", "tansu", traffic, watch, at, notes + run.notes, storage, broker.bootstrap, topic)


def _podpulse() -> list[str]:
    exe = Path(sys.executable).parent / "podpulse"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "cli.main"]


def fault_driver_kill(ctx: Context) -> list[dict]:
    events = max(ctx.events, DRIVER_KILL_EVENTS)  # more than the killed run's actors store as they die
    broker, topic, traffic, storage = _prepared(ctx, "driver-kill", "tansu", "postgresql", events)
    config_file = ctx.tmp / f"driver-kill-{uuid.uuid4().hex[:6]}.yaml"
    config_file.write_text(json.dumps(storage.as_dict()))  # JSON is YAML
    command = [*_podpulse(), "ingest", "--bootstrap", broker.bootstrap, "--topic", topic,
               "--storage-config", str(config_file), "--until-caught-up", "--json",
               "--consumers", str(PIPELINE["consumers"]), "--batch-size", str(PIPELINE["batch_size"]),
               "--linger-ms", str(PIPELINE["linger_ms"]), "--max-in-flight", str(PIPELINE["max_in_flight"])]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, as a user's
    logs = [ctx.tmp / f"driver-kill-{i}.log" for i in (1, 2)]
    watch = Watch(store_offsets(storage, topic), traffic.ends)
    notes: list[str] = []
    at = None
    try:
        with open(logs[0], "wb") as log:
            first = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            try:
                deadline = time.monotonic() + START_TIMEOUT_S
                while watch.stored < MID_STREAM_SHARE * watch.total and first.poll() is None \
                        and time.monotonic() < deadline:
                    time.sleep(0.02)
                reached = watch.stored >= MID_STREAM_SHARE * watch.total
                if first.poll() is not None:
                    notes.append(f"the first `podpulse ingest` ended (exit {first.returncode}) before the kill: "
                                 f"{_tail(logs[0])}")
                ray_processes = psutil.Process(first.pid).children(recursive=True)
                names = {p.pid: _command(p) for p in ray_processes}
                first.kill()
                at = time.time()
                first.wait(30)
                orphans = threading.Thread(target=_outlived, args=(ray_processes, names, at, watch, notes),
                                           daemon=True)
                orphans.start()
            finally:
                if first.poll() is None:
                    first.kill()
        notes.insert(0, _injected(watch, reached, "SIGKILL of `podpulse ingest`") + ", then run again")
        with open(logs[1], "wb") as log:
            second = subprocess.run(command, stdout=subprocess.PIPE, stderr=log, env=env,
                                    timeout=RECOVERY_TIMEOUT_S + 60)
        orphans.join()
        if second.returncode:
            notes.append(f"the second `podpulse ingest` exited {second.returncode}: {_tail(logs[1])}")
        else:
            summary = json.loads(second.stdout.decode().strip().splitlines()[-1])
            notes.append("second run: " + _summary_note(summary))
        time.sleep(2 * POLL_S)
    except subprocess.TimeoutExpired:
        notes.append(f"timed out: the second `podpulse ingest` ran over {RECOVERY_TIMEOUT_S + 60:.0f}s, killed")
    finally:
        watch.close()
    return _row("driver-kill", "postgresql", "tansu", traffic, watch, at, notes, storage, broker.bootstrap, topic)


def _outlived(processes: list, names: dict, killed_at: float, watch: Watch, notes: list[str]) -> None:
    """How long the killed driver's actors went on (Ray's worker processes outlive a SIGKILLed driver
    for a moment), and what was stored by then."""
    at_kill = watch.stored
    actors = [p for p in processes if names[p.pid].startswith("ray::") and "Agent" not in names[p.pid].split()[0]]
    _, alive = psutil.wait_procs(actors, timeout=60)
    took = time.time() - killed_at
    share = f"stored {at_kill / watch.total:.0%} → {watch.stored / watch.total:.0%} by then"
    if alive:
        notes.append(f"{len(alive)} of the killed run's {len(actors)} actor processes still ran 60 s after "
                     f"the kill ({share})")
    else:
        notes.append(f"the killed run's {len(actors)} actor processes lived on {took:.1f}s after the kill ({share})")
    others = sorted(names[p.pid].split()[0].rsplit("/", 1)[-1] for p in processes
                    if p not in actors and _running(p))
    if others:
        notes.append(f"{len(others)} other processes of its Ray still ran then: {', '.join(others)}")


def _command(process) -> str:
    try:
        return " ".join(process.cmdline()).strip() or process.name()
    except psutil.Error:
        return "?"


def _running(process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _tail(path: Path, chars: int = 300) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
        return " | ".join(lines[-3:])[-chars:]
    except OSError:
        return "(no log)"


def fault_db_down_at_start(ctx: Context) -> list[dict]:
    broker, topic, traffic, storage = _prepared(ctx, "db-down-at-start", "kafka", "postgresql")
    pg = ctx.servers.get("postgres")
    notes = []
    pg.stop()
    try:
        run = Pipeline(ingest_config(broker.bootstrap, topic, storage))
        time.sleep(5)
        if not run.running():
            notes.append("the run ended while the database was down")
    finally:
        pg.start()
    at = time.time()
    notes.insert(0, "PostgreSQL stopped before ingest started, started 5 s later")
    watch = Watch(store_offsets(storage, topic), traffic.ends)
    try:
        _finish(run)
    finally:
        watch.close()
    return _row("db-down-at-start", "postgresql", "kafka", traffic, watch, at, notes + run.notes, storage, broker.bootstrap, topic)


def fault_db_restart(ctx: Context) -> list[dict]:
    broker, topic, traffic, storage = _prepared(ctx, "db-restart", "kafka", "postgresql")
    pg = ctx.servers.get("postgres")
    run = Pipeline(ingest_config(broker.bootstrap, topic, storage))
    watch = Watch(store_offsets(storage, topic), traffic.ends)
    try:
        reached = watch.wait(MID_STREAM_SHARE, START_TIMEOUT_S, run.done)
        notes = [_injected(watch, reached, "PostgreSQL restarted")]
        pg.restart()
        at = time.time()
        _finish(run)
    finally:
        watch.close()
    return _row("db-restart", "postgresql", "kafka", traffic, watch, at, notes + run.notes, storage, broker.bootstrap, topic)


def fault_broker_restart(ctx: Context) -> list[dict]:
    """Half the events before, half after the restart: the consumers prefetch a whole small topic, so
    a restart with nothing left to fetch would test only the offset commits."""
    broker = ctx.servers.get("kafka")
    topic = ctx.topic("broker-restart")
    valid = first_records(ctx.events, ctx.seed)
    half = len(valid) // 2
    ends = produce(broker.bootstrap, topic, valid[:half], PARTITIONS)
    storage = fresh_store(ctx.servers, "duckdb", "broker-restart", ctx.tmp)
    run = Pipeline(ingest_config(broker.bootstrap, topic, storage), until_caught_up=False)
    watch = Watch(writer_offsets(run.supervisor, topic), ends)
    traffic = None
    try:
        reached = watch.wait(2 * MID_STREAM_SHARE, START_TIMEOUT_S, run.done)  # of the first half
        share = watch.stored / (2 * watch.total) if watch.total else 0
        broker.stop()
        time.sleep(3)
        broker.start()
        at = time.time()
        ends = produce(broker.bootstrap, topic, valid[half:], PARTITIONS)
        produced_after = time.time() - at
        traffic = read_topic(broker.bootstrap, topic, ends)
        watch.extend(traffic.ends)
        notes = [f"Apache Kafka stopped at {share:.0%} stored"
                 + ("" if reached else " (the share 25% was not reached in time)")
                 + f", started 3 s later; the second half of the events produced after the restart "
                   f"(acknowledged {produced_after:.1f}s after it)"]
        deadline = time.monotonic() + RECOVERY_TIMEOUT_S
        while watch.complete_at is None and time.monotonic() < deadline and run.running():
            time.sleep(POLL_S)
        if watch.complete_at is None:
            notes.append(f"timed out: not everything stored {RECOVERY_TIMEOUT_S:.0f}s after the restart")
        run.finish(RECOVERY_TIMEOUT_S, stop=True)  # a run without --until-caught-up: stopped once all is stored
    finally:
        watch.close()
    return _row("broker-restart", "duckdb", "kafka", traffic, watch, at, notes + run.notes, storage, broker.bootstrap, topic)


def _sh(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True)


def fault_disk_full(ctx: Context) -> list[dict]:
    mount = ctx.tmp / "disk-full"
    mount.mkdir(exist_ok=True)
    done = _sh("mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m", "tmpfs", str(mount))
    if done.returncode:
        why = (done.stderr or done.stdout).strip() or f"exit status {done.returncode}"
        return [make_row("disk-full", "duckdb", "tansu", None, None, None,
                         [f"not run: `mount -t tmpfs -o size={DISK_MB}m tmpfs {mount}` failed: {why}"])]
    try:
        events = max(ctx.events, DISK_FULL_EVENTS)
        broker, topic, traffic, storage = _prepared(ctx, "disk-full", "tansu", "duckdb", events, mount)
        run = Pipeline(ingest_config(broker.bootstrap, topic, storage))
        watch = Watch(writer_offsets(run.supervisor, topic), traffic.ends)
        notes: list[str] = []
        try:
            full, causes = _wait_full(mount, run, watch)
            share = watch.stored / watch.total
            if full:
                notes.append(f"{DISK_MB} MB tmpfs full at {share:.0%} stored ({causes}); "
                             f"remounted at {DISK_GROWN_MB} MB 3 s later")
                time.sleep(3)
            else:
                notes.append(f"the {DISK_MB} MB tmpfs never filled ({share:.0%} stored, "
                             f"{_used_mb(mount):.1f} MB used); remounted at {DISK_GROWN_MB} MB anyway")
            grown = _sh("mount", "-o", f"remount,size={DISK_GROWN_MB}m", str(mount))
            at = time.time()
            if grown.returncode:
                notes.append(f"remount failed: {(grown.stderr or grown.stdout).strip()}")
            _finish(run)
        finally:
            watch.close()
        return _row("disk-full", "duckdb", "tansu", traffic, watch, at, notes + run.notes, storage, broker.bootstrap, topic)
    finally:
        if _sh("umount", str(mount)).returncode:
            _sh("umount", "-l", str(mount))
        shutil.rmtree(mount, ignore_errors=True)


def _used_mb(mount: Path) -> float:
    s = os.statvfs(mount)
    return (s.f_blocks - s.f_bavail) * s.f_frsize / 2**20


def _wait_full(mount: Path, run: Pipeline, watch: Watch) -> tuple[bool, str]:
    """Until the disk is full (a write failure naming it, or under 256 KB free)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and run.running() and watch.complete_at is None:
        s = os.statvfs(mount)
        free = s.f_bavail * s.f_frsize
        try:
            writer = run.handles()["writer"]
            failures = ray.get(writer.get_stats.remote(), timeout=5)["failures"]
        except Exception:
            failures = {}
        space = [c for c in failures if "space" in c.lower() or "disk" in c.lower()]
        if space or free < 256 * 1024:
            return True, f"{free // 1024} KB free" + (f", writer: {space[0][:160]}" if space else "")
        time.sleep(0.2)
    return False, ""


FAULTS: dict[str, tuple[str, str, Callable[[Context], list[dict]]]] = {
    "poison": ("tansu", "duckdb", lambda ctx: fault_poison(ctx, "tansu", "duckdb")),
    "poison-kafka": ("kafka", "postgresql", lambda ctx: fault_poison(ctx, "kafka", "postgresql")),
    "resend": ("tansu", "duckdb", fault_resend),
    "consumer-kill": ("tansu", "duckdb", lambda ctx: fault_actor_kill(ctx, "consumer")),
    "writer-kill": ("tansu", "duckdb", lambda ctx: fault_actor_kill(ctx, "writer")),
    "driver-kill": ("tansu", "postgresql", fault_driver_kill),
    "db-down-at-start": ("kafka", "postgresql", fault_db_down_at_start),
    "db-restart": ("kafka", "postgresql", fault_db_restart),
    "broker-restart": ("kafka", "duckdb", fault_broker_restart),
    "disk-full": ("tansu", "duckdb", fault_disk_full),
}
"""name → (broker, store, runner)."""


def select(only: str | None) -> list[str]:
    """``--only a,b`` → fault names, in matrix order; all of them for None."""
    if not only:
        return list(FAULTS)
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in FAULTS]
    if unknown or not names:
        raise ConfigError(f"unknown fault(s) {', '.join(unknown) or '(none given)'}; "
                          f"faults are {', '.join(FAULTS)}")
    return [n for n in FAULTS if n in names]


def run(events: int = 20_000, only: list[str] | None = None, servers: Servers | None = None,
        on_row: Callable[[dict], None] | None = None, progress: Callable[[str], None] | None = None) -> list[dict]:
    """Run the faults (all, or ``only``); returns every row, each also passed to ``on_row`` when done."""
    names = only or list(FAULTS)
    own = servers is None
    servers = servers or Servers()
    rows: list[dict] = []
    init_ray()
    try:
        with tempfile.TemporaryDirectory(prefix="podpulse-faults-") as tmp:
            ctx = Context(servers, events, Path(tmp))
            for name in names:
                broker, store, runner = FAULTS[name]
                if progress:
                    progress(f"{name} ({broker} + {store}) ...")
                started = time.monotonic()
                try:
                    got = runner(ctx)
                except Exception as e:  # a fault that could not be run: said, never counted
                    why = (str(e).strip().splitlines() or [""])[0][:300]
                    got = [make_row(name, store, broker, None, None, None,
                                    [f"not measured: {type(e).__name__}: {why}"])]
                took = time.monotonic() - started
                for row in got:
                    row["note"] = (row["note"] + "; " if row["note"] else "") + f"fault took {took:.1f}s"
                    rows.append(row)
                    if on_row:
                        on_row(row)
    finally:
        if own:
            servers.close()
    return rows
