"""How the ``podpulse`` command line shows things: progress bars on stderr, tables and summaries on
stdout, and where the libraries' logs go. It renders; it runs nothing.

Every command loads this module, so what only some need (matplotlib) is imported where used.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from podpulse import geo

__all__ = ["out", "err", "simulating", "print_summary", "ingesting", "print_ingest_result",
           "DemoProgressBars", "print_demo_result", "print_demo_summary", "print_demo_models", "write_report",
           "print_report_tables", "print_training", "print_drift", "print_findings", "print_db_status",
           "print_retention", "print_erasure", "print_serving", "print_token", "quiet_logs", "stderr_to", "logs_file"]

out = Console()
err = Console(stderr=True)
_logs: Path | None = None  # where stderr_to sent this process's stderr


def logs_file() -> Path | None:
    """The file this process's stderr goes to since :func:`stderr_to`, or None (the terminal)."""
    return _logs


def _bars(*columns, quiet: bool) -> Progress:
    """Progress bars on stderr. Rich would also catch what the libraries write to sys.stdout and
    sys.stderr while the bars are up and print it above them, past the demo's log file: it does not."""
    return Progress(*columns, console=err, disable=quiet, transient=True, redirect_stdout=False,
                    redirect_stderr=False)


@contextmanager
def simulating(steps: int, quiet: bool = False) -> Iterator[Callable[[int, int], None]]:
    """A progress bar of the simulator's intervals: yields ``progress(intervals done, events so far)``."""
    columns = (TextColumn("[bold]simulating"), BarColumn(), MofNCompleteColumn(),
               TextColumn("intervals · {task.fields[events]:,} events"), TimeRemainingColumn())
    with _bars(*columns, quiet=quiet) as bars:
        task = bars.add_task("", total=steps, events=0)
        yield lambda done, events: bars.update(task, completed=done, events=events)
        bars.update(task, completed=steps)


def print_summary(result: dict) -> None:
    """What ``podpulse simulate`` produced, by state, class and schema version."""
    messages = "" if result["messages"] == result["events"] else f" in {result['messages']:,} uploads"
    table = Table(title=f"{result['events']:,} events{messages} from {result['devices']:,} devices → {result['to']}")
    for name in ("state", "devices", "share", "population share", "events"):
        table.add_column(name, justify="left" if name == "state" else "right")
    total_pop = sum(s.population for s in geo.STATES)
    devices, events = result["devices_by_state"], result["events_by_state"]
    for s in geo.STATES:
        table.add_row(s.code, f"{devices[s.code]:,}", f"{devices[s.code] / result['devices']:.1%}",
                      f"{s.population / total_pop:.1%}", f"{events.get(s.code, 0):,}")
    out.print(table)
    for label, key in (("class", "class"), ("schema", "version")):
        d, e = result[f"devices_by_{key}"], result[f"events_by_{key}"]
        out.print(f"by {label}: " + " · ".join(
            f"{k} {d.get(k, 0):,} devices / {e.get(k, 0):,} events" for k in sorted(d)))
    out.print(f"malformed records injected: {result['malformed']:,} · "
              f"faulty devices: {result['faulty_devices']:,}"
              + (f" (ground truth: {result['truth']})" if result["truth"] else ""))


@contextmanager
def ingesting(quiet: bool = False) -> Iterator[Callable[[dict], None]]:
    """A progress bar of the ingest's lag: yields ``show(status)`` for the supervisor's status."""
    columns = (TextColumn("[bold]ingesting"), BarColumn(), TextColumn("lag {task.fields[lag]:,}"),
               TextColumn("· {task.fields[restarts]} restarts"))
    with _bars(*columns, quiet=quiet) as bars:
        task = bars.add_task("", total=None, lag=0, restarts=0)
        peak = [0]

        def show(status: dict) -> None:
            lag = status.get("total_lag", 0)
            peak[0] = max(peak[0], lag)
            bars.update(task, total=peak[0] or None, completed=peak[0] - lag, lag=lag,
                        restarts=status.get("restarts", 0))

        yield show


