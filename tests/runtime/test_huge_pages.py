"""sparseforge.runtime.huge_pages: copies in 2 MB-aligned memory advised for huge pages (equal contents, every dtype,
the original where the copy does not apply), and ColumnSparseLinear's buffers placed there with results unchanged."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from sparseforge.activation import ColumnSparseLinear
from sparseforge.runtime.huge_pages import HUGE_PAGE_BYTES, huge_pages_available, on_huge_pages


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read()
    except OSError:
        return "[never]"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8, torch.int64])
def test_copy_is_equal_aligned_and_independent(dtype, monkeypatch):
    monkeypatch.delenv("SPARSEFORGE_HUGE_PAGES", raising=False)
    n = 3 * HUGE_PAGE_BYTES // torch.empty((), dtype=dtype).element_size() + 7
    t = (torch.arange(n) % 101).to(dtype).reshape(-1, 1)  # (n, 1)
    h = on_huge_pages(t)
    assert h.dtype == t.dtype and h.shape == t.shape and torch.equal(h, t)
    assert huge_pages_available() == ("[never]" not in _thp_mode())
    if huge_pages_available():
        assert h.data_ptr() != t.data_ptr() and h.data_ptr() % HUGE_PAGE_BYTES == 0
        h[0, 0] = 5
        assert t[0, 0] == 0  # a copy
    for other in (copy.deepcopy(h), pickle.loads(pickle.dumps(h)), h.clone()):
        assert torch.equal(other, h)


def test_the_tensor_itself_where_the_copy_does_not_apply(monkeypatch):
    small = torch.ones(10)
    assert on_huge_pages(small) is small  # under 2 MB
    strided = torch.ones(2048, 1024)[:, ::2]
    assert on_huge_pages(strided) is strided  # not contiguous
    big = torch.ones(HUGE_PAGE_BYTES)
    monkeypatch.setenv("SPARSEFORGE_HUGE_PAGES", "0")
    assert not huge_pages_available() and on_huge_pages(big) is big


def test_column_layer_buffers_on_huge_pages_compute_the_same(monkeypatch):
    torch.manual_seed(0)
    lin = nn.Linear(1024, 2048)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(2048, 1024) >= 0.5)
    monkeypatch.setenv("SPARSEFORGE_HUGE_PAGES", "0")
    plain = ColumnSparseLinear.from_linear(lin, threshold=0.3)
    monkeypatch.delenv("SPARSEFORGE_HUGE_PAGES")
    huge = ColumnSparseLinear.from_linear(lin, threshold=0.3)
    if huge_pages_available():
        assert huge.values.data_ptr() % HUGE_PAGE_BYTES == 0  # 4 MB of values copied; the 256 KB bitmap is not
        assert huge.bitmap.numel() * 8 < HUGE_PAGE_BYTES and plain.values.data_ptr() != huge.values.data_ptr()
    x = torch.randn(3, 1024)
    with torch.inference_mode():
        assert torch.equal(huge(x), plain(x))
        assert torch.equal(huge.bound_gemv()(x[:1]), plain(x[:1]))
    assert torch.equal(copy.deepcopy(huge).values, plain.values)
