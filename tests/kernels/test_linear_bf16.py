"""The bf16 panel product (csrc/linear_bf16.h): every path against the scalar oracle and dense torch bf16.

Paths this CPU cannot run are not generated (the supported set is asserted against the CPU flags in
test_paths_match_the_cpu_flags, so a detection bug fails there).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sparse_cases import ALL_FORMATS, make_case, random_case

from sparseforge import kernels
from sparseforge.errors import ConfigError

FORMATS = ("bitmap", "bitmap_bf16", "nm_2of4", "nm_2of4_bf16", "nm_1of4", "nm_3of8", "nm_2of3", "csr_u16", "csr_i32",
           "csr_bf16")
PATHS = tuple(p for p in kernels.BF16_PATHS if kernels.bf16_path_supported(p))


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def run_bf16(case, x: torch.Tensor, bias=None, path: str = "", ref: bool = False) -> torch.Tensor:
    """y (B, out) float32 from the native bf16 product (or its oracle) on x rounded to bf16."""
    kind, _, n, m = ALL_FORMATS[case.fmt]
    xb = x.to(torch.bfloat16).contiguous().view(torch.uint16).numpy()
    y = torch.full((x.shape[0], case.shape[0]), float("nan"))
    nm = (n, m) if kind == "nm" else ()
    fn = getattr(kernels.native(), f"{kind}_linear_bf16" + ("_ref" if ref else ""))
    if ref:
        fn(xb, *case.bufs, *nm, bias, y.numpy())
    else:
        fn(xb, *case.bufs, *nm, bias, y.numpy(), path)
    return y


def dense_bf16(case, x: torch.Tensor, bias=None) -> torch.Tensor:
    """torch's dense product on bf16-rounded operands, float64 accumulation."""
    w = case.dense.to(torch.bfloat16).double()
    y = x.to(torch.bfloat16).double() @ w.T
    return y if bias is None else y + bias.double()


def assert_close_to_ref(y: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, case) -> None:
    # float32 sums in another order: error bound ~ cols * eps * sum |x| |w|
    scale = x.to(torch.bfloat16).double().abs() @ case.dense.to(torch.bfloat16).double().abs().T
    tol = 1e-6 * case.shape[1] * scale + 1e-6
    assert torch.all((y.double() - ref.double()).abs() <= tol), (y - ref).abs().max()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows,cols,batch", [(33, 100, 16), (47, 520, 17), (1, 37, 64), (64, 1030, 65), (5, 64, 1)])
def test_kernel_matches_oracle_and_dense_bf16(path, fmt, rows, cols, batch):
    case = random_case(fmt, rows, cols, density=0.45, seed=rows + cols)
    x = torch.randn(batch, case.shape[1], generator=torch.Generator().manual_seed(batch))
    bias = torch.randn(case.shape[0])
    y = run_bf16(case, x, bias, path)
    ref = run_bf16(case, x, bias, ref=True)
    assert_close_to_ref(y, ref, x, case)
    torch.testing.assert_close(y.double(), dense_bf16(case, x, bias), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=25, deadline=None)
