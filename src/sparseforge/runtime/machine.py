"""The machine a measurement runs on: CPU name, kernel path, thread counts.

Every published timing carries :func:`machine_info`; :func:`set_threads` gives torch and the sparse
kernels the same thread count before anything is timed.

Example:
    >>> from sparseforge.runtime.machine import machine_info, set_threads
    >>> info = machine_info(set_threads(1))
    >>> info["threads"], sorted(info)
    (1, ['cpu', 'isa', 'threads', 'torch'])
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any, Optional

import torch

from sparseforge import kernels
from sparseforge.errors import ConfigError

__all__ = ["machine_info", "set_threads"]


def machine_info(threads: int) -> dict[str, Any]:
    """``{"cpu", "isa", "threads", "torch"}``: the CPU model name, the kernel path in use, ``threads``
    and the torch version, to print next to every figure."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "isa": kernels.isa(), "threads": threads, "torch": torch.__version__}


def set_threads(threads: Optional[int]) -> int:
    """Run torch and the sparse kernels on ``threads`` threads (default: torch's current count); returns it."""
    threads = torch.get_num_threads() if threads is None else int(threads)
    if threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    kernels.set_num_threads(threads)
    return threads
