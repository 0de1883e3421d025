# The two entry points (README): `make demo` runs the main job, `make test` runs the tests.
# Both set everything up first (scripts/setup.sh: system libraries, .venv, torch, ffcv, this package).
SHELL := /bin/bash
PY := .venv/bin/python
DEMO_OUT ?= out/demo
# Real-data tests read the shared archives; they skip with a message when the folder is absent.
export FFCV_TRANSFER_DATA ?= $(wildcard $(abspath ../shared/data))
export NUMBA_THREADING_LAYER ?= workqueue

.PHONY: setup demo test bench

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/ffcv-transfer demo --out $(DEMO_OUT)

test: setup
	$(PY) -m pytest tests --durations=15

bench: setup
	$(PY) benchmarks/bench_writers.py --out benchmarks/results/writers.json
