# `make train` and `make test` work on a fresh machine with only Python 3.11.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU wheel on this disk; an unpinned torch would pull a multi-GB CUDA build.
TORCH  := torch==2.13.0

.PHONY: setup train test lint clean postgres postgres-stop tune reproduce bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

train: setup
	$(PY) train.py fit --config configs/digits.yaml

# Fashion-MNIST comes from Debian's dataset-fashion-mnist (.ci/fashion-mnist.sh installs it
# with apt if missing), so the real-data test runs without a download.
# The distributed tuning tests need a PostgreSQL server: .ci/postgres.sh installs
# PostgreSQL (apt) if missing and starts one on 127.0.0.1, unless LIT_SURGERY_TEST_POSTGRES
# already names one. It is stopped again after the tests.
test: setup
	$(VENV)/bin/ruff check .
	bash .ci/fashion-mnist.sh
	@if [ -n "$$LIT_SURGERY_TEST_POSTGRES" ]; then \
	  $(PY) -m pytest -q; \
	else \
	  url=$$(bash .ci/postgres.sh start) || exit 1; \
	  status=0; LIT_SURGERY_TEST_POSTGRES=$$url $(PY) -m pytest -q || status=$$?; \
	  bash .ci/postgres.sh stop; exit $$status; \
	fi

# Start the test PostgreSQL server and print its URL (for running tests by hand:
# LIT_SURGERY_TEST_POSTGRES=$(make -s postgres) .venv/bin/python -m pytest tests/test_tuning.py)
postgres:
	@bash .ci/postgres.sh start

postgres-stop:
	@bash .ci/postgres.sh stop

# The digits study (40 trials, about 3 minutes on 2 CPU cores); re-running resumes it.
tune: setup
	$(VENV)/bin/lit-surgery tune sweeps/digits.yaml

# docs/RESULTS.md: every method on Fashion-MNIST and digits, 3 seeds (many CPU hours; an
# interrupted run resumes from runs/reproduce). QUICK=1: digits, quick schedule (minutes).
# JOBS runs side by side, one thread each (default: one per core). REFRESH=1 re-runs the
# results from before runs recorded their settings.
JOBS ?= $(shell nproc)
reproduce: setup
	$(if $(QUICK),,bash .ci/fashion-mnist.sh)
	$(PY) -m lit_surgery.report.reproduce $(if $(QUICK),--quick) $(if $(REFRESH),--refresh) --jobs $(JOBS)

# benchmarks/bench.py: training throughput against a hand-written loop, a surgery run's parts,
# peak memory; prints a table and writes bench.json (about 15 minutes on 2 CPU cores).
bench: setup
	bash .ci/fashion-mnist.sh
	$(PY) benchmarks/bench.py --out bench.json

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
