"""SparseLinear: outputs and input gradients vs the dense masked nn.Linear, state_dict, errors."""

from __future__ import annotations

import importlib
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseforge.errors import ConfigError, ModelError
from sparseforge.masks import mask_from_scores
from sparseforge.nn import SparseLinear

CASES = [(fmt, dt) for fmt in ("bitmap", "nm", "csr") for dt in (torch.float32, torch.bfloat16)]


def pruned_linear(fmt: str, in_f: int = 48, out_f: int = 24, bias: bool = True, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f, bias=bias)
    pattern, sparsity = ("2:4", None) if fmt == "nm" else ("unstructured", 0.9 if fmt == "csr" else 0.6)
    mask = mask_from_scores(lin.weight.detach().abs(), pattern, sparsity)
    with torch.no_grad():
        lin.weight.mul_(mask)
    return lin


def reference(lin: torch.nn.Linear, dtype: torch.dtype) -> torch.nn.Linear:
    """The dense masked layer with the weight rounded to the stored values dtype."""
    ref = torch.nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None)
    with torch.no_grad():
        ref.weight.copy_(lin.weight.to(dtype).float())
        if lin.bias is not None:
            ref.bias.copy_(lin.bias)
    return ref


@pytest.mark.parametrize("fmt,dtype", CASES)
@pytest.mark.parametrize("shape", [(1,), (3,), (17,), (64,), (2, 5), (3, 1, 7)])
def test_forward_matches_dense_masked_linear(fmt, dtype, shape):
    lin = pruned_linear(fmt)
    sl = SparseLinear.from_linear(lin, fmt, dtype=dtype)
    x = torch.randn(*shape, lin.in_features)
    with torch.no_grad():
        y = sl(x)
        assert y.shape == (*shape, lin.out_features)
        torch.testing.assert_close(y, reference(lin, dtype)(x), atol=1e-4, rtol=1e-4)
        if dtype == torch.bfloat16:  # against the fp32 layer: bf16 rounding of the values only
            torch.testing.assert_close(y, lin(x), atol=5e-2, rtol=2e-2)


@pytest.mark.parametrize("fmt,dtype", CASES)
def test_input_gradient_matches_dense(fmt, dtype):
    lin = pruned_linear(fmt)
    ref = reference(lin, dtype)
    sl = SparseLinear.from_linear(lin, fmt, dtype=dtype)
    x = torch.randn(2, 9, lin.in_features, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    dy = torch.randn(2, 9, lin.out_features)
    (sl(x) * dy).sum().backward()
    (ref(x_ref) * dy).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-4, rtol=1e-4)


def test_values_are_buffers_not_trainable():
    sl = SparseLinear.from_linear(pruned_linear("bitmap"), "bitmap")
    assert [n for n, _ in sl.named_parameters()] == ["bias"]
    assert not any(p.requires_grad for p in sl.parameters())
    assert {n for n, _ in sl.named_buffers()} == {"bitmap", "values"}


@pytest.mark.parametrize("fmt", ["bitmap", "nm", "csr"])
def test_state_dict_round_trip_with_different_nnz(fmt):
    src = SparseLinear.from_linear(pruned_linear(fmt, seed=1), fmt)
    other = pruned_linear(fmt, seed=2)
    with torch.no_grad():
        other.weight[0, :] = 0  # a different number of kept weights than src (nm: padded to n per group)
    dst = SparseLinear.from_linear(other, fmt)
    x = torch.randn(5, 48)
    assert not torch.allclose(src(x), dst(x))
    dst.load_state_dict(src.state_dict())
    torch.testing.assert_close(dst(x), src(x), atol=0, rtol=0)
    assert torch.equal(dst.to_dense(), src.to_dense())
    # through torch.save / load of the state dict as well
    import io

    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    dst2 = SparseLinear.from_linear(other, fmt)
    dst2.load_state_dict(torch.load(buf))
    torch.testing.assert_close(dst2(x), src(x), atol=0, rtol=0)


def test_load_state_dict_refuses_corrupt_buffers():
    sl = SparseLinear.from_linear(pruned_linear("bitmap"), "bitmap")
    state = sl.state_dict()
    state["values"] = state["values"][:-1]  # bitmap marks one more kept entry than stored
    with pytest.raises(RuntimeError, match="kept entries"):
        sl.load_state_dict(state)


