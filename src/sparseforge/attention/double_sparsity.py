"""Offline calibration of Double Sparsity's label channels, and their file format.

Double Sparsity (Yang et al., "Post-Training Sparse Attention with Double Sparsity", 2024;
andy-yang-1/DoubleSparse ``config/offline_calibration.py``) approximates a decode step's attention
scores from a few "label" channels of the query and the keys: the outlier channels that carry most
of ``q . k``. They are chosen once per model from calibration text: per layer and head, the channels
with the largest mean ``|q_d * k_d|`` over the calibration tokens, ``q`` and ``k`` rotated (after
RoPE), each token's query against its own key (the reference's "qk" channel mode).

The reference ranks channels per *query* head (keys repeated over the GQA group). Here a KV head's
label channels must serve its whole query group (the label keys are cached once per KV head and
each token is read once), so the per-query-head importances are summed over the group and the
ranking is per KV head.

The result is an int64 tensor ``(layers, kv_heads, channels)``, most important channel first,
saved as a small JSON file (:func:`save_label_channels`, :func:`load_label_channels`).

Example:
    >>> from sparseforge.attention.double_sparsity import calibrate_label_channels  # doctest: +SKIP
    >>> labels = calibrate_label_channels(model, [ids[:, :512]], channels=16)  # doctest: +SKIP
    >>> save_label_channels(labels, "labels.json")  # doctest: +SKIP
    >>> DoubleSparsity(channels=16, budget=2048, labels="labels.json")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Union

import torch
from torch import Tensor

from sparseforge.errors import ConfigError, DataError, ModelError

__all__ = ["calibrate_label_channels", "save_label_channels", "load_label_channels", "check_label_channels",
           "PackedLabels"]

FORMAT = "sparseforge.double_sparsity.labels"
_CALIBRATION_NAME = "sparseforge_label_calibration"


def check_label_channels(labels: Tensor, channels: int, owner: str = "DoubleSparsity") -> Tensor:
    """Validate label channels ``(layers, kv_heads, >= channels)``; returns them as contiguous int64."""
    if not isinstance(labels, Tensor) or labels.dim() != 3 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ConfigError(f"{owner}: labels must be an integer tensor (layers, kv_heads, channels), got "
                          f"{getattr(labels, 'shape', type(labels).__name__)}; use calibrate_label_channels")
    if labels.shape[2] < channels:
        raise ConfigError(f"{owner}: the labels hold {labels.shape[2]} channels per head, fewer than channels={channels}; "
                          f"recalibrate with channels >= {channels}")
    labels = labels.to(torch.int64).contiguous()
    if labels.numel() and int(labels.min()) < 0:
        raise ConfigError(f"{owner}: label channel indices must be >= 0, got {int(labels.min())}")
    top = labels[:, :, :channels]
    if top.numel() and bool((top.sort(-1).values.diff(dim=-1) == 0).any()):
        raise ConfigError(f"{owner}: a head's label channels repeat a channel; each head needs {channels} distinct channels")
    return labels


@torch.no_grad()
def calibrate_label_channels(model: torch.nn.Module, batches: Iterable[Tensor], channels: int) -> Tensor:
    """The ``channels`` label channels per layer and KV head of a transformers decoder model.

    ``batches``: token ids, each ``(B, T)`` (or ``(T,)``), unpadded (the reference: 256 Pile
    samples of 512 tokens). Returns int64 ``(layers, kv_heads, channels)``, sorted by importance
    (mean ``|q_d k_d|`` over the tokens, summed over the KV head's query group), descending.
    The model runs with a temporary attention implementation (transformers' SDPA that also
    records the rotated queries and keys); its own implementation is restored afterwards.
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
        raise ConfigError(f"calibrate_label_channels: channels must be a positive integer, got {channels!r}")
    sums: dict[int, Tensor] = {}  # layer -> (Hkv, D) float64: sum over tokens of |q_d k_d|, summed over the group
    counts: dict[int, int] = {}

    def record(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        layer = getattr(module, "layer_idx", None)
        if layer is None:
            raise ModelError(f"calibrate_label_channels: {type(module).__name__} has no layer_idx")
        B, Hq, T, D = query.shape
        Hkv = key.shape[1]
        q = query.double().reshape(B, Hkv, Hq // Hkv, T, D)  # (B, Hkv, G, T, D), rotated
        k = key[:, :, -T:].double().unsqueeze(2)  # (B, Hkv, 1, T, D): each query token's own key
        contrib = (q * k).abs().sum(dim=(0, 2, 3))  # (Hkv, D)
        sums[layer] = sums[layer] + contrib if layer in sums else contrib
        counts[layer] = counts.get(layer, 0) + B * T
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

    AttentionInterface.register(_CALIBRATION_NAME, record)
    AttentionMaskInterface.register(_CALIBRATION_NAME, sdpa_mask)
    previous = getattr(model.config, "_attn_implementation", None) or "sdpa"
    model.set_attn_implementation(_CALIBRATION_NAME)
    try:
        seen = 0
        for ids in batches:
            ids = torch.as_tensor(ids)
            model(ids.unsqueeze(0) if ids.dim() == 1 else ids, use_cache=False)
            seen += 1
    finally:
        model.set_attn_implementation(previous)
    if not seen:
        raise DataError("calibrate_label_channels: no calibration batches; pass at least one (B, T) tensor of token ids")
    if not sums:
        raise ModelError(f"calibrate_label_channels: {type(model).__name__}'s attention never ran through transformers' "
                         "AttentionInterface; use a Llama / Qwen2 / Mistral-style model")
    layers = sorted(sums)
    if layers != list(range(len(layers))):
        raise ModelError(f"calibrate_label_channels: attention ran in layers {layers}, expected 0..{len(layers) - 1}")
    D = sums[0].shape[1]
    if channels > D:
        raise ConfigError(f"calibrate_label_channels: channels={channels} exceeds the head dimension {D}")
    importance = torch.stack([sums[i] / counts[i] for i in layers])  # (L, Hkv, D)
    return importance.sort(dim=-1, descending=True, stable=True).indices[..., :channels].contiguous()


def save_label_channels(labels: Tensor, path: Union[str, os.PathLike]) -> None:
    """Write label channels ``(layers, kv_heads, channels)`` to a JSON file (temp file, then rename)."""
    labels = check_label_channels(labels, 1, "save_label_channels")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"format": FORMAT, "labels": labels.tolist()}))
    tmp.replace(path)


