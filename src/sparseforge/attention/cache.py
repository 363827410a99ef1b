"""A paged KV cache that is a transformers ``Cache``, with per-page key minimum and maximum.

:class:`PagedKVCache` holds one :class:`PagedLayer` per decoder layer. A layer stores keys and values
as transformers hands them to ``Cache.update`` (after RoPE, ``(B, Hkv, T, D)``), float32 or bfloat16,
in one buffer per tensor ``(B, Hkv, capacity, D)`` (2 MB aligned, advised for transparent huge
pages: :func:`huge_page_empty`) whose capacity grows by whole pages (x1.5, or set once with
``max_cache_len``); a page is ``page_size`` consecutive tokens of one KV head. For
every page it keeps the per-channel minimum and maximum key ``(B, Hkv, pages, D)`` in bfloat16,
updated for the pages each new token touches: Quest's page bound reads them. They are exact for a
bfloat16 cache and rounded outward for a float32 one (:func:`bf16_bounds`: the largest bfloat16 at or
below the minimum, the smallest at or above the maximum), so the bound stays an upper bound of every
key's score while a step reads half the metadata bytes.

``update`` returns views of the valid tokens ``[0, n)``, so any attention implementation works on
this cache; the ``"sparseforge"`` attention (:mod:`sparseforge.attention.interface`) finds the layer
through the keyword arguments transformers passes along and runs the layer's policy and the native
decode kernel on the buffers directly.

Bad input raises: keys with NaN/inf (:class:`NumericalError`), a dtype other than float32/bfloat16,
a batch size other than the one the cache was filled with (:class:`DataError`; ``reset()`` first).

Example:
    >>> import torch
    >>> from sparseforge.attention import PagedKVCache, Dense
    >>> cache = PagedKVCache(num_layers=1, policy=Dense(), page_size=4)
    >>> k = torch.arange(6.).view(1, 1, 6, 1)
    >>> _ = cache.update(k, k, 0)
    >>> cache.get_seq_length(), cache.layers[0].kmax[0, 0, :2, 0].tolist()
    (6, [3.0, 5.0])
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from sparseforge.attention.memory import huge_page_empty, release_rows
from sparseforge.attention.policies import Dense, Policy
from sparseforge.errors import ConfigError, DataError, NumericalError

__all__ = ["PagedKVCache", "PagedLayer", "LAYER_KWARG", "bf16_bounds", "huge_page_empty", "release_rows"]

LAYER_KWARG = "sparseforge_kv_layer"  # key under which update() hands the layer to the attention function
ATTENTION_NAME = "sparseforge"  # the attn_implementation the attention interface registers (interface.NAME)
_DTYPES = (torch.float32, torch.bfloat16)
_GROWTH = 1.5


def bf16_bounds(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """float32 ``lo`` / ``hi`` rounded outward to bfloat16: the largest bfloat16 ``<= lo`` and the
    smallest ``>= hi`` (elementwise); bfloat16 inputs are returned as they are.

    A bfloat16 is a float32 whose low 16 bits are zero: clearing them rounds toward zero, adding
    ``0xFFFF`` first rounds away from zero (exact for every finite value and for inf).

    Example:
        >>> lo, hi = bf16_bounds(torch.tensor([1.001, -1.001]), torch.tensor([1.001, -1.001]))
        >>> lo.tolist(), hi.tolist()
        ([1.0, -1.0078125], [1.0078125, -1.0])
    """
    if lo.dtype == torch.bfloat16:
        return lo, hi

    def rounded(x: Tensor, away_where: Tensor) -> Tensor:
        bits = x.contiguous().view(torch.int32)
        away, toward = (bits + 0xFFFF) & -65536, bits & -65536
        return torch.where(away_where, away, toward).view(torch.float32).to(torch.bfloat16)

    return rounded(lo, lo < 0), rounded(hi, hi > 0)


class PagedLayer(CacheLayerMixin):
    """One decoder layer's paged keys and values (see the module doc)."""

    is_compileable = False
    is_croppable = True
    is_sliding = False
    supports_early_init = False

    def __init__(self, layer_idx: int, policy: Policy, page_size: int = 16, max_cache_len: Optional[int] = None,
                 config=None):
        super().__init__()
        self.config = config  # the model's config (its attention implementation), or None
        self.released = 0  # tokens [0, released) have no dense rows any more (release_dense)
        self.layer_idx = layer_idx
        self.policy = policy
        self.page_size = page_size
        self.max_cache_len = max_cache_len
        self.n = 0
        self.policy_state: dict = {}  # what the policy keeps between steps (SnapKV's kept tokens)
        self.tokens_read = self.tokens_cached = 0  # decode steps so far: tokens attended / held, summed over KV heads
        self.batch = self.kv_heads = self.head_dim = 0
        self.k_store = self.v_store = self.kmin = self.kmax = None

    # ---- state -------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        if key_states.dtype not in _DTYPES or value_states.dtype != key_states.dtype:
            raise DataError(
                f"PagedKVCache stores float32 or bfloat16 keys and values, got {key_states.dtype} / {value_states.dtype}; "
                "load the model with torch_dtype=torch.float32 or torch.bfloat16"
            )
        if key_states.device.type != "cpu":
            raise DataError(f"PagedKVCache runs on the CPU; the keys are on {key_states.device}")
        self.batch, self.kv_heads, _, self.head_dim = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self._allocate(self.max_cache_len or 0)
        self.is_initialized = True

    def _allocate(self, tokens: int) -> None:
        """(Re)allocate the buffers for at least ``tokens`` tokens (whole pages), keeping [0, n)."""
        P = self.page_size
        cap = max(P, math.ceil(tokens / P) * P)
        shape = (self.batch, self.kv_heads, cap, self.head_dim)
        pshape = (self.batch, self.kv_heads, cap // P, self.head_dim)
        k, v = huge_page_empty(shape, self.dtype), huge_page_empty(shape, self.dtype)
        kmin, kmax = huge_page_empty(pshape, torch.bfloat16), huge_page_empty(pshape, torch.bfloat16)
        if self.k_store is not None and self.n:
            pages = -(-self.n // P)
            r = self.released  # freed rows are not copied, and freed again in the new buffers
            k[:, :, r : self.n] = self.k_store[:, :, r : self.n]
            v[:, :, r : self.n] = self.v_store[:, :, r : self.n]
            if r:
                release_rows(k, r)
                release_rows(v, r)
            kmin[:, :, :pages] = self.kmin[:, :, :pages]
            kmax[:, :, :pages] = self.kmax[:, :, :pages]
        self.k_store, self.v_store, self.kmin, self.kmax = k, v, kmin, kmax

    @property
    def capacity(self) -> int:
        return 0 if self.k_store is None else self.k_store.shape[2]

    def _refresh_views(self) -> None:
        self.keys = self.k_store[:, :, : self.n]
        self.values = self.v_store[:, :, : self.n]

    def _update_bounds(self, t0: int, t1: int) -> None:
        """Recompute min/max of the pages holding tokens [t0, t1) from the stored keys."""
        P = self.page_size
        p0, p1 = t0 // P, -(-t1 // P)
        keys = self.k_store[:, :, p0 * P : t1]  # (B, Hkv, T, D)
        pad = p1 * P - t1
        if pad:
            edge = keys[:, :, -1:].expand(-1, -1, pad, -1)  # repeating a real key leaves min/max unchanged
            keys = torch.cat([keys, edge], dim=2)
        pages = keys.view(self.batch, self.kv_heads, p1 - p0, P, self.head_dim)
        self.kmin[:, :, p0:p1], self.kmax[:, :, p0:p1] = bf16_bounds(pages.amin(dim=3), pages.amax(dim=3))

    # ---- transformers Cache layer API -----------------------------------------------------
    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        B, H, T, D = key_states.shape
        if (B, H, D) != (self.batch, self.kv_heads, self.head_dim):
            raise DataError(
                f"PagedKVCache layer {self.layer_idx} holds batch {self.batch} x {self.kv_heads} KV heads x dim "
                f"{self.head_dim}, got keys {tuple(key_states.shape)}; a cache serves one batch: create a new "
                "PagedKVCache (or call cache.reset()) for another batch size"
            )
        if key_states.dtype != self.dtype or value_states.dtype != self.dtype:
            raise DataError(f"PagedKVCache layer {self.layer_idx} holds {self.dtype}, got {key_states.dtype}")
        if self.released:
            self._check_decodes_only(T)
        if not torch.isfinite(key_states).all():
            raise NumericalError(
                f"keys of layer {self.layer_idx} contain NaN or inf (tokens {self.n}..{self.n + T}); "
                "the model's activations overflowed: check its dtype and inputs"
            )
        end = self.n + T
        if self.max_cache_len is not None and end > self.max_cache_len:
            raise DataError(
                f"PagedKVCache(max_cache_len={self.max_cache_len}) is full: {end} tokens needed; raise max_cache_len"
            )
        if end > self.capacity:
            self._allocate(max(end, int(self.capacity * _GROWTH)))
        self.k_store[:, :, self.n : end] = key_states
        self.v_store[:, :, self.n : end] = value_states
        self._update_bounds(self.n, end)
        self.n = end
        self._refresh_views()
        forwarded = kwargs.get("kwargs")
        if isinstance(forwarded, dict):
            forwarded[LAYER_KWARG] = self
        return self.keys, self.values

    def release_dense(self, upto: int) -> None:
        """Free the dense rows of tokens ``[0, upto)`` (a policy keeps them in another form: Mustafar's
        compressed tokens). Afterwards the cache takes single-token decode steps of the ``"sparseforge"``
        attention only (its views read zeros there): a later multi-token chunk, a crop below ``upto``,
        a batch reorder or another attention implementation raise instead of attending over zeros."""
        self._check_decodes_only(1)
        upto = min(upto, self.n)
        if upto <= self.released:
            return
        for store in (self.k_store, self.v_store):
            release_rows(store, upto)
        self.released = upto

    def _check_decodes_only(self, tokens: int) -> None:
        """Raises unless a cache with released rows can take ``tokens`` new tokens (see release_dense)."""
        impl = getattr(self.config, "_attn_implementation", None)
        if impl != ATTENTION_NAME:
            raise ConfigError(
                f"PagedKVCache layer {self.layer_idx}: freeing dense rows needs the cache built from the model's config "
                f"(PagedKVCache(model.config, ...)) on a model running attn_implementation='{ATTENTION_NAME}', got "
                f"{'no config' if self.config is None else repr(impl)}; or keep Mustafar(release_dense=False)"
            )
        if tokens != 1:
            raise DataError(
                f"PagedKVCache layer {self.layer_idx} freed the dense rows of {self.released} compressed tokens "
                f"(Mustafar(release_dense=True)), so it takes single-token decode steps only, got {tokens} tokens; "
                "use release_dense=False for multi-turn, chunked prefill or assisted decoding"
            )

    def page_bounds(self, pages: int) -> tuple[Tensor, Tensor]:
        """(kmin, kmax) of the first ``pages`` pages, ``(B, Hkv, pages, D)`` each (views)."""
        return self.kmin[:, :, :pages], self.kmax[:, :, :pages]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.n + query_length, 0

    def get_seq_length(self) -> int:
        return self.n

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.n = 0
        self.released = 0
        self.policy_state = {}
        self.tokens_read = self.tokens_cached = 0
        self.k_store = self.v_store = self.kmin = self.kmax = None
        self.keys = self.values = None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ConfigError("crop takes a negative number of tokens to remove (transformers' convention)")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        if self.n + tokens_to_remove < self.released:
            raise DataError(f"PagedKVCache layer {self.layer_idx} freed the dense rows of its first {self.released} "
                            f"tokens (Mustafar(release_dense=True)); it cannot be cropped to {self.n + tokens_to_remove}")
        self.n = max(0, self.n + tokens_to_remove)
        # the lowest length cropped to since a policy last looked (tokens from there on may be replaced)
        self.policy_state["cropped_to"] = min(self.policy_state.get("cropped_to", self.n), self.n)
        if self.n:
            self._update_bounds((self.n - 1) // self.page_size * self.page_size, self.n)
        self._refresh_views()

    def _select_batch(self, index: Tensor) -> None:
        if not self.is_initialized:
            return
        if self.released:
            raise DataError(f"PagedKVCache layer {self.layer_idx} freed the dense rows of compressed tokens "
                            "(Mustafar(release_dense=True)); beam search and batch reordering need release_dense=False")
        self.k_store = self.k_store.index_select(0, index).contiguous()
        self.v_store = self.v_store.index_select(0, index).contiguous()
        self.kmin = self.kmin.index_select(0, index).contiguous()
        self.kmax = self.kmax.index_select(0, index).contiguous()
        self.batch = self.k_store.shape[0]
        self.policy_state = {}  # per-row choices do not follow a reordered batch: recomputed by the next prefill
        self._refresh_views()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_batch(beam_idx.to(torch.long))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select_batch(torch.arange(self.batch).repeat_interleave(repeats))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._select_batch(torch.as_tensor(indices, dtype=torch.long))


class PagedKVCache(Cache):
    """A transformers ``Cache`` of :class:`PagedLayer` s that carries a sparse-attention policy.

    Pass it to ``model.generate(..., past_key_values=cache)`` on a model loaded (or switched) with
    ``attn_implementation="sparseforge"`` (:func:`sparseforge.attention.enable`); any other attention
    implementation also works on it, densely.

    Args:
        config: the model's config (``num_hidden_layers`` of its text config), or
        num_layers: the number of decoder layers;
        policy: :class:`~sparseforge.attention.policies.Dense` (default), ``StreamingLLM``, ``Quest``;
        page_size: tokens per page (16);
        max_cache_len: allocate this many tokens at once (``None``: grow by x1.5 as needed).

    Example:
        >>> from sparseforge.attention import PagedKVCache, Quest
        >>> cache = PagedKVCache(num_layers=2, policy=Quest(budget=256))
        >>> len(cache.layers), cache.page_size
        (2, 16)
    """

    def __init__(self, config=None, *, num_layers: Optional[int] = None, policy: Optional[Policy] = None,
                 page_size: int = 16, max_cache_len: Optional[int] = None):
        if not isinstance(page_size, int) or isinstance(page_size, bool) or page_size < 1:
            raise ConfigError(f"PagedKVCache: page_size must be a positive integer, got {page_size!r}")
        if max_cache_len is not None and (not isinstance(max_cache_len, int) or max_cache_len < 1):
            raise ConfigError(f"PagedKVCache: max_cache_len must be a positive integer or None, got {max_cache_len!r}")
        policy = Dense() if policy is None else policy
        if not isinstance(policy, Policy):
            raise ConfigError(f"PagedKVCache: policy must be Dense(), StreamingLLM(...), Quest(...), SnapKV(...) or Mustafar(...), got {policy!r}")
        policy.check_page_size(page_size)
        if config is not None:
            text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
            num_layers = getattr(text, "num_hidden_layers", None)
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ConfigError("PagedKVCache needs the model's config or num_layers >= 1")
        self.policy, self.page_size = policy, page_size
        super().__init__(layers=[PagedLayer(i, policy, page_size, max_cache_len, config=config) for i in range(num_layers)])

    def set_policy(self, policy: Policy) -> None:
        """Switch every layer to ``policy`` from the next decode step on (e.g. dense for a while, then sparse)."""
        if not isinstance(policy, Policy):
            raise ConfigError(f"PagedKVCache: policy must be Dense(), StreamingLLM(...), Quest(...), SnapKV(...) or Mustafar(...), got {policy!r}")
        policy.check_page_size(self.page_size)
        self.policy = policy
        for layer in self.layers:
            layer.policy = policy

    def read_fraction(self) -> float:
        """Tokens the decode steps so far attended over tokens cached at those steps (all layers and
        KV heads; 1.0 for Dense; ``nan`` before the first decode step)."""
        cached = sum(layer.tokens_cached for layer in self.layers)
        return sum(layer.tokens_read for layer in self.layers) / cached if cached else float("nan")

    def kv_bytes(self) -> int:
        """Bytes of the keys and values held (all layers): the valid dense rows not freed, plus what the
        policy keeps per layer (Mustafar's compressed tokens)."""
        total = 0
        for layer in self.layers:
            if layer.keys is not None:
                per_token = layer.keys.numel() // max(1, layer.n) * layer.keys.element_size()
                total += 2 * (layer.n - layer.released) * per_token + layer.policy.state_bytes(layer)
        return total
