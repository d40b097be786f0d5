# fedir: `make demo` runs the main job, `make test` the tests. Both set up .venv first.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.fedir-installed
DEMO_DATA := demo-data/federation
DEMO_OUT  := runs/demo

.PHONY: setup demo test test-fast lint clean browser nginx firewall

setup: $(STAMP)

# torch first: on a machine without an NVIDIA driver take the CPU build (torch==2.13.0,
# which this project's machines hold on disk); with a driver, let pip pick the CUDA build
# inside the range pyproject.toml allows. A torch already in the venv is kept.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
	  echo "torch already installed: $$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
	  $(BIN)/pip install --progress-bar off "torch>=2.3,<3"; \
	else \
	  $(BIN)/pip install --progress-bar off torch==2.13.0; \
	fi
	$(BIN)/pip install --progress-bar off -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedir data synth $(DEMO_DATA) --sites 4 --patients 120 --unlabelled 0.5 --seed 0
	$(BIN)/fedir simulate scenarios/demo.toml --out $(DEMO_OUT)

# The dashboard's browser tests drive Debian's chromium through Playwright (Playwright's own
# browser download cannot work offline); install it when missing (CI runs as root).
browser:
	@test -x /usr/bin/chromium || { apt-get update -q && apt-get install -y -q --no-install-recommends chromium; }

# The deployment's front door for hospitals is nginx (DEPLOY.md, tests/test_fleet_proxy.py);
# install it when missing (CI runs as root on Debian).
nginx:
	@test -x /usr/sbin/nginx || { apt-get update -q && apt-get install -y -q --no-install-recommends nginx-light; }

# `fedir guard` (DEPLOY.md, step 3) writes netfilter rules with iptables; its test applies
# them to a port of its own (CI runs as root on Debian).
firewall:
	@test -x /usr/sbin/iptables || { apt-get update -q && apt-get install -y -q --no-install-recommends iptables; }

# Lint and types first: ruff on the whole tree, mypy on fedir/ and strategies/ (pyproject.toml).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

# The tests on two pytest-xdist workers, a test module at a time; the modules that start Flower
# deployments are one unit and those that start Ray another (tests/xdist_groups.py), so while one
# worker's test waits on a SuperLink, a SuperNode or Ray, the other's computes.
# PYTEST_WORKERS=0: in one process, as before.
PYTEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile

test: lint browser nginx firewall
	$(PYTEST)

test-fast: lint browser nginx firewall
	$(PYTEST) -m "not slow"

clean:
	rm -rf $(VENV) demo-data runs .pytest_cache
