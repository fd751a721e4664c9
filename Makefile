# Two entry points: `make demo` (whole pipeline on PBMC 3k) and `make test` (whole test suite).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The machine's pip.conf points at a local folder holding the CPU build of torch; uv needs it spelled out.
FIND_LINKS := $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
ifneq ($(FIND_LINKS),)
export UV_FIND_LINKS := $(FIND_LINKS)
endif
export RAY_USAGE_STATS_ENABLED := 0
export RAY_AUTH_MODE := disabled
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export DO_NOT_TRACK := 1

.PHONY: install demo test clean

$(BIN)/scdgm: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "uv>=0.4"
	$(BIN)/uv pip install --compile-bytecode --python $(BIN)/python -e ".[test]"
	$(BIN)/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(BIN)/scdgm

install: $(BIN)/scdgm

# The demo ends by serving the registered champion (reports/registered.json) once: test cells over HTTP.
demo: install
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/dvc repro
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/scdgm report
	$(BIN)/scdgm serve --check data/prepared/pbmc3k.h5ad --no-access-log \
	  --model-uri "$$($(BIN)/python -c 'import json; print(json.load(open("reports/registered.json"))["model_uri"])')"

test: install
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
