"""torch custom ops: opcheck, gradients vs autograd of the dense masked layer, clear errors."""

from __future__ import annotations

import pytest
import torch
from sparse_cases import FORMATS, random_case

from sparseforge import ops
from sparseforge.errors import DataError, ModelError
from sparseforge.formats import BitmapWeight, BSRWeight, FanInWeight, NMWeight
from sparseforge.formats.csr import CSRWeight

WEIGHTS = {
    "csr": lambda w, m: CSRWeight.from_dense(w, m),
    "csr_bf16": lambda w, m: CSRWeight.from_dense(w.bfloat16(), m),
    "bitmap": lambda w, m: BitmapWeight.from_dense(w, m),
    "bitmap_bf16": lambda w, m: BitmapWeight.from_dense(w.bfloat16(), m),
    "nm_2of4": lambda w, m: NMWeight.from_dense(w, "2:4", m),
    "nm_3of8": lambda w, m: NMWeight.from_dense(w, "3:8", m),
    "fanin": lambda w, m: FanInWeight.from_dense(w, m),
    "fanin_bf16": lambda w, m: FanInWeight.from_dense(w.bfloat16(), m),
    "bsr_2x4": lambda w, m: BSRWeight.from_dense(w, "block2x4", m),
    "bsr_3x5_bf16": lambda w, m: BSRWeight.from_dense(w.bfloat16(), "block3x5", m),
}
_CASE_FMT = {"csr": "csr_u16", "csr_bf16": "csr_bf16", "bitmap": "bitmap", "bitmap_bf16": "bitmap_bf16",
             "nm_2of4": "nm_2of4", "nm_3of8": "nm_3of8", "fanin": "fanin", "fanin_bf16": "fanin_bf16",
             "bsr_2x4": "bsr_2x4", "bsr_3x5_bf16": "bsr_3x5_bf16"}


def _weight(name, rows=12, cols=40, seed=0):
    case = random_case(_CASE_FMT[name], rows, cols, density=0.5, seed=seed)
    mask = case.dense != 0
    return WEIGHTS[name](case.dense, mask), case.dense


def _op_args(weight, x, bias):
    if isinstance(weight, CSRWeight):
        return ops.csr_linear, (x, weight.row_ptr, weight.col, weight.values, bias)
    if isinstance(weight, BitmapWeight):
        return ops.bitmap_linear, (x, weight.bitmap, weight.row_offsets, weight.values, bias)
    if isinstance(weight, FanInWeight):
        return ops.fanin_linear, (x, weight.values, weight.indices, bias)
    if isinstance(weight, BSRWeight):
        return ops.bsr_linear, (x, weight.block_row_ptr, weight.block_col, weight.values, bias)
    return ops.nm_linear, (x, weight.values, weight.indices, weight.pattern.n, weight.pattern.m, bias)


