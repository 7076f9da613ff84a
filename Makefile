# kdtools: make install | demo | test | bench | <dataset>-<method> recipes
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# Shared data (MNIST, Fashion-MNIST, crowd sets) is found only through KD_DATA; use ../shared/data when present.
KD_DATA ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),)
export KD_DATA

.PHONY: install demo test test-all bench bench-long help
help:
	@echo "make demo     install, then steal a digits classifier through a kd- pipe (no download, ~2 min)"
	@echo "make test     install, then run the test suite (fast tests; CI runs this)"
	@echo "make test-all also the slow tests"
	@echo "make bench    benchmarks/ (minutes to hours; results go in docs/benchmarks.md)"
	@echo "make bench-long  the extraction, AEDM and MNIST step-distillation benchmarks (hours on a CPU)"
	@echo "recipes:      $(RECIPES)"

install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: install
	bash recipes/demo.sh

# Test files are spread over TEST_WORKERS processes (pytest-xdist), one file per worker at a time so that
# a file's module fixtures (trained teachers, priors) are built once. The ten slowest tests are listed at the end,
# so a suite creeping towards its 15-minute budget shows where the time goes.
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=10

test-all: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m ''

bench: install
	$(PY) benchmarks/foundation.py
	$(PY) benchmarks/aggregate.py
	$(PY) benchmarks/aggregate_solver.py
	$(PY) benchmarks/http_overhead.py
	$(PY) benchmarks/diffstep.py swissroll

# the attacks' benchmarks take hours on a CPU (they continue where they stopped when rerun)
bench-long: install
	$(PY) benchmarks/extraction.py
	$(PY) benchmarks/aedm.py --work $(RUNS)/aedm-bench
	# MNIST step distillation on the AEDM benchmark's MNIST prior and victim (run it twice in parallel to use two cores)
	$(PY) benchmarks/diffstep.py mnist --teacher $(RUNS)/aedm-bench/prior-mnist --lenet $(RUNS)/aedm-bench/mnist-victim.safetensors \
	  --work $(RUNS)/diffstep-mnist --distill-iters 800 --figure $(RUNS)/diffstep-mnist/samples.png

# every recipes/*.mk adds its targets to RECIPES
include $(sort $(wildcard recipes/*.mk))