def load_label_channels(path: Union[str, os.PathLike]) -> Tensor:
    """Read label channels saved by :func:`save_label_channels`: int64 ``(layers, kv_heads, channels)``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Double Sparsity label file {path} does not exist; create it with calibrate_label_channels "
                          "and save_label_channels")
    try:
        doc = json.loads(path.read_text())
        if doc.get("format") != FORMAT:
            raise ValueError(f"format is {doc.get('format')!r}, expected {FORMAT!r}")
        labels = torch.tensor(doc["labels"], dtype=torch.int64)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"{path} is not a Double Sparsity label file ({exc}); recreate it with save_label_channels") from None
    return check_label_channels(labels, 1, str(path))


class PackedLabels:
    """The 4-bit label cache of one layer: per (sequence, KV head) the label channels of every cached
    key, quantized per token (:func:`sparseforge.ops.label_select.quantize_labels`) and packed in the
    native kernel's layout (``codes (B, Hkv, C, cap / 2)`` uint8, ``scales (B, Hkv, cap)`` float32,
    ``cap`` a multiple of 32 that doubles as tokens arrive). ``C / 2 + 4`` bytes per token and KV head
    against ``2 * head_dim * 2`` for the bf16 keys and values it stands for.

    Example:
        >>> import torch
        >>> cache = PackedLabels(1, 1, 2)
        >>> cache.write(torch.tensor([[[[1.0, -2.0], [0.5, 0.5]]]]), 0)
        >>> cache.n, tuple(cache.codes.shape), tuple(cache.scales.shape)
        (2, (1, 1, 2, 16), (1, 1, 32))
    """

    def __init__(self, batch: int, kv_heads: int, channels: int):
        self.codes = torch.zeros(batch, kv_heads, channels, 0, dtype=torch.uint8)
        self.scales = torch.zeros(batch, kv_heads, 0, dtype=torch.float32)
        self.n = 0

    def write(self, label_keys: Tensor, start: int) -> None:
        """Tokens ``[start, start + T)`` from ``label_keys (B, Hkv, T, C)``; later tokens are dropped."""
        from sparseforge.ops.label_select import BLOCK, pack_codes, quantize_labels, unpack_codes

        if not 0 <= start <= self.n:
            raise DataError(f"PackedLabels: tokens can only follow the {self.n} held, got start {start}")
        T = label_keys.shape[2]
        end = start + T
        cap = -(-end // BLOCK) * BLOCK
        if cap > self.scales.shape[-1]:
            cap = max(cap, 2 * self.scales.shape[-1])
            codes = torch.zeros(*self.codes.shape[:3], cap // 2, dtype=torch.uint8)
            codes[..., : self.codes.shape[-1]] = self.codes
            scales = torch.zeros(*self.scales.shape[:2], cap, dtype=torch.float32)
            scales[..., : self.scales.shape[-1]] = self.scales
            self.codes, self.scales = codes, scales
        codes, scales = quantize_labels(label_keys)  # (B, Hkv, T, C), (B, Hkv, T)
        b0 = start // BLOCK * BLOCK  # the first block the new tokens touch; its older tokens are kept
        if start > b0:
            held = unpack_codes(self.codes[..., b0 // 2: b0 // 2 + BLOCK // 2])[..., : start - b0, :]
            codes = torch.cat([held, codes], dim=2)
        packed = pack_codes(codes)  # (B, Hkv, C, blocks * 16)
        self.codes[..., b0 // 2: b0 // 2 + packed.shape[-1]] = packed
        self.scales[..., start:end] = scales
        self.n = end

