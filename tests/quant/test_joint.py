"""Joint sparsify + quantize inside SparseGPT's column pass (Frantar & Alistarh 2023, section 3.4)."""

import pytest
import torch

from sparseforge.errors import ConfigError
from sparseforge.masks import satisfies
from sparseforge.patterns import NM
from sparseforge.prune.methods import get_method, LayerStats, sparsegpt_prune
from sparseforge.quant import QuantConfig
from sparseforge.quant.grid import codes_of, fake_quantize


def calibrated_layer(seed: int, rows: int = 24, cols: int = 64, n: int = 2048):
    """A weight and correlated inputs, like a transformer layer's (low rank plus noise, uneven scales)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 12, generator=g)
    x = (z @ torch.randn(12, cols, generator=g) + 0.1 * torch.randn(n, cols, generator=g)) * (torch.rand(cols, generator=g) + 0.2)
    w = torch.randn(rows, cols, generator=g)
    return w, x, 2 * x.T @ x / n


def output_error(w, x, new):
    return float(((x @ (w - new).T) ** 2).sum())


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_zero_sparsity_joint_is_gptq_and_beats_round_to_nearest(bits, seed):
    w, x, h = calibrated_layer(seed)
    joint, mask, info = sparsegpt_prune(w, h, "unstructured", 0.0, quantize=QuantConfig(bits=bits, method="joint"))
    rtn, rtn_scale = fake_quantize(w, bits)
    assert mask.all()
    assert torch.equal(info["weight_scale"], rtn_scale)  # same grid: only the error feedback differs
    codes_of(joint, info["weight_scale"], bits)  # on the grid
    assert output_error(w, x, joint) < output_error(w, x, rtn)


@pytest.mark.parametrize("pattern, sparsity", [("2:4", None), ("unstructured", 0.5), ("4:8", None)])
@pytest.mark.parametrize("group_size", [None, 16])
def test_joint_keeps_the_mask_exactly_and_lands_on_the_grid(pattern, sparsity, group_size):
    w, x, h = calibrated_layer(3)
    q = QuantConfig(bits=4, group_size=group_size, method="joint")
    new, mask, info = sparsegpt_prune(w, h, pattern, sparsity, blocksize=32, quantize=q)
    assert torch.all(new[~mask] == 0) and not torch.signbit(new[new == 0]).any()  # pruned entries exactly +0.0
    if pattern != "unstructured":
        assert satisfies(new != 0, NM(int(pattern[0]), int(pattern[2])))
    else:
        assert int((~mask).sum()) == w.numel() // 2
    scale = info["weight_scale"]
    assert scale.dtype == torch.float32
    assert tuple(scale.shape) == ((24,) if group_size is None else (24, 64 // group_size))
    codes_of(new, scale, 4, group_size)
    assert info["quantization"] == q.describe()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_joint_int4_beats_rounding_after_sparsegpt(seed):
    """At 4 bits the rounding error matters; propagating it lowers the layer's output error."""
    w, x, h = calibrated_layer(seed)
    fp, _, _ = sparsegpt_prune(w, h, "2:4")
    rtn, _ = fake_quantize(fp, 4)
    joint, _, _ = sparsegpt_prune(w, h, "2:4", quantize=QuantConfig(bits=4, method="joint"))
    assert output_error(w, x, fp) < output_error(w, x, joint) < output_error(w, x, rtn)


def test_all_pruned_rows_and_dead_inputs_give_finite_results():
    w, x, h = calibrated_layer(5)
    w[3] = 0.0  # a row that is all zeros
    h = h.clone()
    h[:, 7] = 0.0
    h[7, :] = 0.0  # an input that never fired
    new, mask, info = sparsegpt_prune(w, h, "2:4", quantize=QuantConfig(bits=8, method="joint"))
    assert torch.isfinite(new).all() and torch.isfinite(info["weight_scale"]).all()
    assert info["weight_scale"][3] == 0 and torch.all(new[3] == 0) and torch.all(new[:, 7] == 0)


def test_joint_as_a_sparsegpt_option_and_its_errors():
    w, x, h = calibrated_layer(6)
    method = get_method("sparsegpt", {"quantize": {"bits": 8, "method": "joint"}})
    stats = LayerStats(64, hessian=True)
    stats.add_batch(x)
    result = method.prune(w, stats, "2:4", None)
    codes_of(result.weight, result.info["weight_scale"], 8)
    with pytest.raises(ConfigError, match="multiple of it"):
        sparsegpt_prune(w, h, "2:4", blocksize=24, quantize=QuantConfig(bits=4, group_size=16, method="joint"))
    with pytest.raises(ConfigError, match="does not divide"):
        sparsegpt_prune(w, h, "2:4", blocksize=48, quantize=QuantConfig(bits=4, group_size=48, method="joint"))
    with pytest.raises(ConfigError, match="keys are bits"):
        get_method("sparsegpt", {"quantize": {"bitz": 8}})
    with pytest.raises(ConfigError, match="QuantConfig"):
        sparsegpt_prune(w, h, "2:4", quantize={"bits": 8})
