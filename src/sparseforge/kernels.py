"""Access to the compiled CPU kernels (``sparseforge._native``) and their run-time settings.

The kernels are torch-free C++17 (``csrc/``), compiled by the package's own build (scikit-build-core
+ CMake + nanobind) during ``pip install``. There is no pure-Python fallback: if the compiled module
is missing, :func:`native` raises an :class:`ImportError` saying how to build it.

Settings (read by the native code, see ``docs/kernels.md``):

* ``SPARSEFORGE_ISA=scalar|avx2|avx512`` forces a kernel path (a :class:`ConfigError` if the CPU lacks
  it); unset or ``auto`` picks the best one. Read on every call, so it can be changed at any time.
* ``SPARSEFORGE_VPOPCNTDQ=0|1|auto``: within ``avx512``, the bitmap and N:M kernels built with
  AVX512_VPOPCNTDQ (picked when the CPU has it) or without it (``0``).
* ``SPARSEFORGE_BF16_PATH=scalar|avx512_bf16|amx`` forces the path of the bf16-compute product
  (:func:`sparseforge.ops.linear_bf16`); unset or ``auto`` picks the best (AMX, else AVX512_BF16,
  else scalar). Read on every call.
* ``SPARSEFORGE_NUM_THREADS=n`` sizes the kernels' thread pool at first use (default: the CPUs this
  process may run on); :func:`set_num_threads` changes it later.

Example:
    >>> from sparseforge import kernels
    >>> kernels.isa() in ("scalar", "avx2", "avx512")
    True
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager
from types import ModuleType
from typing import Iterator, Optional

__all__ = [
    "native", "isa", "best_isa", "cpu_supports", "num_threads", "set_num_threads", "pool_wait_counts", "pool_held",
    "sparse_threads", "ISAS",
    "bf16_path", "bf16_path_supported", "BF16_PATHS",
]

ISAS = ("scalar", "avx2", "avx512")
BF16_PATHS = ("scalar", "avx512_bf16", "amx")  # paths of the bf16-compute product, slowest first

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


def bf16_path(requested: str = "") -> str:
    """Path the bf16-compute product would use now (``SPARSEFORGE_BF16_PATH`` if set, else the best);
    a :class:`~sparseforge.errors.ConfigError` for a path this build, CPU or OS cannot run."""
    return native().bf16_path(requested)


def bf16_path_supported(name: str) -> bool:
    """Whether this build, CPU and OS can run bf16 path ``name`` (one of :data:`BF16_PATHS`); for
    ``"amx"`` this asks Linux for the tile-data permission (once per process)."""
    return native().bf16_path_supported(name)


def int8_act_path(requested: str = "") -> str:
    """The int8-activation product (``activations="int8"``, :mod:`sparseforge.ops.int8`) a call on ISA path
    ``requested`` (default: :func:`isa`) runs: ``"avx512_vnni"`` (AVX512 VNNI / VBMI / VBMI2, unless
    ``SPARSEFORGE_INT8_VNNI=0``), ``"avx2"`` or ``"portable"`` (an integer loop). Every path gives the
    same result."""
    return native().int8_act_path(requested)


def int8_float_walk(requested: str = "", pattern: str = "bitmap") -> str:
    """The walk a float32-activation call of an int8-valued weight at batch 1-3 runs on ISA path ``requested``
    (default: :func:`isa`): ``"fixed_x"`` (x as a 24-bit fixed point in three bytes, exact integer row sums by
    ``vpdpbusd``: AVX512 VNNI / VBMI / VBMI2, bitmap and n:m other than 2:4) or ``"fma"`` (int8 values widened
    to float32, FMA). ``pattern``: ``"bitmap"`` or an n:m pattern such as ``"2:4"``.
    ``SPARSEFORGE_INT8_WALK=fma`` forces ``"fma"``. See docs/kernels.md ("int8 values")."""
    if pattern == "bitmap":
        return native().int8_float_walk(requested, 0, 0)
    from sparseforge.errors import ConfigError
    from sparseforge.patterns import NM, parse

    nm = parse(pattern)
    if not isinstance(nm, NM):
        raise ConfigError(f"pattern must be 'bitmap' or an n:m pattern such as '2:4', got {pattern!r}")
    return native().int8_float_walk(requested, nm.n, nm.m)


def num_threads() -> int:
    """Threads the kernels use, the calling thread included."""
    return native().num_threads()


def pool_wait_counts() -> tuple[int, int]:
    """How the thread pool's workers began their waits for the next job since the process started:
    ``(polled, parked)``: polling for ~0.2 ms first (after a job that expects another kernel call
    soon) or sleeping at once (after a job whose caller hands the cores to torch next, e.g. the MoE
    decode kernel, :func:`sparseforge.ops.expert_ffn.expert_ffn`)."""
    polled, parked = native().pool_wait_counts()
    return int(polled), int(parked)


@contextmanager
def pool_held():
    """Inside, the thread pool's workers poll between jobs without the ~0.2 ms limit (and after jobs that would
    park them): for a caller that runs short single-threaded work between kernel calls, such as a decode step's
    norms and rotary between its matmuls, where a worker that fell asleep wakes late and leaves the start of
    the next call to the calling thread alone. The workers hold their cores while inside, so keep other
    multi-threaded work (torch's) out of it. Nests; released on exit, also on error.

    Example:
        >>> from sparseforge import kernels
        >>> with kernels.pool_held():
        ...     kernels.native().pool_holders()
        1
    """
    native().pool_hold(True)
    try:
        yield
    finally:
        native().pool_hold(False)


def set_num_threads(n: int) -> None:
    """Resize the kernels' thread pool (process-wide, like ``torch.set_num_threads``)."""
    native().set_num_threads(int(n))


@contextmanager
def sparse_threads(n: Optional[int] = None) -> Iterator[int]:
    """Inside: torch runs single-threaded and the sparse kernels on ``n`` threads (default: torch's
    thread count on entry); both are restored on exit.

    Why: torch's OpenMP workers keep spinning for a while after each parallel torch op, so in a
    model that interleaves small torch ops (norms, attention at batch 1) with sparse layers, they
    occupy the cores the kernels' own threads need. Measured on the 2-core reference machine,
    batch-1 generation of a Llama-shaped model (hidden 2048, 4 layers): 2:4 went from 1.23x to 2.41x
    and 75% CSR from 1.49x to 2.96x dense, while dense fp32 itself runs at 0.97x with one torch
    thread (batch-1 matrix-vector products are memory-bound). ``OMP_WAIT_POLICY=PASSIVE`` set before
    torch is imported has the same effect.

    Example:
        >>> import torch
        >>> from sparseforge import kernels
        >>> before = torch.get_num_threads()
        >>> with kernels.sparse_threads(2) as n:
        ...     (torch.get_num_threads(), kernels.num_threads(), n)
        (1, 2, 2)
        >>> torch.get_num_threads() == before
        True
    """
    import torch

    torch_before, kernels_before = torch.get_num_threads(), num_threads()
    n = torch_before if n is None else int(n)
    if n < 1:
        from sparseforge.errors import ConfigError

        raise ConfigError(f"sparse_threads needs n >= 1, got {n}")
    torch.set_num_threads(1)
    set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(torch_before)
        set_num_threads(kernels_before)
