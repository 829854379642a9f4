# Two commands do all the set-up on a fresh machine:
#   make demo   installs llmship (CPU build of torch) and runs the whole chain on the bundled tiny model
#   make test   installs llmship with the test tools and runs the fast tests (not marked slow; a few minutes)
#   make test-all  the whole suite, slow tests included: what CI runs (.ci/run)
# They install into the active virtualenv or conda env when there is one, else into ./.venv, made here from
# PYTHON3: system Pythons of Debian 12 / Ubuntu 23.04+ refuse `pip install` (PEP 668, externally managed).
PYTHON3 ?= python3
ifneq ($(VIRTUAL_ENV)$(CONDA_PREFIX),)
PY ?= python
ENV_PY :=
else
VENV ?= .venv
PY := $(VENV)/bin/python
ENV_PY := $(PY)
endif
PIP ?= $(PY) -m pip
STAMP := $(if $(ENV_PY),$(VENV)/.setup.stamp,.setup.stamp)

.PHONY: setup demo test test-all lint
setup: $(STAMP)

ifneq ($(ENV_PY),)
$(ENV_PY):
	$(PYTHON3) scripts/make_venv.py $(VENV)
endif

# torch is installed first and pinned: `torch==2.13.0` resolves to the local CPU wheel on CPU machines;
# an unpinned torch would pull a multi-GB CUDA build. GPU users: see README.
# TORCH_INDEX: where a machine without the local CPU wheel gets a CPU build, e.g.
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
$(STAMP): pyproject.toml $(ENV_PY)
	$(PIP) install -q "torch==2.13.0" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -q -e ".[dev]"
	@touch $(STAMP)

demo: setup
	$(PY) -m llmship.cli demo

test: setup
	$(PY) -m pytest -q -m "not slow"

test-all: setup
	$(PY) -m pytest -q --durations=25

lint: setup
	$(PY) -m ruff check .
