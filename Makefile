# prodclass developer entry points. `make setup` builds .venv from scratch (CPU-only torch) and
# checks the Debian packages the tests use; `make test` is the test command CI runs (.ci/run):
# `make lint` (ruff + import-linter's stage layers), then pytest.
PYTHON ?= python3
VENV ?= .venv
# Real data used by the tests and the main job: ../shared/data beside this checkout unless set.
export PRODCLASS_DATA ?= $(abspath ../shared/data)

.PHONY: setup system-packages lint test test-fast bench clean

setup: system-packages $(VENV)/.installed

# chromium + dataset-fashion-mnist: a cheap check on every `make setup`; apt-get only when one is
# missing and we are root, otherwise it prints the sudo command (see the script).
system-packages:
	bash .ci/system-packages.sh

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned resolve would pull the CUDA build (GBs)
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e ".[dev,demo,ray]"
	@if $(VENV)/bin/pip list 2>/dev/null | grep -qi '^nvidia-'; then echo "CUDA packages were installed" >&2; exit 1; fi
	touch $@

# Both checks always run; either failing fails the target. Config: pyproject.toml [tool.ruff], [tool.importlinter].
lint: $(VENV)/.installed
	status=0; \
	$(VENV)/bin/ruff check src tests benchmarks || status=1; \
	$(VENV)/bin/lint-imports --no-logo || status=1; \
	exit $$status

test: setup lint
	$(VENV)/bin/pytest -q

test-fast: setup
	$(VENV)/bin/pytest -q -m "not slow"

bench: setup
	$(VENV)/bin/python benchmarks/bench_main.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .import_linter_cache build *.egg-info
