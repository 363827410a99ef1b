"""Double Sparsity's native label scores and token selection over the 4-bit label cache
(csrc/label_select*, ``sparseforge::label_scores`` / ``sparseforge::label_select``): every ISA against
the scalar reference and a float64 oracle built here from the layout's definition; the selection
against torch.topk (NaN first, ties to the older token); the quantizer and the packing (property
tests); the packed cache across appends; thread independence, the fake impls and bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseforge import kernels
from sparseforge.attention.double_sparsity import PackedLabels
from sparseforge.errors import DataError
from sparseforge.ops.label_select import (label_scores, label_scores_ref, label_select, pack_codes, pad_scales,
                                          quantize_labels, unpack_codes)

N = kernels.native()
ISAS = [i for i in kernels.ISAS if kernels.cpu_supports(i)]


def _packed(B, Hkv, T, C, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, Hkv, T, C, generator=g)
    codes, scales = quantize_labels(x)
    return x, codes, pack_codes(codes), pad_scales(scales), scales


def _oracle(q, codes, scales):
    """float64 (B, Hkv, T): scale_t * sum_c q_c (code_tc - 8), from the unpacked codes (B, Hkv, T, C)."""
    return torch.einsum("bhc,bhtc->bht", q.double(), codes.double() - 8) * scales.double()


def _native_scores(q, packed, cap_scales, n, isa, parallel=True):
    out = torch.full((q.shape[0], q.shape[1], n), float("nan"))
    N.label_scores(q.numpy(), packed.numpy(), cap_scales.numpy(), n, out.numpy(), isa, parallel)
    return out


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("T,C", [(1, 16), (31, 8), (32, 16), (45, 5), (200, 16), (513, 32)])
def test_every_isa_matches_reference_and_oracle(isa, T, C):
    _, codes, packed, cap_scales, scales = _packed(2, 3, T, C, seed=T + C)
    q = torch.randn(2, 3, C, generator=torch.Generator().manual_seed(1))
    got = _native_scores(q, packed, cap_scales, T, isa)
    torch.testing.assert_close(got, label_scores_ref(q, packed, cap_scales, T), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.double(), _oracle(q, codes, scales), rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 300), C=st.integers(1, 24), budget_frac=st.floats(0.0, 1.0), seed=st.integers(0, 10 ** 6),
       isa=st.sampled_from(ISAS))
def test_selection_is_the_topk_of_the_scores(T, C, budget_frac, seed, isa):
    _, codes, packed, cap_scales, scales = _packed(1, 2, T, C, seed=seed)
    q = torch.randn(1, 2, C, generator=torch.Generator().manual_seed(seed + 1))
    budget = max(1, int(T * budget_frac))
    scores = torch.empty(1, 2, T)
    chosen = torch.empty(1, 2, budget, dtype=torch.int32)
    N.label_select(q.numpy(), packed.numpy(), cap_scales.numpy(), T, budget, scores.numpy(), chosen.numpy(), isa, True)
    assert torch.equal(chosen, label_select(q, packed, cap_scales, T, budget))  # the op: the same choice
    assert torch.equal(scores, _native_scores(q, packed, cap_scales, T, isa))
    for h in range(2):
        got = chosen[0, h].tolist()
        assert got == sorted(set(got))  # ascending, distinct
        # exactly the budget largest: every chosen score >= every unchosen one (ties: the older token)
        rest = torch.ones(T, dtype=torch.bool)
        rest[chosen[0, h].long()] = False
        if rest.any():
            low, high = scores[0, h, chosen[0, h].long()].min(), scores[0, h, rest].max()
            assert low >= high
            if low == high:  # a tie at the cut: the older token wins
                assert chosen[0, h][scores[0, h, chosen[0, h].long()] == low].max() < rest.nonzero()[scores[0, h, rest] == high].min()


def test_nan_scores_rank_first_and_ties_go_to_the_older_token():
    x = torch.ones(1, 1, 6, 2)
    x[0, 0, 4, 0] = float("nan")  # token 4: NaN scale -> NaN score
    codes, scales = quantize_labels(x)
    assert torch.isnan(scales[0, 0, 4]) and int(codes[0, 0, 4, 0]) == 8
    chosen = label_select(torch.ones(1, 1, 2), pack_codes(codes), pad_scales(scales), 6, 3)
    assert chosen.tolist() == [[[0, 1, 4]]]  # NaN first, then the equal scores of the oldest tokens
    assert torch.topk(torch.tensor([1.0, 1.0, float("nan")]), 1).indices.item() == 2  # torch.topk's NaN order


@settings(max_examples=30, deadline=None)
@given(T=st.integers(1, 100), C=st.integers(1, 20), seed=st.integers(0, 10 ** 6))
def test_quantize_and_pack_round_trip(T, C, seed):
    x = torch.randn(2, T, C, generator=torch.Generator().manual_seed(seed)) * 10
    codes, scales = quantize_labels(x)
    assert codes.min() >= 1 and codes.max() <= 15
    deq = (codes.float() - 8) * scales.unsqueeze(-1)
    assert ((deq - x).abs() <= scales.unsqueeze(-1) / 2 + 1e-5).all()  # within half a step
    packed = pack_codes(codes)
    assert packed.shape == (2, C, -(-T // 32) * 16)
    assert torch.equal(unpack_codes(packed)[:, :T], codes) and (unpack_codes(packed)[:, T:] == 0).all()


def test_packed_cache_appends_in_pieces_equal_one_write():
    x = torch.randn(1, 2, 100, 8, generator=torch.Generator().manual_seed(3))
    whole = PackedLabels(1, 2, 8)
    whole.write(x, 0)
    parts = PackedLabels(1, 2, 8)
    for a, b in ((0, 7), (7, 40), (40, 41), (41, 100)):
        parts.write(x[:, :, a:b], a)
    assert parts.n == whole.n == 100
    assert torch.equal(unpack_codes(parts.codes)[:, :, :100], unpack_codes(whole.codes)[:, :, :100])
    assert torch.equal(parts.scales[..., :100], whole.scales[..., :100])
    parts.write(x[:, :, 10:20] * 2, 10)  # a rewrite after a crop drops what followed
    assert parts.n == 20
    with pytest.raises(DataError, match="can only follow"):
        parts.write(x[:, :, :1], 25)


def test_results_do_not_depend_on_the_thread_pool():
    _, _, packed, cap_scales, _ = _packed(2, 4, 1000, 16)
    q = torch.randn(2, 4, 16)
    assert torch.equal(_native_scores(q, packed, cap_scales, 1000, "", True),
                       _native_scores(q, packed, cap_scales, 1000, "", False))


def test_fake_impls_give_the_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, codes, scales = torch.empty(1, 2, 4), torch.empty(1, 2, 4, 32, dtype=torch.uint8), torch.empty(1, 2, 64)
        assert torch.ops.sparseforge.label_scores(q, codes, scales, 50).shape == (1, 2, 50)
        chosen = torch.ops.sparseforge.label_select(q, codes, scales, 50, 7)
        assert chosen.shape == (1, 2, 7) and chosen.dtype == torch.int32


def test_bad_arguments_are_clear_errors():
    _, _, packed, cap_scales, _ = _packed(1, 2, 40, 8)
    q = torch.randn(1, 2, 8)
    with pytest.raises(DataError, match="budget"):
        label_select(q, packed, cap_scales, 40, 0)
    with pytest.raises(DataError, match="budget"):
        label_select(q, packed, cap_scales, 40, 41)
    with pytest.raises(DataError, match="capacity"):
        label_scores(q, packed, cap_scales, 65)
    with pytest.raises(DataError, match="q must be float32"):
        label_scores(q.double(), packed, cap_scales, 40)
    with pytest.raises(DataError, match="codes must be"):
        label_scores(q, packed[:, :1], cap_scales, 40)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_tokens_copies_the_chosen_rows(dtype):
    from sparseforge.ops.label_select import gather_tokens

    src = torch.randn(2, 3, 70, 24).to(dtype)
    idx = torch.randint(0, 70, (2, 3, 9), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    got = gather_tokens(src, idx)
    assert got.dtype == dtype and torch.equal(got, src.gather(2, idx.long().unsqueeze(-1).expand(-1, -1, -1, 24)))
    idx[1, 2, 4] = 70
    with pytest.raises(DataError, match="outside the cache capacity 70"):
        gather_tokens(src, idx)


def _tie_heavy(B, Hkv, T, C, seed, nan_every, zero_every):
    """Label keys whose scores are small integers (many ties), with NaN tokens and all-zero tokens
    (score +0 or -0) mixed in: (codes packed, scales padded, q)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, (B, Hkv, T, C), generator=g).float()
    x[..., 0] = 7.0  # every token's scale is 1: codes hold the values exactly
    if zero_every:
        x[:, :, ::zero_every] = 0.0
    if nan_every:
        x[:, :, 1::nan_every, -1] = float("nan")
    codes, scales = quantize_labels(x)
    q = torch.randint(-2, 3, (B, Hkv, C), generator=g).float()
    return pack_codes(codes), pad_scales(scales), q


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 3000), C=st.integers(1, 12), budget_frac=st.floats(0.0, 1.0), seed=st.integers(0, 10 ** 6),
       nan_every=st.sampled_from([0, 3, 17, 500]), zero_every=st.sampled_from([0, 2, 7]), isa=st.sampled_from(ISAS))
