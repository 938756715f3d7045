"""One self-contained HTML page for a :func:`analytics.queries.full_report`.

Charts are matplotlib SVGs inlined as ``<svg>`` elements, with text kept as
text (``svg.fonttype = 'none'``), so the page needs no network, fonts or
scripts to view. Every text value from the report is escaped; a query with no
rows renders "no data" instead of a chart or table.
"""

from __future__ import annotations

import html
import io
import sys
from pathlib import Path

import matplotlib

if "matplotlib.pyplot" not in sys.modules:  # never ask for a display; leave a host's own choice alone
    matplotlib.use("Agg")

from matplotlib.figure import Figure  # noqa: E402  (no pyplot: figures are not global state)
from matplotlib.ticker import PercentFormatter  # noqa: E402

__all__ = ["render_html", "write_html", "CHART_TITLES"]

CHART_TITLES = {
    "listening_by_hour": "Listening by local hour of day, urban vs rural",
    "mode_shares": "Noise-control mode shares by state, urban vs rural",
    "exposure": "Weekly sound exposure: device-weeks per dose band",
    "battery_health": "Battery drain by model and firmware",
    "firmware_adoption": "Firmware adoption over time",
}
MODES = (("anc", "#1f5f8b"), ("adaptive", "#4a9fd8"), ("transparency", "#f0a030"), ("off", "#b8b8b8"))
NO_DATA = '<p class="nodata">no data</p>'
SUPPRESSED, NO_DEVICES = "suppressed (< k)", "no devices"  # never shown as a number, least of all 0
_NO_METADATA = {"Creator": None, "Date": None, "Format": None, "Type": None}
CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;background:#fff;
 max-width:64rem;margin:2rem auto;padding:0 1rem}
