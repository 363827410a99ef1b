"""Hostile index buffers for every public sparse op: a ``SparseforgeError`` or the correct result.

Each example builds a valid weight of one format, corrupts one index buffer (a hostile value at a
random position: out of range, negative, 2^31-1, -2^31, 60000 in uint16, a swap that breaks the
ascending order, a shifted row pointer, a flipped bitmap / N:M index bit) and calls the forward,
transposed and dW ops on it. An independent Python decoder (below, written from the layouts in
``csrc/*.h``) says whether the corrupted buffers still describe a weight: if so, the op must return
the dense product with that weight; if not, it must raise a ``SparseforgeError`` (``ModelError``).
Reads outside the buffers are what ``make test-asan`` runs this file for; the issue's reproducers
run in subprocesses at the end, so a segfault fails a test instead of ending the run.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparseforge.ops as ops
from sparseforge.errors import DataError, ModelError, SparseforgeError
from sparseforge.formats import BitmapWeight, BSRWeight, FanInWeight, NMWeight
from sparseforge.formats.csr import CSRWeight
from sparseforge.moe.native import expert_ffn, moe_expert_ffn

HOSTILE = (-1, -(2**31), 2**31 - 1, 60000, 65535, 1 << 16, 7, 0)
TOL = dict(rtol=1e-4, atol=1e-4)
SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---- independent decoders: (rows, cols, buffers) -> [(r, c, q)] entries, or None if invalid ----

def _ascending_in(seq: list[int], hi: int) -> bool:
    return all(0 <= c < hi for c in seq) and all(a < b for a, b in zip(seq, seq[1:]))


def _pointers_ok(ptr: list[int], total: int) -> bool:
    return ptr[0] == 0 and ptr[-1] == total and all(a <= b for a, b in zip(ptr, ptr[1:]))


def decode_csr(rows, cols, row_ptr, col, values):
    rp, cl = row_ptr.tolist(), col.tolist()
    if len(rp) != rows + 1 or not _pointers_ok(rp, len(cl)):
        return None
    if col.dtype == torch.int16 or col.dtype == torch.uint16:
        cl = [c & 0xFFFF for c in cl]
    out = []
    for r in range(rows):
        seg = cl[rp[r]:rp[r + 1]]
        if not _ascending_in(seg, cols):
            return None
        out += [(r, c, rp[r] + i) for i, c in enumerate(seg)]
    return out


def decode_fanin(rows, cols, values, indices):
    k = indices.shape[1]
    ix = indices.tolist()
    out = []
    for r in range(rows):
        if not _ascending_in(ix[r], cols):
            return None
        out += [(r, c, r * k + i) for i, c in enumerate(ix[r])]
    return out


def decode_bitmap(rows, cols, bitmap, row_offsets, values):
    ro = row_offsets.tolist()
    if not _pointers_ok(ro, values.numel()):
        return None
    out = []
    for r in range(rows):
        row = bitmap[r].tolist()
        kept = [j for j in range(8 * len(row)) if (row[j // 8] >> (j % 8)) & 1]
        if any(j >= cols for j in kept) or len(kept) != ro[r + 1] - ro[r]:
            return None
        out += [(r, c, ro[r] + i) for i, c in enumerate(kept)]
    return out


def decode_nm(rows, cols, values, indices, n, m):
    b = max(1, (m - 1).bit_length())
    vpr = cols // m * n
    out = []
    for r in range(rows):
        stream = indices[r].tolist()
        pos = [sum(((stream[(v * b + t) // 8] >> ((v * b + t) % 8)) & 1) << t for t in range(b)) for v in range(vpr)]
        for g in range(cols // m):
            grp = pos[g * n:(g + 1) * n]
            if not _ascending_in(grp, m):
                return None
            out += [(r, g * m + p, r * vpr + g * n + i) for i, p in enumerate(grp)]
    return out


def decode_bsr(rows, cols, block_row_ptr, block_col, values):
    h, w = values.shape[1], values.shape[2]
    brp, bc = block_row_ptr.tolist(), block_col.tolist()
    if not _pointers_ok(brp, len(bc)):
        return None
    out = []
    for R in range(rows // h):
        seg = bc[brp[R]:brp[R + 1]]
        if not _ascending_in(seg, cols // w):
            return None
        for bi, C in enumerate(seg):
            blk = brp[R] + bi
            out += [(R * h + i, C * w + jj, (blk * h + i) * w + jj) for i in range(h) for jj in range(w)]
    return out


# ---- one weight per format, as op buffers -------------------------------------------------------

def _weight(fmt: str, rows: int, cols: int, seed: int):
    """(op prefix, buffer tuple, statics, decoder) of a valid random weight."""
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(rows, cols, generator=g)
    keep = torch.rand(rows, cols, generator=g) < 0.4  # (rows, cols)
    if fmt == "csr":
        w = CSRWeight.from_dense(dense, keep)
        return (w.row_ptr.clone(), w.col.clone(), w.values.clone()), (), decode_csr
    if fmt == "bitmap":
        w = BitmapWeight.from_dense(dense, keep)
        return (w.bitmap.clone(), w.row_offsets.clone(), w.values.clone()), (), decode_bitmap
    if fmt == "nm24" or fmt == "nm23":
        n, m = (2, 4) if fmt == "nm24" else (2, 3)
        cols -= cols % m
        scores = torch.rand(rows, cols // m, m, generator=g)  # n kept of every m
        nm_keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(2, scores.topk(n, dim=2).indices, True)
        w = NMWeight.from_dense(dense[:, :cols], f"{n}:{m}", nm_keep.reshape(rows, cols))
        return (w.values.clone(), w.indices.clone()), (n, m), decode_nm
    if fmt == "fanin":
        order = torch.rand(rows, cols, generator=g).argsort(dim=1)[:, : cols // 3]  # k = cols / 3 per row
        w = FanInWeight.from_dense(dense, torch.zeros(rows, cols, dtype=torch.bool).scatter_(1, order, True))
        return (w.values.clone(), w.indices.clone()), (), decode_fanin
    if fmt == "bsr":
        w = BSRWeight.from_dense(dense[: rows - rows % 2], "block2x4", keep[: rows - rows % 2])
        return (w.block_row_ptr.clone(), w.block_col.clone(), w.values.clone()), (), decode_bsr
    raise AssertionError(fmt)


OP_PREFIX = {"csr": "csr", "bitmap": "bitmap", "nm24": "nm", "nm23": "nm", "fanin": "fanin", "bsr": "bsr"}
INDEX_BUFFER = {"csr": (1, 0), "bitmap": (0, 1), "nm24": (1,), "nm23": (1,), "fanin": (1,), "bsr": (1, 0)}


def _corrupt(t: torch.Tensor, data) -> torch.Tensor:
    """t with one hostile change drawn by hypothesis (dtype kept where it can hold the value)."""
    flat = t.reshape(-1).to(torch.int64)
    if flat.numel() == 0:
        return t
    kind = data.draw(st.sampled_from(["value", "swap", "bit", "shift"]))
    i = data.draw(st.integers(0, flat.numel() - 1))
    if kind == "value":
        flat[i] = data.draw(st.sampled_from(HOSTILE + (int(flat.max()) + 1,)))
    elif kind == "swap" and flat.numel() > 1:
        j = data.draw(st.integers(0, flat.numel() - 1))
        flat[i], flat[j] = int(flat[j]), int(flat[i])
    elif kind == "bit":
        flat[i] ^= 1 << data.draw(st.integers(0, 7))
    else:
        flat[i] += data.draw(st.sampled_from([-2, -1, 1, 2]))
    if t.dtype == torch.uint8:
        flat &= 0xFF
    elif t.dtype == torch.uint16:
        flat &= 0xFFFF
    elif t.dtype == torch.int32:
        flat = ((flat + 2**31) % 2**32) - 2**31
    dtype = t.dtype
    if dtype == torch.uint16:  # the value may need the signed 32-bit type the ops also accept
        if data.draw(st.booleans()):
            dtype = torch.int32
    return flat.to(dtype).reshape(t.shape)


def _expect(call, entries, reference):
    """entries None (invalid buffers): a SparseforgeError; else the op's result equals reference()."""
    if entries is None:
        with pytest.raises(SparseforgeError):
            call()
    else:
        torch.testing.assert_close(call(), reference(), **TOL)


