"""The ``"sparseforge"`` attention implementation, registered with transformers' ``AttentionInterface``.

A model opts in with ``attn_implementation="sparseforge"`` (at load time, or later with
``model.set_attn_implementation("sparseforge")``) after :func:`enable` registered it; no model code
is copied or patched. The function receives what the model's attention module passes to any
attention implementation (rotated ``query (B, Hq, q_len, D)``, the cache's ``key``/``value``):

* prefill (``q_len > 1``) runs the policy's own prefill if it has one (:class:`TriangleMix`: the
  native block-sparse prefill kernel ``sparseforge::prefill_attention``), else transformers' own SDPA
  attention with the mask transformers built (the mask function registered for the name is
  transformers' ``sdpa_mask``), then shows the queries to the decode policy (SnapKV chooses its
  tokens there);
* decode (``q_len == 1``) runs the policy's one-call step where it has one and nothing clips the
  step (``Policy.fused_step``: Quest's ``sparseforge::quest_attention``), else asks the layer's
  policy for token spans and runs ``sparseforge::decode_attention`` on the paged buffers (the
  native kernels directly in eager mode); a padding mask (left padding) or a sliding
  window (Mistral/Qwen2 ``sliding_window``) clip the spans to the tokens the dense mask allows.

The cache layer arrives through the keyword arguments transformers forwards from ``Cache.update``
to the attention call (:data:`~sparseforge.attention.cache.LAYER_KWARG`); decoding without a
:class:`~sparseforge.attention.cache.PagedKVCache` raises.

Example:
    >>> from sparseforge.attention import enable
    >>> enable()
    'sparseforge'
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from sparseforge.attention.cache import ATTENTION_NAME, LAYER_KWARG, PagedLayer
from sparseforge.errors import ConfigError, DataError, ModelError
from sparseforge.attention.policies import StreamingLLM
from sparseforge.attention.rope import inv_freq_of, shift_positions
from sparseforge.ops.decode_attention import attend, merge_attention

__all__ = ["NAME", "enable", "sparseforge_attention", "clip_spans"]

NAME = ATTENTION_NAME


def clip_spans(spans: Tensor, lo: Tensor) -> Tensor:
    """Spans ``(B, Hkv, S, 2)`` restricted to tokens ``>= lo[b]`` (``lo`` int ``(B,)``)."""
    start, length = spans[..., 0].long(), spans[..., 1].long()
    lo = lo.view(-1, 1, 1).long()
    new_start = torch.maximum(start, lo)
    new_len = (start + length - new_start).clamp(min=0)
    new_start = torch.where(new_len > 0, new_start, torch.zeros_like(new_start))
    return torch.stack([new_start, new_len], dim=-1).to(torch.int32).contiguous()


def _first_allowed(mask: Tensor, n: int) -> Tensor:
    """First attended token per row of a decode mask, checking the row allows exactly [lo, n)."""
    row = mask[:, 0, -1, :n]  # (B, n)
    allowed = row if row.dtype == torch.bool else row == 0
    lo = n - allowed.flip(-1).long().cumprod(-1).sum(-1)  # length of the trailing run of allowed tokens
    expect = torch.arange(n).unsqueeze(0) >= lo.unsqueeze(1)
    if not torch.equal(allowed, expect):
        raise DataError(
            "the sparseforge attention supports padding on the left only (a causal mask that allows one suffix of "
            "the cache per sequence); pad on the left (tokenizer.padding_side='left')"
        )
    return lo


def sparseforge_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                          attention_mask: Optional[Tensor], scaling: Optional[float] = None, dropout: float = 0.0,
                          **kwargs) -> tuple[Tensor, None]:
    """Attention with the signature of transformers' attention functions (see the module doc)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layer = kwargs.pop(LAYER_KWARG, None)
    if query.shape[2] > 1:
        scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
        own = layer.policy.prefill(module, layer, query, attention_mask, scale, dropout=dropout, **kwargs) \
            if isinstance(layer, PagedLayer) else None
        out = (own, None) if own is not None else \
            sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        if isinstance(layer, PagedLayer):
            layer.policy.decoding().observe_prefill(layer, query, scale)
        return out
    if not isinstance(layer, PagedLayer):
        raise ModelError(
            f"attn_implementation='{NAME}' decodes from a sparseforge.attention.PagedKVCache, and {type(module).__name__} "
            "did not hand one to the attention: pass cache=PagedKVCache(model.config, policy=...) to generate, on a model "
            "whose attention forwards its kwargs to Cache.update (Llama, Qwen2, Mistral, ...)"
        )
    if torch.is_grad_enabled() and (query.requires_grad or layer.k_store.requires_grad):
        raise ConfigError(f"attn_implementation='{NAME}' decodes for inference only (no gradients); run under "
                          "torch.no_grad() (generate does), or train with 'sdpa'")
    if kwargs.get("output_attentions"):
        raise ConfigError(f"attn_implementation='{NAME}' does not return attention weights; use 'eager' for that")
    if kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        raise ModelError(
            f"{type(module).__name__} uses logit softcapping or a position bias, which attn_implementation='{NAME}' "
            "does not implement; use a Llama / Qwen2 / Mistral-style model"
        )
    B, Hq, _, D = query.shape
    n = layer.n
    scale = D ** -0.5 if scaling is None else float(scaling)
    q = query.reshape(B, Hq, D).float().contiguous()  # (B, Hq, D)
    policy = layer.policy.decoding()
    layer_idx = module.layer_idx if hasattr(module, "layer_idx") else layer.layer_idx
    lo = None
    if attention_mask is not None:
        lo = _first_allowed(attention_mask, n)
    window = kwargs.get("sliding_window")
    if window is not None and n > window:
        lo_w = torch.full((B,), n - int(window), dtype=torch.long)
        lo = lo_w if lo is None else torch.maximum(lo, lo_w)
    clipped = lo is not None and bool((lo > 0).any())
    fused = None if clipped else policy.fused_step(layer, q, layer_idx, scale)
    if fused is not None:  # selected and attended in one native call (Quest)
        out, read = fused
        layer.tokens_read += read
        layer.tokens_cached += n * B * layer.kv_heads
        return out.to(query.dtype).view(B, 1, Hq, D), None
    spans = policy.spans(layer, q, layer_idx)
    if clipped:
        spans = clip_spans(spans, lo)
    layer.tokens_read += int(spans[..., 1].sum())
    layer.tokens_cached += n * B * layer.kv_heads
    out = policy.decode(layer, q, spans, scale)
    if out is not None:
        if clipped:
            raise DataError(f"{type(policy).__name__} does not support padded batches or sliding windows below the "
                            "cache yet; use Dense, Quest or StreamingLLM")
    elif isinstance(policy, StreamingLLM) and policy.positions == "cache" and policy.skipped(n) and policy.sinks:
        if clipped:
            raise DataError("StreamingLLM(positions='cache') needs an unpadded batch and no sliding window below the "
                            "cache; use positions='text'")
        out = _sinks_at_cache_positions(module, layer, q, spans, n, scale, policy.skipped(n))
    else:
        out = attend(q, layer.k_store, layer.v_store, spans, n, scale)  # (B, Hq, D) float32
    return out.to(query.dtype).view(B, 1, Hq, D), None


