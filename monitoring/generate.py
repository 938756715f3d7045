"""Write prometheusrule.yaml from prometheus/podpulse-rules.yaml: the same groups, as a PrometheusRule.

    python monitoring/generate.py          # rewrite it
    python monitoring/generate.py --check  # exit 1 if it is out of date

The plain rules file is the source (promtool checks and unit-tests it);
tests/monitoring checks that the two carry the same rules.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
RULES = HERE / "prometheus" / "podpulse-rules.yaml"
OUT = HERE / "prometheusrule.yaml"

HEADER = """\
# GENERATED from prometheus/podpulse-rules.yaml by `python monitoring/generate.py`: edit that file.
# The PodPulse alert rules for the Prometheus Operator (kube-prometheus-stack).
# Its Prometheus picks up PrometheusRules whose labels match its ruleSelector:
# kube-prometheus-stack's default is `release: <Helm release name>`; change the
# label below if your release is not called kube-prometheus-stack.
"""


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render() -> str:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    manifest = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "podpulse",
            "labels": {"app.kubernetes.io/name": "podpulse", "app.kubernetes.io/component": "monitoring",
                       "release": "kube-prometheus-stack"},
        },
        "spec": {"groups": groups},
    }
    return HEADER + yaml.dump(manifest, Dumper=_Dumper, sort_keys=False, width=1000, allow_unicode=True)


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if OUT.read_text() != text:
            print(f"{OUT} is out of date: run python monitoring/generate.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
