"""SparseLoRA's SVD estimator and channel-skipping MLP as tensor functions, against dense references."""

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.nn import functional as F

from sparseforge.finetune.svd_estimator import (
    ffn_channel_scores,
    kept_count,
    low_rank_factors,
    skip_channel_mlp,
    top_channels,
)


def true_scores(x, wg, wu, act=F.silu):
    """The exact contribution norm of each channel on sequence-averaged inputs (the estimator's target)."""
    rows = x.mean(dim=1)  # (batch, hidden)
    return (act(rows @ wg.t()) * (rows @ wu.t())).norm(dim=0)  # (intermediate,)


def low_rank(out, inp, rank, g):
    return torch.randn(out, rank, generator=g) @ torch.randn(rank, inp, generator=g)


@pytest.mark.parametrize("rank", [1, 4, 8])
def test_low_rank_factors_are_the_best_rank_r_approximation(rank):
    w = torch.randn(48, 20, generator=torch.Generator().manual_seed(rank))
    a, b = low_rank_factors(w, rank)
    assert a.shape == (20, rank) and b.shape == (rank, 48)
    u, s, vh = torch.linalg.svd(w.t(), full_matrices=False)
    best = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]  # Eckart-Young
    torch.testing.assert_close(a @ b, best, rtol=1e-4, atol=1e-4)
    # the reference's split: A = U sqrt(S), B = sqrt(S) V^T (balanced factors)
    torch.testing.assert_close(a.norm(dim=0), b.norm(dim=1), rtol=1e-4, atol=1e-4)


def test_estimator_picks_the_largest_true_contributions_on_low_rank_weights():
    g = torch.Generator().manual_seed(0)
    wg, wu = low_rank(96, 24, 6, g), low_rank(96, 24, 6, g)  # exactly rank 6: the rank-8 SVD is exact
    x = torch.randn(4, 12, 24, generator=g)
    est = ffn_channel_scores(x, low_rank_factors(wg, 8), low_rank_factors(wu, 8), F.silu)
    exact = true_scores(x, wg, wu)
    torch.testing.assert_close(est, exact, rtol=1e-3, atol=1e-4)
    for sparsity in (0.5, 0.75, 0.9):
        k = kept_count(96, sparsity)
        assert set(top_channels(est, sparsity).tolist()) == set(exact.topk(k).indices.tolist())


def test_estimator_finds_planted_dominant_channels_in_full_rank_weights():
    g = torch.Generator().manual_seed(1)
    inter, hidden = 128, 32
    # the planted channels share a rank-2 input structure with large weights (a positive gate along the
    # input's mean direction, so silu passes them); every other channel is small full-rank noise
    basis = torch.linalg.qr(torch.randn(hidden, 2, generator=g)).Q.t()  # (2, hidden) orthonormal rows
    wg = 0.05 * torch.randn(inter, hidden, generator=g)
    wu = 0.05 * torch.randn(inter, hidden, generator=g)
    planted = torch.randperm(inter, generator=g)[:16]
    coef_g = torch.randn(16, 2, generator=g)
    coef_g[:, 0] = coef_g[:, 0].abs() + 0.5
    wg[planted] += 3.0 * coef_g @ basis
    wu[planted] += 3.0 * (torch.randn(16, 2, generator=g).abs() + 0.5) @ basis
    x = 0.3 * torch.randn(3, 10, hidden, generator=g) + 2.0 * basis[0]  # inputs along the first basis vector
    exact = true_scores(x, wg, wu)
    assert set(exact.topk(16).indices.tolist()) == set(planted.tolist())  # the built case is what we claim
    est = ffn_channel_scores(x, low_rank_factors(wg, 8), low_rank_factors(wu, 8), F.silu)
    assert set(top_channels(est, 1 - 16 / inter).tolist()) == set(planted.tolist())


def test_scores_without_sequence_averaging_use_every_token():
    g = torch.Generator().manual_seed(2)
    wg, wu = low_rank(40, 16, 3, g), low_rank(40, 16, 3, g)
    x = torch.randn(2, 5, 16, generator=g)
    est = ffn_channel_scores(x, low_rank_factors(wg, 3), low_rank_factors(wu, 3), F.silu, seq_avg=False)
    rows = x.reshape(-1, 16)
    torch.testing.assert_close(est, (F.silu(rows @ wg.t()) * (rows @ wu.t())).norm(dim=0), rtol=1e-3, atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), sparsity=st.floats(0.0, 0.999), seed=st.integers(0, 2**16))
