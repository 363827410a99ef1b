"""Rotary position embedding (RoPE) as transformers applies it, to move a rotated query to another position.

RoPE rotates each channel pair ``(x_i, x_{i + r/2})`` of the first ``r`` channels (``rotate_half``
convention) by ``position * inv_freq_i``; rotations compose, so a query rotated at position ``p``
becomes the query at ``p + delta`` by one more rotation of ``delta * inv_freq``. StreamingLLM's
cache positions (:class:`~sparseforge.attention.policies.StreamingLLM`) use this for the sinks.

Example:
    >>> import torch
    >>> q = torch.randn(1, 2, 8)
    >>> f = torch.tensor([1.0, 0.1, 0.01, 0.001])
    >>> torch.allclose(shift_positions(shift_positions(q, 5, f), -5, f), q, atol=1e-6)
    True
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparseforge.errors import ConfigError

__all__ = ["inv_freq_of", "shift_positions"]


def inv_freq_of(config, head_dim: int) -> Tensor:
    """float32 ``(r / 2,)`` RoPE frequencies of a transformers config (``rope_parameters``), ``r`` the
    rotated channels (``head_dim * partial_rotary_factor``). Raises for length-dependent RoPE."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", "default")
    if rope_type == "dynamic":
        raise ConfigError("StreamingLLM(positions='cache') needs fixed RoPE frequencies; 'dynamic' RoPE rescales them "
                          "with the length: use positions='text'")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        dim = int(head_dim * params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)))
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ConfigError(f"unknown RoPE type {rope_type!r} in the model config")
    inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    return inv_freq.float()


def shift_positions(q: Tensor, delta: int, inv_freq: Tensor) -> Tensor:
    """``q (..., D)`` rotated at position ``p`` -> the same vector rotated at ``p + delta`` (float32)."""
    r = 2 * inv_freq.numel()
    angle = delta * inv_freq.double()  # (r / 2,)
    cos, sin = angle.cos().float(), angle.sin().float()
    x1, x2, rest = q[..., : r // 2], q[..., r // 2 : r], q[..., r:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)
