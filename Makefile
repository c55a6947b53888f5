# prodclass developer entry points. `make setup` builds .venv from scratch (CPU-only torch);
# `make test` is the test command CI runs (.ci/run).
PYTHON ?= python3
VENV ?= .venv
# Real data used by the tests and the main job: ../shared/data beside this checkout unless set.
export PRODCLASS_DATA ?= $(abspath ../shared/data)

.PHONY: setup test test-fast bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned resolve would pull the CUDA build (GBs)
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e ".[dev,demo]"
	@if $(VENV)/bin/pip list 2>/dev/null | grep -qi '^nvidia-'; then echo "CUDA packages were installed" >&2; exit 1; fi
	touch $@

test: setup
	$(VENV)/bin/pytest -q

test-fast: setup
	$(VENV)/bin/pytest -q -m "not slow"

bench: setup
	$(VENV)/bin/python benchmarks/bench_main.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
