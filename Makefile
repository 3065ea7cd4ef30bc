# One command each: `make bench` runs the benchmark suites, `make test` runs the plugin's tests.
# Both create .venv on first use and install what they need. TORCH picks the torch build:
# the default is the CPU build of torch 2.13.0; on a GPU machine use e.g. TORCH="torch" (CUDA build).

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: bench test install clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

bench: $(VENV)/.installed
	$(PY) -m pytest --lora-bench $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest $(ARGS)

clean:
	rm -rf $(VENV) .hypothesis .pytest_cache
