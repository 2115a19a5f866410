# weft developer entry points. Every target installs what it needs, idempotently.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.weft-setup
BENCH_STAMP := $(VENV)/.weft-bench
PYTEST_ARGS ?=

.PHONY: setup etcd k8s cluster-up cluster-down test test-unit test-integration lint demo bench bench-kv clean help

help:
	@echo "make demo     run the local demo (installs what it needs)"
	@echo "make test     lint, then the whole test suite (installs what it needs)"
	@echo "make lint     ruff + mypy --strict + import-linter"
	@echo "make cluster-up / cluster-down   a real kube-apiserver 1.20 on loopback, by hand"
	@echo "make bench    weft against NIXL, DRAM to DRAM, two processes"
	@echo "make bench-kv the KV store against NIXL's POSIX backend (and OBJ on a local S3)"

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
	$(BIN)/python -m pip install --quiet -e '.[dev,ucx]'
	touch $@

test: lint k8s
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# kube-apiserver, kube-controller-manager and kubectl 1.20.2 from Debian's source, built once
# (~8 min) and cached in ~/.cache/weft/k8s (the operator's tests run against them)
k8s:
	@scripts/k8s-build.sh >/dev/null

cluster-up: setup k8s
	$(BIN)/python -m weft.operator.controlplane up

cluster-down: setup
	$(BIN)/python -m weft.operator.controlplane down

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

# nixl depends on torch: install the CPU build first so pip does not pull CUDA wheels.
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet 'torch==2.13.0'
	$(BIN)/python -m pip install --quiet -e '.[dev,ucx,bench]'
	touch $@

bench: $(BENCH_STAMP)
	$(BIN)/python bench/fabric.py $(BENCH_ARGS)

# the KV store's POSIX tier against NIXL's POSIX backend and os.pwrite/preadv; OBJ on moto
bench-kv: $(BENCH_STAMP)
	$(BIN)/python bench/kvstore.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
