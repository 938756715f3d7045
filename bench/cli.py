"""``podpulse bench ...``: the benchmarks' commands. Each prints its figure beside a baseline from the same run.

The benchmarks' own libraries (psutil, aiohttp) come with the ``bench`` extra:
``pip install 'podpulse[bench]'``; without it a command says so in one line.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from podpulse.errors import ConfigError
from podpulse.simulator import Shape

__all__ = ["bench_app"]

bench_app = typer.Typer(help="Benchmarks: each prints its figure beside a baseline from the same run.",
                        no_args_is_help=True)
out = Console()
err = Console(stderr=True)
StorageFile = Annotated[Optional[Path], typer.Option(
    "--storage-config", metavar="FILE", help="YAML routing of record kinds to backends (see examples/).")]


def _module(name: str):
    """A benchmark module, or a one-line error naming the extra that brings its libraries."""
    try:
        return importlib.import_module(f"bench.{name}")
    except ModuleNotFoundError as e:
        if e.name and not e.name.startswith(("bench", "podpulse")):
            raise ConfigError(f"podpulse bench {name} needs {e.name}: pip install 'podpulse[bench]'") from e
        raise


@bench_app.command("simulate")
def bench_simulate(
    devices: Annotated[int, typer.Option(min=1)] = 10_000,
    hours: Annotated[float, typer.Option(min=0.01)] = 24.0,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Simulator throughput (events generated and JSON-encoded per second, one core)."""
    run = _module("simulate").run

    result = run(devices=devices, hours=hours)
    if json_out:
        print(json.dumps(result))
    else:
        out.print(f"simulator: [bold]{result['events_per_s']:,.0f}[/] events/s "
                  f"({result['events']:,} events); JSON encoding alone: "
                  f"{result['encode_only_events_per_s']:,.0f} events/s")


