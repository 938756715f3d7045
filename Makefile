# The two commands of the quick start:  make demo  ·  make test
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

INFRA := .cache/infra
TOOLS := .cache/tools/bin
KUBERAY_CRDS := .cache/tools/kuberay-crds

.PHONY: setup demo test test-fast e2e cluster bench tools infra kube browser

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
	$(BIN)/python -m pytest -m "not integration and not slow and not e2e"

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

# The one-node cluster of the end-to-end tests (testbed/cluster.py), beside `make kube`'s control plane:
# kubelet, kube-scheduler and kube-proxy (tools/node), containerd 2 with its runc shim and ctr
# (tools/containerd), the CNI plugins (tools/cni), crane (tools/crane: the registry on loopback and the
# image builder) and CoreDNS (tools/coredns), each from its Go module at the version its go.mod and
# go.sum pin; runc, iptables, conntrack, busybox-static and mmdebstrap from Debian. Rebuilt only when a go.mod or
# go.sum changes. On 2 cores after `make kube` (its build cache warm): kubelet 38 s, kube-scheduler
# and kube-proxy 10 s each, containerd 55 s, CNI 9 s, crane 5 s, CoreDNS 99 s.
CNI := .cache/tools/cni
cluster: kube $(TOOLS)/kubelet $(TOOLS)/kube-scheduler $(TOOLS)/kube-proxy $(TOOLS)/containerd $(TOOLS)/crane \
  $(TOOLS)/coredns $(CNI)/.built
	@command -v runc >/dev/null && command -v iptables >/dev/null && command -v conntrack >/dev/null \
	  && command -v mmdebstrap >/dev/null && test -x /bin/busybox || { \
	  sudo=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
	  $$sudo apt-get update -qq && \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    runc iptables conntrack busybox-static mmdebstrap; }

$(TOOLS)/kubelet $(TOOLS)/kube-scheduler $(TOOLS)/kube-proxy: tools/node/go.mod tools/node/go.sum
	$(GO_NEEDED)
	cd tools/node && v=$$(go list -m -f '{{.Version}}' k8s.io/kubernetes) && minor=$${v#v1.} && \
	  pkg=k8s.io/component-base/version && \
	  $(GOBUILD) -ldflags="-s -w -X $$pkg.gitVersion=$$v -X $$pkg.gitMajor=1 -X $$pkg.gitMinor=$${minor%%.*} \
	    -X $$pkg.gitTreeState=clean" -o $(CURDIR)/$@ k8s.io/kubernetes/cmd/$(@F)

# no_btrfs and friends: the snapshotters that need C libraries are left out (overlayfs is used)
$(TOOLS)/containerd: tools/containerd/go.mod tools/containerd/go.sum
	$(GO_NEEDED)
	cd tools/containerd && for cmd in containerd containerd-shim-runc-v2 ctr; do \
	  $(GOBUILD) -tags "no_btrfs no_devmapper no_zfs" -ldflags="-s -w" -o $(CURDIR)/$(TOOLS)/$$cmd \
	    github.com/containerd/containerd/v2/cmd/$$cmd || exit 1; done

$(TOOLS)/crane: tools/crane/go.mod tools/crane/go.sum
	$(GO_NEEDED)
	cd tools/crane && CGO_ENABLED=0 $(GOBUILD) -ldflags="-s -w" -o $(CURDIR)/$@ github.com/google/go-containerregistry/cmd/crane

$(TOOLS)/coredns: tools/coredns/go.mod tools/coredns/go.sum
	$(GO_NEEDED)
	cd tools/coredns && CGO_ENABLED=0 $(GOBUILD) -ldflags="-s -w" -o $(CURDIR)/$@ github.com/coredns/coredns

$(CNI)/.built: tools/cni/go.mod tools/cni/go.sum
	$(GO_NEEDED)
	mkdir -p $(CNI) && cd tools/cni && for p in main/bridge ipam/host-local main/loopback meta/portmap; do \
	  CGO_ENABLED=0 $(GOBUILD) -ldflags="-s -w" -o $(CURDIR)/$(CNI)/$${p#*/} \
	    github.com/containernetworking/plugins/plugins/$$p || exit 1; done
	touch $@

# The end-to-end tests (tests/e2e, marker e2e): PodPulse in Pods on the one-node cluster. Not part of
# `make test`. Needs root: the node configures this machine's network (and takes it all down after).
# -rP prints each test's own figures (Pod start times, upgrade latencies); --durations, where the time
# went; the JUnit summary is kept in .cache/e2e-junit.xml.
e2e: setup infra browser cluster
	$(BIN)/python -m pytest -m e2e tests/e2e -rP --durations=30 --junitxml=.cache/e2e-junit.xml

bench: setup
	$(BIN)/podpulse bench simulate
