# The two commands of the quick start:  make demo  ·  make test
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

INFRA := .cache/infra
TOOLS := .cache/tools/bin
KUBERAY_CRDS := .cache/tools/kuberay-crds

.PHONY: setup demo test test-fast bench tools infra kube browser

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/podpulse demo

test: setup tools infra kube browser
	$(BIN)/python -m pytest

# Unit and property tests: no server (no broker, database, Ray, control plane or browser), under 3 minutes.
test-fast: setup
	$(BIN)/python -m pytest -m "not integration and not slow"

# prometheus and promtool (alert-rule tests, the scrape test) and amtool (the Alertmanager
# example) come from Debian's prometheus and prometheus-alertmanager packages.
tools:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null && command -v amtool >/dev/null || { \
	  sudo=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
	  $$sudo apt-get update -qq && \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    prometheus prometheus-alertmanager; }

# Debian's Chromium, which Playwright drives through the console (tests/deployments/test_console.py):
# `playwright install` downloads browsers from a CDN this machine does not reach.
browser:
	@test -x /usr/bin/chromium || { \
	  sudo=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
	  $$sudo apt-get update -qq && \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; }

# The real servers the tests start (testbed): Apache Kafka and Apache Cassandra from Maven
# Central into $(INFRA) (kept between runs), and Debian's PostgreSQL, whose initdb makes each
# test session a private cluster. The demo needs none of them.
infra: $(INFRA)/kafka/.fetched $(INFRA)/cassandra/.fetched
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  sudo=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
	  $$sudo apt-get update -qq && \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql; }

$(INFRA)/%/.fetched: testbed/maven/%/pom.xml
	rm -rf $(INFRA)/$*
	mvn -q -B -f $< dependency:copy-dependencies -DoutputDirectory=$(CURDIR)/$(INFRA)/$*
	touch $@

# The control plane of tests/k8s (testbed/kube.py): etcd, kube-apiserver and kube-controller-manager
# (only its garbage collector runs: tests/k8s/test_operator_live.py) built from their Go modules, at the
# versions tools/go.mod and go.sum pin, into $(TOOLS) (kept between runs: rebuilt only when tools/go.mod
# or go.sum changes); KubeRay and Helm below. Go's own caches (~/go/pkg/mod, ~/.cache/go-build) make a
# rebuild after a change mostly a link. Cold, on 2 cores: etcd 2 min, kube-apiserver 11 min, then
# kube-controller-manager 7 min (most of its packages are kube-apiserver's, already in the build cache).
GOBUILD := nice -n 19 go build -trimpath -buildvcs=false
GO_NEEDED = @command -v go >/dev/null || { echo "make kube: Go (1.26) is needed to build the test cluster's tools" >&2; exit 1; }
kube: $(TOOLS)/etcd $(TOOLS)/kube-apiserver $(TOOLS)/kube-controller-manager $(TOOLS)/ray-operator \
  $(KUBERAY_CRDS)/.generated $(TOOLS)/helm

$(TOOLS)/etcd: tools/go.mod tools/go.sum
	$(GO_NEEDED)
	cd tools && $(GOBUILD) -ldflags="-s -w" -o $(CURDIR)/$@ go.etcd.io/etcd/server/v3

# The version ldflags are what Kubernetes' own build sets: without them /version says v0.0.0-master.
$(TOOLS)/kube-apiserver $(TOOLS)/kube-controller-manager: tools/go.mod tools/go.sum
	$(GO_NEEDED)
	cd tools && v=$$(go list -m -f '{{.Version}}' k8s.io/kubernetes) && minor=$${v#v1.} && \
	  pkg=k8s.io/component-base/version && \
	  $(GOBUILD) -ldflags="-s -w -X $$pkg.gitVersion=$$v -X $$pkg.gitMajor=1 -X $$pkg.gitMinor=$${minor%%.*} \
	    -X $$pkg.gitTreeState=clean" -o $(CURDIR)/$@ k8s.io/kubernetes/cmd/$(@F)

# KubeRay's operator (tests/k8s/test_kuberay_operator.py) from its Go module, with its own k8s.io pins
# (1.34) in a module of its own, tools/kuberay: tools/go.mod's Kubernetes is 1.37. Its CRDs (ray.io/v1
# only: PodPulse uses no other version) are generated from its Go API types by controller-gen
# (sigs.k8s.io/controller-tools, tools/controller-gen) with the options of KubeRay's own Makefile,
# reading the types at the version tools/kuberay pins: nothing of KubeRay is copied into this
# repository. Helm (helm.sh/helm/v3, tools/helm) lints and renders charts/podpulse; its ldflags are
# those of Helm's Makefile (the Kubernetes version `helm template` assumes follows its client-go).
# Each is rebuilt only when its go.mod or go.sum changes. First builds on 2 shared cores: ray-operator
# 7 min, controller-gen 1 min, helm 3 min; the CRDs take 4 s.
$(TOOLS)/ray-operator: tools/kuberay/go.mod tools/kuberay/go.sum
	$(GO_NEEDED)
	cd tools/kuberay && $(GOBUILD) -ldflags="-s -w" -o $(CURDIR)/$@ github.com/ray-project/kuberay/ray-operator

$(TOOLS)/controller-gen: tools/controller-gen/go.mod tools/controller-gen/go.sum
	$(GO_NEEDED)
	cd tools/controller-gen && $(GOBUILD) -ldflags="-s -w" -o $(CURDIR)/$@ sigs.k8s.io/controller-tools/cmd/controller-gen

$(KUBERAY_CRDS)/.generated: $(TOOLS)/controller-gen tools/kuberay/go.mod tools/kuberay/go.sum
	rm -rf $(KUBERAY_CRDS) && mkdir -p $(KUBERAY_CRDS)
	cd tools/kuberay && nice -n 19 $(CURDIR)/$(TOOLS)/controller-gen \
	  crd:maxDescLen=0,generateEmbeddedObjectMeta=true,allowDangerousTypes=true \
	  paths=github.com/ray-project/kuberay/ray-operator/apis/ray/v1 output:crd:dir=$(CURDIR)/$(KUBERAY_CRDS)
	touch $@

$(TOOLS)/helm: tools/helm/go.mod tools/helm/go.sum
	$(GO_NEEDED)
	cd tools/helm && v=$$(go list -m -f '{{.Version}}' helm.sh/helm/v3) && \
	  k=$$(go list -m -f '{{.Version}}' k8s.io/client-go) && k=$${k#v0.} && \
	  $(GOBUILD) -ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$$v \
	    -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$${k%%.*} \
	    -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$${k%%.*}" \
	  -o $(CURDIR)/$@ helm.sh/helm/v3/cmd/helm

bench: setup
	$(BIN)/podpulse bench simulate
