# The two commands of the README: `make test` and `make demo`.
# Each builds .venv on a fresh machine. torch is installed first and pinned to the
# CPU build the machine carries, so that pip never reaches for the CUDA build.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: test lint demo clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

demo: $(STAMP)
	$(VENV)/bin/qkv demo --out runs/demo

# One pytest worker per core, each on one thread: the tests' tensors are small, and two
# threads per worker on two cores spent most of the run waiting on each other.
test: lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n auto

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
