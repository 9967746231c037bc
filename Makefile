# Two entry points, both self-contained on a fresh machine with Python 3.11:
#   make demo       - create .venv if missing, install, run the end-to-end demo
#   make test       - same set-up, then the whole test suite (what CI runs)
# and, for working on the code:
#   make test-fast  - the suite without the cluster, browser and slow tests (pytest markers)
#   make lint       - ruff's checks and its format check
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lint install clean bench

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=/path/to/python3.11 ...'"; exit 2; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/cxrflow demo --out demo-output --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not cluster and not browser and not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/metadata.py
	$(BIN)/python benchmarks/etl.py
	$(BIN)/python benchmarks/loader.py
	$(BIN)/python benchmarks/train.py
	$(BIN)/python benchmarks/report.py
	$(BIN)/python benchmarks/startup.py

clean:
	rm -rf demo-output .pytest_cache
