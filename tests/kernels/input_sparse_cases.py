"""Test helpers shared by the two activation-sparsity kernels (csrc/sparse_input.h: dense weight,
csrc/column_sparse.h: column-bitmap weight), which take the same input, thresholds and bias.

``random_problem`` draws x (batch, in), a float32 weight (out, in) with a fraction of its entries
zero, and a bias (out,); each test turns the weight into its kernel's layout.
"""

from __future__ import annotations

import math

import torch

from sparseforge import kernels

ALGOS = ["gemv", "gemm"]  # the native paths of both kernels
DTYPES = [torch.float32, torch.bfloat16]


def random_problem(batch: int, n_in: int, n_out: int, seed: int = 0, weight_sparsity: float = 0.0):
    """x (batch, n_in), w (n_out, n_in) float32 (about ``weight_sparsity`` of it 0), bias (n_out,)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n_in, generator=g)
    w = torch.randn(n_out, n_in, generator=g)
    if weight_sparsity > 0.0:
        w[torch.rand(n_out, n_in, generator=g) < weight_sparsity] = 0.0
    bias = torch.randn(n_out, generator=g)
    return x, w, bias


def raw(t: torch.Tensor):
    """A tensor as the native binding takes it: bfloat16 as its uint16 bits."""
    return t.view(torch.uint16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def tol(n_in: int) -> dict:
    """Summation-order tolerance of an n_in-term float32 dot product."""
    return dict(rtol=1e-4, atol=1e-4 * math.sqrt(n_in))


def at_thread_counts(fn, counts=(1, 3)) -> list:
    """``fn()`` run with each kernel thread count in ``counts`` (the setting restored after)."""
    before = kernels.num_threads()
    try:
        out = []
        for n in counts:
            kernels.set_num_threads(n)
            out.append(fn())
        return out
    finally:
        kernels.set_num_threads(before)
