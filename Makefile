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
# test processes (pytest-xdist): one per core, at most 4 (every test process runs torch on 1 thread)
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)
TORCH_FIND_LINKS ?= /opt/wheels  # where the CPU torch wheel lies on this project's machines

.PHONY: demo test test-fast test-latest test-asan install lock bench bench-report bench-guard clean

$(STAMP): pyproject.toml $(LOCK) $(BUILD_LOCK) CMakeLists.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r $(BUILD_LOCK) -r $(LOCK)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sparseforge demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow"

# The newest versions pyproject.toml allows (torch stays the pinned CPU build: an unpinned torch is
# the CUDA build). A failure here names an upstream change before it reaches the lock.
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade -r requirements/torch-cpu.txt
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -c requirements/torch-cpu.txt -e ".[hf,minilm,test,finetune]"
	$(LATEST_VENV)/bin/python -m pip freeze > $(LATEST_VENV)/resolved.txt
	$(LATEST_VENV)/bin/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) $(PYTEST_ARGS)

# Refresh the lock files with uv (installed into .venv-tools); commit the result with a test run.
lock:
	$(PYTHON) -m venv .venv-tools
	.venv-tools/bin/python -m pip install -q uv
	.venv-tools/bin/uv pip compile pyproject.toml --extra hf --extra minilm --extra test --extra finetune \
		-c requirements/torch-cpu.txt --find-links $(TORCH_FIND_LINKS) --python-version 3.11 \
		--no-header --annotation-style line --upgrade -o $(LOCK)
	.venv-tools/bin/uv pip compile requirements/build.in --python-version 3.11 \
		--no-header --annotation-style line --upgrade -o $(BUILD_LOCK)

# The native kernels' tests against an extension built with AddressSanitizer and
# UndefinedBehaviorSanitizer (its own venv and build dir; the first run installs the lock, ~2 min).
# libasan is preloaded into the (uninstrumented) Python, with libstdc++ (Python does not link it, and
# ASan must find the real __cxa_throw at start-up or every C++ exception aborts); leak checking is
# off (Python and torch keep allocations to exit); any sanitizer report ends the run with an error
# (--capture=sys leaves file descriptor 2 alone, so the report is printed).
ASAN_VENV := .venv-asan
ASAN_TESTS ?= tests/kernels tests/formats tests/fuzz/test_ops_hostile.py
ASAN_CXXFLAGS := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
test-asan:
	test -x $(ASAN_VENV)/bin/python || ($(PYTHON) -m venv $(ASAN_VENV) && \
		$(ASAN_VENV)/bin/python -m pip install -q -r $(BUILD_LOCK) -r $(LOCK))
	$(ASAN_VENV)/bin/python -m pip install -q --no-build-isolation --no-deps -e . -C build-dir=build/asan \
		-C cmake.build-type=RelWithDebInfo -C "cmake.define.CMAKE_CXX_FLAGS=$(ASAN_CXXFLAGS)"
	LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libstdc++.so)" \
		ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1 \
		UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
		$(ASAN_VENV)/bin/python -m pytest -q -p no:cacheprovider --capture=sys $(PYTEST_ARGS) $(ASAN_TESTS)

bench: $(STAMP)
	$(PY) benchmarks/bench_oneshot.py

# Rebuild every published figure on this host into docs/benchmarks.md (one section per CPU model;
# ~1 h; BENCH_REPORT_ARGS=--quick for a smoke run). See benchmarks/bench_report.py.
BENCH_REPORT_ARGS ?=
bench-report: $(STAMP)
	$(PY) benchmarks/bench_report.py $(BENCH_REPORT_ARGS)

# The regression guard: short headline ratios against stated floors (~3 min); run before a kernel change lands.
bench-guard: $(STAMP)
	$(PY) benchmarks/bench_guard.py

clean:
	rm -rf $(VENV) $(LATEST_VENV) $(ASAN_VENV) .venv-tools build sparseforge-demo
