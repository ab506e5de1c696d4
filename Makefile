# polyclip: two commands do all set-up on a fresh machine:
#   make demo   # venv + pinned deps + data + local Ray cluster + the demo job + serving
#   make test   # venv + pinned deps + data + the default test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
DATA_DIR ?= data/fashion-mnist
DEMO_CONFIG ?= jobs/configs/demo.yaml
DASHBOARD_PORT ?= 8265
export RAY_USAGE_STATS_ENABLED := 0
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install data demo test test-slow lint lock cluster-up cluster-down clean

# CPU-only torch: `make install TORCH_INDEX=https://download.pytorch.org/whl/cpu` installs torch
# and torchvision from that index first (no CUDA libraries); the pins below then keep them.
TORCH_INDEX ?=
TORCH_PINS := $(shell sed -n 's/^ *"\(torch\(vision\)\{0,1\}==[^"]*\)",*$$/\1/p' pyproject.toml)

# The venv is rebuilt when the pins change. Developers get `.[dev]` (every extra + the dev
# tools) under requirements-dev.lock; cluster nodes install requirements.lock (no dev tools).
$(VENV)/.installed: pyproject.toml requirements.lock requirements-dev.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade "pip==26.0.1" || true
	$(if $(TORCH_INDEX),$(PIP) install --quiet --index-url $(TORCH_INDEX) $(TORCH_PINS))
	$(PIP) install --quiet -c requirements-dev.lock -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# Fashion-MNIST: the Debian package when apt is usable as root, else torchvision's download.
data: install
	@if $(PY) -c "from polyclip.data.datasets import fashion_mnist_root; fashion_mnist_root()" 2>/dev/null; then \
		echo "Fashion-MNIST: found"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
		 (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) && echo "Fashion-MNIST: installed (Debian)"; \
	else \
		$(PY) -m polyclip.data.download fashion_mnist $(DATA_DIR); \
	fi

test: data
	$(PY) -m pytest -q --timeout 300 -p no:randomly --durations=10

test-slow: data
	$(PY) -m pytest -q --timeout 1800 -m slow

lint: install
	$(VENV)/bin/ruff check library jobs serve tests
	$(VENV)/bin/mypy

# Regenerate the locks from the pins in pyproject.toml: the dev lock is what `.[dev]` resolves
# to under the venv's versions, the runtime lock what `.[all]` resolves to under the dev lock
# (no pytest, ruff, mypy). Only resolution metadata is fetched (pip --dry-run --report).
LOCK_RESOLVE = $(PIP) install --quiet --dry-run --ignore-installed --report .lock-report.json
LOCK_WRITE = $(PY) -c "import json; r = json.load(open('.lock-report.json'))['install']; \
	  print('\n'.join(sorted((p['metadata']['name'] + '==' + p['metadata']['version'] for p in r \
	  if p['metadata']['name'] != 'polyclip'), key=str.lower)))"
lock: install
	$(PIP) freeze --exclude-editable | grep -v '^polyclip' > .lock-freeze.txt
	$(LOCK_RESOLVE) -c .lock-freeze.txt ".[dev]" && $(LOCK_WRITE) > requirements-dev.lock
	$(LOCK_RESOLVE) -c requirements-dev.lock ".[all]" && $(LOCK_WRITE) > requirements.lock
	rm -f .lock-report.json .lock-freeze.txt

cluster-up: install
	PATH=$(abspath $(VENV))/bin:$$PATH cluster/local/up.sh

cluster-down:
	PATH=$(abspath $(VENV))/bin:$$PATH cluster/local/down.sh

demo: data
	PATH=$(abspath $(VENV))/bin:$$PATH jobs/demo.sh $(DEMO_CONFIG)

clean:
	rm -rf runs .cache
