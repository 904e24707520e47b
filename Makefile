# `make demo` and `make test` each work on a fresh clone: they create .venv when missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# CPU wheels of these versions install cleanly next to JAX on Python 3.11 (see README).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?= -n 2

.PHONY: demo demo-compare test install install-test clean

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

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
