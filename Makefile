# Two entry points, both from a fresh clone:
#   make demo   set up .venv, run the workflow on the demo cohort, build report.html
#   make test   set up .venv, run the test suite
# and, for development: make lint (ruff, snakefmt; CI runs it first) and make test-fast (unit tests only).
# The venv sees the system's site-packages, so a machine that already has (a CUDA build of) torch uses it;
# otherwise the CPU wheel torch==2.13.0 is installed first (a bare `torch` could pull a multi-GB CUDA build).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= all
TORCH := 2.13.0

.PHONY: setup demo test test-fast lint lock clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==$(TORCH)
	@# every other package at the version of requirements.lock (what CI tests); torch as found or installed above
	$(BIN)/pip install -q -c requirements.lock -e ".[test,learn,bids]"
	@# compile the CPU kernels once into numba's on-disk cache (~10 s), not inside the first registration
	$(BIN)/python -c "from maskreg.engine import cpu_kernels; cpu_kernels.warm_up()"
	touch $@

demo: setup
	@# the report is built even when a subject failed (it lists it); the exit status still says so
	$(BIN)/snakemake --profile profiles/local --cores $(CORES); status=$$?; \
	$(BIN)/snakemake --report report.html && \
	echo "Done: results/cohort/metrics.tsv and report.html" && exit $$status

test: setup
	$(BIN)/python -m pytest -q

# unit tests only, under 2 minutes on 2 CPU cores: no Snakemake or SLURM runs (markers workflow, slurm), no
# unit test that took 4 s or more (marker slow), and not the modules that compare real registrations with
# ANTsPy case by case (FAST_EXCLUDE); `make test` runs everything
FAST_EXCLUDE := test_matrix test_mask_configurations
test-fast: setup
	$(BIN)/python -m pytest -q -m "not workflow and not slurm and not slow" $(FAST_EXCLUDE:%=--ignore=tests/%.py)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/snakefmt --check Snakefile workflow/rules

# requirements.lock and workflow/envs/maskreg.yaml anew, from a fresh venv (PyPI's newest versions within
# pyproject.toml's ranges); then `make test` before committing them
LOCK_VENV := .lock-venv
lock:
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q torch==$(TORCH)
	$(LOCK_VENV)/bin/pip install -q -e ".[test,learn,bids]"
	sed -n '/^#/p' requirements.lock > $(LOCK_VENV)/lock
	$(LOCK_VENV)/bin/pip freeze --exclude-editable | grep -v -i '^torch==' >> $(LOCK_VENV)/lock
	mv $(LOCK_VENV)/lock requirements.lock
	sed -n '1,/^      - torch==/p' workflow/envs/maskreg.yaml | sed 's/^      - torch==.*/      - torch==$(TORCH)/' > $(LOCK_VENV)/env
	grep -v '^#' requirements.lock | sed 's/^/      - /' >> $(LOCK_VENV)/env
	mv $(LOCK_VENV)/env workflow/envs/maskreg.yaml
	rm -rf $(LOCK_VENV)

clean:
	rm -rf results logs report.html .snakemake
