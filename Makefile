# The two commands of the quick start:  make demo  ·  make test
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

INFRA := .cache/infra
TOOLS := .cache/tools/bin

.PHONY: setup demo test bench tools infra kube

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/podpulse demo

test: setup tools infra kube
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

# The control plane of tests/k8s (tests/infra/kube.py): etcd, kube-apiserver and kube-controller-manager
# (only its garbage collector runs: tests/k8s/test_operator_live.py) built from their Go modules, at the
# versions tools/go.mod and go.sum pin, into $(TOOLS) (kept between runs: rebuilt only when tools/go.mod
# or go.sum changes). Go's own caches (~/go/pkg/mod, ~/.cache/go-build) make a rebuild after a change
# mostly a link. Cold, on 2 cores: etcd 2 min, kube-apiserver 11 min, then kube-controller-manager 7 min
# (most of its packages are kube-apiserver's, already in the build cache).
GOBUILD := nice -n 19 go build -trimpath -buildvcs=false
kube: $(TOOLS)/etcd $(TOOLS)/kube-apiserver $(TOOLS)/kube-controller-manager

$(TOOLS)/etcd: tools/go.mod tools/go.sum
	@command -v go >/dev/null || { echo "make kube: Go (1.26) is needed to build etcd, kube-apiserver and kube-controller-manager" >&2; exit 1; }
	cd tools && $(GOBUILD) -ldflags="-s -w" -o $(CURDIR)/$@ go.etcd.io/etcd/server/v3

# The version ldflags are what Kubernetes' own build sets: without them /version says v0.0.0-master.
$(TOOLS)/kube-apiserver $(TOOLS)/kube-controller-manager: tools/go.mod tools/go.sum
	@command -v go >/dev/null || { echo "make kube: Go (1.26) is needed to build etcd, kube-apiserver and kube-controller-manager" >&2; exit 1; }
	cd tools && v=$$(go list -m -f '{{.Version}}' k8s.io/kubernetes) && minor=$${v#v1.} && \
	  pkg=k8s.io/component-base/version && \
	  $(GOBUILD) -ldflags="-s -w -X $$pkg.gitVersion=$$v -X $$pkg.gitMajor=1 -X $$pkg.gitMinor=$${minor%%.*} \
	    -X $$pkg.gitTreeState=clean" -o $(CURDIR)/$@ k8s.io/kubernetes/cmd/$(@F)

bench: setup
	$(BIN)/podpulse bench simulate
