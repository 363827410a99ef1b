import pytest
import torch

from sparseforge.errors import ConfigError, DataError, NumericalError
from sparseforge.masks import mask_from_scores, num_pruned, satisfies
from sparseforge.patterns import NM, Block, Channel, FanIn, Unstructured, parse
from sparseforge.prune.methods import LayerStats, get_method, sparsegpt_prune
from sparseforge.prune.methods.sparsegpt import MAX_DAMP_RETRIES, inverse_hessian_factor


def correlated_inputs(n=1024, cin=64, rank=8, seed=0):
    """Tokens (n, in) whose features are strongly correlated (low rank + a little noise)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, rank, generator=g)
    scale = torch.rand(cin, generator=g) * 2 + 0.1
    return (z @ torch.randn(rank, cin, generator=g) + 0.05 * torch.randn(n, cin, generator=g)) * scale


def hessian_of(x):
    return 2 * x.T @ x / x.shape[0]  # (in, in)


def naive_sparsegpt(w, h, pattern, sparsity, blocksize, damp):
    """Oracle in float64 with explicit inverses of the remaining Hessian, one column at a time.

    Independent of the Cholesky trick and of the lazy block updates: the OBS step for column j uses
    Hinv_F = inv(H[j:, j:]) and updates W[:, j:] -= w_j / Hinv_F[0, 0] * Hinv_F[0, :].
    """
    pattern = parse(pattern)
    W, H = w.double().clone(), h.double().clone()
    rows, cols = W.shape
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.diagonal(H).mean() * torch.eye(cols, dtype=H.dtype)
    hinv_diag = torch.tensor([torch.linalg.inv(H[j:, j:])[0, 0].item() for j in range(cols)], dtype=H.dtype)
    mask = torch.ones(rows, cols, dtype=torch.bool)
    if isinstance(pattern, (FanIn, Channel)):
        mask = mask_from_scores(W**2 / hinv_diag, pattern, sparsity)
    for j in range(cols):
        if j % blocksize == 0 and isinstance(pattern, (Unstructured, Block)):
            j2 = min(j + blocksize, cols)
            unit = rows if isinstance(pattern, Unstructured) else rows // pattern.h // pattern.w
            k = num_pruned(sparsity, unit * j2) - num_pruned(sparsity, unit * j)
            total = unit * (j2 - j)
            scores = W[:, j:j2] ** 2 / hinv_diag[j:j2]
            mask[:, j:j2] = False if k == total else mask_from_scores(scores, pattern, k / total)
        if isinstance(pattern, NM) and j % pattern.m == 0:
            g = slice(j, j + pattern.m)
            mask[:, g] = mask_from_scores(W[:, g] ** 2 / hinv_diag[g], pattern)
        hinv = torch.linalg.inv(H[j:, j:])
        pruned = ~mask[:, j]
        W[pruned, j:] -= (W[pruned, j] / hinv[0, 0]).unsqueeze(1) * hinv[0].unsqueeze(0)
        W[pruned, j] = 0.0
    return W, mask


@pytest.mark.parametrize(
    "pattern, sparsity, blocksize",
    [("unstructured", 0.5, 8), ("unstructured", 0.37, 12), ("2:4", None, 8), ("1:4", None, 4),
     ("block2x4", 0.5, 8), ("fanin", 0.6, 8), ("fanin5", None, 16), ("channel", 0.5, 8)],
)
def test_matches_naive_obs_oracle(pattern, sparsity, blocksize):
    x = correlated_inputs(n=256, cin=24, rank=6, seed=3)
    x[:, 7] = 0.0  # a dead input
    w = torch.randn(8, 24, generator=torch.Generator().manual_seed(4))
    h = hessian_of(x)
    w_new, mask, info = sparsegpt_prune(w, h, pattern, sparsity, blocksize=blocksize, dampening=0.01)
    w_ref, mask_ref = naive_sparsegpt(w, h, pattern, sparsity, blocksize, 0.01)
    assert torch.equal(mask, mask_ref)
    torch.testing.assert_close(w_new, w_ref.float(), rtol=1e-4, atol=1e-4)
    assert satisfies(mask, pattern)
    assert (w_new[~mask] == 0).all()
    assert info["dead_inputs"] == 1 and (w_new[:, 7] == 0).all()
    expected = (~mask_from_scores(torch.rand(8, 24), pattern, sparsity)).sum()
    assert (~mask).sum() == expected  # layer-exact count, as mask_from_scores defines it


def test_error_estimate_is_the_dampened_quadratic_loss():
    x = correlated_inputs(n=512, cin=32, seed=5)
    w = torch.randn(12, 32, generator=torch.Generator().manual_seed(6))
    h = hessian_of(x)
    w_new, _, info = sparsegpt_prune(w, h, "unstructured", 0.5, blocksize=8, dampening=0.01)
    dw = (w - w_new).double()
    hd = h.double() + 0.01 * torch.diagonal(h).mean().double() * torch.eye(32, dtype=torch.float64)
    assert info["error_estimate"] == pytest.approx(0.5 * torch.einsum("ri,ij,rj->", dw, hd, dw).item(), rel=1e-4)
    actual = ((x.double() @ dw.T) ** 2).sum().item() / x.shape[0]
    assert actual <= info["error_estimate"]  # dampening only adds a positive term


def reconstruction_error(w, w_new, x):
    return ((x @ (w - w_new).T) ** 2).sum().item()  # ||W X - W' X||^2


@pytest.mark.parametrize("pattern, sparsity", [("unstructured", 0.5), ("2:4", None)])
@pytest.mark.parametrize("blocksize", [16, 128])
def test_beats_wanda_and_magnitude_on_correlated_inputs(pattern, sparsity, blocksize):
    x = correlated_inputs()
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    stats = LayerStats(64, hessian=True)
    for chunk in x.split(100):
        stats.add_batch(chunk)
    errors = {
        name: reconstruction_error(w, get_method(name, opts).prune(w, stats, pattern, sparsity).weight, x)
        for name, opts in [("magnitude", {}), ("wanda", {}), ("sparsegpt", {"blocksize": blocksize})]
    }
    assert errors["sparsegpt"] < 0.5 * min(errors["wanda"], errors["magnitude"]), errors


def test_zero_sparsity_returns_weight_unchanged():
    x = correlated_inputs(n=256, cin=16)
    w = torch.randn(4, 16)
    w_new, mask, info = sparsegpt_prune(w, hessian_of(x), "unstructured", 0.0, blocksize=8)
    assert mask.all() and torch.equal(w_new, w) and info["error_estimate"] == 0.0


def test_singular_hessian_duplicate_and_zero_columns():
    x = correlated_inputs(n=64, cin=16, rank=3)  # rank 3 << 16: singular X^T X
    x[:, 5] = x[:, 2]  # duplicate input
    x[:, 9] = 0.0  # dead input
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(2))
    stats = LayerStats(16, hessian=True)
    stats.add_batch(x)
    assert torch.linalg.matrix_rank(stats.hessian.double()) < 16
    result = get_method("sparsegpt").prune(w, stats, "2:4", None)
    assert torch.isfinite(result.weight).all() and satisfies(result.mask, "2:4")
    assert result.info["dead_inputs"] == 1 and (result.weight[:, 9] == 0).all()
    assert result.info["dampening"] == 0.01
    wanda = get_method("wanda").prune(w, stats, "2:4", None)
    assert reconstruction_error(w, result.weight, x) < reconstruction_error(w, wanda.weight, x)


def test_dampening_is_raised_when_cholesky_fails():
    h = torch.diag(torch.tensor([1.0, 1.0, 1.0, -0.05]))  # indefinite: 1% of mean diag is not enough
    u, used, retries = inverse_hessian_factor(h.double(), 0.01)
    assert used == pytest.approx(0.1) and retries == 1
    _, _, info = sparsegpt_prune(torch.randn(2, 4), h, "2:4")
    assert info["dampening"] == pytest.approx(0.1) and info["dampening_retries"] == 1


def test_hopeless_hessian_raises_numerical_error():
    with pytest.raises(NumericalError, match="singular after dampening"):
        sparsegpt_prune(torch.randn(2, 4), -torch.eye(4), "2:4")
    assert MAX_DAMP_RETRIES >= 1


def test_non_finite_inputs_raise():
    h = torch.eye(4)
    with pytest.raises(NumericalError, match="weight"):
        sparsegpt_prune(torch.full((2, 4), float("nan")), h, "unstructured", 0.5)
    bad = h.clone()
    bad[1, 2] = float("inf")
    with pytest.raises(NumericalError, match="Hessian"):
        sparsegpt_prune(torch.randn(2, 4), bad, "unstructured", 0.5)
    stats = LayerStats(4, hessian=True)
    stats.add_batch(torch.randn(8, 4))
    with pytest.raises(NumericalError):
        get_method("sparsegpt").prune(torch.full((2, 4), float("nan")), stats, "unstructured", 0.5)


def test_blocksize_must_fit_the_pattern():
    h = torch.eye(16)
    with pytest.raises(ConfigError, match="multiple of M=4"):
        sparsegpt_prune(torch.randn(2, 16), h, NM(2, 4), blocksize=6)
    with pytest.raises(ConfigError, match="tile width 4"):
        sparsegpt_prune(torch.randn(2, 16), h, Block(2, 4), 0.5, blocksize=6)
    with pytest.raises(DataError, match="Hessian has shape"):
        sparsegpt_prune(torch.randn(2, 16), torch.eye(8), "unstructured", 0.5)


def test_needs_hessian_stats():
    stats = LayerStats(4)
    stats.add_batch(torch.randn(8, 4))
    with pytest.raises(DataError, match="Hessian"):
        get_method("sparsegpt").prune(torch.randn(2, 4), stats, "unstructured", 0.5)


def test_does_not_modify_inputs():
    x = correlated_inputs(n=128, cin=8)
    x[:, 3] = 0
    w, h = torch.randn(4, 8), hessian_of(x)
    w0, h0 = w.clone(), h.clone()
    sparsegpt_prune(w, h, "unstructured", 0.5)
    assert torch.equal(w, w0) and torch.equal(h, h0)
