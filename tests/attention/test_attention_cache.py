"""PagedKVCache (sparseforge.attention.cache): storage equals the appended keys/values, per-page key
min/max always equal the pages' true min/max (property test over any sequence of appends), growth,
crop, batch selection, and one-line errors for bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseforge.attention import Dense, PagedKVCache, Quest, StreamingLLM
from sparseforge.attention.cache import bf16_bounds, huge_page_empty
from sparseforge.errors import ConfigError, DataError, NumericalError


def _true_bounds(keys: torch.Tensor, P: int):
    """(kmin, kmax) per page of (B, H, n, D) keys, straight from the definition (the keys' dtype)."""
    n = keys.shape[2]
    pages = [keys[:, :, p * P:min(n, (p + 1) * P)] for p in range(-(-n // P))]
    return torch.stack([p.amin(2) for p in pages], 2), torch.stack([p.amax(2) for p in pages], 2)


def _bf16_step(b: torch.Tensor, up: bool) -> torch.Tensor:
    """The next bfloat16 above (``up``) or below each value of ``b`` (bfloat16, nonzero, finite)."""
    bits = b.view(torch.int16)
    grow = (b > 0) == up  # moving away from zero: magnitude bits + 1
    return torch.where(grow, bits + 1, bits - 1).to(torch.int16).view(torch.bfloat16)


def _assert_tight_bounds(kmin: torch.Tensor, kmax: torch.Tensor, true_min: torch.Tensor, true_max: torch.Tensor):
    """kmin / kmax are bfloat16, enclose the true bounds, and no bfloat16 lies strictly between
    (for a bfloat16 cache: equal to them)."""
    assert kmin.dtype == kmax.dtype == torch.bfloat16
    if true_min.dtype == torch.bfloat16:
        assert torch.equal(kmin, true_min) and torch.equal(kmax, true_max)
        return
    lo, hi, tmin, tmax = kmin.double(), kmax.double(), true_min.double(), true_max.double()
    assert bool((lo <= tmin).all()) and bool((hi >= tmax).all())
    assert bool((_bf16_step(kmin, up=True).double() > tmin).all())
    assert bool((_bf16_step(kmax, up=False).double() < tmax).all())


def test_float32_bounds_round_outward_to_bfloat16():
    x = torch.tensor([1.0, 1.001, -1.001, float("inf"), float("-inf"), 0.0])
    lo, hi = bf16_bounds(x, x)
    assert lo.dtype == hi.dtype == torch.bfloat16
    assert lo.tolist() == [1.0, 1.0, -1.0078125, float("inf"), float("-inf"), 0.0]
    assert hi.tolist() == [1.0, 1.0078125, -1.0, float("inf"), float("-inf"), 0.0]
    wide = torch.randn(4000, generator=torch.Generator().manual_seed(0)) * torch.logspace(-30, 30, 4000)
    _assert_tight_bounds(*bf16_bounds(wide, wide), wide, wide)
    b = wide.bfloat16()
    assert bf16_bounds(b, b)[0] is b  # a bfloat16 cache's bounds are exact


@settings(max_examples=30, deadline=None)
@given(
    chunks=st.lists(st.integers(1, 40), min_size=1, max_size=8),
    page=st.sampled_from([1, 4, 16]),
    bf16=st.booleans(),
    prealloc=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_storage_and_page_bounds_track_every_append(chunks, page, bf16, prealloc, seed):
    dtype = torch.bfloat16 if bf16 else torch.float32
    g = torch.Generator().manual_seed(seed)
    cache = PagedKVCache(num_layers=1, page_size=page, max_cache_len=sum(chunks) if prealloc else None)
    ks, vs = [], []
    for t in chunks:
        k, v = torch.randn(2, 3, t, 5, generator=g).to(dtype), torch.randn(2, 3, t, 5, generator=g).to(dtype)
        ks.append(k)
        vs.append(v)
        keys, values = cache.update(k, v, 0)
        layer = cache.layers[0]
        all_k, all_v = torch.cat(ks, 2), torch.cat(vs, 2)
        assert torch.equal(keys, all_k) and torch.equal(values, all_v)
        kmin, kmax = _true_bounds(all_k, page)
        pages = kmin.shape[2]
        _assert_tight_bounds(layer.kmin[:, :, :pages], layer.kmax[:, :, :pages], kmin, kmax)
        assert layer.capacity % page == 0 and layer.capacity >= layer.n
    assert cache.get_seq_length() == sum(chunks)


def test_huge_page_buffers_are_aligned_and_behave_as_tensors():
    import mmap

    big = huge_page_empty((3, 1 << 20), torch.bfloat16)  # 6 MB
    assert big.shape == (3, 1 << 20) and big.dtype == torch.bfloat16 and big.is_contiguous()
    if hasattr(mmap, "MADV_HUGEPAGE"):
        assert big.data_ptr() % (2 << 20) == 0
    big.fill_(2.0)
    big[1] = 3.0
    assert big.float().sum().item() == 2 * 2.0 * (1 << 20) + 3.0 * (1 << 20)
    small = huge_page_empty((4, 5), torch.float32)
    assert small.shape == (4, 5) and small.dtype == torch.float32
    cache = PagedKVCache(num_layers=1, page_size=16, max_cache_len=8192)
    k = torch.randn(1, 2, 8192, 64)
    cache.update(k, k, 0)
    layer = cache.layers[0]
    assert torch.equal(layer.keys, k)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        assert layer.k_store.data_ptr() % (2 << 20) == 0 and layer.v_store.data_ptr() % (2 << 20) == 0


def test_crop_and_reset():
    cache = PagedKVCache(num_layers=1, page_size=4)
    k = torch.randn(1, 2, 10, 3)
    cache.update(k, k, 0)
    cache.crop(-3)
    layer = cache.layers[0]
    assert layer.n == 7 and torch.equal(layer.keys, k[:, :, :7])
    kmin, kmax = _true_bounds(k[:, :, :7], 4)
    _assert_tight_bounds(layer.kmin[:, :, :2], layer.kmax[:, :, :2], kmin, kmax)
    cache.reset()
    assert cache.get_seq_length() == 0
    cache.update(torch.randn(3, 2, 1, 3), torch.randn(3, 2, 1, 3), 0)  # another batch size after reset
    assert cache.layers[0].batch == 3


def test_beam_reorder_selects_rows():
    cache = PagedKVCache(num_layers=1, page_size=4)
    k = torch.randn(3, 1, 6, 2)
    cache.update(k, k, 0)
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    assert torch.equal(cache.layers[0].keys, k[[2, 2, 0]])
    kmin, kmax = _true_bounds(k[[2, 2, 0]], 4)
    _assert_tight_bounds(cache.layers[0].kmin[:, :, :2], cache.layers[0].kmax[:, :, :2], kmin, kmax)


def test_update_hands_the_layer_to_the_attention_kwargs():
    cache = PagedKVCache(num_layers=2)
    forwarded = {}
    k = torch.randn(1, 1, 2, 4)
    cache.update(k, k, 1, kwargs=forwarded)
    assert forwarded["sparseforge_kv_layer"] is cache.layers[1]


def test_kv_bytes_counts_valid_tokens():
    cache = PagedKVCache(num_layers=2)
    for i in range(2):
        k = torch.randn(1, 2, 5, 8, dtype=torch.bfloat16)
        cache.update(k, k, i)
    assert cache.kv_bytes() == 2 * 2 * (2 * 5 * 8 * 2)


def test_batch_size_change_is_an_error():
    cache = PagedKVCache(num_layers=1)
    cache.update(torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4), 0)
    with pytest.raises(DataError, match="a cache serves one batch"):
        cache.update(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4), 0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_keys_are_rejected(bad):
    cache = PagedKVCache(num_layers=1)
    k = torch.randn(1, 2, 3, 4)
    k[0, 1, 2, 0] = bad
    with pytest.raises(NumericalError, match="NaN or inf"):
        cache.update(k, torch.randn(1, 2, 3, 4), 0)


def test_unsupported_dtype_and_full_cache():
    with pytest.raises(DataError, match="float32 or bfloat16"):
        PagedKVCache(num_layers=1).update(torch.randn(1, 1, 2, 4).half(), torch.randn(1, 1, 2, 4).half(), 0)
    cache = PagedKVCache(num_layers=1, max_cache_len=4)
    cache.update(torch.randn(1, 1, 4, 2), torch.randn(1, 1, 4, 2), 0)
    with pytest.raises(DataError, match="is full"):
        cache.update(torch.randn(1, 1, 1, 2), torch.randn(1, 1, 1, 2), 0)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: PagedKVCache(num_layers=1, page_size=0), "page_size must be a positive integer"),
        (lambda: PagedKVCache(num_layers=1, page_size=-16), "page_size must be a positive integer"),
        (lambda: PagedKVCache(num_layers=0), "num_layers"),
        (lambda: PagedKVCache(num_layers=1, policy="quest"), "policy must be"),
        (lambda: PagedKVCache(num_layers=1, page_size=32, policy=Quest(budget=64, page_size=16)), "does not match"),
        (lambda: PagedKVCache(num_layers=1, page_size=48, policy=Quest(budget=64)), "not a multiple of the page size"),
        (lambda: Quest(budget=0), "budget must be a positive integer"),
        (lambda: Quest(budget=-5), "budget must be a positive integer"),
        (lambda: Quest(budget=100, page_size=16), "not a multiple of the page size 16; use 96"),
        (lambda: Quest(budget=64, page_size=0), "page_size must be a positive integer"),
        (lambda: StreamingLLM(sinks=-1, window=8), "sinks must be an integer >= 0"),
        (lambda: StreamingLLM(sinks=4, window=0), "window must be a positive integer"),
    ],
)
def test_bad_sizes_raise_one_line_config_errors(make, match):
    with pytest.raises(ConfigError, match=match) as info:
        make()
    assert "\n" not in str(info.value)


def test_default_policy_is_dense():
    assert PagedKVCache(num_layers=1).policy == Dense()


def test_set_policy_switches_every_layer_and_validates():
    cache = PagedKVCache(num_layers=3, page_size=16)
    cache.set_policy(Quest(budget=64))
    assert all(layer.policy == Quest(budget=64) for layer in cache.layers)
    with pytest.raises(ConfigError, match="not a multiple of the page size"):
        cache.set_policy(Quest(budget=40))
    with pytest.raises(ConfigError, match="policy must be"):
        cache.set_policy(None)


def test_huge_page_buffers_are_private_anonymous_mappings():
    """Transparent huge pages apply to private anonymous memory (shared memory only where the system
    enables them for it): the cache's buffers must be such a mapping, "rw-p" in /proc/self/maps."""
    from sparseforge.attention.cache import huge_page_empty

    x = huge_page_empty((4, 1 << 20), torch.float32)  # 16 MB
    x.fill_(1.0)
    addr = x.data_ptr()
    for line in open("/proc/self/maps"):
        lo, hi = (int(a, 16) for a in line.split()[0].split("-"))
        if lo <= addr < hi:
            assert line.split()[1] == "rw-p"
            assert addr % (2 << 20) == 0  # 2 MB aligned
            return
    raise AssertionError("the buffer's mapping was not found in /proc/self/maps")
