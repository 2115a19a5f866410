# weft developer entry points. Every target installs what it needs, idempotently.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.weft-setup
BENCH_STAMP := $(VENV)/.weft-bench
PYTEST_ARGS ?=

E2E_ROUNDS ?= 20
E2E_ARGS ?=
# the layers whose tests wait on peers, leases and deadlines: `make test` runs them with every
# CPU kept busy (weft.testing.burn), the rest of the suite on a quiet machine
TIMING_TESTS ?= tests/ep tests/membership tests/agent tests/engine

.PHONY: setup etcd k8s cluster-up cluster-down test test-unit test-integration test-under-load lint demo bench bench-kv bench-nixl clean help \
	crds pod-schema helm-lint images e2e e2e-kind e2e-up e2e-down

help:
	@echo "make demo     run the local demo (installs what it needs)"
	@echo "make test     lint, then the whole test suite (installs what it needs)"
	@echo "make lint     ruff + mypy --strict + import-linter"
	@echo "make test-under-load  the timing-sensitive layers with every CPU kept busy (part of make test)"
	@echo "make helm-lint  lint helm/weft (Helm's Go SDK) and validate every manifest on kube-apiserver"
	@echo "make e2e      the chaos suite on a real local cluster (root; kubelet, dockerd, Helm chart)"
	@echo "make e2e-kind the same scenarios on kind (needs kind, Docker and Docker Hub)"
	@echo "make images   the agent and operator images with your docker (BASE=... to change the base)"
	@echo "make cluster-up / cluster-down   a real kube-apiserver 1.20 on loopback, by hand"
	@echo "make bench    weft against NIXL, DRAM to DRAM, two processes"
	@echo "make bench-kv the KV store against NIXL's POSIX backend (and OBJ on a local S3)"
	@echo "make bench-nixl  NIXL's Python API: NIXL 1.5 against weft.nixl, same client code"

setup: etcd $(STAMP)

# etcd for the membership tests and the demo (Debian's etcd-server 3.4). Phony, so every
# `make setup` checks it again; cheap when it is installed.
etcd:
	@command -v etcd >/dev/null && command -v etcdctl >/dev/null || { \
		SUDO=$$( [ $$(id -u) = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server etcd-client; }

$(STAMP): pyproject.toml | etcd
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "weft needs Python >= 3.11 (found $$($(PYTHON) --version))"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet 'torch==2.13.0'
	$(BIN)/python -m pip install --quiet --no-deps 'lmcache==0.5.6'
	$(BIN)/python -m pip install --quiet -e '.[dev,ucx,lmcache]'
	touch $@

test: lint k8s
	$(BIN)/python -m pytest $(PYTEST_ARGS) $(addprefix --ignore=,$(TIMING_TESTS))
	$(MAKE) test-under-load
	$(MAKE) e2e

# the timing-sensitive layers while busy loops occupy every CPU: a test that waits on a timer
# instead of a condition fails here first
test-under-load: setup
	$(BIN)/python -m weft.testing.burn -- $(BIN)/python -m pytest $(PYTEST_ARGS) $(TIMING_TESTS)

# the CRD from weft/api, into crds/ and the chart
crds: setup
	$(BIN)/weft crds -o crds/transfergroup.yaml
	cp crds/transfergroup.yaml crds/kopf-peering.yaml helm/weft/crds/

# spec.template.spec's schema (weft/api/podspec.json) from the swagger.json of the Kubernetes
# the tests run, then the CRD; from a live cluster instead:
#   kubectl get --raw /openapi/v2 | weft crds --pod-schema-from - --kubernetes-version vX.Y.Z
pod-schema: setup k8s
	$(BIN)/weft crds -o crds/transfergroup.yaml --kubernetes-version v1.20.2 --pod-schema-from \
		"$$($(BIN)/python -c 'from weft.testing.controlplane import cache_dir; print(cache_dir())')/work/src/kubernetes-1.20.2/api/openapi-spec/swagger.json"
	cp crds/transfergroup.yaml crds/kopf-peering.yaml helm/weft/crds/

helm-lint: setup k8s
	$(BIN)/python -m e2e.chart lint

images: setup
	$(BIN)/python -m e2e.images build $(if $(BASE),--base $(BASE))

# chaos on a real single-node cluster built from Debian's packages (needs root): 20 randomized
# rounds, e2e/out/report.json and e2e/out/timeline.png
e2e: setup k8s
	$(BIN)/python -m e2e.scenarios --driver local --rounds $(E2E_ROUNDS) $(E2E_ARGS)

e2e-kind: setup
	$(BIN)/python -m e2e.scenarios --driver kind --rounds $(E2E_ROUNDS) $(E2E_ARGS)

# the local cluster with weft installed, left running (KUBECONFIG printed); e2e-down stops it
e2e-up: setup k8s
	$(BIN)/python -m e2e.local up

e2e-down: setup
	$(BIN)/python -m e2e.local down

# kube-apiserver, kube-controller-manager and kubectl 1.20.2 from Debian's source, built once
# (~8 min) and cached in ~/.cache/weft/k8s (the operator's tests run against them)
k8s:
	@scripts/k8s-build.sh >/dev/null

cluster-up: setup k8s
	$(BIN)/python -m weft.testing.controlplane up

cluster-down: setup
	$(BIN)/python -m weft.testing.controlplane down

test-unit: setup
	$(BIN)/python -m pytest -m 'not integration' $(PYTEST_ARGS)

test-integration: setup k8s
	$(BIN)/python -m pytest -m integration $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check weft tests bench e2e
	$(BIN)/ruff format --check weft tests
	$(BIN)/mypy
	$(BIN)/lint-imports

demo: setup
	$(BIN)/weft demo

# nixl depends on torch: setup installs the CPU build first so pip does not pull CUDA wheels.
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,ucx,bench]'
	touch $@

bench: $(BENCH_STAMP)
	$(BIN)/python bench/fabric.py $(BENCH_ARGS)

# the KV store's POSIX tier against NIXL's POSIX backend and os.pwrite/preadv; OBJ on moto
bench-kv: $(BENCH_STAMP)
	$(BIN)/python bench/kvstore.py $(BENCH_ARGS)

# NIXL's Python API, the same client code on NIXL and on weft.nixl (chunks on POSIX, block
# READs between two processes, per-call overhead, a target killed mid-READ)
bench-nixl: $(BENCH_STAMP)
	$(BIN)/python bench/nixl_api.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
