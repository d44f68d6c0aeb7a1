# The two quick-start commands are `make run` and `make test`; everything else is a step of those.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= config/sidecar.yaml

.PHONY: setup system-deps run test check lint types unit bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# Debian packages the tests run for real: etcd, dnsmasq, Prometheus (promtool).
system-deps:
	bash scripts/install-system-deps.sh test

# Quick start 1: set up, start the demo upstreams, run the sidecar on the shipped config.
run: setup
	$(VENV)/bin/sidecar demo -c $(CONFIG)

# Quick start 2: set up everything and run every check and test.
test: setup system-deps check unit

check: lint types

lint: setup
	$(VENV)/bin/ruff format --check sidecar tests bench
	$(VENV)/bin/ruff check sidecar tests bench

types: setup
	$(VENV)/bin/mypy

unit: setup
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# make bench BASE=<rev>: an A/B of that revision (own worktree and venv) beside this tree.
bench: setup
	bash scripts/install-system-deps.sh bench
	$(PY) -m bench $(if $(BASE),--base $(BASE)) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
