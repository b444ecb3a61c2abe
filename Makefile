# The two commands of the README: `make demo` and `make test` (plus `make bench`).
# Each builds the virtual environment from requirements.txt on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export PYTHONUNBUFFERED := 1
export MPLBACKEND := Agg

.PHONY: env demo test unit notebooks bench clean

env: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	@echo "==> building $(VENV) (first run: about 2 minutes)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

demo: env
	$(PY) -m cpc_utils demo-data data/demo
	$(PY) scripts/sweep.py --data-root data/demo --run demo
	@echo "==> results in results/demo/ (summary.md, comparison.png, <category>/<encoder>/)"

test: env
	$(PY) -m pytest -q tests

bench: env
	$(PY) scripts/benchmark.py

clean:
	rm -rf $(VENV) data/demo .pytest_cache
