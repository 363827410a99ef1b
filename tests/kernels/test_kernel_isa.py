"""Kernel path selection (SPARSEFORGE_ISA), thread settings, and the missing-module error."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sparseforge import kernels
from sparseforge.errors import ConfigError


def test_isa_reports_the_forced_path(monkeypatch):
    monkeypatch.delenv("SPARSEFORGE_ISA", raising=False)
    assert kernels.isa() == kernels.best_isa()
    for name in kernels.ISAS:
        if kernels.cpu_supports(name):
            monkeypatch.setenv("SPARSEFORGE_ISA", name)
            assert kernels.isa() == name
    monkeypatch.setenv("SPARSEFORGE_ISA", "auto")
    assert kernels.isa() == kernels.best_isa()


def test_scalar_is_always_available_and_best_is_supported():
    assert kernels.cpu_supports("scalar")
    assert kernels.cpu_supports(kernels.best_isa())
    order = list(kernels.ISAS)
    assert all(kernels.cpu_supports(i) for i in order[: order.index(kernels.best_isa()) + 1])


def test_unknown_isa_is_a_config_error(monkeypatch):
    monkeypatch.setenv("SPARSEFORGE_ISA", "sse9")
    with pytest.raises(ConfigError, match="scalar, avx2, avx512"):
        kernels.isa()


def test_unsupported_isa_is_a_config_error(monkeypatch):
    missing = [i for i in kernels.ISAS if not kernels.cpu_supports(i)]
    if not missing:
        pytest.skip("this CPU supports every kernel path")
    monkeypatch.setenv("SPARSEFORGE_ISA", missing[0])
    with pytest.raises(ConfigError, match="lacks"):
        kernels.isa()


def test_kernel_call_with_bad_isa_raises_config_error(monkeypatch):
    import torch
    from sparse_cases import random_case

    case = random_case("csr_u16", 4, 8)
    monkeypatch.setenv("SPARSEFORGE_ISA", "fastest")
    with pytest.raises(ConfigError):
        case.run(torch.randn(1, 8))


def test_set_num_threads_validates():
    with pytest.raises(ConfigError):
        kernels.set_num_threads(0)
    n = kernels.num_threads()
    kernels.set_num_threads(n)
    assert kernels.num_threads() == n


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**os.environ, **env}
    )


def test_num_threads_env_var():
    res = _run("from sparseforge import kernels; print(kernels.num_threads())", SPARSEFORGE_NUM_THREADS="3")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "3"
    res = _run("from sparseforge import kernels; kernels.num_threads()", SPARSEFORGE_NUM_THREADS="many")
    assert res.returncode != 0 and "SPARSEFORGE_NUM_THREADS" in res.stderr and "ConfigError" in res.stderr


def test_missing_native_module_says_how_to_build(monkeypatch):
    monkeypatch.setitem(sys.modules, "sparseforge._native", None)  # import now raises ImportError
    with pytest.raises(ImportError, match=r"pip install -e \."):
        kernels.native()


def test_importing_sparseforge_does_not_load_the_kernels():
    res = _run("import sys, sparseforge; sparseforge.parse('2:4'); print('sparseforge._native' in sys.modules)")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"
