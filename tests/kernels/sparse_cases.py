"""Test helpers: one random weight in every kernel format, with its native kernels and oracles.

A ``Case`` holds the raw buffers of a format (built through the format classes where they allow
it, by hand for int32-index CSR on a narrow matrix) and ``dense``: the float32 dense weight the
kernels must reproduce (pruned entries 0, bf16 values already rounded).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparseforge.formats import BitmapWeight, BSRWeight, FanInWeight, NMWeight
from sparseforge.formats.csr import CSRWeight
from sparseforge.kernels import native

# name -> (kind, value dtype, n, m)
FORMATS = {
    "csr_u16": ("csr", torch.float32, 0, 0),
    "csr_i32": ("csr", torch.float32, 0, 0),
    "csr_bf16": ("csr", torch.bfloat16, 0, 0),
    "bitmap": ("bitmap", torch.float32, 0, 0),
    "bitmap_bf16": ("bitmap", torch.bfloat16, 0, 0),
    "nm_2of4": ("nm", torch.float32, 2, 4),
    "nm_2of4_bf16": ("nm", torch.bfloat16, 2, 4),
    "nm_1of4": ("nm", torch.float32, 1, 4),
    "nm_3of8": ("nm", torch.float32, 3, 8),
    "nm_2of3": ("nm", torch.float32, 2, 3),
}
# constant fan-in and BSR (kind, value dtype, block h, block w); kept apart from FORMATS because
# their masks are constrained (equal row counts / whole blocks), which the shape-fixed tests of
# test_native_kernels.py do not respect
STRUCTURED = {
    "fanin": ("fanin", torch.float32, 0, 0),
    "fanin_i32": ("fanin", torch.float32, 0, 0),
    "fanin_bf16": ("fanin", torch.bfloat16, 0, 0),
    "bsr_1x1": ("bsr", torch.float32, 1, 1),
    "bsr_2x4": ("bsr", torch.float32, 2, 4),
    "bsr_4x4": ("bsr", torch.float32, 4, 4),
    "bsr_2x8_bf16": ("bsr", torch.bfloat16, 2, 8),
    "bsr_8x2": ("bsr", torch.float32, 8, 2),
    "bsr_4x16": ("bsr", torch.float32, 4, 16),
    "bsr_3x5_bf16": ("bsr", torch.bfloat16, 3, 5),
    "bsr_1x32_i32": ("bsr", torch.float32, 1, 32),
}
ALL_FORMATS = {**FORMATS, **STRUCTURED}


def nm_of(fmt: str) -> tuple[int, int]:
    return ALL_FORMATS[fmt][2], ALL_FORMATS[fmt][3]


def random_mask(fmt: str, rows: int, cols: int, density: float, gen: torch.Generator) -> torch.Tensor:
    """A keep-mask valid for ``fmt``: Bernoulli(density), or n of every m (some groups short)."""
    kind, _, n, m = ALL_FORMATS[fmt]
    if kind == "fanin":  # every row keeps the same k = round(density * cols) columns
        k = round(density * cols)
        order = torch.rand(rows, cols, generator=gen).argsort(dim=1)[:, :k]
        return torch.zeros(rows, cols, dtype=torch.bool).scatter_(1, order, True)
    if kind == "bsr":  # whole h x w blocks, each ~density full (partly kept blocks store zeros)
        on = torch.rand(rows // n, 1, cols // m, 1, generator=gen) < density
        inner = torch.rand(rows // n, n, cols // m, m, generator=gen) < 0.9
        return (on & inner).reshape(rows, cols)
    if kind != "nm":
        return torch.rand(rows, cols, generator=gen) < density
    scores = torch.rand(rows, cols // m, m, generator=gen)
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(2, scores.topk(n, dim=2).indices, True)
    keep &= torch.rand(rows, cols // m, 1, generator=gen) < 0.9  # ~10% of groups keep nothing
    return keep.reshape(rows, cols)


@dataclass
class Case:
    fmt: str
    dense: torch.Tensor  # float32 (rows, cols): what the kernels must compute with
    bufs: tuple

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.dense.shape)

    def _nm(self) -> tuple:
        return nm_of(self.fmt) if ALL_FORMATS[self.fmt][0] == "nm" else ()

    def _call(self, name: str, a: torch.Tensor, *rest, **kw) -> None:
        kind = ALL_FORMATS[self.fmt][0]
        getattr(native(), f"{kind}_{name}")(a, *self.bufs, *self._nm(), *rest, **kw)

    def run(self, x: torch.Tensor, bias=None, *, isa: str = "", algo: str = "auto", **tile) -> torch.Tensor:
        """The dispatched forward; ``tile``: the lanes kernels' ``col_tile`` / ``block_rows``."""
        y = torch.full((x.shape[0], self.shape[0]), float("nan"))
        self._call("linear", x, bias, y, isa, algo, **tile)
        return y

    def ref(self, x: torch.Tensor, bias=None) -> torch.Tensor:
        y = torch.full((x.shape[0], self.shape[0]), float("nan"))
        self._call("linear_ref", x, bias, y)
        return y

    def run_t(self, dy: torch.Tensor, *, isa: str = "") -> torch.Tensor:
        dx = torch.full((dy.shape[0], self.shape[1]), float("nan"))
        self._call("linear_t", dy, dx, isa)
        return dx

    def ref_t(self, dy: torch.Tensor) -> torch.Tensor:
        dx = torch.full((dy.shape[0], self.shape[1]), float("nan"))
        self._call("linear_t_ref", dy, dx)
        return dx


