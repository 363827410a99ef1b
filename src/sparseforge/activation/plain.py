"""The model's activation-sparse layers seen as the plain layers they replaced (for saving).

A checkpoint stores the weights under the names and shapes of the unmodified model
(``q_proj.weight`` ``(out, in)``, not ``q_proj.weight_t`` ``(in, out)``) and the thresholds in
``sparsity_config.activation`` (``docs/checkpoint-format.md``). :func:`plain_layers` swaps every
:class:`~sparseforge.activation.SparseInputLinear` for an ``nn.Linear`` whose weight is a transposed
view of the same storage (no copy when the model's dtype is the stored one) and every
:class:`~sparseforge.activation.cats.CATSMLP` for a module holding its three projections, and puts
the sparse layers back on exit, even after an error.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from sparseforge.activation import SparseInputLinear
    >>> from sparseforge.activation.plain import plain_layers
    >>> model = nn.Sequential(SparseInputLinear.from_linear(nn.Linear(4, 3), threshold=0.1))
    >>> with plain_layers(model):
    ...     sorted(model.state_dict())
    ['0.bias', '0.weight']
    >>> type(model[0]).__name__
    'SparseInputLinear'
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn

from sparseforge.activation.cats import CATSMLP
from sparseforge.activation.linear import SparseInputLinear
from sparseforge.layers import set_module
from sparseforge.quant.config import SCALE_BUFFER

__all__ = ["plain_layers", "as_linear"]


def as_linear(layer: SparseInputLinear, dtype: Optional[torch.dtype] = None) -> nn.Linear:
    """An ``nn.Linear`` over ``layer``'s weight (a transposed view, cast to ``dtype`` when given),
    with the layer's quantization scales as its ``weight_scale`` buffer when it has them (a
    quantized layer's buffer, or the row scales of a column layer's int8 values), so a compressed
    save stores it int8."""
    weight = layer.weight_t.detach().t()  # (out, in)
    dtype = dtype or weight.dtype
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if layer.bias is not None:
        linear.bias = nn.Parameter(layer.bias.detach().to(dtype), requires_grad=False)
    scale = getattr(layer, "scales", None)  # ColumnSparseLinear with int8 values: float32 (out,)
    scale = getattr(layer, SCALE_BUFFER, None) if scale is None else scale
    if isinstance(scale, torch.Tensor):
        linear.register_buffer(SCALE_BUFFER, scale.detach())
    return linear


class _GLUProjections(nn.Module):
    """The state-dict shape of a GLU MLP: gate_proj, up_proj, down_proj (never run)."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj


def _model_dtype(model: nn.Module) -> Optional[torch.dtype]:
    dtype = getattr(model, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


@contextmanager
def plain_layers(model: nn.Module) -> Iterator[bool]:
    """Inside the block ``model`` has its plain layers (see the module doc); yields whether any
    layer was swapped."""
    dtype = _model_dtype(model)
    swapped: list[tuple[str, nn.Module]] = []
    cats = {name for name, m in model.named_modules() if isinstance(m, CATSMLP)}
    try:
        for name, m in list(model.named_modules()):
            if name in cats:
                plain = _GLUProjections(m.gate_proj, m.up_proj, as_linear(m.down_proj, dtype))
            elif isinstance(m, SparseInputLinear) and name.rpartition(".")[0] not in cats:
                plain = as_linear(m, dtype)
            else:
                continue
            set_module(model, name, plain)
            swapped.append((name, m))
        yield bool(swapped)
    finally:
        for name, m in reversed(swapped):
            set_module(model, name, m)
