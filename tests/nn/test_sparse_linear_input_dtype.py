"""SparseLinear refuses non-floating inputs exactly as nn.Linear does (issue 12, item 6)."""

import pytest
import torch

from sparseforge.nn import SparseLinear


def _pair(values_dtype):
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 4)
    with torch.no_grad():
        lin.weight.mul_((torch.arange(16) % 2 == 0).float())  # 50% zeros, 2:4-compatible
    return lin, SparseLinear.from_linear(lin, format="bitmap", dtype=values_dtype)


@pytest.mark.parametrize("values_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("x_dtype", [torch.int32, torch.int64, torch.int8, torch.uint8, torch.bool, torch.complex64])
def test_non_floating_input_raises_what_linear_raises(values_dtype, x_dtype):
    lin, sparse = _pair(values_dtype)
    lin = lin.to(values_dtype)
    x = torch.ones(3, 16).to(x_dtype)
    with pytest.raises(Exception) as expected:
        lin(x)
    with pytest.raises(type(expected.value)) as got:
        sparse(x)
    assert str(got.value) == str(expected.value)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_floating_inputs_still_work(x_dtype):
    lin, sparse = _pair(torch.float32)
    x = torch.randn(3, 16).to(x_dtype)
    y = sparse(x)
    assert y.dtype == x_dtype
    torch.testing.assert_close(y.float(), lin(x.float()).to(x_dtype).float(), atol=2e-2, rtol=2e-2)