def test_selection_equals_the_reference_and_a_stable_sort_under_ties_nan_and_signed_zero(T, C, budget_frac, seed,
                                                                                         nan_every, zero_every, isa):
    packed, cap_scales, q = _tie_heavy(2, 2, T, C, seed, nan_every, zero_every)
    budget = max(1, int(T * budget_frac))
    scores = torch.empty(2, 2, T)
    chosen = torch.empty(2, 2, budget, dtype=torch.int32)
    N.label_select(q.numpy(), packed.numpy(), cap_scales.numpy(), T, budget, scores.numpy(), chosen.numpy(), isa, True)
    ref = torch.empty_like(chosen)
    N.label_select_ref(scores.numpy(), budget, ref.numpy())
    assert torch.equal(chosen, ref)
    # torch: a stable descending sort ranks NaN first and keeps equal scores (-0 == +0) oldest first
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :budget]
    assert torch.equal(chosen, order.sort(dim=-1).values.to(torch.int32))
    top = torch.topk(scores, budget, dim=-1).values.sort(dim=-1).values
    picked = scores.gather(-1, chosen.long()).sort(dim=-1).values
    assert torch.equal(picked.nan_to_num(nan=1e30), top.nan_to_num(nan=1e30))  # the same values as torch.topk


@pytest.mark.parametrize("isa", ISAS)
def test_selection_at_long_context_equals_the_reference(isa):
    """32K tokens over many histogram bins, the threshold inside a crowded bin (randn scores)."""
    _, _, packed, cap_scales, _ = _packed(1, 2, 32768, 16, seed=5)
    q = torch.randn(1, 2, 16, generator=torch.Generator().manual_seed(6))
    scores = torch.empty(1, 2, 32768)
    chosen = torch.empty(1, 2, 2048, dtype=torch.int32)
    N.label_select(q.numpy(), packed.numpy(), cap_scales.numpy(), 32768, 2048, scores.numpy(), chosen.numpy(), isa, False)
    ref = torch.empty_like(chosen)
    N.label_select_ref(scores.numpy(), 2048, ref.numpy())
    assert torch.equal(chosen, ref)
    assert torch.equal(scores, _native_scores(q, packed, cap_scales, 32768, isa))
    assert torch.equal(chosen, torch.topk(scores, 2048, dim=-1).indices.sort(dim=-1).values.to(torch.int32))