@pytest.mark.parametrize("fmt", list(OP_PREFIX))
@SETTINGS
@given(rows=st.integers(2, 10), cols=st.sampled_from([8, 16, 24, 48]), batch=st.sampled_from([1, 5]),
       seed=st.integers(0, 2**16), data=st.data())
def test_hostile_index_buffers_raise_or_compute_correctly(fmt, rows, cols, batch, seed, data):
    if fmt == "bsr":
        rows -= rows % 2  # whole 2x4 blocks
    bufs, statics, decode = _weight(fmt, rows, cols, seed)
    pos = data.draw(st.sampled_from(INDEX_BUFFER[fmt]))
    bufs = list(bufs)
    bufs[pos] = _corrupt(bufs[pos], data)
    bufs = tuple(bufs)
    cols_w = cols - cols % statics[1] if statics else cols
    entries = decode(rows, cols_w, *bufs, *statics)
    values = bufs[0] if fmt in ("nm24", "nm23", "fanin") else bufs[-1]
    dense = torch.zeros(rows, cols_w)
    flat_vals = values.reshape(-1).float()
    for r, c, q in entries or ():
        dense[r, c] = flat_vals[q]
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, cols_w, generator=g)
    dy = torch.randn(batch, rows, generator=g)
    prefix = OP_PREFIX[fmt]
    lin, lin_t, lin_dw = (getattr(ops, f"{prefix}_linear{s}") for s in ("", "_t", "_dw"))

    def dw_ref():
        dw = torch.zeros(values.numel())
        for r, c, q in entries:
            dw[q] = (dy[:, r] * x[:, c]).sum()
        return dw.reshape(values.shape)

    _expect(lambda: lin(x, *bufs, *statics, None), entries, lambda: x @ dense.T)
    _expect(lambda: lin_t(dy, *bufs, *statics, cols_w), entries, lambda: dy @ dense)
    _expect(lambda: lin_dw(x, dy, *bufs, *statics), entries, dw_ref)


