"""kernels.sparse_threads: torch single-threaded inside, both settings restored on exit (also on error)."""

import doctest

import pytest
import torch

from sparseforge import kernels
from sparseforge.errors import ConfigError


def test_sparse_threads_sets_and_restores():
    torch_before, kernels_before = torch.get_num_threads(), kernels.num_threads()
    with pytest.raises(RuntimeError, match="boom"):
        with kernels.sparse_threads(2) as n:
            assert (torch.get_num_threads(), kernels.num_threads(), n) == (1, 2, 2)
            raise RuntimeError("boom")
    assert (torch.get_num_threads(), kernels.num_threads()) == (torch_before, kernels_before)
    with kernels.sparse_threads() as n:
        assert n == torch_before and kernels.num_threads() == torch_before
    with pytest.raises(ConfigError, match="n >= 1"):
        with kernels.sparse_threads(0):
            pass
    assert torch.get_num_threads() == torch_before


def test_kernels_module_doctest():
    assert doctest.testmod(kernels).failed == 0
