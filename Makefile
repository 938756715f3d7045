# The two commands of the quick start:  make demo  ·  make test
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

INFRA := .cache/infra

.PHONY: setup demo test bench tools infra

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/podpulse demo

test: setup tools infra
	$(BIN)/python -m pytest

# prometheus and promtool (alert-rule tests, the scrape test) and amtool (the Alertmanager
# example) come from Debian's prometheus and prometheus-alertmanager packages.
tools:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null && command -v amtool >/dev/null || { \
	  sudo=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
	  $$sudo apt-get update -qq && \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    prometheus prometheus-alertmanager; }

# The real servers the tests start (tests/infra): Apache Kafka and Apache Cassandra from Maven
# Central into $(INFRA) (kept between runs), and Debian's PostgreSQL, whose initdb makes each
# test session a private cluster. The demo needs none of them.
infra: $(INFRA)/kafka/.fetched $(INFRA)/cassandra/.fetched
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  sudo=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
	  $$sudo apt-get update -qq && \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql; }

$(INFRA)/%/.fetched: tests/infra/%/pom.xml
	rm -rf $(INFRA)/$*
	mvn -q -B -f $< dependency:copy-dependencies -DoutputDirectory=$(CURDIR)/$(INFRA)/$*
	touch $@

bench: setup
	$(BIN)/podpulse bench simulate
