# Two entry points (see README): `make demo` runs the main job, `make test` runs the test suite.
# Both create .venv on first use and install the locked versions (requirements/lock.txt, with the
# CPU build of torch) and then sparseforge itself, built from those locked build requirements.
# `make test-latest` runs the suite against the newest versions pyproject.toml allows;
# `make lock` refreshes the lock files (see docs/dependencies.md).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK := requirements/lock.txt
BUILD_LOCK := requirements/build-lock.txt
STAMP := $(VENV)/.sparseforge-installed
LATEST_VENV := .venv-latest
PYTEST_ARGS ?=
TORCH_FIND_LINKS ?= /opt/wheels  # where the CPU torch wheel lies on this project's machines

.PHONY: demo test test-fast test-latest test-asan install lock bench clean

$(STAMP): pyproject.toml $(LOCK) $(BUILD_LOCK) CMakeLists.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r $(BUILD_LOCK) -r $(LOCK)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sparseforge demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# The newest versions pyproject.toml allows (torch stays the pinned CPU build: an unpinned torch is
# the CUDA build). A failure here names an upstream change before it reaches the lock.
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade -r requirements/torch-cpu.txt
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -c requirements/torch-cpu.txt -e ".[hf,minilm,test]"
	$(LATEST_VENV)/bin/python -m pip freeze > $(LATEST_VENV)/resolved.txt
	$(LATEST_VENV)/bin/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# Refresh the lock files with uv (installed into .venv-tools); commit the result with a test run.
lock:
	$(PYTHON) -m venv .venv-tools
	.venv-tools/bin/python -m pip install -q uv
	.venv-tools/bin/uv pip compile pyproject.toml --extra hf --extra minilm --extra test \
		-c requirements/torch-cpu.txt --find-links $(TORCH_FIND_LINKS) --python-version 3.11 \
		--no-header --annotation-style line --upgrade -o $(LOCK)
	.venv-tools/bin/uv pip compile requirements/build.in --python-version 3.11 \
		--no-header --annotation-style line --upgrade -o $(BUILD_LOCK)

bench: $(STAMP)
	$(PY) benchmarks/bench_oneshot.py

clean:
	rm -rf $(VENV) $(LATEST_VENV) .venv-tools build sparseforge-demo