def _sinks_at_cache_positions(module, layer: PagedLayer, q: Tensor, spans: Tensor, n: int, scale: float,
                              skipped: int) -> Tensor:
    """StreamingLLM with the paper's positions: the sink span (spans[..., 0]) scored by the query moved
    back by the skipped tokens, the window span by the query as is, merged by their log-sum-exp."""
    inv_freq = layer.policy_state.get("inv_freq")
    if inv_freq is None:
        config = getattr(module, "config", None)
        if config is None:
            raise ModelError(f"StreamingLLM(positions='cache') needs the RoPE settings: {type(module).__name__} has no config")
        inv_freq = layer.policy_state["inv_freq"] = inv_freq_of(config, q.shape[-1])
    q_sink = shift_positions(q, -skipped, inv_freq).contiguous()
    out_s, lse_s = attend(q_sink, layer.k_store, layer.v_store, spans[:, :, :1].contiguous(), n, scale, lse=True)
    out_w, lse_w = attend(q, layer.k_store, layer.v_store, spans[:, :, 1:].contiguous(), n, scale, lse=True)
    return merge_attention(out_s, lse_s, out_w, lse_w)


def enable() -> str:
    """Register the ``"sparseforge"`` attention (and its mask, transformers' sdpa mask); returns the name.

    Then load a model with ``attn_implementation="sparseforge"`` or call
    ``model.set_attn_implementation("sparseforge")``. Idempotent.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, sparseforge_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
