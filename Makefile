# The two commands of the quick start:  make demo  ·  make test
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test bench tools

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/podpulse demo

test: setup tools
	$(BIN)/python -m pytest

# prometheus and promtool (alert-rule tests, the scrape test) and amtool (the Alertmanager
# example) come from Debian's prometheus and prometheus-alertmanager packages.
tools:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null && command -v amtool >/dev/null || { \
	  sudo=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
	  $$sudo apt-get update -qq && \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    prometheus prometheus-alertmanager; }

bench: setup
	$(BIN)/podpulse bench simulate
