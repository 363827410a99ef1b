# Two entry points (see README): `make demo` runs the main job, `make test` runs the test suite.
# Both create .venv on first use and install sparseforge with the CPU build of torch.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.sparseforge-installed

.PHONY: demo test test-fast install bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"   # pinned CPU build: an unpinned torch pulls CUDA wheels
	$(PY) -m pip install -q -e ".[hf,minilm,test]"
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sparseforge demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/oneshot.py

clean:
	rm -rf $(VENV) build sparseforge-demo
