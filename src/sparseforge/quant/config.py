"""Configuration of weight quantization (torch-free): :class:`QuantConfig` and the buffer contract.

:class:`QuantConfig` is defined in :mod:`sparseforge.config` next to the other configs (a
:class:`~sparseforge.config.SparsifyConfig` holds one) and re-exported here.

Quantization here is *symmetric* and *narrow-range*: a weight ``w`` of row ``r`` becomes the integer
code ``q = clamp(round(w / s_r), -qmax, qmax)`` with ``qmax = 2**(bits-1) - 1`` (127 for int8, 7 for
int4; -128 / -8 are never used) and the layer keeps the dequantized value ``q * s_r`` in float32.

Contract of a quantized layer (what :func:`sparseforge.quant.quantize_` and the joint SparseGPT
pass leave behind, and what an int8 storage format may rely on):

* ``module.weight`` holds exactly ``q.float() * scale`` (float32 products; a bfloat16 model keeps
  them rounded to its dtype, so the exact contract is that of float32 models), and pruned entries
  are exactly ``+0.0``;
* ``module.weight_scale`` (the name is :data:`SCALE_BUFFER`) is a registered, persistent float32
  buffer of shape ``(out_features,)`` per output channel, or ``(out_features, in_features //
  group_size)`` with ``group_size`` (group ``g`` of row ``r`` covers columns ``g*G .. g*G+G-1``);
* a row (or group) whose weights are all zero has scale ``0.0`` and codes ``0``.

Example:
    >>> from sparseforge.quant.config import QuantConfig, parse_quantize
    >>> QuantConfig(bits=4, method="joint").qmax
    7
    >>> parse_quantize("int8")
    QuantConfig(bits=8, group_size=None, method='rtn')
"""

from __future__ import annotations

from sparseforge.config import QUANT_BITS, QUANT_METHODS, QuantConfig
from sparseforge.errors import ConfigError

__all__ = ["QuantConfig", "SCALE_BUFFER", "QUANT_METHODS", "QUANT_BITS", "parse_quantize", "quantization_block"]

SCALE_BUFFER = "weight_scale"  # the float32 buffer every quantized linear layer carries


def parse_quantize(text: str, method: str = "rtn", group_size: int | None = None) -> QuantConfig:
    """``"int8"`` / ``"int4"`` (the CLI's ``--quantize``) -> :class:`QuantConfig`."""
    bits = {"int8": 8, "int4": 4}.get(text) if isinstance(text, str) else None
    if bits is None:
        raise ConfigError(f"unknown quantization {text!r}; use int8 or int4")
    return QuantConfig(bits=bits, group_size=group_size, method=method)


def quantization_block(config: QuantConfig, layers: list[str]) -> dict:
    """The checkpoint's ``sparsity_config["quantization"]`` entry: how the listed layers were quantized."""
    return {"bits": config.bits, "group_size": config.group_size, "method": config.method,
            "scheme": "symmetric", "buffer": SCALE_BUFFER, "layers": list(layers)}