def test_top_channels_keeps_the_k_best_sorted(n, sparsity, seed):
    scores = torch.rand(n, generator=torch.Generator().manual_seed(seed))
    keep = top_channels(scores, sparsity)
    k = kept_count(n, sparsity)
    assert k == max(1, int(n * (1 - sparsity))) and keep.numel() == k
    assert torch.equal(keep, keep.sort().values)
    outside = torch.ones(n, dtype=torch.bool)
    outside[keep] = False
    if outside.any():
        assert scores[keep].min() >= scores[outside].max()


def dense_restricted(x, keep, wg, bg, wu, bu, wd, bd, act, lg=None, lu=None, ld=None):
    """The dense MLP with the base gate/up rows and down columns outside ``keep`` zeroed (LoRA dense)."""
    mask = torch.zeros(wg.shape[0], dtype=torch.bool)
    mask[keep] = True
    g = F.linear(x, wg * mask[:, None], None if bg is None else bg * mask)
    u = F.linear(x, wu * mask[:, None], None if bu is None else bu * mask)
    if lg is not None:
        g = g + lg(x)
    if lu is not None:
        u = u + lu(x)
    h = act(g) * u
    out = F.linear(h, wd * mask[None, :], bd)
    return out + ld(h) if ld is not None else out


def lora(inp, out, rank, g):
    a, b = torch.randn(rank, inp, generator=g), torch.randn(out, rank, generator=g)
    return lambda h: F.linear(F.linear(h, a), b) * 0.5


@settings(max_examples=40, deadline=None)
@given(hidden=st.integers(2, 24), inter=st.integers(2, 48), k_frac=st.floats(0.0, 1.0), bias=st.booleans(),
       adapters=st.sampled_from(["", "g", "u", "d", "gu", "gud"]), act=st.sampled_from(["silu", "gelu", "sigmoid"]),
       seed=st.integers(0, 2**16))
def test_skipped_channel_forward_equals_dense_restricted_to_the_kept_channels(hidden, inter, k_frac, bias, adapters,
                                                                               act, seed):
    g = torch.Generator().manual_seed(seed)
    fn = {"silu": F.silu, "gelu": F.gelu, "sigmoid": torch.sigmoid}[act]
    wg, wu, wd = torch.randn(inter, hidden, generator=g), torch.randn(inter, hidden, generator=g), torch.randn(hidden, inter, generator=g)
    bg, bu, bd = (torch.randn(inter, generator=g), torch.randn(inter, generator=g), torch.randn(hidden, generator=g)) if bias else (None,) * 3
    keep = torch.randperm(inter, generator=g)[: max(1, round(k_frac * inter))].sort().values
    lg = lora(hidden, inter, 2, g) if "g" in adapters else None
    lu = lora(hidden, inter, 2, g) if "u" in adapters else None
    ld = lora(inter, hidden, 2, g) if "d" in adapters else None
    x = torch.randn(2, 3, hidden, generator=g)
    got = skip_channel_mlp(x, keep, (wg, bg), (wu, bu), (wd, bd), fn, lg, lu, ld)
    want = dense_restricted(x, keep, wg, bg, wu, bu, wd, bd, fn, lg, lu, ld)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_all_channels_kept_is_the_dense_mlp_and_gradients_reach_the_input():
    g = torch.Generator().manual_seed(3)
    wg, wu, wd = torch.randn(20, 8, generator=g), torch.randn(20, 8, generator=g), torch.randn(8, 20, generator=g)
    x = torch.randn(2, 4, 8, generator=g, requires_grad=True)
    got = skip_channel_mlp(x, torch.arange(20), (wg, None), (wu, None), (wd, None), F.silu)
    want = F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(got.sum(), x)
    (grad_want,) = torch.autograd.grad(want.sum(), x)
    torch.testing.assert_close(grad, grad_want, rtol=1e-5, atol=1e-5)