class DemoProgressBars:
    """cli.demo.DemoProgress as rich progress bars on stderr, and one line per step."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bars = _bars(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TextColumn("{task.fields[what]}"), TimeRemainingColumn(), quiet=quiet)
        self.sim = self.ingest = None
        self.peak = 0

    def __enter__(self) -> "DemoProgressBars":
        self.bars.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bars.__exit__(*exc)

    def step(self, text: str) -> None:
        if not self.quiet:
            self.bars.console.print(text, markup=False, highlight=False)

    def simulated(self, intervals: int, of: int, events: int) -> None:
        if self.sim is None:
            self.sim = self.bars.add_task("simulating", total=of, what="")
        self.bars.update(self.sim, completed=intervals, what=f"intervals · {events:,} events")

    def ingesting(self, status: dict) -> None:
        lag = status.get("total_lag", 0)
        self.peak = max(self.peak, lag)
        if self.ingest is None:
            self.ingest = self.bars.add_task("ingesting", total=None, what="")
        self.bars.update(self.ingest, total=self.peak or None, completed=self.peak - lag,
                         what=f"lag {lag:,} · {status.get('restarts', 0)} restarts")


def print_demo_models(s: dict, most: int = 5) -> None:
    battery, serve = s["battery_anomaly"], s["serve"]
    table = Table(title="most anomalous devices (drain vs the model)")
    for column in ("device", "score", "flagged", "injected fault"):
        table.add_column(column)
    for d in battery["most_anomalous"][:most]:
        table.add_row(d["device_id"], f"{d['score']:.1f}", "yes" if d["flagged"] else "",
                      d.get("injected_fault") or "none")
    out.print(table)
    url, shown = serve["url"], serve["token_shown"]
    out.print(f"Fleet console: {url}/  (sign in with the token below)  ·  OpenAPI docs {url}/docs")
    out.print(f"  export TOKEN={shown}", highlight=False)
    for path in (f"/v1/devices/{serve['worst_device']}/battery-health", "/v1/forecast/usage?region=NSW-urban",
                 "/v1/analytics/usage_trend"):
        out.print(f"  curl -H \"Authorization: Bearer $TOKEN\" '{url}{path}'", highlight=False, soft_wrap=True)


def print_demo_summary(s: dict) -> None:
    out.print(f"\n[bold]{s['ingested']:,}[/] events stored ({s['events_produced']:,} produced, "
              f"[bold]{s['dead_lettered']:,}[/] dead-lettered; {s['partitions']} partitions, "
              f"{s['consumers']} consumer actors) → {s['store']}")
    out.print(f"the store now holds {s['events_stored']:,} events from {s['devices']:,} devices")
    out.print("devices by state: " + " · ".join(f"{state} {n:,}" for state, n in s["devices_by_state"].items()))
    for cls, v in s["listening"].items():
        out.print(f"{cls}: {v['listening_hours']:,} listening hours over {v['devices']:,} devices "
                  f"({v['hours_per_device']} h per device)")
    if s["first_dead_letter"]:
        out.print(f"first dead letter: {s['first_dead_letter']}")
    _print_failures(s.get("failures", {}))
    out.print(f"fleet report: {s['report']}")


def write_report(result: dict, fmt: str, out_dir: Path | None, quiet: bool = False) -> Path | None:
    """Print or write a full report; returns the file written, if any."""
    path = None
    if fmt == "json":
        text = json.dumps(result, default=str)
        if out_dir:
            out_dir.mkdir(parents=True, exist_ok=True)
            path = out_dir / "report.json"
            path.write_text(text)
        print(text)
    elif fmt == "html":
        from analytics.report_html import write_html  # lazy: matplotlib, see the docstring

        path = write_html(result, out_dir or Path("podpulse-data/report"))
        if not quiet:
            out.print(f"report written to {path}")
    else:
        print_report_tables(result)
    return path


def print_report_tables(result: dict, max_rows: int = 25) -> None:
    out.print(f"[bold]PodPulse fleet report[/] {result['range']['from']} → {result['range']['to']} "
              f"(days {result['range']['days']}), k = {result['k']}, "
              f"{result['events_covered']:,} events covered, "
              f"{(result.get('cohort') or {}).get('label', 'all devices')}")
    for name, q in result.items():
        if not isinstance(q, dict) or "rows" not in q:
            continue
        table = Table(title=name.replace("_", " "), title_justify="left")
        for column in q["columns"]:
            table.add_column(column, justify="left" if column in ("day", "state", "model", "firmware",
                                                                  "ambient_band") else "right")
        for row in q["rows"][:max_rows]:
            table.add_row(*(f"{v:,.3f}" if isinstance(v, float) else str(v) for v in row))
        out.print(table)
        extra = [f"{len(q['rows']) - max_rows} more rows in --format json"] if len(q["rows"]) > max_rows else []
        if q["k"]:
            extra.append(f"{q['suppressed']} cells with fewer than {q['k']} devices suppressed")
        for line in [*extra, *q["notes"]]:
            out.print(f"  [dim]{line}[/]")
    outliers = result["battery_health"]["extra"].get("outliers", [])
    if outliers:
        out.print("battery outliers (furthest from their model/firmware cohort): " + ", ".join(
            f"{o['device_id']} (z {o['z']:.1f})" for o in outliers[:5]))


def print_ingest_result(result: dict) -> None:
    w = result["writer"]
    erased = f", {w['erased']:,} of erased devices" if w.get("erased") else ""
    out.print(f"stored {w.get('applied', 0):,} events ({w.get('replayed', 0):,} redelivered and "
              f"{w.get('repeated', 0):,} sent twice{erased}, skipped) from {result['partitions']} partitions "
              f"with {result['consumers']} consumers; dead-lettered "
              f"{result['dead_lettered'] + w.get('refused', 0):,}; lag {sum(result['lag'].values()):,}")
    _print_failures(result.get("failures", {}))


def _print_failures(failures: dict[str, int]) -> None:
    for cause, n in sorted(failures.items(), key=lambda kv: -kv[1]):
        out.print(f"  {n:,} × {cause}", markup=False, highlight=False)


def print_demo_result(summary: dict, *, models: bool, log_file: Path | None, kept_store: bool) -> None:
    """The demo's closing lines: what was stored, the models, where the logs went, what to do next."""
    print_demo_summary(summary)
    if models:
        print_demo_models(summary)
    if log_file:
        out.print(f"[dim]Ray, Ray Data and TensorFlow logs: {log_file} (--verbose shows them here)[/]")
    out.print(f"next: open {summary['report']}" if kept_store else
              f"next: open {summary['report']}, or try `podpulse report --db {summary['store']}`")


