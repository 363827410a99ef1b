"""Which machine a figure came from: CPU model, the ISA flags that decide the kernels, cache sizes.

Every published figure names its host (the project's machines change between sessions: AMD Zen 5
without AMX, Intel Xeon with AMX, ...). ``host_info()`` reads Linux's /proc/cpuinfo and sysfs and
returns what it could read; unknown values are ``None``, never guessed.

    from bench_host import host_info, host_line
    print(host_line())   # "Intel(R) Xeon(R) Processor, 2 CPUs, avx512f avx512_bf16 amx_bf16 ..., L2 2 MiB, L3 480 MiB"
"""

from __future__ import annotations

import os
from pathlib import Path

FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_vpopcntdq", "avx512_fp16",
                     "amx_bf16", "amx_int8", "avx_vnni")  # fmt: skip


def _cpuinfo() -> dict[str, str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in info:
            info[key.strip()] = value.strip()
    return info


def cache_sizes(cpu: int = 0) -> dict[str, int]:
    """Data/unified cache sizes in bytes per level of ``cpu`` from sysfs, e.g. {"L1": 49152, "L2": 2097152, ...}."""
    out: dict[str, int] = {}
    for index in sorted(Path(f"/sys/devices/system/cpu/cpu{cpu}/cache").glob("index*")):
        try:
            kind = (index / "type").read_text().strip()
            level = (index / "level").read_text().strip()
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        if kind == "Instruction":
            continue
        mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(size[-1], 1)
        out[f"L{level}"] = int(size.rstrip("KMG")) * mult
    return out


def host_info() -> dict:
    info = _cpuinfo()
    flags = set(info.get("flags", info.get("Features", "")).split())
    return {"cpu": info.get("model name") or info.get("CPU part"), "cpus": os.cpu_count(),
            "flags": [f for f in FLAGS_OF_INTEREST if f in flags], "caches": cache_sizes()}  # fmt: skip


def host_line() -> str:
    h = host_info()
    caches = ", ".join(f"{k} {v // 2**20} MiB" if v >= 2**20 else f"{k} {v // 2**10} KiB" for k, v in h["caches"].items())
    return f"{h['cpu']}, {h['cpus']} CPUs, {' '.join(h['flags'])}, {caches}"


if __name__ == "__main__":
    print(host_line())