def make_case(fmt: str, w: torch.Tensor, mask: torch.Tensor) -> Case:
    """Compress float32 ``w`` (rows, cols) kept at ``mask`` into ``fmt``."""
    kind, dtype, n, m = ALL_FORMATS[fmt]
    w = w.to(dtype)
    if kind == "fanin":
        fw = FanInWeight.from_dense(w, mask)
        idx = fw.indices.to(torch.int32) if fmt.endswith("_i32") else fw.indices
        return Case(fmt, fw.to_dense().float(), (fw.values, idx))
    if kind == "bsr":
        bw = BSRWeight.from_dense(w, (n, m), mask)
        col = bw.block_col.to(torch.int32) if fmt.endswith("_i32") else bw.block_col
        return Case(fmt, bw.to_dense().float(), (bw.block_row_ptr, col, bw.values))
    if kind == "csr":
        cw = CSRWeight.from_dense(w, mask)
        col = cw.col.to(torch.int32) if fmt == "csr_i32" else cw.col
        return Case(fmt, cw.to_dense().float(), (cw.row_ptr, col, cw.values))
    if kind == "bitmap":
        bw = BitmapWeight.from_dense(w, mask)
        return Case(fmt, bw.to_dense().float(), (bw.bitmap, bw.row_offsets, bw.values))
    nw = NMWeight.from_dense(w, f"{n}:{m}", mask)
    return Case(fmt, nw.to_dense().float(), (nw.values, nw.indices))


def random_case(fmt: str, rows: int, cols: int, density: float = 0.4, seed: int = 0, special_rows: bool = True) -> Case:
    """Random weight; with special_rows, row 0 is empty and row 1 fully kept (when they exist)."""
    gen = torch.Generator().manual_seed(seed)
    kind, _, n, m = ALL_FORMATS[fmt]
    if kind == "nm":
        cols = max(m, cols - cols % m)
    if kind == "bsr":
        rows, cols = max(n, rows - rows % n), max(m, cols - cols % m)
    w = torch.randn(rows, cols, generator=gen)
    mask = random_mask(fmt, rows, cols, density, gen)
    if special_rows and rows > 1 and kind in ("csr", "bitmap", "nm"):
        mask[0] = False
        if kind != "nm":
            mask[1] = True
    return make_case(fmt, w, mask)


def exact_dense(x: torch.Tensor, dense: torch.Tensor, bias=None) -> torch.Tensor:
    """x @ dense^T with IEEE semantics for every product (0 * inf = NaN), in float64."""
    y = (x.double()[:, None, :] * dense.double()[None, :, :]).sum(-1)  # (B, rows)
    return y if bias is None else y + bias.double()
