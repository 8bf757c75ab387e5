# `make demo` and `make test` each set themselves up on a fresh machine: a venv in .venv,
# torch pinned first (never an unpinned torch: that would pull a multi-GB CUDA build on
# CPU-only machines), then the project with its test extras in one resolver run.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
WORKDIR ?= demo-run
PY := $(VENV)/bin/python
STAMP := $(VENV)/.clipray-installed
PYTEST_ARGS ?=

export NO_ALBUMENTATIONS_UPDATE := 1
export PYTHONUNBUFFERED := 1

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q "$(TORCH_SPEC)"
	$(PY) -m pip install --disable-pip-version-check -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/clipray demo --workdir $(WORKDIR)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(WORKDIR) .pytest_cache