@pytest.mark.parametrize("bad", [-2, 3, 2**31 - 1, 2**62, -(2**63)])
@pytest.mark.parametrize("custom_op", [False, True])
def test_expert_ids_outside_the_experts_raise(bad, custom_op):
    E, d, h = 3, 4, 5
    x, w_up, w_down = torch.randn(2, d), torch.randn(E, d, h), torch.randn(E, h, d)
    experts = torch.tensor([[0, 1], [2, bad]])
    weights = torch.full((2, 2), 0.5)
    call = moe_expert_ffn if custom_op else expert_ffn
    args = (x, experts, weights, w_up, w_down, None, "silu", False)
    with pytest.raises(DataError, match=f"expert id {bad}"):
        call(*args)


def test_format_object_fast_path_checks_its_buffers_once():
    # ops.linear on a format object checks its buffers natively once, then skips the scans: an
    # object that bypassed the constructor's checks is still refused
    dense = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]])
    w = CSRWeight((2, 3), torch.tensor([0, 2, 3], dtype=torch.int32), torch.tensor([0, 2, 1], dtype=torch.uint16),
                  torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(ops.linear(torch.ones(1, 3), w), torch.ones(1, 3) @ dense.T)
    hostile = CSRWeight.__new__(CSRWeight)  # bypass the constructor's checks, as a corrupt object would
    object.__setattr__(hostile, "shape", (2, 3))
    object.__setattr__(hostile, "row_ptr", torch.tensor([0, 2, 3], dtype=torch.int32))
    object.__setattr__(hostile, "col", torch.tensor([-5, 2, 1], dtype=torch.int32))
    object.__setattr__(hostile, "values", torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ModelError, match=r"csr_check: col\[0\] = -5 is outside \[0, 3\)"):
        ops.linear(torch.ones(1, 3), hostile)


# ---- the reproducers of issue 12, each in a fresh interpreter ------------------------------------

REPRODUCERS = {
    "csr_col_int32_max": (
        "o.csr_linear(torch.zeros(3,64), torch.tensor([0,4]+[4]*47, dtype=torch.int32), "
        "torch.full((4,), 2**31-1, dtype=torch.int32), torch.ones(4), None)",
        r"csr_linear: col\[0\] = 2147483647 is outside \[0, 64\)",
    ),
    "csr_col_uint16_60000": (
        "o.csr_linear(torch.zeros(3,64), torch.tensor([0,4]+[4]*47, dtype=torch.int32), "
        "torch.tensor([1,2,3,60000], dtype=torch.uint16), torch.ones(4), None)",
        r"csr_linear: col\[3\] = 60000 is outside \[0, 64\)",
    ),
    "csr_row_ptr_decreasing": (
        "o.csr_linear(torch.zeros(3,8), torch.tensor([0,4,1,4], dtype=torch.int32), "
        "torch.tensor([0,1,2,3], dtype=torch.int32), torch.ones(4), None)",
        r"row_ptr\[2\] = 1 is below row_ptr\[1\] = 4",
    ),
    "fanin_index_int32_max": (
        "o.fanin_linear(torch.zeros(3,64), torch.ones(2,2), torch.tensor([[0,2**31-1],[1,2]], dtype=torch.int32), None)",
        r"fanin_linear: indices\[1\] = 2147483647 is outside \[0, 64\)",
    ),
    "fanin_index_int32_min": (
        "o.fanin_linear(torch.zeros(3,64), torch.ones(2,2), torch.tensor([[-2**31,1],[1,2]], dtype=torch.int32), None)",
        r"fanin_linear: indices\[0\] = -2147483648 is outside \[0, 64\)",
    ),
    "fanin_index_uint16_60000": (
        "o.fanin_linear(torch.zeros(3,64), torch.ones(2,2), torch.tensor([[0,60000],[1,2]], dtype=torch.uint16), None)",
        r"fanin_linear: indices\[1\] = 60000 is outside \[0, 64\)",
    ),
    "bsr_block_col_int32_max": (
        "o.bsr_linear(torch.zeros(3,64), torch.tensor([0,1], dtype=torch.int32), "
        "torch.tensor([2**31-1], dtype=torch.int32), torch.ones(1,2,4), None)",
        r"bsr_linear: block_col\[0\] = 2147483647 is outside \[0, 16\)",
    ),
    "bitmap_row_offsets_past_values": (
        "o.bitmap_linear(torch.zeros(3,8), torch.tensor([[255],[0]], dtype=torch.uint8), "
        "torch.tensor([0,0,8]), torch.ones(8), None)",
        r"bitmap_linear: row_offsets\[1\] - row_offsets\[0\] = 0 but bitmap row 0 keeps 8 entries",
    ),
    "nm_position_past_group": (
        "o.nm_linear(torch.zeros(3,6), torch.ones(1,4), torch.tensor([[0xff]], dtype=torch.uint8), 2, 3, None)",
        r"nm_linear: indices row 0 stores position 3",
    ),
    "csr_dw_col_int32_max": (
        "o.csr_linear_dw(torch.zeros(3,64), torch.zeros(3,1), torch.tensor([0,1], dtype=torch.int32), "
        "torch.tensor([2**31-1], dtype=torch.int32), torch.ones(1))",
        r"csr_sddmm: col\[0\] = 2147483647",
    ),
    "csr_t_col_int32_max": (
        "o.csr_linear_t(torch.zeros(3,1), torch.tensor([0,1], dtype=torch.int32), "
        "torch.tensor([2**31-1], dtype=torch.int32), torch.ones(1), 64)",
        r"csr_linear_t: col\[0\] = 2147483647",
    ),
}


@pytest.mark.parametrize("name", list(REPRODUCERS))
def test_issue_reproducer_raises_model_error_in_a_subprocess(name):
    call, message = REPRODUCERS[name]
    code = textwrap.dedent(f"""
        import torch, sparseforge.ops as o
        from sparseforge.errors import ModelError
        try:
            y = {call}
        except ModelError as e:
            print("ModelError:", e)
        else:
            print("no error:", y)
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"exit {run.returncode} (a crash?): {run.stderr[-2000:]}"
    out = run.stdout.strip()
    assert out.startswith("ModelError:"), out
    assert "\n" not in out, "the error message must be one line"
    import re

    assert re.search(message, out), out
