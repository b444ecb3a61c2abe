# The two commands of the README: `make demo` and `make test` (plus `make cpc`, `make study`, `make bench`).
# Each builds the virtual environment from requirements.txt on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export PYTHONUNBUFFERED := 1
export MPLBACKEND := Agg

.PHONY: env demo cpc compare study test unit notebooks bench wheel clean

env: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	@echo "==> building $(VENV) (first run: about 2 minutes)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

# notebook 02 at its defaults on every demo category (both halves) with the default encoder
demo: env
	$(PY) -m cpc_utils demo-data data/demo
	$(PY) scripts/sweep.py --data-root data/demo --run demo --encoders resnet18v2
	@echo "==> results in results/demo/ (summary.md, comparison.png, <category>/<encoder>/)"

# notebook 01 (CPC) at its defaults on every demo category, 3 seeds each, then one table;
# a failing category does not stop the others, and makes the target fail at the end
cpc: env
	$(PY) -m cpc_utils demo-data data/demo
	@failed=""; for c in brick gravel bottle screw grass tissue capsule nut; do \
	  echo "==> notebook 01 on $$c"; mkdir -p results/notebook01/$$c; \
	  $(VENV)/bin/papermill notebooks/01_cpc_pixelcnn.ipynb results/notebook01/$$c/resnet18v2.ipynb \
	    -p category $$c -p data_root data/demo --no-progress-bar -k python3 || failed="$$failed $$c"; \
	done; \
	$(PY) scripts/cpc_summary.py results/notebook01 --out results/notebook01/summary.md; \
	cat results/notebook01/summary.md; \
	if [ -n "$$failed" ]; then echo "==> failed:$$failed"; exit 1; fi

# notebook 03's table, class x encoder x training length, as an epoch ladder scaled to 2 CPU cores:
# two textures and two objects (the demo's tuning half) x the three encoders x 20/40/60 epochs, one seed,
# each pair trained once to 60 epochs, two at a time; then notebook 03 reads it. A failing pair
# does not stop the others, nor the notebook, and makes the target fail at the end.
COMPARE_CATEGORIES ?= brick gravel bottle screw
COMPARE_EPOCHS ?= 20 40 60
COMPARE_SEEDS ?= 0
compare: env
	$(PY) -m cpc_utils demo-data data/demo
	@status=0; $(PY) scripts/sweep.py --data-root data/demo --run compare --categories $(COMPARE_CATEGORIES) \
	  --epochs $(COMPARE_EPOCHS) --seeds $(COMPARE_SEEDS) --devices cpu,cpu || status=$$?; \
	mkdir -p results/compare/notebook03; \
	$(VENV)/bin/papermill notebooks/03_encoder_comparison.ipynb results/compare/notebook03/03_encoder_comparison.ipynb \
	  -p results_dir results/compare -p run_comparison False -p output_dir results/compare/notebook03 \
	  --no-progress-bar -k python3 || status=1; \
	echo "==> results in results/compare/ (summary.md; notebook03/: the executed notebook, tables, figures)"; \
	exit $$status

# the study behind the defaults (scripts/study.py): settings x demo categories x 3 seeds;
# the chosen setting, the paper preset and the first defaults on both halves, the rejected
# variants on the tuning half only (the small stem with one seed)
study: env
	$(PY) -m cpc_utils demo-data data/demo
	$(PY) scripts/study.py --jobs 2 --settings fast patch16 patch16_refs16k dense paper
	$(PY) scripts/study.py --jobs 2 --settings stem_norm offset1 width32 epochs80 densenet resnet50v2 width32_p16 size256 --categories brick gravel bottle screw
	$(PY) scripts/study.py --jobs 2 --settings stem_small --seeds 0 --categories brick gravel bottle screw
	$(PY) scripts/study.py --jobs 2 --settings untrained
	$(PY) scripts/study.py --jobs 2 --settings retrain hardneg --categories brick gravel bottle screw

test: env
	$(PY) -m pytest -q tests

bench: env
	$(PY) scripts/benchmark.py

# the wheel for Kaggle (docs/mvtec_kaggle.md): dist/cpc_ad-<version>-py3-none-any.whl, built offline from
# this checkout, with the notebooks and the published study's table inside; no build/ or egg-info left behind
wheel: env
	rm -rf build cpc_ad.egg-info
	$(PY) -m pip wheel -q --no-deps --no-build-isolation --no-index -w dist .
	rm -rf build cpc_ad.egg-info
	@ls dist/cpc_ad-*.whl

clean:
	rm -rf $(VENV) data/demo .pytest_cache
