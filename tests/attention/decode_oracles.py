"""Helpers shared by the attention tests: one decode step through ``sparseforge_attention`` with a
stand-in attention module, and its oracle, SDPA masked to exactly the tokens a policy selected."""

from __future__ import annotations

from types import SimpleNamespace

import torch.nn.functional as F

from sparseforge.attention import sparseforge_attention


def decode_one(layer, q, mask=None, module=None, **kw):
    """sparseforge_attention for one decode query q (B, Hq, D) through a stand-in attention module."""
    module = module or SimpleNamespace(layer_idx=3)
    B, Hq, D = q.shape
    out, _ = sparseforge_attention(module, q.unsqueeze(2), layer.keys, layer.values, mask, scaling=D ** -0.5,
                                   sparseforge_kv_layer=layer, **kw)
    return out.view(B, Hq, D)


def sdpa_over(q, keys, values, allowed):
    """SDPA of q (B, Hq, D) over the tokens ``allowed`` (bool (B, Hkv, n)) selects, keys repeated per group."""
    G = q.shape[1] // keys.shape[1]
    m = allowed.repeat_interleave(G, 1).unsqueeze(2)  # (B, Hq, 1, n)
    return F.scaled_dot_product_attention(q.unsqueeze(2), keys.float().repeat_interleave(G, 1),
                                          values.float().repeat_interleave(G, 1), attn_mask=m).squeeze(2)