@bench_app.command("decode")
def bench_decode(
    events: Annotated[int, typer.Option(min=1000, help="Samples to decode in each shape.")] = 1_000_000,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """The contract's decoder on one core, single events and 50-sample uploads, beside a raw JSON parse."""
    result = _module("decode").run(events=events)
    if json_out:
        print(json.dumps(result))
    else:
        for shape, r in result.items():
            out.print(f"{shape}: [bold]{r['events_per_s']:,}[/] events/s decoded ({r['messages']:,} messages) · "
                      f"raw JSON parse: {r['raw_parse_events_per_s']:,} events/s · ratio {r['ratio']}")


@bench_app.command("ingest")
def bench_ingest(
    events: Annotated[int, typer.Option(min=1, help="Events to preload and ingest.")] = 1_000_000,
    partitions: Annotated[int, typer.Option(min=1)] = 8,
    storage_file: StorageFile = None,
    consumers: Annotated[int, typer.Option(min=0, help="0: one per CPU.")] = 0,
    writers: Annotated[int, typer.Option(min=1, help="StorageWriter actors (server backends only).")] = 1,
    batch_size: Annotated[int, typer.Option(min=1)] = 20_000,
    bootstrap: Annotated[Optional[str], typer.Option(
        help="A Kafka to use instead of the embedded broker.")] = None,
    profile: Annotated[Optional[Path], typer.Option(
        help="Record py-spy profiles (speedscope) of the driver and each ingest actor into this directory.")] = None,
    shape: Annotated[Shape, typer.Option(
        help="event: one sample per message; upload: 50-sample device uploads.")] = Shape.event,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Ingest throughput into the durable store, beside the raw consume rate of the same topic."""
    run = _module("ingest").run

    result = run(events=events, partitions=partitions, consumers=consumers, writers=writers, batch_size=batch_size,
                 bootstrap=bootstrap, storage_file=storage_file, profile=profile, shape=shape.value)
    if json_out:
        print(json.dumps(result))
    else:
        uploads = (f" ({result['messages_per_s']:,} uploads/s; raw {result['raw_consume_messages_per_s']:,})"
                   if result["shape"] == "upload" else "")
        out.print(f"pipeline: [bold]{result['events_per_s']:,}[/] events/s durable · raw consume: "
                  f"{result['raw_consume_events_per_s']:,} events/s{uploads} · ratio {result['ratio']} · "
                  f"lost {result['lost']} · duplicated {result['duplicated']} · "
                  f"peak RSS {result['peak_rss_mb']:,} MB (pipeline {result['pipeline_peak_rss_mb']:,}, slope "
                  f"{result['pipeline_rss_slope_mb_per_min']} MB/min; Ray's own {result['ray_peak_rss_mb']:,})\n"
                  f"per million events: {result['cpu_s_per_million_events']:,} CPU-seconds · bytes per event: "
                  f"{result['message_bytes_per_event']} on the wire, {result['stored_bytes_per_event']} stored")
        for p in result.get("profiles", []):
            busiest = ", ".join(f"{f['function']} {f['share']:.0%}" for f in p["top_own"][:3])
            out.print(f"{p['role']}: active {p['active_s']} s, busiest {busiest} → {p['file']}")


@bench_app.command("commit")
def bench_commit(
    events: Annotated[int, typer.Option(min=1000, help="Events to commit.")] = 1_000_000,
    batch_size: Annotated[int, typer.Option(min=100, help="Events per commit.")] = 20_000,
    storage_file: StorageFile = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """The writer's commit path alone (one core, no Kafka, no Ray), beside inserting the raw events alone."""
    result = _module("commit").run(events=events, batch_size=batch_size, storage_file=storage_file)
    if json_out:
        print(json.dumps(result))
    else:
        out.print(f"commit path: [bold]{result['events_per_s']:,}[/] events/s in {result['commits']} commits of "
                  f"{result['batch_size']:,} · raw events alone: {result['raw_insert_events_per_s']:,} events/s · "
                  f"ratio {result['ratio']}")


@bench_app.command("peak")
def bench_peak(
    devices: Annotated[int, typer.Option(min=1, help="The fleet to size for.")] = 3_000_000,
    minutes: Annotated[float, typer.Option(min=0.1, help="How long to sustain the busiest hour's rate.")] = 10.0,
    shape: Annotated[Shape, typer.Option(help="event or upload (50 samples).")] = Shape.upload,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """The fleet's busiest-hour rate, produced live for some minutes while ingest runs: the lag over time."""
    result = _module("peak").run(devices=devices, minutes=minutes, shape=shape.value)
    if json_out:
        print(json.dumps(result))
    else:
        out.print(f"{devices:,} devices, busiest hour: [bold]{result['rate_asked_events_per_s']:,}[/] events/s "
                  f"(peak factor {result['peak_factor']}), produced {result['rate_produced_events_per_s']:,}/s · "
                  f"lag max {result['lag_max_messages']:,} messages, slope {result['lag_slope_messages_per_min']}/min, "
                  f"{result['lag_at_end_messages']:,} at the end")


@bench_app.command("report")
def bench_report(
    devices: Annotated[int, typer.Option(min=100)] = 20_000,
    days: Annotated[int, typer.Option(min=1)] = 7,
    storage_file: StorageFile = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Full JSON report latency over a simulated fleet, beside one raw scan of its events; and one
    device's 30-day timeline, beside a read of its raw events by key."""
    run = _module("report").run

    result = run(devices=devices, days=days, storage_file=storage_file)
    if json_out:
        print(json.dumps(result))
    else:
        out.print(f"report: [bold]{result['seconds']}[/] s over {result['events_scanned']:,} events · "
                  f"one raw scan: {result['raw_scan_seconds']} s\n"
                  f"device timeline (30 days): [bold]{result['timeline_ms_p50']}[/] ms p50 · "
                  f"its raw events by key: {result['device_raw_read_ms_p50']} ms")


@bench_app.command("store")
def bench_store(
    db: Annotated[Path, typer.Option("--db", help="The DuckDB store to write (must not exist).")],
    devices: Annotated[int, typer.Option(min=1)] = 5_000,
    days: Annotated[int, typer.Option(min=1)] = 28,
    seed: Annotated[int, typer.Option(help="Same seed, same fleet.")] = 7,
    faults: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of devices with a fault.")] = 0.1,
    fault_mix: Annotated[str, typer.Option(
        help="strong, subtle, all, or kinds separated by commas (podpulse.simulator.FAULTS).")] = "subtle",
    truth: Annotated[Optional[Path], typer.Option(help="Ground truth file (default: DB.truth.json).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Write a simulated fleet straight to a DuckDB store (not through Kafka) with its ground truth of
    injected faults (DB.truth.json) and each device's behaviour profile (DB.profiles.json): the fleet
    that `podpulse train --truth` and `--profiles` are measured on."""
    from podpulse.simulator import Fleet, FleetSpec  # lazy, as _module's: the simulator only when asked
    from podpulse.simulator import fault_mix as mix_of  # lazy: as the line above
    from testbed.stores import build_store  # lazy, as _module's: the store only when asked

    if db.exists():
        raise ConfigError(f"{db} exists: give a new --db")
    try:
        spec = FleetSpec(devices=devices, hours=24 * days, seed=seed, fault_share=faults, fault_mix=mix_of(fault_mix))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    db.parent.mkdir(parents=True, exist_ok=True)
    events = build_store(db, devices, days, seed=seed, start=spec.start, fault_share=faults, fault_mix=spec.fault_mix)
    truth = truth or db.with_suffix(".truth.json")
    fleet = Fleet.build(spec)
    truth.write_text(json.dumps(fleet.truth(), indent=1))
    profiles = db.with_suffix(".profiles.json")
    profiles.write_text(json.dumps(fleet.profiles()))
    result = {"db": str(db), "truth": str(truth), "profiles": str(profiles), "devices": devices, "days": days,
              "events": events,
              "fault_mix": list(spec.fault_mix), "faulty_devices": round(devices * faults)}
    if json_out:
        print(json.dumps(result))
    else:
        out.print(f"{events:,} events of {devices:,} devices × {days} days → {db}; faults ({', '.join(spec.fault_mix)}) "
                  f"→ {truth}\nnext: podpulse train --model battery-anomaly --db {db} --truth {truth} --json")


@bench_app.command("detect")
def bench_detect(
    seeds: Annotated[int, typer.Option(min=1)] = 5,
    devices: Annotated[int, typer.Option(min=100)] = 2_000,
    days: Annotated[int, typer.Option(min=14, help="The release is in the middle.")] = 21,
    regression: Annotated[float, typer.Option(min=0.5, max=3.0, help="The regressed firmware's drain multiplier.")] = 1.25,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Firmware regression detection over seeds: delay after the rollout and false alarms, beside an
    unpaired comparison without usage control."""
    result = _module("detect").run(seeds=seeds, devices=devices, days=days, regression=regression)
    if json_out:
        print(json.dumps(result))
    else:
        base = result["baseline"]
        out.print(f"firmware regression ×{regression}: detected {result['detected']} of "
                  f"{result['detected'] + result['missed']} (model, seed) rollouts, median "
                  f"[bold]{result['delay_days_median']}[/] days after the release (max {result['delay_days_max']}) "
                  f"with {result['devices_at_detection_median']} devices; false alarms "
                  f"[bold]{result['false_alarms']}[/] in {result['daily_runs_without_regression']} daily runs "
                  f"without one\nunpaired baseline: detected {base['detected']}, median {base['delay_days_median']} "
                  f"days, false alarms {base['false_alarms']}")


@bench_app.command("privacy")
def bench_privacy(
    devices: Annotated[int, typer.Option(min=100)] = 20_000,
    days: Annotated[int, typer.Option(min=2, max=92)] = 28,
    runs: Annotated[int, typer.Option(min=1, max=100, help="Releases of each query, fresh noise each.")] = 5,
    seed: int = 5,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """The private answers against the exact ones (what an admin reads), and the differencing attack
    against its baseline on exact answers (off by 0)."""
    result = _module("privacy").run(devices=devices, days=days, seed=seed, runs=runs)
    if json_out:
        print(json.dumps(result))
        return
    table = Table("query", "ε", "median error", "p95 error", "baseline")
    for name, q in result["queries"].items():
        unit = "%" if q["error_unit"] == "relative" else " points"
        scale = 100 if q["error_unit"] == "relative" else 1
        table.add_row(name, f"{q['epsilon']:g}", f"{q['error_median'] * scale:.2f}{unit}",
                      f"{q['error_p95'] * scale:.2f}{unit}", "0 (exact)")
    out.print(table)
    overview, attack = result["queries"]["state_overview"], result["attack"]
    out.print(f"state listening per device-day within ±2%: [bold]{overview['listening_within_2pct']:.0%}[/] of "
              f"releases; 95% intervals held {overview['interval_95_held']:.0%}")
    out.print(f"differencing ({attack['target']}, {attack['devices']} devices): off by a median "
              f"[bold]{attack['error_h_median']} h[/] a cell (truth {attack['true_listening_h_per_cell_median']} h); "
              f"on exact answers: {attack['baseline_error_h']} h")


@bench_app.command("serve")
def bench_serve(
    rate: Annotated[int, typer.Option(min=1, help="Requests per second.")] = 200,
    seconds: Annotated[float, typer.Option(min=1.0, help="How long to send them.")] = 10.0,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """/v1/battery/score latency through Ray Serve at a fixed rate, beside in-process scoring."""
    run = _module("serve").run

    result = run(rate=rate, seconds=seconds)
    if json_out:
        print(json.dumps(result))
    else:
        out.print(f"Serve ({result['ingress']}): p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms at {result['rps']} req/s "
                  f"({result['errors']} errors) · in-process: p50 {result['direct_p50_ms']} ms\n"
                  f"batch scoring ({result['batch_rows']:,}-row requests, {result['batch_clients']} senders): "
                  f"[bold]{result['batch_rows_per_s']:,}[/] rows/s, p50 {result['batch_p50_ms']} ms "
                  f"({result['batch_errors']} errors) · in-process: {result['direct_batch_rows_per_s']:,} rows/s")


@bench_app.command("faults")
def bench_faults(
    events: Annotated[int, typer.Option(min=100, help="Valid events produced per fault.")] = 20_000,
    only: Annotated[Optional[str], typer.Option(
        metavar="NAME[,NAME...]", help="Run only these faults (see bench/faults.py): poison, poison-kafka, "
                                       "resend, consumer-kill, writer-kill, driver-kill, db-down-at-start, "
                                       "db-restart, broker-restart, disk-full.")] = None,
    json_out: Annotated[bool, typer.Option(
        "--json", help="Print one JSON object per row, one per line, as each fault ends.")] = False,
) -> None:
    """Fault matrix: each fault against the real pipeline; lost, duplicated and recovery time per fault."""
    run, select = _module("faults").run, _module("faults").select

    names = select(only)

    def emit(row: dict) -> None:
        if json_out:
            print(json.dumps(row), flush=True)

    rows = run(events=events, only=names, on_row=emit, progress=lambda line: err.print(f"[dim]fault: {line}[/]"))
    if not json_out:
        table = Table(title="fault matrix", title_justify="left")
        for column in ("fault", "broker", "store", "produced", "stored", "dead-lettered", "expected",
                       "lost", "duplicated", "recovery s", "note"):
            table.add_column(column, justify="left" if column in ("fault", "broker", "store", "note") else "right")
        for r in rows:
            table.add_row(r["fault"], r["broker"], r["store"],
                          *("—" if r[k] is None else f"{r[k]:,}" for k in (
                              "produced", "stored", "dead_lettered", "expected_dead_letters", "lost", "duplicated",
                              "recovery_s")), r["note"])
        out.print(table)
