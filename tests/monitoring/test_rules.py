"""The alert rules, the PrometheusRule, the scrape config, Alertmanager and the kustomization.

Checked by the real tools: promtool and amtool (Debian's prometheus and
prometheus-alertmanager packages, installed by .ci/run) and kubectl kustomize.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

from jobs import drift
from podpulse import metrics

ROOT = Path(__file__).resolve().parents[2]
MON = ROOT / "monitoring"
RULES = MON / "prometheus" / "podpulse-rules.yaml"
RULE_TESTS = MON / "prometheus" / "podpulse-rules.test.yaml"
ALERTMANAGER = MON / "alertmanager" / "alertmanager.yml"


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_the_metric_name_extractor_finds_selectors_only(promql_metric_names):
    expr = ('histogram_quantile(0.99, sum by (le, endpoint) (rate(ray_a_bucket{x="rate(b)"}[5m]))) > 0.025 '
            'and on (model, version) max by (model) (ray_b offset 1h) == 1e3 or absent_over_time(ray_c[15m:1m])')
    assert promql_metric_names(expr) == {"ray_a_bucket", "ray_b", "ray_c"}


def test_promtool_accepts_the_rules_file():
    r = run("promtool", "check", "rules", str(RULES))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(rules())} rules found" in r.stdout


def test_the_rules_unit_tests_pass_and_show_each_alert_firing_and_not_firing():
    r = run("promtool", "test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout
    cases: dict[str, set[bool]] = {}
    for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for case in test["alert_rule_test"]:
            cases.setdefault(case["alertname"], set()).add(bool(case.get("exp_alerts")))
    alerts = {r["alert"] for r in rules()}
    assert alerts == {"PodPulseConsumerLagGrowing", "PodPulseDeadLetterRateHigh", "PodPulseNoEventsConsumed",
                      "PodPulseScoringLatencyHigh", "PodPulseModelDrift", "PodPulseFirmwareRegression",
                      "PodPulseAPITokensFileUnreadable"}
    assert cases == {a: {True, False} for a in alerts}


def test_the_rules_select_only_metrics_podpulse_exports(promql_metric_names):
    exported = metrics.exported_series()
    for rule in rules():
        names = promql_metric_names(rule["expr"])
        assert names and names <= exported, (rule["alert"], names - exported)


def test_the_drift_alert_uses_the_drift_commands_threshold():
    expr = next(r["expr"] for r in rules() if r["alert"] == "PodPulseModelDrift")
    assert float(re.search(r"ray_podpulse_feature_drift_psi\)\s*>\s*([0-9.]+)", expr).group(1)) == drift.THRESHOLD


def test_the_prometheusrule_carries_the_plain_files_rules():
    manifest = yaml.safe_load((MON / "prometheusrule.yaml").read_text())
    assert manifest["apiVersion"] == "monitoring.coreos.com/v1" and manifest["kind"] == "PrometheusRule"
    assert manifest["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
    r = run(sys.executable, str(MON / "generate.py"), "--check")
    assert r.returncode == 0, r.stderr


def test_the_example_prometheus_config_is_valid_and_loads_the_rules():
    r = run("promtool", "check", "config", str(MON / "prometheus" / "prometheus.yml"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "podpulse-rules.yaml" in r.stdout and f"{len(rules())} rules found" in r.stdout


def test_alertmanager_routes_each_severity_the_rules_use_to_its_own_receiver():
    r = run("amtool", "check-config", str(ALERTMANAGER))
    assert r.returncode == 0, r.stdout + r.stderr
    routed = {}
    for severity in {r["labels"]["severity"] for r in rules()} | {"unknown"}:
        out = run("amtool", "config", "routes", "test", f"--config.file={ALERTMANAGER}",
                  f"severity={severity}", "alertname=PodPulseTest")
        assert out.returncode == 0, out.stderr
        routed[severity] = out.stdout.strip()
    assert routed == {"critical": "podpulse-pager", "warning": "podpulse-chat",
                      "info": "podpulse-ml-tickets", "unknown": "podpulse-chat"}


def test_kustomize_renders_the_rule_the_podmonitor_and_the_dashboard_configmap():
    r = run("kubectl", "kustomize", str(MON))
    assert r.returncode == 0, r.stderr
    docs = {d["kind"]: d for d in yaml.safe_load_all(r.stdout)}
    assert set(docs) == {"PrometheusRule", "PodMonitor", "ConfigMap"}
    assert docs["PrometheusRule"]["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
    cm = docs["ConfigMap"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["podpulse.json"]) == json.loads((MON / "grafana" / "podpulse.json").read_text())
    endpoints = docs["PodMonitor"]["spec"]["podMetricsEndpoints"]
    assert [e["port"] for e in endpoints] == ["metrics"]
    # the port name the PodMonitor scrapes is the one ray-cluster.yaml gives Ray's metrics port
    assert re.search(r"containerPort:\s*8080,\s*name:\s*metrics", (ROOT / "ray-cluster.yaml").read_text())
