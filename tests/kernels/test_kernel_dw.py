"""dW restricted to the mask (SDDMM): native kernels vs scalar reference vs dense autograd.

For a stored entry ``q`` at ``(r, c)``, ``dw[q] = sum_b dy[b, r] * x[b, c]``: the gradient of a
dense masked layer's weight, read at the mask in the order of the format's ``values``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from sparse_cases import ALL_FORMATS, random_case

from sparseforge import kernels, ops
from sparseforge.errors import DataError
from sparseforge.formats import BitmapWeight, BSRWeight, FanInWeight, NMWeight
from sparseforge.formats.csr import CSRWeight, index_dtype
from sparseforge.kernels import native
from test_kernel_ops import _CASE_FMT, WEIGHTS, _op_args

ISAS = [i for i in kernels.ISAS if kernels.cpu_supports(i)]
BATCHES = [1, 3, 17, 64, 257]


def _values(case):
    return case.bufs[0] if ALL_FORMATS[case.fmt][0] in ("nm", "fanin") else case.bufs[2]


def _sddmm(case, x, dy, *, isa="", ref=False):
    kind = ALL_FORMATS[case.fmt][0]
    dw = torch.full(_values(case).shape, float("nan"))
    name = f"{kind}_sddmm_ref" if ref else f"{kind}_sddmm"
    extra = () if ref else (isa,)
    getattr(native(), name)(x, dy, *case.bufs, *case._nm(), dw, *extra)
    return dw


def _format_obj(case):
    """The format object over the case's buffers (index dtypes normalised to the narrowest)."""
    kind = ALL_FORMATS[case.fmt][0]
    rows, cols = case.shape
    if kind == "fanin":
        values, idx = case.bufs
        return FanInWeight((rows, cols), values, idx.to(index_dtype(cols)))
    if kind == "bsr":
        brp, bcol, values = case.bufs
        return BSRWeight((rows, cols), brp, bcol.to(index_dtype(cols // values.shape[2])), values)
    if kind == "nm":
        n, m = case._nm()
        return NMWeight((rows, cols), f"{n}:{m}", *case.bufs)
    if kind == "bitmap":
        return BitmapWeight((rows, cols), case.bufs[0], case.bufs[2])
    return CSRWeight((rows, cols), case.bufs[0], case.bufs[1].to(index_dtype(cols)), case.bufs[2])


def at_stored(weight, full: torch.Tensor) -> torch.Tensor:
    """Entries of a dense (rows, cols) tensor at the stored positions, in the order of ``values``."""
    order = torch.arange(weight.nnz, dtype=torch.float32).reshape(weight.values.shape)
    where = dataclasses.replace(weight, values=order).to_dense()  # value index at each stored position
    mask = weight.mask()
    out = torch.empty(weight.nnz, dtype=full.dtype)
    out[where[mask].long()] = full[mask]
    return out.reshape(weight.values.shape)


@pytest.mark.parametrize("fmt", list(ALL_FORMATS))
@pytest.mark.parametrize("batch", BATCHES)
def test_every_isa_matches_reference_and_dense(fmt, batch):
    case = random_case(fmt, 29, 83, density=0.4, seed=batch)
    gen = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, case.shape[1], generator=gen)
    dy = torch.randn(batch, case.shape[0], generator=gen)
    ref = _sddmm(case, x, dy, ref=True)
    dense = at_stored(_format_obj(case), dy.double().T @ x.double()).float()
    torch.testing.assert_close(ref, dense, rtol=1e-4, atol=1e-4)
    for isa in ISAS:
        torch.testing.assert_close(_sddmm(case, x, dy, isa=isa), ref, rtol=1e-4, atol=1e-4, msg=f"{isa}")


@pytest.mark.parametrize("isa", ISAS)
def test_forced_isa_env_and_odd_shapes(isa, monkeypatch):
    monkeypatch.setenv("SPARSEFORGE_ISA", isa)
    for rows, cols, batch in [(1, 1, 1), (7, 13, 5), (64, 200, 65), (3, 1024, 2)]:
        case = random_case("csr_i32", rows, cols, density=0.3, seed=rows, special_rows=rows > 1)
        x, dy = torch.randn(batch, cols), torch.randn(batch, rows)
        torch.testing.assert_close(_sddmm(case, x, dy), _sddmm(case, x, dy, ref=True), rtol=1e-4, atol=1e-4)


def test_empty_batch_gives_zero_and_empty_weight_is_fine():
    case = random_case("bitmap", 6, 20)
    dw = _sddmm(case, torch.zeros(0, 20), torch.zeros(0, 6))
    assert torch.equal(dw, torch.zeros_like(dw))
    empty = random_case("csr_u16", 4, 9, density=0.0, special_rows=False)
    assert _sddmm(empty, torch.randn(3, 9), torch.randn(3, 4)).numel() == 0


def test_nonfinite_propagates_as_dense():
    case = random_case("bitmap", 8, 32, density=0.5, seed=1)
    x, dy = torch.randn(5, 32), torch.randn(5, 8)
    x[2, 3] = float("nan")
    dy[4, 1] = float("inf")
    dense = at_stored(_format_obj(case), dy.T @ x)  # NaN where column 3 / row 1 are stored, as torch computes it
    for isa in ISAS:
        got = _sddmm(case, x, dy, isa=isa)
        assert torch.equal(got.isnan(), dense.isnan())
        assert torch.equal(got.isinf(), dense.isinf())


def test_shape_errors():
    case = random_case("csr_u16", 5, 16)
    with pytest.raises(ValueError, match="same number of rows"):
        _sddmm(case, torch.randn(3, 16), torch.randn(2, 5))
    with pytest.raises(ValueError, match="weight is 5x16"):
        _sddmm(case, torch.randn(3, 16), torch.randn(3, 6))
    with pytest.raises(ValueError, match="one element per stored value"):
        native().csr_sddmm(torch.randn(3, 16), torch.randn(3, 5), *case.bufs, torch.empty(1))


# ---- through the torch ops / autograd ---------------------------------------------------------

def _weight(name, rows=12, cols=40, seed=0):
    case = random_case(_CASE_FMT[name], rows, cols, density=0.5, seed=seed)
    return WEIGHTS[name](case.dense, case.dense != 0)


def _trainable(weight):
    weight.values.requires_grad_(True)
    return weight


@pytest.mark.parametrize("name", WEIGHTS)
@pytest.mark.parametrize("batch", [1, 17, 64])
def test_value_grad_matches_dense_masked_layer(name, batch):
    weight = _trainable(_weight(name, rows=21, cols=48, seed=batch))
    x = torch.randn(batch, weight.shape[1], requires_grad=True)
    bias = torch.randn(weight.shape[0], requires_grad=True)
    y = ops.linear(x, weight, bias)
    gy = torch.randn_like(y)
    y.backward(gy)
    mask = weight.mask()
    wd = weight.to_dense().detach().float().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    torch.nn.functional.linear(x2, wd * mask, bias.detach()).backward(gy)
    assert weight.values.grad.dtype == weight.values.dtype and weight.values.grad.shape == weight.values.shape
    tol = 2e-2 if weight.dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(weight.values.grad.float(), at_stored(weight, wd.grad), rtol=tol, atol=tol)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore:Input #")
@pytest.mark.parametrize("name", ["csr", "bitmap", "nm_2of4", "fanin", "bsr_2x4"])
def test_gradcheck(name):
    # float32 kernels: finite differences in float32 with a matching step/tolerance
    weight = _weight(name, rows=5, cols=16, seed=2)
    values = weight.values.detach().clone().requires_grad_()
    x = torch.randn(3, 16, requires_grad=True)
    bias = torch.randn(weight.shape[0], requires_grad=True)
    op, args = _op_args(weight, x, bias)
    vi = next(i for i, a in enumerate(args) if a is weight.values)

    def f(x, values, bias):
        a = list(args)
        a[0], a[vi], a[-1] = x, values, bias
        return op(*a)

    assert torch.autograd.gradcheck(f, (x, values, bias), eps=1e-2, atol=2e-2, rtol=2e-2, fast_mode=False)


@pytest.mark.parametrize("name", WEIGHTS)
def test_opcheck_with_trainable_values(name):
    weight = _trainable(_weight(name))
    x = torch.randn(5, weight.shape[1], requires_grad=True)
    op, args = _op_args(weight, x, torch.randn(weight.shape[0], requires_grad=True))
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("name", ["csr", "bitmap", "nm_3of8", "fanin", "bsr_2x4"])
def test_opcheck_dw_op(name):
    weight = _weight(name)
    x, dy = torch.randn(4, weight.shape[1]), torch.randn(4, weight.shape[0])
    op, args = _op_args(weight, x, None)
    dw_op = getattr(ops, op._name + "_dw")
    wargs = args[1:-1]
    torch.library.opcheck(dw_op, (x, dy, *wargs))


def test_dw_op_checks_batches():
    weight = _weight("csr")
    with pytest.raises(DataError, match="same batch"):
        ops.csr_linear_dw(torch.randn(3, 40), torch.randn(2, 12), weight.row_ptr, weight.col, weight.values)


def test_torch_compile_trains_values():
    weight = _trainable(_weight("bitmap", rows=16, cols=48))

    def f(x, values):
        return ops.bitmap_linear(x, weight.bitmap, weight.row_offsets, values, None).square().sum()

    x = torch.randn(6, 48)
    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(x, weight.values)
    loss.backward()
    wd = weight.to_dense().detach().requires_grad_()
    (x @ (wd * weight.mask()).T).square().sum().backward()
    torch.testing.assert_close(weight.values.grad, at_stored(weight, wd.grad), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["csr_u16", "bitmap_bf16", "nm_2of4", "nm_3of8", "fanin"])
def test_wide_layers_walk_several_column_windows(fmt):
    # the SDDMM walks columns in windows of 64K floats / tile width (1024 columns at 64 lanes)
    case = random_case(fmt, 9, 2600, density=0.3, seed=5)
    for batch in (17, 64, 130):
        x, dy = torch.randn(batch, case.shape[1]), torch.randn(batch, case.shape[0])
        ref = _sddmm(case, x, dy, ref=True)
        for isa in ISAS:
            torch.testing.assert_close(_sddmm(case, x, dy, isa=isa), ref, rtol=1e-4, atol=1e-4)
