# `make demo` and `make test` each work on a fresh clone: they create .venv when missing.
# A new .venv is made with Python 3.12 when one is found (so it gets the newest JAX; JAX 0.11+
# needs 3.12), else with python3 (3.11 works, with JAX 0.10). `make PYTHON=python3.11 test`
# picks another; an existing .venv is kept as it is.
# Python 3.12: `python3.12` on PATH, else a 3.12 version installed through pyenv.
FIND_PYTHON312 := python3.12 -c 'import sys; print(sys.executable)' 2>/dev/null || \
  for v in $$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.[0-9]+)?$$' | sort -rV); do \
    PYENV_VERSION=$$v python3.12 -c 'import sys; print(sys.executable)' 2>/dev/null && break; \
  done; true
PYTHON312 ?= $(shell $(FIND_PYTHON312))
PYTHON ?= $(or $(PYTHON312),python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# CPU wheels of these versions install cleanly next to JAX on Python 3.11 (see README).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
# loadgroup: the tests marked with one xdist_group share a costly module fixture (real trainer
# runs, a one-device reference step): they go to one worker, first, so it is computed once.
PYTEST_ARGS ?= -n 2 --dist loadgroup

.PHONY: demo demo-compare test test-aot test-latest print-python312 install install-test clean

$(VENV)/.base: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -e .
	touch $@

# On x86_64 those torch wheels are CUDA builds: with their nvidia-* wheels the venv grows by
# about 5.6 GB, so when torch is not there yet, say so up front rather than fail half-way
# through pip.
TEST_INSTALL_FREE_GB ?= 7
HAS_TORCH := import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)

$(VENV)/.test: $(VENV)/.base
	@free=$$(df -Pk $(VENV) | awk 'NR == 2 {print int($$4 / 1048576)}'); \
	if ! $(PY) -c "$(HAS_TORCH)" && [ "$$free" -lt $(TEST_INSTALL_FREE_GB) ]; then \
	  echo "make test: installing torch for the parity tests needs about" \
	    "$(TEST_INSTALL_FREE_GB) GB free on the disk of $(VENV); $$free GB are free." >&2; \
	  exit 1; \
	fi
	$(PIP) install -q --no-cache-dir -e '.[test,torch]' $(TORCH_PINS)
	touch $@

install: $(VENV)/.base
install-test: $(VENV)/.test

DEMO_DIR ?= runs/demo

# Trains the tiny COSMOS on the synthetic dataset, evaluates it, prints the table and PNG paths.
demo: $(VENV)/.base
	$(PY) -m cosmos_jax.cli demo --workdir $(DEMO_DIR)

# The same, then the CLIP-only baseline on the same budget; both side by side.
demo-compare: $(VENV)/.base
	$(PY) -m cosmos_jax.cli demo --workdir $(DEMO_DIR) --compare

test: $(VENV)/.test
	$(PY) -m pytest $(PYTEST_ARGS) tests

# The TPU compile test (tests/test_aot.py, which `make test` skips where libtpu is missing):
# installs the aot extra, libtpu (a 0.7 GB wheel, ~30 s from a nearby index), then compiles the
# tiny step for a v5e 2x2 slice (~1 min of CPU). Separate so that `make test` needs no libtpu.
$(VENV)/.aot: $(VENV)/.base
	$(PIP) install -q --no-cache-dir -e '.[test,aot]'
	touch $@

test-aot: $(VENV)/.aot
	$(PY) -m pytest -n 0 tests/test_aot.py

# The suite on the newest releases (Python 3.12, jax 0.12 and up), in its own venv, upgraded
# on every run so it follows new releases. LATEST_EXTRAS=test leaves the torch parity tests
# out (they skip) and saves the ~5.6 GB torch install.
LATEST_VENV ?= .venv-latest
LATEST_EXTRAS ?= test,torch
# .ci/run passes -m 'not slow': the end-to-end runs of the loop are covered by `make test`.
LATEST_PYTEST_ARGS ?=
LATEST_PY := $(LATEST_VENV)/bin/python
print-python312:
	@echo $(PYTHON312)
test-latest:
	@if [ -z "$(PYTHON312)" ]; then \
	  echo "make test-latest: no Python 3.12 found (python3.12 on PATH or a pyenv 3.12);" \
	    "give one with PYTHON312=<python3.12 command>." >&2; exit 1; \
	fi
	test -x $(LATEST_PY) || $(PYTHON312) -m venv $(LATEST_VENV)
	@free=$$(df -Pk . | awk 'NR == 2 {print int($$4 / 1048576)}'); \
	case ",$(LATEST_EXTRAS)," in *,torch,*) \
	  if ! $(LATEST_PY) -c "$(HAS_TORCH)" && [ "$$free" -lt $(TEST_INSTALL_FREE_GB) ]; then \
	    echo "make test-latest: installing torch needs about $(TEST_INSTALL_FREE_GB) GB free;" \
	      "$$free GB are free (LATEST_EXTRAS=test skips the torch tests)." >&2; exit 1; \
	  fi;; \
	esac
	$(LATEST_PY) -m pip install -q --no-cache-dir --upgrade --upgrade-strategy eager \
	  -e '.[$(LATEST_EXTRAS)]' $(if $(findstring torch,$(LATEST_EXTRAS)),$(TORCH_PINS))
	$(LATEST_PY) -c 'import sys, jax, flax; print(f"python {sys.version.split()[0]}, jax {jax.__version__}, flax {flax.__version__}")'
	$(LATEST_PY) -m pytest $(PYTEST_ARGS) $(LATEST_PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) $(LATEST_VENV) build *.egg-info .pytest_cache
