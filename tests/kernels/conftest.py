"""Fixtures shared by the kernel tests: ``isa`` runs a test once per kernel path (every ISA in
``kernels.ISAS``; a path the CPU cannot run is skipped as "CPU lacks ...") with SPARSEFORGE_ISA set."""

from __future__ import annotations

import pytest

from sparseforge import kernels

ISAS = [pytest.param(i, marks=pytest.mark.skipif(not kernels.cpu_supports(i), reason=f"CPU lacks {i}")) for i in kernels.ISAS]


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv("SPARSEFORGE_ISA", request.param)
    assert kernels.isa() == request.param
    return request.param
