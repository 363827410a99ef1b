"""Access to the compiled CPU kernels (``sparseforge._native``) and their run-time settings.

The kernels are torch-free C++17 (``csrc/``), compiled by the package's own build (scikit-build-core
+ CMake + nanobind) during ``pip install``. There is no pure-Python fallback: if the compiled module
is missing, :func:`native` raises an :class:`ImportError` saying how to build it.

Settings (read by the native code, see ``docs/kernels.md``):

* ``SPARSEFORGE_ISA=scalar|avx2|avx512`` forces a kernel path (a :class:`ConfigError` if the CPU lacks
  it); unset or ``auto`` picks the best one. Read on every call, so it can be changed at any time.
* ``SPARSEFORGE_NUM_THREADS=n`` sizes the kernels' thread pool at first use (default: the CPUs this
  process may run on); :func:`set_num_threads` changes it later.

Example:
    >>> from sparseforge import kernels
    >>> kernels.isa() in ("scalar", "avx2", "avx512")
    True
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["native", "isa", "best_isa", "cpu_supports", "num_threads", "set_num_threads", "ISAS"]

ISAS = ("scalar", "avx2", "avx512")

_BUILD_HINT = (
    "sparseforge's compiled CPU kernels (sparseforge._native) could not be imported{why}. They are "
    "built by the package's own build, not at run time: run `pip install -e .` (or `pip install .`) "
    "in the sparseforge source checkout. Building needs a C++17 compiler (GCC or Clang) and CMake >= "
    "3.18; pip fetches scikit-build-core and nanobind itself. Torch is not needed to build."
)


def native() -> ModuleType:
    """The compiled module; raises ImportError with build instructions when it is missing."""
    try:
        return importlib.import_module("sparseforge._native")
    except ImportError as exc:
        raise ImportError(_BUILD_HINT.format(why=f" ({exc})")) from exc


def isa(requested: str = "") -> str:
    """Kernel path a call would use now (``SPARSEFORGE_ISA`` if set, else the best available)."""
    return native().isa(requested)


def best_isa() -> str:
    """Best kernel path this CPU supports, ignoring ``SPARSEFORGE_ISA``."""
    return native().best_isa()


def cpu_supports(name: str) -> bool:
    """Whether this build and CPU can run kernel path ``name`` (one of :data:`ISAS`)."""
    return native().cpu_supports(name)


def num_threads() -> int:
    """Threads the kernels use, the calling thread included."""
    return native().num_threads()


def set_num_threads(n: int) -> None:
    """Resize the kernels' thread pool (process-wide, like ``torch.set_num_threads``)."""
    native().set_num_threads(int(n))
