"""Import a benchmark script (``benchmarks/bench_<name>.py``) as a module, for the benchmark tests.

The scripts import their siblings (``bench_timing``, ``bench_host``, ...) by name, so ``benchmarks/``
is on ``sys.path`` while the module executes, and removed again afterwards.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/bench_<name>.py`` executed as a fresh module named ``bench_<name>`` (registered in
    ``sys.modules`` first, as an import does: dataclasses look their module up there)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"bench_{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module
