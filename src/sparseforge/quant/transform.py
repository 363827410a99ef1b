"""``quantize_``: round-to-nearest quantization of a whole model's linear layers, in place.

Every target layer's weight is replaced by its dequantized values on the symmetric grid (exactly
``codes * scale`` in float32; zeros stay exactly zero, so a pruned layer keeps its mask) and gets the
float32 buffer :data:`~sparseforge.quant.config.SCALE_BUFFER` (see :mod:`sparseforge.quant.config`).
Applied after pruning this is the RTN baseline of SparseGPT section 3.4; the joint mode needs the
calibration pass and runs inside :func:`sparseforge.sparsify_` instead.

Example:
    >>> import torch
    >>> from sparseforge.quant import QuantConfig, quantize_
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> quantize_(model, QuantConfig(bits=4), targets=["0", "2"]).layers
    ['0', '2']
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from sparseforge.errors import ConfigError, NumericalError
from sparseforge.layers import find_blocks, select_targets, weight_2d
from sparseforge.quant.config import SCALE_BUFFER, QuantConfig
from sparseforge.quant.grid import fake_quantize

__all__ = ["quantize_", "QuantizeReport", "set_quantized", "attach_scale"]


@dataclass
class QuantizeReport:
    config: QuantConfig
    layers: list[str]
    seconds: float

    def summary(self) -> str:
        return f"{self.config.describe()}: {len(self.layers)} layers quantized in {self.seconds:.1f} s"


def attach_scale(module: nn.Module, scale: torch.Tensor) -> None:
    """Register ``scale`` as ``module``'s persistent float32 buffer :data:`SCALE_BUFFER` (replacing one)."""
    module.register_buffer(SCALE_BUFFER, scale.detach().to(torch.float32).contiguous())


@torch.no_grad()
def set_quantized(module: nn.Module, weight: torch.Tensor, scale: torch.Tensor) -> None:
    """Write the dequantized ``weight`` (out, in) into ``module`` and register its float32 scales."""
    target = weight_2d(module)  # (out, in) view
    target.copy_(weight.to(target.dtype))
    attach_scale(module, scale.to(target.device))


@torch.no_grad()
def quantize_(
    model: nn.Module,
    config: QuantConfig,
    *,
    targets: list[str] | None = None,
    ignore: list[str] | tuple[str, ...] = (),
) -> QuantizeReport:
    """Round-to-nearest quantize ``model``'s linear layers in place (default: those in the repeated blocks).

    Every target is checked (finite, group size divides its width) before any weight changes.
    """
    if isinstance(config, dict):
        config = QuantConfig(**config)
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"quantize_ needs a QuantConfig, got {type(config).__name__}")
    if config.method != "rtn":
        raise ConfigError(
            "joint quantization runs inside SparseGPT's pruning pass: use sparsify_(model, SparsifyConfig("
            "method='sparsegpt', quantize=QuantConfig(method='joint'))); quantize_ does round-to-nearest (method='rtn')"
        )
    start = time.perf_counter()
    prefix = None
    if targets is None:
        prefix, _ = find_blocks(model)
    names = select_targets(model, targets, list(ignore), prefix)
    modules = dict(model.named_modules())
    for name in names:
        w = weight_2d(modules[name])
        if not torch.isfinite(w).all():
            raise NumericalError(f"layer {name} has NaN or inf weights; fix or reload the model before quantizing")
        if config.group_size is not None and w.shape[1] % config.group_size:
            raise ConfigError(f"layer {name}: group_size={config.group_size} does not divide in_features={w.shape[1]}")
    for name in names:
        module = modules[name]
        deq, scale = fake_quantize(weight_2d(module).float(), config.bits, config.group_size)
        set_quantized(module, deq, scale)
    return QuantizeReport(config, names, time.perf_counter() - start)
