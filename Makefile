# The two commands: `make train` (set up, train the embedded default, evaluate) and `make test`.
# The virtual environment is rebuilt only when requirements.txt changes (the stamp is older than it).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
# The suite runs in one pytest worker per core (pytest-xdist), a test module per worker at a time so that its
# module-scoped fixtures (built models, prepared runs) are built once, in tests/conftest.py's order (the long
# modules first; xdist would otherwise start with the modules of most tests); JOBS=0 runs it in this process.
JOBS ?= $(shell nproc)
PYTEST := $(PY) -m pytest -q -n $(JOBS) --dist loadscope --no-loadscope-reorder

.PHONY: train test test-fast setup clean

setup: $(STAMP)

$(STAMP): requirements.txt
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $(STAMP)

train: $(STAMP)
	$(PY) train.py $(ARGS)

test: $(STAMP)
	$(PYTEST) --durations=20 $(ARGS)

# Leaves out the end-to-end and multi-process tests and the GPU-target compile check (minutes each).
test-fast: $(STAMP)
	$(PYTEST) -m "not slow and not gpu_compile" $(ARGS)

clean:
	rm -rf runs .cache .pytest_cache