@pytest.mark.parametrize("name", WEIGHTS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck(name, with_bias):
    weight, _ = _weight(name)
    x = torch.randn(5, weight.shape[1], requires_grad=True)
    bias = torch.randn(weight.shape[0], requires_grad=True) if with_bias else None
    op, args = _op_args(weight, x, bias)
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("name", WEIGHTS)
def test_opcheck_transposed(name):
    weight, _ = _weight(name)
    dy = torch.randn(4, weight.shape[0])
    if isinstance(weight, CSRWeight):
        args = (ops.csr_linear_t, (dy, weight.row_ptr, weight.col, weight.values, weight.shape[1]))
    elif isinstance(weight, BitmapWeight):
        args = (ops.bitmap_linear_t, (dy, weight.bitmap, weight.row_offsets, weight.values, weight.shape[1]))
    elif isinstance(weight, FanInWeight):
        args = (ops.fanin_linear_t, (dy, weight.values, weight.indices, weight.shape[1]))
    elif isinstance(weight, BSRWeight):
        args = (ops.bsr_linear_t, (dy, weight.block_row_ptr, weight.block_col, weight.values, weight.shape[1]))
    else:
        args = (ops.nm_linear_t, (dy, weight.values, weight.indices, weight.pattern.n, weight.pattern.m, weight.shape[1]))
    torch.library.opcheck(*args)


@pytest.mark.parametrize("name", WEIGHTS)
def test_gradients_match_dense_masked_layer(name):
    weight, dense = _weight(name, rows=33, cols=72, seed=3)
    x = torch.randn(2, 7, dense.shape[1], requires_grad=True)  # leading dims are flattened
    bias = torch.randn(dense.shape[0], requires_grad=True)
    y = ops.linear(x, weight, bias)
    assert y.shape == (2, 7, dense.shape[0])
    gy = torch.randn_like(y)
    y.backward(gy)
    x2 = x.detach().clone().requires_grad_()
    b2 = bias.detach().clone().requires_grad_()
    y2 = torch.nn.functional.linear(x2, dense, b2)
    y2.backward(gy)
    torch.testing.assert_close(y, y2, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(x.grad, x2.grad, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(bias.grad, b2.grad, rtol=2e-5, atol=2e-5)


def test_gradient_with_broadcast_upstream_grad():
    weight, dense = _weight("bitmap")
    x = torch.randn(6, dense.shape[1], requires_grad=True)
    ops.linear(x, weight).sum().backward()  # dy arrives as an expanded (stride 0) tensor
    torch.testing.assert_close(x.grad, torch.ones(6, dense.shape[0]) @ dense, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", ["csr", "bitmap", "nm_2of4"])
def test_bad_activations_give_clear_errors(name):
    weight, _ = _weight(name)
    cols = weight.shape[1]
    with pytest.raises(DataError, match="float32"):
        ops.linear(torch.randn(3, cols, dtype=torch.float64), weight)
    with pytest.raises(DataError, match="float32"):
        ops.linear(torch.randn(3, cols).bfloat16(), weight)
    with pytest.raises(DataError, match="contiguous"):
        ops.linear(torch.randn(cols, 3).T, weight)
    with pytest.raises(DataError, match=f"\\(\\.\\.\\., {cols}\\)"):
        ops.linear(torch.randn(3, cols + 1), weight)
    with pytest.raises(DataError, match="bias"):
        ops.linear(torch.randn(3, cols), weight, torch.randn(weight.shape[0] + 1))
    op, args = _op_args(weight, torch.randn(cols, 3).T, None)
    with pytest.raises(DataError, match="contiguous"):
        op(*args)
    if name != "csr":  # CSR buffers do not record in_features: the raw op takes it from x
        op, args = _op_args(weight, torch.randn(3, cols + 8), None)
        with pytest.raises(ModelError, match="do not fit"):
            op(*args)


def test_bad_weight_buffers_give_clear_errors():
    weight, _ = _weight("csr")
    x = torch.randn(2, weight.shape[1])
    with pytest.raises(ModelError, match="row_ptr"):
        ops.csr_linear(x, weight.row_ptr.long(), weight.col, weight.values, None)
    with pytest.raises(ModelError, match="values"):
        ops.csr_linear(x, weight.row_ptr, weight.col, weight.values.double(), None)
    bw, _ = _weight("bitmap")
    with pytest.raises(ModelError, match="do not fit"):
        ops.bitmap_linear(torch.randn(2, 80), bw.bitmap, bw.row_offsets, bw.values, None)
    nw, _ = _weight("nm_2of4")
    with pytest.raises(ModelError, match="2:8"):
        ops.nm_linear(torch.randn(2, nw.shape[1]), nw.values, nw.indices, 2, 8, None)
    with pytest.raises(ModelError, match="no sparse kernel"):
        ops.linear(torch.randn(2, 4), torch.nn.Linear(4, 2).weight.detach())


def test_native_layer_rejects_what_it_cannot_read():
    # the binding's own checks back up the Python ones (direct _native callers)
    from sparseforge.kernels import native

    case = random_case("bitmap", 5, 16)
    x = torch.randn(2, 16)
    with pytest.raises(ValueError, match="y must be float32"):
        native().bitmap_linear(x, *case.bufs, None, torch.empty(2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="C-contiguous"):
        native().bitmap_linear(x, *case.bufs, None, torch.empty(5, 2).T)
    with pytest.raises(ValueError, match="bytes per row"):
        native().bitmap_linear(torch.randn(2, 40), *case.bufs, None, torch.empty(2, 5))
    with pytest.raises(ValueError, match="algo"):
        native().bitmap_linear(x, *case.bufs, None, torch.empty(2, 5), "", "fast")


def test_torch_compile_fullgraph_forward_and_backward():
    weight, dense = _weight("bitmap", rows=16, cols=48)
    nweight, ndense = _weight("nm_2of4", rows=16, cols=48, seed=1)

    def f(x):
        h = ops.bitmap_linear(x, weight.bitmap, weight.row_offsets, weight.values, None)
        return ops.nm_linear(torch.relu(h).repeat(1, 3), nweight.values, nweight.indices, 2, 4, None)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 48, requires_grad=True)
    y = compiled(x)
    y.sum().backward()
    x2 = x.detach().clone().requires_grad_()
    y2 = torch.relu(x2 @ dense.T).repeat(1, 3) @ ndense.T
    y2.sum().backward()
    torch.testing.assert_close(y, y2, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(x.grad, x2.grad, rtol=2e-5, atol=2e-5)
