"""Training a SparseLinear: the kept values learn through dW at the mask, the structure stays."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sparseforge.nn import SparseLinear
from test_sparse_linear import CASES, pruned_linear, reference


@pytest.mark.parametrize("fmt,dtype", CASES)
def test_value_and_bias_gradients_match_dense_masked_layer(fmt, dtype):
    lin = pruned_linear(fmt, in_f=40, out_f=20)
    sl = SparseLinear.from_linear(lin, fmt, dtype=dtype, trainable=True)
    ref = reference(lin, dtype)
    mask = sl.weight_format.mask()  # (out, in) stored positions
    x = torch.randn(3, 7, 40)
    dy = torch.randn(3, 7, 20)
    (sl(x) * dy).sum().backward()
    (torch.nn.functional.linear(x, ref.weight * mask, ref.bias) * dy).sum().backward()
    values = sl.weight_format.values
    assert values.grad is not None and values.grad.dtype == dtype
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(values.grad.float().reshape(-1), ref.weight.grad[mask], atol=tol, rtol=tol)
    torch.testing.assert_close(sl.bias.grad, ref.bias.grad, atol=1e-4, rtol=1e-4)


def test_trainable_values_are_a_parameter_and_structure_stays_buffers():
    sl = SparseLinear.from_linear(pruned_linear("bitmap"), "bitmap", trainable=True)
    assert sl.trainable
    assert sorted(n for n, _ in sl.named_parameters()) == ["bias", "values"]
    assert [n for n, _ in sl.named_buffers()] == ["bitmap"]
    assert all(p.requires_grad for p in sl.parameters())
    assert set(sl.state_dict()) == {"bitmap", "values", "bias"}
    sl.set_trainable(False)
    assert not sl.trainable and [n for n, _ in sl.named_parameters()] == ["bias"]
    assert not sl.bias.requires_grad
    sl.requires_grad_()
    assert sl.trainable


@pytest.mark.parametrize("fmt", ["bitmap", "nm", "csr"])
def test_sgd_steps_reduce_loss_and_keep_the_mask(fmt):
    torch.manual_seed(0)
    lin = pruned_linear(fmt, in_f=32, out_f=16)
    target = torch.nn.Linear(32, 16)
    sl = SparseLinear.from_linear(lin, fmt, trainable=True)
    mask = sl.weight_format.mask().clone()
    opt = torch.optim.SGD(sl.parameters(), lr=0.3)
    x = torch.randn(64, 32)
    with torch.no_grad():
        y = target(x)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = (sl(x) - y).square().mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]
    assert torch.equal(sl.weight_format.mask(), mask)
    dense = sl.to_dense()
    assert not bool(dense[~mask].any())  # pruned entries never come back


def test_state_dict_round_trip_of_a_trained_layer():
    sl = SparseLinear.from_linear(pruned_linear("csr"), "csr", trainable=True)
    with torch.no_grad():
        sl.weight_format.values.mul_(2)
    other = SparseLinear.from_linear(pruned_linear("csr"), "csr", trainable=True)
    param = other.csr_values
    other.load_state_dict(sl.state_dict())
    assert other.csr_values is param  # same parameter object (optimizers keep working)
    x = torch.randn(4, 48)
    torch.testing.assert_close(other(x), sl(x))
    frozen = SparseLinear.from_linear(pruned_linear("csr"), "csr")
    frozen.load_state_dict(sl.state_dict())
    torch.testing.assert_close(frozen(x), sl(x))


def _structured_linear(fmt: str) -> torch.nn.Linear:
    from sparseforge.masks import mask_from_scores

    torch.manual_seed(1)
    lin = torch.nn.Linear(48, 24)
    pattern, sparsity = ("fanin12", None) if fmt == "fanin" else ("block4x8", 0.5)
    with torch.no_grad():
        lin.weight.mul_(mask_from_scores(lin.weight.abs(), pattern, sparsity))
    return lin


@pytest.mark.parametrize("fmt", ["fanin", "bsr"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fanin_and_bsr_layers_forward_and_train(fmt, dtype):
    lin = _structured_linear(fmt)
    sl = SparseLinear.from_linear(lin, fmt, pattern="block4x8" if fmt == "bsr" else None, dtype=dtype, trainable=True)
    assert sl.format == fmt and fmt in repr(sl)
    ref = reference(lin, dtype)
    x = torch.randn(5, 48)
    dy = torch.randn(5, 24)
    y = sl(x)
    torch.testing.assert_close(y, ref(x), atol=1e-4, rtol=1e-4)
    (y * dy).sum().backward()
    mask = sl.weight_format.mask()
    (torch.nn.functional.linear(x, ref.weight * mask, ref.bias) * dy).sum().backward()
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    weight = sl.weight_format
    got = dataclasses.replace(weight, values=weight.values.grad.detach()).to_dense().float()  # grads at their positions
    torch.testing.assert_close(got, ref.weight.grad * mask, atol=tol, rtol=tol)
    state = sl.state_dict()
    again = SparseLinear.from_linear(lin, fmt, pattern="block4x8" if fmt == "bsr" else None, dtype=dtype)
    again.load_state_dict(state)
    torch.testing.assert_close(again(x), y.detach())


def test_bsr_needs_a_block_pattern_and_fanin_equal_rows():
    from sparseforge.errors import ConfigError

    with pytest.raises(ConfigError, match="block pattern"):
        SparseLinear.from_linear(_structured_linear("bsr"), "bsr")
    with pytest.raises(ConfigError, match="same number of inputs"):
        SparseLinear.from_linear(pruned_linear("bitmap"), "fanin")


def test_trainable_layer_under_torch_compile():
    lin = pruned_linear("bitmap")
    sl = SparseLinear.from_linear(lin, "bitmap", trainable=True)
    compiled = torch.compile(sl, fullgraph=True, backend="aot_eager")
    x = torch.randn(6, lin.in_features)
    compiled(x).square().sum().backward()
    eager = SparseLinear.from_linear(lin, "bitmap", trainable=True)
    eager(x).square().sum().backward()
    torch.testing.assert_close(sl.values.grad, eager.values.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sl.bias.grad, eager.bias.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("trainable", [True, False])
def test_replace_weight_keeps_the_parameter_when_the_count_is_unchanged(trainable):
    from sparseforge.formats import BitmapWeight
    from sparseforge.formats.csr import CSRWeight
    from sparseforge.errors import ModelError

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 16, generator=gen)
    keep = torch.zeros(6, 16, dtype=torch.bool)
    keep[:, :4] = True
    layer = SparseLinear(CSRWeight.from_dense(w, keep), trainable=trainable)
    held = layer.stored_values
    moved = keep.roll(5, dims=1)  # same count per layer, other positions
    got = layer.replace_weight(CSRWeight.from_dense(w, moved))
    assert (got is held) == trainable  # a trainable Parameter is refilled in place
    torch.testing.assert_close(layer.to_dense(), w * moved)
    x = torch.randn(3, 16, generator=gen)
    torch.testing.assert_close(layer(x), x @ (w * moved).T, rtol=1e-5, atol=1e-5)
    grown = keep | moved  # more kept weights: a new Parameter (or buffer)
    got = layer.replace_weight(CSRWeight.from_dense(w, grown))
    assert got is not held and got.numel() == int(grown.sum())
    assert isinstance(got, torch.nn.Parameter) == trainable
    torch.testing.assert_close(layer(x), x @ (w * grown).T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ModelError, match="needs a csr weight of shape \\(6, 16\\)"):
        layer.replace_weight(BitmapWeight.from_dense(w, keep))
    with pytest.raises(ModelError, match="needs a csr weight"):
        layer.replace_weight(CSRWeight.from_dense(w[:, :8], keep[:, :8]))