@given(
    fmt=st.sampled_from(FORMATS),
    rows=st.integers(1, 70),
    cols=st.integers(1, 600),
    batch=st.integers(1, 140),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_property_any_shape_matches_oracle(path, fmt, rows, cols, batch, density, seed):
    case = random_case(fmt, rows, cols, density=density, seed=seed)
    x = torch.randn(batch, case.shape[1], generator=torch.Generator().manual_seed(seed))
    y = run_bf16(case, x, path=path)
    assert_close_to_ref(y, run_bf16(case, x, ref=True), x, case)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fmt", ("bitmap", "nm_2of4_bf16", "csr_u16"))
def test_nonfinite_x_propagates_like_dense(path, fmt):
    case = random_case(fmt, 20, 96, density=0.3, seed=3)
    x = torch.randn(18, 96)
    x[2, 5] = float("inf")
    x[7, 40] = float("nan")
    y = run_bf16(case, x, path=path)
    want = dense_bf16(case, x).float()  # 0 * inf = NaN where a row does not store column 5
    assert torch.equal(torch.isnan(y), torch.isnan(want))
    finite = ~torch.isnan(want)
    torch.testing.assert_close(y[finite], want[finite], rtol=1e-4, atol=1e-4)


def test_float32_values_round_to_nearest_even_like_torch():
    case = random_case("bitmap", 8, 64, density=1.0, seed=1, special_rows=False)
    x = torch.ones(16, 64)
    y = run_bf16(case, x, path="scalar")
    torch.testing.assert_close(y.double(), dense_bf16(case, x), rtol=1e-6, atol=1e-5)
    # the product with float32 values differs from it: the rounding is not a no-op
    assert not torch.allclose(y.double(), x.double() @ case.dense.double().T, rtol=1e-6, atol=1e-6)


def test_paths_match_the_cpu_flags():
    flags = _cpu_flags()
    assert "scalar" in PATHS
    vec = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512_vbmi2"} <= flags
    assert ("avx512_bf16" in PATHS) == vec
    assert ("amx" in PATHS) == (vec and {"amx_tile", "amx_bf16"} <= flags)
    assert kernels.native().bf16_best_path() == PATHS[-1]


def test_forced_path_and_errors(monkeypatch):
    monkeypatch.delenv("SPARSEFORGE_BF16_PATH", raising=False)
    assert kernels.bf16_path() == PATHS[-1]
    for p in PATHS:
        monkeypatch.setenv("SPARSEFORGE_BF16_PATH", p)
        assert kernels.bf16_path() == p
    monkeypatch.setenv("SPARSEFORGE_BF16_PATH", "fp8")
    with pytest.raises(ConfigError, match="not a bf16 kernel path"):
        kernels.bf16_path()
    case = random_case("bitmap", 4, 32)
    with pytest.raises(ConfigError, match="SPARSEFORGE_BF16_PATH"):
        run_bf16(case, torch.randn(16, 32))
    missing = [p for p in kernels.BF16_PATHS if p not in PATHS]
    for p in missing:
        monkeypatch.setenv("SPARSEFORGE_BF16_PATH", p)
        with pytest.raises(ConfigError, match="lacks|no such path"):
            kernels.bf16_path()
    with pytest.raises(ConfigError, match="unknown bf16 kernel path"):
        kernels.bf16_path_supported("amx2")


def test_bad_arguments_are_clear_errors():
    case = random_case("bitmap", 4, 32)
    native = kernels.native()
    y = torch.empty(16, 4)
    with pytest.raises(ValueError, match="bfloat16"):
        native.bitmap_linear_bf16(torch.randn(16, 32).double().numpy(), *case.bufs, None, y.numpy())  # float32 and bf16 only
    xb = torch.randn(16, 32).bfloat16().view(torch.uint16).numpy()
    with pytest.raises(ValueError, match="one column per weight row"):
        native.bitmap_linear_bf16(xb, *case.bufs, None, torch.empty(16, 5).numpy())
    with pytest.raises(ValueError, match="as many rows"):
        native.bitmap_linear_bf16(xb, *case.bufs, None, torch.empty(15, 4).numpy())



def test_each_path_really_runs_its_own_code():
    """Float32 sums in a different order give different last bits: forced paths are not silently the same kernel."""
    case = random_case("bitmap_bf16", 64, 1024, density=0.5, seed=7)
    x = torch.randn(64, 1024, generator=torch.Generator().manual_seed(7))
    outs = {p: run_bf16(case, x, path=p) for p in PATHS}
    for a in PATHS:
        for b in PATHS:
            if a < b:
                assert not torch.equal(outs[a], outs[b]), (a, b)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fmt", ("bitmap_bf16", "nm_2of4", "csr_u16"))
def test_column_blocks_over_groups_of_row_blocks(path, fmt):
    """in > kBf16AmxColBlock (4096): AMX sweeps each column block over groups of up to 8 row blocks with
    the accumulators parked in scratch; 300 rows = two groups, the last block partial; batch 33 = three
    batch tiles (one unpaired)."""
    case = random_case(fmt, 300, 9000, density=0.1, seed=9)
    x = torch.randn(33, case.shape[1], generator=torch.Generator().manual_seed(9))
    bias = torch.randn(case.shape[0])
    y = run_bf16(case, x, bias, path)
    assert_close_to_ref(y, run_bf16(case, x, bias, ref=True), x, case)
    torch.testing.assert_close(y.double(), dense_bf16(case, x, bias), rtol=1e-4, atol=1e-4)


def _float32_x_edge_values(batch: int, cols: int, seed: int) -> torch.Tensor:
    """x (batch, cols) float32 mixing values the bf16 rounding must get exactly right: ties to even both
    ways, just off a tie, float32 subnormals (some round up to the smallest normal), -0, large finite."""
    gen = torch.Generator().manual_seed(seed)
    bits = [0x3F808000, 0x3F818000, 0x3F808001, 0x3F817FFF, 0x007FFFFF, 0x00400000, 0x80000001, 0x80000000,
            0x7F7F7FFF, 0xC2F6FFFF]
    ulp_half = torch.tensor([b - (1 << 32) if b >= 1 << 31 else b for b in bits], dtype=torch.int32).view(torch.float32)
    x = torch.randn(batch, cols, generator=gen) * 4
    pick = torch.randint(0, 3, (batch, cols), generator=gen) == 0
    x[pick] = ulp_half[torch.randint(0, len(ulp_half), (int(pick.sum()),), generator=gen)]
    return x


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=15, deadline=None)
@given(batch=st.integers(1, 70), cols=st.integers(1, 200), seed=st.integers(0, 2**16))
def test_property_float32_x_packs_to_the_bits_of_torch_rounding(path, batch, cols, seed):
    """The packing of float32 x (vector or portable) rounds like torch's .to(bfloat16), bit for bit, at
    any batch and width (partial batch tiles, odd `in`): with an identity weight y is the packed x."""
    eye = torch.eye(cols)
    case = make_case("bitmap_bf16", eye, eye.bool())
    x = _float32_x_edge_values(batch, cols, seed)
    ys = []
    for xin in (x.contiguous().numpy(), x.to(torch.bfloat16).view(torch.uint16).numpy()):
        y = torch.full((batch, cols), float("nan"))
        kernels.native().bitmap_linear_bf16(xin, *case.bufs, None, y.numpy(), path)
        ys.append(y)
    assert torch.equal(ys[0].view(torch.int32), ys[1].view(torch.int32))
    want = x.to(torch.bfloat16).float()
    if path != "scalar":  # AMX and vdpbf16ps read bf16 subnormals as zero
        want = torch.where(want.abs() < torch.finfo(torch.float32).tiny, torch.zeros_like(want), want)
    assert torch.equal(ys[0], want)
