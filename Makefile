# `make demo` and `make test` each set themselves up on a fresh machine: a venv in .venv,
# torch pinned first (never an unpinned torch: that would pull a multi-GB CUDA build on
# CPU-only machines), then the project with its test extras in one resolver run.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
WORKDIR ?= demo-run
PY := $(VENV)/bin/python
STAMP := $(VENV)/.clipray-installed
# The oracle libraries (open_clip, transformers, clip-benchmark) in a venv of their own: see
# tests/oracles/requirements.txt for why. Tests find it through CLIPRAY_ORACLE_PYTHON.
ORACLE_VENV ?= .venv-oracles
ORACLE_REQUIREMENTS := tests/oracles/requirements.txt
ORACLE_STAMP := $(ORACLE_VENV)/.oracles-installed
PYTEST_ARGS ?=
# HEAVY=1 also runs the tests marked `heavy` (CI does: .ci/run); plain `pytest` runs everything.
HEAVY ?= 0

export NO_ALBUMENTATIONS_UPDATE := 1
export PYTHONUNBUFFERED := 1

.PHONY: demo test install oracles clean

install: $(STAMP)

oracles: $(ORACLE_STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q "$(TORCH_SPEC)"
	$(PY) -m pip install --disable-pip-version-check -q -e ".[test]"
	touch $(STAMP)

$(ORACLE_STAMP): $(ORACLE_REQUIREMENTS)
	test -x $(ORACLE_VENV)/bin/python || $(PYTHON) -m venv $(ORACLE_VENV)
	$(ORACLE_VENV)/bin/python -m pip install --disable-pip-version-check -q -r $(ORACLE_REQUIREMENTS)
	touch $(ORACLE_STAMP)

demo: $(STAMP)
	$(VENV)/bin/clipray demo --workdir $(WORKDIR)

test: $(STAMP) $(ORACLE_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	CLIPRAY_ORACLE_PYTHON=$(abspath $(ORACLE_VENV))/bin/python CLIPRAY_HEAVY_TESTS=$(HEAVY) \
		$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(ORACLE_VENV) $(WORKDIR) .pytest_cache
