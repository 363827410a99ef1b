"""TriangleMix: training-free sparse prefill, dense attention in the shallow layers and the Triangle
pattern in the deep ones (He et al., "TriangleMix: A Lossless and Efficient Attention Pattern for
Long Context Prefilling", 2025; microsoft/MInference ``minference/modules/tri_mix.py``,
``ops/streaming_kernel.py::tri_shape_kernel``).

In a Triangle layer, query ``i`` of a prompt of ``n`` tokens attends to key ``j <= i`` when

* ``j < sinks`` (the first tokens, attention sinks), or
* ``i - j < window`` (the local band, the diagonal included), or
* ``i >= n - last`` (the last ``last`` queries attend to everything before them),

so the "middle" query-key block, which the paper's gradient analysis finds contributes almost
nothing to the tokens generated after the prompt, is never computed: the cost per Triangle layer
is ``O(n (sinks + window) + last n)`` instead of ``O(n^2 / 2)``. The first ``dense_layers`` layers
attend densely. Both run the native block-sparse prefill kernel
(:mod:`sparseforge.ops.prefill_attention`), with one rule for dense layers over a bfloat16 cache:
they run our kernel when its bf16 compute path is ``amx`` (AMX-BF16 tiles, measured at or above
torch's bf16 SDPA), and torch's SDPA otherwise (``avx512_bf16`` and the float32-compute path are
slower than SDPA's bf16 there; see docs/attention.md for the measured ratios;
``SPARSEFORGE_BF16_PATH`` decides the path). Decode steps afterwards run ``decode_policy``
(:class:`~sparseforge.attention.policies.Dense` by default, every prompt token is cached).

Defaults follow the reference's ``tri_mix`` settings (``n_init=8, n_local=512, n_last=128,
starting_layer=16`` for the 32-layer Llama-3.1-8B); ``dense_layers=None`` takes half of the model's
layers, the reference's 16 of 32. Where this differs from the reference:

* the reference splits the prompt into the first ``n - last`` queries (sink + band, the
  "A-shape" kernel) and the last ``last`` queries (dense over all keys, computed in full
  ``einsum`` then masked); here one kernel runs both, skipping every key block with no allowed
  key, exactly the same set of (query, key) pairs;
* ``last`` is capped by the reference at ``n - 1``; here ``last >= n`` makes the layer dense;
* a prefill in several chunks (a cache that already holds tokens) applies the pattern to each
  chunk as if its last token ended the prompt: each chunk's last ``last`` rows attend densely;
* grouped-query attention reads each KV head once per query head instead of repeating K and V.

Example:
    >>> from sparseforge.attention import TriangleMix
    >>> TriangleMix(dense_layers=2).triangle_layer(1, 4), TriangleMix(dense_layers=2).triangle_layer(2, 4)
    (False, True)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from sparseforge.attention.policies import Dense, Policy
from sparseforge.errors import ConfigError, DataError, ModelError

__all__ = ["TriangleMix"]


def _count(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"TriangleMix: {name} must be an integer >= {minimum}, got {value!r}")


def _check_causal(mask: Tensor, T: int, n: int, horizon: int) -> None:
    """Raises unless the (B, 1, T, n) mask allows exactly the causal (and sliding-window) keys."""
    allowed = mask if mask.dtype == torch.bool else mask == 0
    i = torch.arange(n - T, n).view(-1, 1)
    j = torch.arange(n).view(1, -1)
    want = (j <= i) & (i - j < horizon)  # (T, n)
    if allowed.shape[-2:] != want.shape or not bool((allowed == want).all()):
        raise DataError(
            "TriangleMix prefill needs unpadded sequences (a plain causal mask); generate one prompt at a time or "
            "pad nothing, or use the Dense policy for padded batches"
        )


@dataclass(frozen=True)
class TriangleMix(Policy):
    """Dense prefill in the first ``dense_layers`` layers, the Triangle pattern in the others.

    ``sinks``: first tokens every query attends to (the reference's ``n_init``, 8); ``window``:
    local band, the diagonal included (``n_local``, 512); ``last``: final queries that attend to
    every earlier token (``n_last``, 128); ``dense_layers``: leading dense layers (``None``: half
    the model's layers, the reference's ``starting_layer=16`` of 32); ``decode_policy``: the policy
    of the decode steps after the prompt.

    Example:
        >>> TriangleMix(sinks=8, window=512, last=128, dense_layers=8)
        TriangleMix(sinks=8, window=512, last=128, dense_layers=8, decode_policy=Dense())
    """

    sinks: int = 8
    window: int = 512
    last: int = 128
    dense_layers: Optional[int] = None
    decode_policy: Policy = field(default_factory=Dense)

    def __post_init__(self):
        _count("sinks", self.sinks, 0)
        _count("window", self.window, 1)
        _count("last", self.last, 0)
        if self.dense_layers is not None:
            _count("dense_layers", self.dense_layers, 0)
        if not isinstance(self.decode_policy, Policy) or isinstance(self.decode_policy, TriangleMix):
            raise ConfigError(f"TriangleMix: decode_policy must be a decode policy (Dense(), Quest(...), ...), "
                              f"got {self.decode_policy!r}")

    def triangle_layer(self, layer_idx: int, num_layers: int) -> bool:
        """Whether layer ``layer_idx`` of ``num_layers`` runs the Triangle pattern (else dense)."""
        dense = num_layers // 2 if self.dense_layers is None else self.dense_layers
        return layer_idx >= dense

    def pattern(self, n: int, triangle: bool, horizon: Optional[int] = None) -> dict:
        """The kernel's pattern arguments for a chunk ending at token ``n`` (``horizon``: the model's
        sliding window, ``None`` for none)."""
        horizon = n if horizon is None else min(int(horizon), n)
        if not triangle:
            return {"sinks": 0, "window": max(1, n), "last": 0, "horizon": max(1, horizon)}
        return {"sinks": self.sinks, "window": self.window, "last": self.last, "horizon": max(1, horizon)}

    @staticmethod
    def dense_bf16_native() -> bool:
        """Whether dense layers over a bfloat16 cache run our prefill kernel (its bf16 compute path is
        ``amx``) rather than torch's SDPA (the module doc's rule)."""
        from sparseforge.ops.prefill_attention import bf16_compute_path

        return bf16_compute_path() == "amx"

    def decoding(self) -> Policy:
        return self.decode_policy

    def check_page_size(self, page_size: int) -> None:
        self.decode_policy.check_page_size(page_size)

    def prefill(self, module, layer, query: Tensor, attention_mask: Optional[Tensor], scale: float,
                **kwargs) -> Optional[Tensor]:
        """The chunk's attention ``(B, T, Hq, D)`` in ``query``'s dtype, by the native prefill kernel."""
        from sparseforge.ops.prefill_attention import attend_prefill

        if torch.is_grad_enabled() and (query.requires_grad or layer.k_store.requires_grad):
            raise ConfigError("TriangleMix prefill is for inference only (no gradients); run under torch.no_grad() "
                              "(generate does), or train with attn_implementation='sdpa'")
        if kwargs.get("output_attentions"):
            raise ConfigError("TriangleMix prefill does not return attention weights; use attn_implementation='eager'")
        if kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
            raise ModelError(f"{type(module).__name__} uses logit softcapping or a position bias, which TriangleMix's "
                             "prefill kernel does not implement; use a Llama / Qwen2 / Mistral-style model")
        if kwargs.get("dropout") and getattr(module, "training", False):
            raise ConfigError("TriangleMix prefill has no attention dropout; call model.eval() first")
        config = getattr(module, "config", None)
        layer_idx = getattr(module, "layer_idx", layer.layer_idx)
        if self.dense_layers is None and getattr(config, "num_hidden_layers", None) is None:
            raise ModelError(f"TriangleMix(dense_layers=None) takes half of the model's layers, but "
                             f"{type(module).__name__} has no config.num_hidden_layers; pass dense_layers=")
        num_layers = getattr(config, "num_hidden_layers", 0)
        B, Hq, T, D = query.shape
        n = layer.n
        horizon = kwargs.get("sliding_window")
        if attention_mask is not None:
            _check_causal(attention_mask, T, n, n if horizon is None else int(horizon))
        triangle = self.triangle_layer(layer_idx, num_layers)
        if not triangle and layer.k_store.dtype == torch.bfloat16 and not self.dense_bf16_native():
            return None  # dense bfloat16 without AMX: torch's SDPA beats our kernel
        pattern = self.pattern(n, triangle, horizon)
        out = attend_prefill(query.float().contiguous(), layer.k_store, layer.v_store, n, scale, **pattern)
        return out.to(query.dtype)  # (B, T, Hq, D)
