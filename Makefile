# The two entry points (README): `make demo` runs the main job, `make test` runs the tests.
# Both set everything up first (scripts/setup.sh: system libraries, .venv, torch, ffcv, this package).
SHELL := /bin/bash
PY := .venv/bin/python
DEMO_OUT ?= out/demo
# Real-data tests read the shared archives; they skip with a message when the folder is absent.
export FFCV_TRANSFER_DATA ?= $(wildcard $(abspath ../shared/data))

.PHONY: setup demo test test-slow lint check-light bench

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/ffcv-transfer demo --out $(DEMO_OUT)

# The quick default tier; `make test-slow` runs the rest (pytest.ini's markers: slow, system). CI runs both.
test: setup
	$(PY) -m pytest tests -m "not slow and not system" --durations=15

test-slow: setup
	$(PY) -m pytest tests -m "slow or system" --durations=15

# ruff's lint and format check (pyproject.toml); `.venv/bin/ruff format .` applies the format
lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

# the light core alone (`pip install .`, numpy only) in a throw-away virtualenv: the kernel runs, the command
# names the missing extra; needs no set-up, only python3 and PyPI
check-light:
	@bash scripts/check_light_install.sh

bench: setup
	$(PY) benchmarks/bench_writers.py --out benchmarks/results/writers.json
