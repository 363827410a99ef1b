"""The machine a measurement runs on: CPU name, kernel path, thread counts, last-level cache.

Every published timing carries :func:`machine_info`; :func:`set_threads` gives torch and the sparse
kernels the same thread count before anything is timed; :func:`last_level_cache` reads the size of
the last-level cache from the machine (Linux sysfs, else ``os.sysconf``, else a stated fallback of
:data:`FALLBACK_LLC_BYTES`), which decides whether the advisor times weights streamed from memory.

Example:
    >>> from sparseforge.runtime.machine import machine_info, set_threads
    >>> info = machine_info(set_threads(1))
    >>> info["threads"], sorted(info)
    (1, ['cpu', 'isa', 'llc_bytes', 'llc_source', 'threads', 'torch'])
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from sparseforge import kernels
from sparseforge.errors import ConfigError

__all__ = ["machine_info", "set_threads", "last_level_cache", "available_memory_bytes", "CacheSize",
           "FALLBACK_LLC_BYTES"]


def machine_info(threads: int) -> dict[str, Any]:
    """``{"cpu", "isa", "threads", "torch", "llc_bytes", "llc_source"}``: the CPU model name, the kernel
    path in use, ``threads``, the torch version and the last-level cache, to print next to every figure."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    llc = last_level_cache()
    return {"cpu": cpu, "isa": kernels.isa(), "threads": threads, "torch": torch.__version__,
            "llc_bytes": llc.nbytes, "llc_source": llc.source}


def set_threads(threads: Optional[int]) -> int:
    """Run torch and the sparse kernels on ``threads`` threads (default: torch's current count); returns it."""
    threads = torch.get_num_threads() if threads is None else int(threads)
    if threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    kernels.set_num_threads(threads)
    return threads


def available_memory_bytes() -> int:
    """Memory the kernel says a new allocation can get (``MemAvailable``), else physical memory."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# ------------------------------------------------------------------------------- cache size

FALLBACK_LLC_BYTES = 32 << 20  # assumed when neither sysfs nor sysconf gives a size (stated in `source`)
SYSFS_CACHE = Path("/sys/devices/system/cpu/cpu0/cache")
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


@dataclass(frozen=True)
class CacheSize:
    """The last-level cache of this machine: ``nbytes`` and where the number came from."""

    nbytes: int
    source: str  # e.g. "sysfs L3 (index3)", "sysconf SC_LEVEL3_CACHE_SIZE", "fallback: ..."


def parse_cache_size(text: str) -> int:
    """Bytes of a sysfs cache ``size`` entry: ``"48K"`` -> 49152, ``"36M"``, ``"1024"``; ValueError if malformed."""
    s = text.strip().upper().removesuffix("B")
    unit = s[-1:] if s[-1:] in _SIZE_UNITS and not s[-1:].isdigit() else ""
    number = s[: len(s) - len(unit)]
    if not number.isdigit() or int(number) == 0:
        raise ValueError(f"not a cache size: {text!r}")
    return int(number) * _SIZE_UNITS[unit]


def _from_sysfs(root: Path) -> Optional[CacheSize]:
    """The highest-level data or unified cache listed under ``root/index*/{level,type,size}``."""
    best: Optional[tuple[int, int, str]] = None
    for index in sorted(root.glob("index*")):
        try:
            kind = (index / "type").read_text().strip()
            level = int((index / "level").read_text())
            size = parse_cache_size((index / "size").read_text())
        except (OSError, ValueError):
            continue
        if kind in ("Data", "Unified") and (best is None or (level, size) > best[:2]):
            best = (level, size, index.name)
    return None if best is None else CacheSize(best[1], f"sysfs L{best[0]} ({best[2]})")


def _from_sysconf() -> Optional[CacheSize]:
    for level in (4, 3, 2):
        name = f"SC_LEVEL{level}_CACHE_SIZE"
        if name in os.sysconf_names:
            try:
                size = os.sysconf(name)
            except (OSError, ValueError):
                continue
            if size > 0:
                return CacheSize(size, f"sysconf {name}")
    return None


def last_level_cache(sysfs: Path = SYSFS_CACHE) -> CacheSize:
    """Size of CPU 0's last-level cache: from sysfs (Linux), else ``os.sysconf``, else
    :data:`FALLBACK_LLC_BYTES` with a ``source`` that says so.

    Example:
        >>> from sparseforge.runtime.machine import last_level_cache
        >>> last_level_cache().nbytes > 0
        True
    """
    return _from_sysfs(sysfs) or _from_sysconf() or CacheSize(
        FALLBACK_LLC_BYTES, f"fallback: no cache size in {sysfs} or sysconf; assumed {FALLBACK_LLC_BYTES >> 20} MiB")
