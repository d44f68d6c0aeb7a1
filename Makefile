# The two quick-start commands are `make run` and `make test`; everything else is a step of those.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= config/sidecar.yaml

.PHONY: setup system-deps native run test check lint types unit unit-native bench clean

# The request path compiled with mypyc into a copy of the package (scripts/build-native.sh):
# what `make run`, the bench and the image run. The tree itself stays source only.
# PYTHONSAFEPATH=1 keeps `python -m sidecar` (the tests' subprocesses) from putting the
# working folder, the source tree, before the copy.
NATIVE := build/native
NATIVE_STAMP := $(NATIVE)/SOURCES
SOURCES := $(shell find sidecar -type f ! -name '*.pyc' ! -path '*/__pycache__/*')

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

native: $(NATIVE_STAMP)

$(NATIVE_STAMP): $(STAMP) $(SOURCES) scripts/build-native.sh
	bash scripts/build-native.sh $(NATIVE) $(PY)

# Debian packages the tests run for real: etcd, dnsmasq, Prometheus (promtool).
system-deps:
	bash scripts/install-system-deps.sh test

# Quick start 1: set up, start the demo upstreams, run the sidecar on the shipped config.
run: setup native
	PYTHONPATH=$(CURDIR)/$(NATIVE) $(VENV)/bin/sidecar demo -c $(CONFIG)

# Quick start 2: set up everything and run every check and test (the fast ones once more
# against the compiled copy).
test: setup system-deps check unit unit-native

check: lint types

lint: setup
	$(VENV)/bin/ruff format --check sidecar tests bench
	$(VENV)/bin/ruff check sidecar tests bench

types: setup
	$(VENV)/bin/mypy

unit: setup
	$(VENV)/bin/pytest $(PYTEST_ARGS)

unit-native: setup native
	PYTHONPATH=$(CURDIR)/$(NATIVE) PYTHONSAFEPATH=1 SIDECAR_EXPECT_NATIVE=1 \
		$(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS)

# make bench BASE=<rev>: an A/B of that revision (own worktree and venv) beside this tree.
bench: setup native
	bash scripts/install-system-deps.sh bench
	$(PY) -m bench $(if $(BASE),--base $(BASE)) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(NATIVE) .mypy_cache .ruff_cache .pytest_cache
