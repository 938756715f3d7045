"""PodPulse's floors (.importlinter) hold: each layer imports only the layers below it."""

import ast
import configparser
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_import_layers_hold():
    out = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


def test_every_package_is_one_floor_with_a_contract_of_its_own():
    """No folder holds more than one floor: each top-level package is a layer of the floors contract,
    and the order inside it is a contract of its own."""
    config = configparser.ConfigParser()
    config.read(ROOT / ".importlinter")
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert set(config["importlinter"]["root_packages"].split()) == packages == set(PACKAGES)
    floors = config["importlinter:contract:floors"]["layers"].replace("|", " ").split()
    assert sorted(floors) == sorted(packages)
    contained = {config[s]["containers"].strip() for s in config.sections() if "containers" in config[s]}
    assert contained == packages


PACKAGES = ("podpulse", "storage", "actors", "analytics", "jobs", "deployments", "crds", "testbed", "bench", "cli")


def _function_level_imports(path: Path):
    """(line number, source line) of each import statement inside a function of ``path``."""
    source = path.read_text()
    lines = source.splitlines()
    found = []
    for fn in ast.walk(ast.parse(source)):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    found.append((node.lineno, lines[node.lineno - 1]))
    return sorted(set(found))


def test_function_level_imports_say_why():
    """Imports go at the top of a module; one inside a function (a heavy or optional dependency:
    TensorFlow, Serve, kopf, a backend's driver) carries its reason as a comment on its line."""
    silent = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
              for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))
              for n, line in _function_level_imports(path) if "#" not in line]
    assert not silent, "function-level imports without a reason:\n" + "\n".join(silent)


def test_the_reason_check_sees_a_silent_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import os\n\ndef f():\n    import json\n    import tensorflow  # heavy: 5 s\n")
    assert [n for n, line in _function_level_imports(module) if "#" not in line] == [4]


def _architecture_table() -> dict[str, set[str]]:
    """README's architecture table: each row's folders → the names the row puts in backticks."""
    text = (ROOT / "README.md").read_text().split("## Architecture", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, set[str]] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0].startswith("`"):
            for folder in re.findall(r"`([^`]+)`", cells[0]):
                rows.setdefault(folder, set()).update(re.findall(r"`([^`]+)`", cells[1]))
    return rows


def test_the_architecture_table_matches_the_folders():
    rows = _architecture_table()
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    top = {p.split("/")[0] + ("/" if "/" in p else "") for p in tracked.splitlines() if not p.startswith(".")}
    top -= {"README.md", "Makefile", "pyproject.toml"}
    assert top == set(rows), f"folders without a row: {top - set(rows)}; rows without a folder: {set(rows) - top}"
    for package in PACKAGES:
        modules = {p.stem for p in (ROOT / package).glob("*.py") if p.stem != "__init__"}
        assert modules <= rows[f"{package}/"], f"{package}/ modules missing from the table: {modules - rows[package + '/']}"


def test_no_unused_import_and_imports_in_order():
    """ruff's pyflakes and isort rules ([tool.ruff] in pyproject.toml) over every package and the tests."""
    out = subprocess.run([str(Path(sys.executable).parent / "ruff"), "check", "--no-cache", "."], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
