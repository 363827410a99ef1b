"""DSnoT against a row-by-row scalar reference, and its invariants (counts, N:M, error, no-op cases)."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from sparseforge.errors import ConfigError
from sparseforge.masks import mask_from_scores
from sparseforge.prune.methods import LayerStats, get_method
from sparseforge.prune.methods.dsnot import dsnot_update
from sparseforge.patterns import NM, Unstructured


def reference_row(w, keep, mean, var, score, m, max_cycles, threshold, power, same_sign):
    """One row of DSnoT, written as plain Python lists (the paper's Algorithm 1 and the reference code's orders)."""
    n = len(w)
    keep = list(keep)
    d = [w[j] * mean[j] for j in range(n)]
    error = sum(d[j] for j in range(n) if not keep[j])
    sign0 = (error > 0) - (error < 0)
    grow_metric = [0.0 if keep[j] else d[j] / max(var[j], 1e-12) ** power for j in range(n)]
    grow_order = sorted(range(n), key=lambda j: grow_metric[j])  # stable
    g_front, g_back = 0, n - 1
    kept0 = [j for j in range(n) if keep[j]]
    if m is None:
        by_score = sorted(kept0, key=lambda j: score[j])
        neg = [j for j in by_score if d[j] < 0]
        zero = [j for j in by_score if d[j] == 0]
        pos = [j for j in by_score if d[j] > 0][::-1]
        prune_order = neg + zero + pos
        p_front, p_back = 0, len(prune_order) - 1
    base = [score[j] if keep[j] else float("inf") for j in range(n)]
    for _ in range(max_cycles):
        if g_front > g_back:
            break
        if error > 0:
            grow, g_back = grow_order[g_back], g_back - 1
        else:
            grow, g_front = grow_order[g_front], g_front + 1
        if keep[grow]:
            break
        if m is None:
            if p_front > p_back:
                break
            if error < 0:
                prune, p_back = prune_order[p_back], p_back - 1
            else:
                prune, p_front = prune_order[p_front], p_front + 1
        else:
            start = grow - grow % m
            block = base[start:start + m]
            low = min(block)
            if low == float("inf"):
                break
            prune = start + block.index(low)
        after = error + d[prune] - d[grow]
        if abs(error) <= threshold:
            break
        if same_sign and sign0 != (after > 0) - (after < 0):
            break
        keep[prune], keep[grow] = False, True
        base[prune] = float("inf")
        error = after
    return keep


def _case(seed, rows, cols):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    x = torch.randn(64, cols, generator=g, dtype=torch.float64) * 2 + torch.randn(cols, generator=g, dtype=torch.float64)
    return w, x.mean(0), x.var(0, unbiased=False), (x * x).sum(0)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 5), st.sampled_from([8, 16, 24]), st.sampled_from(["u", "2:4", "1:4"]),
       st.sampled_from([None, True, False]), st.sampled_from([0.0, 0.1, 1.0]))
def test_matches_scalar_reference(seed, rows, cols, kind, same_sign, threshold):
    w, mean, var, sq = _case(seed, rows, cols)
    pattern = Unstructured() if kind == "u" else NM(int(kind[0]), 4)
    score = w.abs() * sq.sqrt()[None, :]
    mask = mask_from_scores(score, pattern, 0.6 if kind == "u" else None, scope="row")
    got = dsnot_update(w, mask, mean, var, score, pattern, max_cycles=7, update_threshold=threshold, same_sign=same_sign)
    sign_check = (kind != "u") if same_sign is None else same_sign
    for i in range(rows):
        want = reference_row(w[i].tolist(), mask[i].tolist(), mean.tolist(), var.tolist(), score[i].tolist(),
                             None if kind == "u" else 4, 7, threshold, 1.0, sign_check)
        assert got[i].tolist() == want, i


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from(["unstructured", "2:4"]), st.floats(0.3, 0.8))
def test_counts_pattern_and_error_sign_kept(seed, pattern, sparsity):
    w, mean, var, sq = _case(seed, 6, 32)
    pat = NM(2, 4) if pattern == "2:4" else Unstructured()
    score = w.abs() * sq.sqrt()[None, :]
    mask = mask_from_scores(score, pat, None if pattern == "2:4" else sparsity, scope="row")
    new = dsnot_update(w, mask, mean, var, score, pat, max_cycles=50, update_threshold=0.0, same_sign=True)
    assert torch.equal(new.sum(1), mask.sum(1))  # every row keeps its count
    if pattern == "2:4":
        assert torch.equal(new.view(6, -1, 4).sum(-1), torch.full((6, 8), 2))
    d = w * mean[None, :]
    before, after = (d * ~mask).sum(1), (d * ~new).sum(1)
    assert (torch.sign(after) == torch.sign(before)).all()  # the sign check holds


def test_zero_cycles_is_the_base_mask():
    w, mean, var, sq = _case(3, 4, 16)
    score = w.abs() * sq.sqrt()[None, :]
    mask = mask_from_scores(score, Unstructured(), 0.5, scope="row")
    assert torch.equal(dsnot_update(w, mask, mean, var, score, Unstructured(), max_cycles=0), mask)


@pytest.mark.parametrize("base", ["wanda", "magnitude", "sparsegpt"])
def test_method_on_each_base_keeps_sparsity(base):
    method = get_method("dsnot", {"base": base, "update_threshold": 0.0})
    stats = LayerStats(16, hessian=method.needs_hessian)
    g = torch.Generator().manual_seed(0)
    stats.add_batch(torch.randn(256, 16, generator=g) + 0.5)
    w = torch.randn(8, 16, generator=g)
    for pattern, sparsity in (("unstructured", 0.7), ("2:4", None)):
        result = method.prune(w, stats, pattern, sparsity)
        assert result.info["achieved_sparsity"] == pytest.approx(0.7 if sparsity else 0.5, abs=0.07)
        assert torch.equal(result.weight != 0, result.mask)
        assert torch.equal(result.weight[result.mask], w[result.mask])  # no weight is changed, only the mask
        assert result.info["swapped"] > 0


def test_layer_stats_mean_and_var():
    stats = LayerStats(3)
    x = torch.randn(2, 50, 3) * 3 + 1
    stats.add_batch(x[0])
    stats.add_batch(x[1])
    flat = x.reshape(-1, 3).double()
    assert torch.allclose(stats.input_mean.double(), flat.mean(0), atol=1e-5)
    assert torch.allclose(stats.input_var.double(), flat.var(0, unbiased=False), atol=1e-4)


def test_bad_options_and_patterns():
    with pytest.raises(ConfigError, match="base must be one of"):
        get_method("dsnot", {"base": "obs"})
    with pytest.raises(ConfigError, match="max_cycles"):
        get_method("dsnot", {"max_cycles": -1})
    stats = LayerStats(8)
    stats.add_batch(torch.randn(16, 8))
    with pytest.raises(ConfigError, match="unstructured and N:M"):
        get_method("dsnot").prune(torch.randn(8, 8), stats, "block2x2", 0.5)


def test_sparsify_with_dsnot_on_a_tiny_llama():
    import sparseforge as sf
    from tiny_models import tiny_model, tokens

    model = tiny_model("llama")
    report = sf.sparsify_(model, sf.SparsifyConfig(method="dsnot", sparsity=0.6), calibration=tokens(8, 16),
                          progress=False)
    assert report.layers and all(abs(layer.achieved_sparsity - 0.6) < 0.05 for layer in report.layers)