def test_to_bfloat16_and_back_rebuilds_the_weight():
    lin = pruned_linear("bitmap")
    sl = SparseLinear.from_linear(lin, "bitmap")
    x = torch.randn(4, 48)
    sl.to(torch.bfloat16)
    assert sl.weight_format.dtype == torch.bfloat16 and sl.bitmap.dtype == torch.uint8
    ref = reference(lin, torch.bfloat16)
    with torch.no_grad():
        ref.bias.copy_(lin.bias.bfloat16().float())  # .to() rounded the bias too
    torch.testing.assert_close(sl(x), ref(x), atol=1e-4, rtol=1e-4)
    y16 = sl(x.bfloat16())  # bf16 activations: cast in and out
    assert y16.dtype == torch.bfloat16


def test_to_dense_and_to_linear_and_repr():
    lin = pruned_linear("csr")
    sl = SparseLinear.from_linear(lin, "csr")
    assert torch.equal(sl.to_dense(), lin.weight.detach())
    dense = sl.to_linear()
    x = torch.randn(3, 48)
    torch.testing.assert_close(dense(x), lin(x))
    text = repr(sl)
    assert "format=csr" in text and f"nnz={int((lin.weight != 0).sum())}" in text
    assert f"sparsity={1 - int((lin.weight != 0).sum()) / lin.weight.numel():.3f}" in text


def test_from_conv1d():
    transformers = importlib.import_module("transformers")
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(12, 16)  # nf=12 outputs, nx=16 inputs; weight stored (in, out)
    with torch.no_grad():
        conv.weight.mul_(torch.rand(16, 12) < 0.4)
        conv.bias.normal_()
    sl = SparseLinear.from_linear(conv, "bitmap")
    assert (sl.out_features, sl.in_features) == (12, 16)
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(sl(x), conv(x), atol=1e-5, rtol=1e-5)
    del transformers


def test_errors():
    with pytest.raises(ModelError, match="nn.Linear or transformers Conv1D"):
        SparseLinear.from_linear(torch.nn.Conv2d(2, 2, 3), "bitmap")
    dense = torch.nn.Linear(8, 4)
    with pytest.raises(ConfigError, match="violates 2:4"):
        SparseLinear.from_linear(dense, "nm")
    with pytest.raises(ConfigError, match="unknown sparse format"):
        SparseLinear.from_linear(dense, "coo")
    with pytest.raises(ConfigError, match="float32, bfloat16 or int8"):
        SparseLinear.from_linear(dense, "bitmap", dtype=torch.float16)
    sl = SparseLinear.from_linear(dense, "bitmap")
    from sparseforge.errors import DataError

    with pytest.raises(DataError, match=r"\(\.\.\., 8\)"):
        sl(torch.randn(3, 7))


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 40), cols=st.integers(1, 70), batch=st.integers(1, 20),
    density=st.floats(0.0, 1.0), fmt=st.sampled_from(["bitmap", "csr"]), seed=st.integers(0, 2**16),
)
def test_property_matches_dense(rows, cols, batch, density, fmt, seed):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(cols, rows)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(rows, cols, generator=g) * (torch.rand(rows, cols, generator=g) < density))
    x = torch.randn(batch, cols, generator=g)
    sl = SparseLinear.from_linear(lin, fmt)
    with torch.no_grad():
        torch.testing.assert_close(sl(x), lin(x), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_torch_compile_fullgraph():
    lin = pruned_linear("nm")
    sl = SparseLinear.from_linear(lin, "nm")
    compiled = torch.compile(sl, fullgraph=True)
    x = torch.randn(2, 3, 48)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), lin(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fmt,expect", [("nm", "nm"), ("csr", "csr"), ("bitmap", "bitmap")])
def test_from_linear_auto_without_bias(fmt, expect):
    lin = pruned_linear(fmt, bias=False)  # nm: 2:4 -> nm; csr: 90% -> csr; bitmap: 60% -> bitmap
    sl = SparseLinear.from_linear(lin, "auto")
    assert sl.format == expect and sl.bias is None
    x = torch.randn(4, 48)
    with torch.no_grad():
        torch.testing.assert_close(sl(x), lin(x), atol=1e-4, rtol=1e-4)