h1{font-size:1.6rem;margin:0 0 .3rem}
h2{font-size:1.15rem;margin:2.2rem 0 .6rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
.meta{color:#555;margin:.1rem 0}
table{border-collapse:collapse;font-size:.9rem;margin:.4rem 0}
th,td{padding:.25rem .7rem;border-bottom:1px solid #e6e6e6;text-align:left;vertical-align:top}
th{background:#f4f4f4} td.num{text-align:right;font-variant-numeric:tabular-nums}
svg{max-width:100%;height:auto}
.nodata{color:#888;font-style:italic} .note{color:#555;font-size:.85rem}
"""


def _e(value) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return html.escape(str(value))


def _m(text) -> str:
    """A label as matplotlib should draw it: literal dollars, never mathtext."""
    return str(text).replace("$", r"\$")


def _records(q: dict) -> list[dict]:
    return [dict(zip(q.get("columns", []), row)) for row in q.get("rows") or []]


def _table(columns: list[str], rows: list[list]) -> str:
    if not rows:
        return NO_DATA
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(
        f'<td class="num">{_e(v)}</td>' if isinstance(v, (int, float)) and not isinstance(v, bool)
        else f"<td>{_e(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _svg(fig: Figure, name: str, title: str) -> str:
    fig.suptitle(title)
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": f"podpulse-{name}"}):
        fig.savefig(buf, format="svg", metadata=_NO_METADATA)
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]  # drop the XML prologue and DOCTYPE
    svg = svg.replace(' xmlns:xlink="http://www.w3.org/1999/xlink"', "").replace("xlink:href=", "href=")
    for ref in (' id="', ' href="#', "url(#"):  # one page holds several SVGs: keep their ids apart
        svg = svg.replace(ref, f"{ref}{name}-")
    return svg.replace("<svg ", f'<svg role="img" aria-label="{html.escape(title)}" ', 1)


def _axes(height: float = 3.4):
    fig = Figure(figsize=(7.5, height), layout="constrained")
    return fig, fig.add_subplot()


def _listening(q: dict) -> Figure | None:
    recs = [r for r in _records(q) if r["minutes_per_device"] is not None]
    if not recs:
        return None
    fig, ax = _axes()
    for urban, label in ((True, "urban"), (False, "rural")):
        pts = sorted((r["local_hour"], r["minutes_per_device"]) for r in recs if bool(r["urban"]) == urban)
        if pts:
            ax.plot(*zip(*pts), marker="o", markersize=3, label=label)
    ax.set(xlabel="local hour of day (state standard time)", ylabel="minutes per active device",
           xticks=range(0, 24, 3), xlim=(-0.5, 23.5))
    ax.legend()
    return fig


def _noise(q: dict, group: str = "state", unit: str = "", xlabel: str = "state") -> Figure | None:
    """Stacked mode shares per group (state, or ambient band), urban and rural side by side."""
    recs = _records(q)
    if not recs:
        return None
    hidden = {(key[0], bool(key[1])) for key in q.get("suppressed_cells") or []}
    bands = list(dict.fromkeys(r[group] for r in recs))
    fig, ax = _axes(3.8)
    ticks, labels = [], []
    for i, band in enumerate(bands):
        for offset, urban, label in ((-0.21, True, "urban"), (0.21, False, "rural")):
            ticks.append(i + offset)
            labels.append(label)
            rec = next((r for r in recs if r[group] == band and bool(r["urban"]) == urban), None)
            if rec is None:  # under k devices, or none at all: never drawn as a share of 0
                why = "suppressed (< k)" if (band, urban) in hidden else "no devices"
                ax.text(i + offset, 0.03, why, rotation=90, ha="center", fontsize=8, color="#777")
            bottom = 0.0
            for mode, colour in (MODES if rec else ()):
                share = rec[mode] or 0.0
                ax.bar(i + offset, share, 0.4, bottom=bottom, color=colour, label=mode if i == 0 else None)
                bottom += share
    ax.set_xticks(ticks, labels, fontsize=8)
    ax.set_xlim(-0.5, len(bands) - 0.5)
    bands_axis = ax.secondary_xaxis(-0.1)
    bands_axis.set_xticks(range(len(bands)), [_m(b) + unit for b in bands])
    bands_axis.tick_params(length=0)
    bands_axis.spines["bottom"].set_visible(False)
    bands_axis.set_xlabel(xlabel)
    ax.set_ylabel("share of in-ear time")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    handles, names = ax.get_legend_handles_labels()
    unique = dict(zip(names, handles))
    ax.legend(unique.values(), unique.keys(), title="mode", loc="upper left", bbox_to_anchor=(1.01, 1))
    return fig


def _exposure(q: dict) -> Figure | None:
    dist = (q.get("extra") or {}).get("distribution") or {}
    counts, edges = dist.get("device_weeks") or [], dist.get("edges_pct") or []
    if not counts or not dist.get("total"):
        return None
    fig, ax = _axes()
    ax.bar(edges[:len(counts)], counts, width=9, align="edge", color="#4a7fb0", label="device-weeks")
    ax.axvline(100, color="#c0392b", linestyle="--", label="WHO weekly allowance (100%)")
    positive = [c for c in counts if c > 0]
    log = max(positive) > 50 * min(positive)
    if log:
        ax.set_yscale("log")
    over, total = dist.get("over_guide", 0), dist["total"]
    ax.text(0.98, 0.75, f"{over:,} / {total:,} device-weeks over the guide ({over / total:.1%})",
            transform=ax.transAxes, ha="right", va="top")
    ax.set(xlabel=f"weekly dose, % of the WHO allowance (80 dBA for 40 h); the last band is "
                  f"{edges[len(counts) - 1]}% and above",
           ylabel="device-weeks" + (" (log scale)" if log else ""))
    ax.xaxis.set_major_formatter(PercentFormatter(100))
    ax.legend(loc="upper right")
    return fig


def _battery(q: dict) -> Figure | None:
    recs = _records(q)
    if not recs:
        return None
    fig, ax = _axes(max(2.6, 0.42 * len(recs) + 1.4))
    y = range(len(recs))
    ax.hlines(y, [r["p10_pct_per_h"] for r in recs], [r["p90_pct_per_h"] for r in recs],
              linewidth=7, color="#9cc3e6", label="p10 to p90 of devices")
    ax.plot([r["p50_pct_per_h"] for r in recs], y, "D", color="#1f3f5f", markersize=5, label="median (p50)")
    ax.set_yticks(y, [_m(f"{r['model']} / {r['firmware']} (n={r['devices']})") for r in recs], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("battery drain, % per hour of playback (mean of both buds)")
    ax.set_ylabel("model / firmware")
    fig.legend(loc="outside lower center", ncols=2, fontsize=8)
    return fig


def _firmware(q: dict) -> Figure | None:
    recs = [r for r in _records(q) if r["share"] is not None]
    if not recs:
        return None
    days = sorted({str(r["day"]) for r in recs})
    fig, ax = _axes()
    for fw in sorted({str(r["firmware"]) for r in recs}):
        share = {str(r["day"]): r["share"] for r in recs if str(r["firmware"]) == fw}
        ax.plot(range(len(days)), [share.get(d, float("nan")) for d in days], marker="o", markersize=3,
                label=_m(fw))
    step = max(1, len(days) // 10)
    ax.set_xticks(range(0, len(days), step), [d[5:] for d in days[::step]])
    ax.set(xlabel=f"day (AEST), {days[0]} to {days[-1]}", ylabel="share of the day's active devices",
           ylim=(0, 1.05))
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.legend(title="firmware", loc="upper left", bbox_to_anchor=(1.01, 1))
    return fig


CHARTS = (("listening_by_hour", "Listening through the day", _listening),
          ("mode_shares", "Noise control", _noise), ("exposure", "Sound exposure", _exposure),
          ("battery_health", "Battery drain", _battery), ("firmware_adoption", "Firmware", _firmware))


def _usage_summary(q: dict) -> str:
    """Listening per state, urban and rural: the sum of the day cells shown. A part with no day cell
    shown says why: its cells were suppressed (1 to k-1 devices), or it had no devices at all."""
    shown: dict[tuple[str, bool], float] = {}
    for r in _records(q):
        key = (str(r["state"]), bool(r["urban"]))
        shown[key] = shown.get(key, 0.0) + (r["listening_h"] or 0.0)
    hidden = {(str(state), bool(urban)) for _, state, urban in q.get("suppressed_cells") or []}

    def part(state: str, urban: bool):
        return shown.get((state, urban), SUPPRESSED if (state, urban) in hidden else NO_DEVICES)

    rows = []
    for state in {s for s, _ in shown} | {s for s, _ in hidden}:
        parts = [part(state, True), part(state, False)]
        numbers = [p for p in parts if isinstance(p, float)]
        rows.append([state, *parts, sum(numbers) if numbers else SUPPRESSED])
    rows.sort(key=lambda row: (-row[3] if isinstance(row[3], float) else 0.0, row[0]))
    return _table(["state", "urban hours", "rural hours", "total hours"], rows) + (
        f'<p class="note">Sums the day cells shown; a suppressed day cell (fewer than {_e(q.get("k"))} '
        'devices) is not counted. "no devices": none was active there.</p>' if rows else "")


def _table_of(q: dict) -> str:
    """A query's table, its suppressed cells as rows that say so (keys only, never a value)."""
    columns, rows = q.get("columns", []), [list(r) for r in q.get("rows") or []]
    for key in q.get("suppressed_cells") or []:
        rows.append([*key, SUPPRESSED, *([""] * (len(columns) - len(key) - 1))])
    return _table(columns, rows)


def _suppressed(q: dict) -> str:
    n, k = q.get("suppressed", 0), q.get("k")
    if k is None:
        return "no regional cells"
    return f"{n} cell{'' if n == 1 else 's'} with fewer than {k} devices suppressed"


def render_html(report: dict) -> str:
    """The report as one HTML page with inline CSS and inline SVG charts."""
    queries = {name: q for name, q in report.items() if isinstance(q, dict) and "rows" in q}
    span = report.get("range") or {}
    out = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
           f"<title>PodPulse report</title><style>{CSS}</style></head><body>",
           "<h1>PodPulse report</h1>",
           f'<p class="meta">Days {_e(span.get("from"))} to {_e(span.get("to"))}: {_e(span.get("days"))}. '
           f'Devices: {_e((report.get("cohort") or {}).get("label", "all devices"))}.</p>',
           f'<p class="meta">k = {_e(report.get("k"))}: every regional cell with fewer than k distinct '
           f'devices is left out. Events covered: {_e(report.get("events_covered"))}.</p>']
    for name, section, draw in CHARTS:
        fig, title = draw(queries.get(name) or {}), CHART_TITLES[name]
        out += [f"<h2>{_e(section)}</h2>", _svg(fig, name, title) if fig is not None
                else f'<p class="nodata">{_e(title)}: no data</p>']
        if (queries.get(name) or {}).get("suppressed"):
            out.append(f'<p class="note">{_e(_suppressed(queries[name]))}: not drawn.</p>')
    out += ["<h2>States</h2>", _table_of(queries.get("state_overview", {})),
            "<h2>Total listening per state over the range</h2>", _usage_summary(queries.get("usage_trend", {})),
            "<h2>Noise control against ambient noise</h2>", _table_of(queries.get("noise_habits", {})),
            "<h2>Battery outliers</h2>"]
    outliers = (queries.get("battery_health", {}).get("extra") or {}).get("outliers") or []
    out.append(_table(list(outliers[0]), [list(o.values()) for o in outliers]) if outliers else NO_DATA)
    out.append('<p class="note">Robust z-score of the worse bud against its model-and-firmware cohort.</p>')
    out.append("<h2>Queries: suppression and notes</h2>")
    out.append(_table(["query", "cells shown", "suppressed"], [
        [name, len(q.get("rows") or []), _suppressed(q)] for name, q in queries.items()]))
    for name, q in queries.items():
        if q.get("notes"):
            out.append(f"<p class=\"note\"><b>{_e(name)}</b>: " + "; ".join(_e(n) for n in q["notes"]) + "</p>")
    out.append("</body></html>\n")
    return "\n".join(out)


def write_html(report: dict, out_dir: Path) -> Path:
    """Render ``report`` to ``out_dir/report.html``; returns the file's absolute path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.html"
    path.write_text(render_html(report))
    return path.resolve()