def print_training(model: str, result: dict) -> None:
    if model == "battery-anomaly":
        auc = ("n/a" if result["auc"] is None
               else f"{result['auc']:.3f} (IsolationForest {result['baseline_auc']:.3f})")
        out.print(f"battery-anomaly {result['version']}: AUC {auc}, {result['flagged_devices']:,} of "
                  f"{result['devices']:,} devices flagged at score ≥ {result['threshold']} → {result['path']}")
        if result.get("by_fault"):
            table = Table(title="per fault kind, against the healthy devices")
            for column in ("fault", "devices", "AUC", "IsolationForest AUC", "precision", "recall"):
                table.add_column(column, justify="left" if column == "fault" else "right")

            def cell(x):
                return "n/a" if x is None else f"{x:.3f}"

            for kind, f in [("all", result), *result["by_fault"].items()]:
                table.add_row(kind, f"{f['devices'] if kind != 'all' else result['devices'] - result['healthy_devices']:,}",
                              cell(f["auc"]), cell(f["baseline_auc"]), cell(f["precision"]), cell(f["recall"]))
            out.print(table)
    elif model == "listening-segments":
        def ari(x):
            return "n/a" if x is None else f"{x:.3f}"

        out.print(f"listening-segments {result['version']}: {result['k']} segments ({', '.join(result['names'])}); "
                  f"silhouette {result['silhouette']:.3f} (k-means on the raw features {result['baseline_silhouette']:.3f}), "
                  f"stability ARI {result['stability_ari']:.3f} ({result['baseline_stability_ari']:.3f}), "
                  f"against the simulator's profiles ARI {ari(result['profiles_ari'])} "
                  f"({ari(result['baseline_profiles_ari'])}) → {result['path']}")
    else:
        out.print(f"usage-forecast {result['version']}: MAPE {result['mape']:.1f}% (seasonal naive "
                  f"{result['baseline_mape']:.1f}%) → {result['path']}")


