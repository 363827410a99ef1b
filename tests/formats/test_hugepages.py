"""Format buffers built by from_dense are backed by transparent huge pages where the OS allows it."""

from __future__ import annotations

import importlib
import copy
import json
import pickle
import re

import pytest
import torch

from sparseforge.formats import BitmapWeight, NMWeight
from sparseforge.formats.csr import CSRWeight
from sparseforge.formats.memory import MIN_BYTES, hugepage_backed, hugepage_copy, hugepages_available
from sparseforge.masks import mask_from_scores


def _advised_huge(t: torch.Tensor) -> bool:
    """Whether the mapping holding ``t`` is advised MADV_HUGEPAGE (``hg`` in its smaps VmFlags).

    Whether the kernel then backs it with 2 MB pages depends on free contiguous memory at that
    moment (under memory pressure it falls back to 4 KB pages), so the advice is what is checked.
    """
    addr = t.data_ptr()
    with open("/proc/self/smaps") as f:
        text = f.read()
    for block in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", text):
        start, end = (int(x, 16) for x in block.split(" ", 1)[0].split("-"))
        if start <= addr < end:
            flags = re.search(r"^VmFlags:(.*)$", block, flags=re.M)
            return flags is not None and "hg" in flags.group(1).split()
    return False


def _big_buffers(obj) -> list[torch.Tensor]:
    return [t for t in obj.state_dict("").values() if t.numel() * t.element_size() >= MIN_BYTES]


def test_small_or_unsuitable_tensors_are_returned_unchanged():
    t = torch.arange(100, dtype=torch.float32)
    assert hugepage_backed(t) is t
    copied = hugepage_copy(t)
    assert copied is not t and torch.equal(copied, t)
    big = torch.randn(MIN_BYTES // 4 * 2)[::2]  # not contiguous
    assert hugepage_backed(big) is big


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int32, torch.uint16, torch.uint8])
def test_copy_is_exact_and_survives_gc_copy_and_pickle(dtype):
    n = MIN_BYTES // torch.tensor([], dtype=dtype).element_size() + 123
    t = torch.randint(0, 100, (n,)).to(dtype)
    out = hugepage_backed(t.view(-1, 1))
    assert out.shape == (n, 1) and out.dtype == dtype and out.is_contiguous()
    import gc

    gc.collect()
    assert torch.equal(out.view(-1), t)  # the mapping stays alive with the tensor
    assert torch.equal(copy.deepcopy(out), out)
    if dtype != torch.uint16:  # torch 2.13 cannot pickle any uint16 tensor
        assert torch.equal(pickle.loads(pickle.dumps(out)), out)


@pytest.mark.skipif(not hugepages_available(), reason="no transparent huge pages here")
def test_from_dense_buffers_use_huge_pages():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(2048, 2048, generator=gen)
    formats = [CSRWeight.from_dense(w, w > 0), BitmapWeight.from_dense(w, w > 0), NMWeight.from_dense(w, "2:4", mask_from_scores(w.abs(), "2:4", None))]
    for f in formats:
        assert _big_buffers(f) and all(_advised_huge(t) for t in _big_buffers(f)), type(f).__name__
    assert not _advised_huge(w)  # the check can fail: torch's own allocation is not advised
    for f in formats:
        torch.testing.assert_close(f.to_dense(), w * (f.to_dense() != 0))
        assert f.nnz > 0


@pytest.mark.skipif(not hugepages_available(), reason="no transparent huge pages here")
@pytest.mark.parametrize("fmt", ["bitmap", "nm"])
def test_loaded_checkpoint_buffers_use_huge_pages(tmp_path, fmt):
    """load_state_dict_compressed (behind sparseforge.load(..., sparse=True)) moves big buffers into huge pages."""
    importlib.import_module("transformers")
    from safetensors.torch import save_file

    from sparseforge.io.layout import load_state_dict_compressed

    gen = torch.Generator().manual_seed(1)
    w = torch.randn(2048, 2048, generator=gen)
    if fmt == "bitmap":
        obj = BitmapWeight.from_dense(w, w > 0)
    else:
        obj = NMWeight.from_dense(w, "2:4", mask_from_scores(w.abs(), "2:4", None))
    layer = {"format": fmt, "shape": [2048, 2048], "dtype": "float32", "pattern": "2:4" if fmt == "nm" else None}
    config = {"architectures": ["LlamaForCausalLM"],
              "sparsity_config": {"format_version": 2, "format": fmt, "layers": {"fc": layer}}}  # v2: no checksums
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({**obj.state_dict("fc."), "fc.bias": torch.zeros(2048)}, str(tmp_path / "model.safetensors"))
    state = load_state_dict_compressed(tmp_path)
    loaded = state["fc"]
    assert _big_buffers(loaded) and all(_advised_huge(t) for t in _big_buffers(loaded))
    assert type(loaded) is type(obj) and torch.equal(loaded.to_dense(), obj.to_dense())
    assert torch.equal(state["fc.bias"], torch.zeros(2048))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8, torch.uint16])
def test_hugepage_cat_equals_torch_cat_and_is_advised_when_large(dtype):
    from sparseforge.formats.memory import hugepage_cat

    rows = MIN_BYTES // (64 * torch.tensor([], dtype=dtype).element_size()) + 3
    parts = [torch.randint(-50, 50, (r, 64)).to(dtype) for r in (rows // 2, 1, rows - rows // 2)]
    out = hugepage_cat(parts)
    assert out.dtype == dtype and torch.equal(out, torch.cat(parts))
    if hugepages_available():
        assert _advised_huge(out)
    small = hugepage_cat([torch.ones(2, 3, dtype=dtype), torch.zeros(1, 3, dtype=dtype)])
    assert torch.equal(small, torch.cat([torch.ones(2, 3), torch.zeros(1, 3)]).to(dtype))
