"""The Grafana dashboard: every query parses (promtool) and selects metrics PodPulse exports."""

import json
import re
import subprocess
from pathlib import Path

import yaml

from podpulse import metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "monitoring" / "grafana" / "podpulse.json"
# Grafana's variables, replaced by values of the same kind so that Prometheus can parse the query
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "6h", "$topic": ".*"}


def queries() -> dict[str, str]:
    """Every PromQL query of the dashboard, by panel title and refId, variables replaced."""
    d = json.loads(DASHBOARD.read_text())
    found = {}
    for panel in d["panels"]:
        for t in panel.get("targets", []):
            expr = t["expr"]
            for var, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(var, value)
            assert "$" not in expr, f"{panel['title']}: unknown variable in {t['expr']}"
            found[f"{panel['title']} {t['refId']}"] = expr
    for var in d["templating"]["list"]:
        if var["type"] == "query":
            found[f"variable {var['name']}"] = var["definition"]
    return found


def test_every_panel_has_queries_and_every_query_parses(tmp_path):
    d = json.loads(DASHBOARD.read_text())
    panels = [p for p in d["panels"] if p["type"] != "row"]
    assert panels and all(p.get("targets") for p in panels)
    exprs = {k: v for k, v in queries().items() if not k.startswith("variable")}
    # promtool parses each expression as a recording rule
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(exprs.values())]}]}
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump(rules))
    r = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in r.stdout


def test_a_broken_query_would_be_caught(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": [
        {"record": "x:y", "expr": "sum by (le (rate(ray_podpulse_events_consumed_total[1m]))"}]}]}))
    r = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0


def test_the_dashboard_selects_only_exported_metrics_and_shows_each_one_asked_for(promql_metric_names):
    exported = metrics.exported_series()
    used = set()
    for where, expr in queries().items():
        if where.startswith("variable"):
            expr = re.fullmatch(r"label_values\((\w+),\s*\w+\)", expr).group(1)
        names = promql_metric_names(expr)
        assert names and names <= exported, (where, names - exported)
        used |= names
    p = metrics.PREFIX
    assert {p + "podpulse_events_consumed_total", p + "podpulse_events_stored_total",  # ingest rate
            p + "podpulse_consumer_lag", p + "podpulse_events_dead_lettered_total",
            p + "podpulse_batch_write_seconds_bucket", p + "podpulse_anomalous_devices",
            p + "podpulse_scoring_latency_seconds_bucket", p + "podpulse_model_info"} <= used


def test_latency_panels_show_p50_and_p99_per_backend_and_endpoint():
    q = queries()
    for title, label in (("Batch write latency", "backend"), ("Scoring latency", "endpoint")):
        exprs = [e for k, e in q.items() if k.startswith(title)]
        assert sorted(re.match(r"histogram_quantile\((0\.\d+),", e).group(1) for e in exprs) == ["0.5", "0.99"]
        assert all(f"sum by (le, {label})" in e for e in exprs)