def print_findings(result: dict) -> None:
    table = Table(title=f"firmware against the version before it, per model ({result['confidence']:.0%} intervals)")
    for column in ("model", "firmware", "before", "devices", "drain change", "interval", "p", "listening h/day",
                   "regression"):
        table.add_column(column, justify="left" if column in ("model", "firmware", "before") else "right")
    for f in result["findings"]:
        table.add_row(f["model"], f["firmware"], f["baseline_firmware"], f"{f['devices']:,}", f"{f['drain_change']:+.1%}",
                      f"{f['ci_low']:+.1%} .. {f['ci_high']:+.1%}", f"{f['p_value']:.4f}",
                      f"{f['listening_change_h']:+.2f}", "[bold red]yes[/]" if f["regression"] else "")
    out.print(table if result["findings"] else "no firmware version has a predecessor run by enough of the same devices")
    out.print(f"{result['regressions']} regression(s): drain up by more than {result['min_effect']:.0%} at "
              f"{result['confidence']:.0%} confidence; kept in the store as of {result['detected_at']}")


def print_drift(result: dict) -> None:
    for name, value in result["features"].items():
        out.print(f"{name:>14}: PSI {value:.3f}")
    out.print(("[bold red]retrain[/]" if result["retrain"] else "[green]no retraining needed[/]")
              + f" (max PSI {result['max_psi']:.3f}, threshold {result['threshold']})"
              + (f" — {result['note']}" if result.get("note") else ""))


def print_db_status(result: dict) -> None:
    out.print(f"current version {result['current']}, latest {result['latest']}")
    for m in result["pending"]:
        out.print(f"  pending {m['version']}: {m['description']}")


def print_retention(result: dict) -> None:
    """What a retention run removed, per backend and table."""
    if not result["backends"]:
        out.print("no retention configured: every record is kept (set retention in the storage config, "
                  "or --keep KIND=DAYS)")
        return
    out.print(f"retention counted back from {result['now']}: "
              + ", ".join(f"{kind} {days} days" for kind, days in result["retention"].items()))
    for name, backend in result["backends"].items():
        out.print(f"[bold]{name}[/] ({backend['type']})")
        for table, r in backend["tables"].items():
            out.print(f"  {table:<22} before {r['cutoff']}: {_removed(r)}")


def print_erasure(result: dict) -> None:
    """What erasing devices removed, per backend and table."""
    out.print(f"erased {', '.join(result['devices'])}")
    for name, backend in result["backends"].items():
        extra = [f"{backend['partitions']:,} partitions deleted"] if "partitions" in backend else []
        if "tombstones" in backend:
            extra.append(f"{backend['tombstones']:,} tombstones kept (replays and backfills skip these devices)")
        out.print(f"[bold]{name}[/] ({backend['type']})" + (": " + "; ".join(extra) if extra else ""))
        for table, rows in backend["tables"].items():
            out.print(f"  {table:<22} {rows:,} rows deleted")


def _removed(r: dict) -> str:
    if r["by"] == "ttl":
        return "rows expire by the TTL they were written with"
    if r["by"] == "partition":
        parts = r["partitions"]
        return f"{len(parts)} partitions dropped" + (f" ({', '.join(parts)})" if parts else "")
    return f"{r['rows']:,} rows deleted"


def quiet_logs(path: Path) -> Path:
    """Send everything written to this process's stderr (Ray's, Ray Data's, Serve's and TensorFlow's
    logs, C++ ones included) to ``path``; PodPulse's own progress and summary still reach the terminal.
    Set before Ray starts (``init_ray(log_file=path)`` keeps the actors' output there too)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # On a terminal Ray Data draws progress bars on stdout and echoes its log lines above them;
    # read when ray.data is first imported (training imports it later).
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    stderr_to(path)
    logging.captureWarnings(True)
    return path


def stderr_to(path: Path) -> None:
    """Point this process's fd 2 at ``path`` (appending); ``err`` keeps writing to the terminal."""
    global _logs
    path.parent.mkdir(parents=True, exist_ok=True)
    err.file = os.fdopen(os.dup(2), "w", buffering=1)  # the terminal, for PodPulse's own lines
    log = open(path, "a", buffering=1)
    sys.stderr.flush()
    os.dup2(log.fileno(), 2)
    _logs = path


def print_serving(url: str) -> None:
    out.print(f"PodPulse API on {url}  (fleet console: {url}/ · OpenAPI docs: {url}/docs). Ctrl-C stops it.")


def print_token(value: str, entry: dict) -> None:
    """A new token (shown once) and its tokens-file entry, each on stdout for a script to take."""
    err.print("token (shown once; the file keeps only its SHA-256):")
    print(value)
    err.print("tokens-file entry:")
    print(yaml.safe_dump([entry], sort_keys=False), end="")
