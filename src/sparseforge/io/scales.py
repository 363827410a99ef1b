"""The quantization scales across save and load.

A quantized layer's :data:`~sparseforge.quant.config.SCALE_BUFFER` buffer is part of the model's
state dict, so every checkpoint (dense or compressed) stores it as a plain float32 tensor
``<module>.weight_scale`` next to the weights, covered by the checksums like any other tensor; the
``sparsity_config`` block records ``quantization`` (bits, group size, method, the scaled layers) for
readers. A transformers model class does not declare these buffers, so the loaders find the stored
scale tensors (:func:`stored_scale_shapes`), add placeholders to the skeleton they validate against
(:func:`add_scale_placeholders`), keep them out of transformers' state dict (:func:`pop_scales`) and
register them on the loaded modules (:func:`attach_scales`).

Example:
    >>> import sparseforge as sf                                             # doctest: +SKIP
    >>> model = sf.load("pruned-int8")          # scales back as model.<...>.q_proj.weight_scale
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparseforge.errors import ModelError
from sparseforge.io.layout import read_safetensors_header
from sparseforge.layers import is_linear, weight_2d
from sparseforge.quant.config import SCALE_BUFFER

__all__ = ["stored_scale_shapes", "add_scale_placeholders", "pop_scales", "attach_scales"]

_SUFFIX = "." + SCALE_BUFFER


def stored_scale_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` of the scale tensors (``*.weight_scale``) in safetensors ``files``
    (headers only; ModelError on a corrupt header)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        for key, entry in read_safetensors_header(file).items():
            if key.endswith(_SUFFIX):
                shapes[key] = tuple(entry["shape"])
    return shapes


def _owner(model: nn.Module, key: str) -> nn.Module | None:
    """The linear module (nn.Linear, Conv1D or SparseLinear) ``key`` (``<module>.weight_scale``) belongs to, or None."""
    try:
        module = model.get_submodule(key[: -len(_SUFFIX)])
    except AttributeError:
        return None
    return module if is_linear(module) or isinstance(getattr(module, "out_features", None), int) else None


def add_scale_placeholders(model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> None:
    """Register empty (meta) scale buffers on ``model``'s linear layers named in ``shapes``.

    A checkpoint's skeleton then expects the stored scales; names that are no linear layer of the
    model get none, so validation reports them."""
    for key, shape in shapes.items():
        module = _owner(model, key)
        if module is not None and getattr(module, SCALE_BUFFER, None) is None:
            module.register_buffer(SCALE_BUFFER, torch.empty(shape, dtype=torch.float32, device="meta"))


def pop_scales(state: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Remove and return the scale tensors of ``state`` (those named in ``shapes``)."""
    return {key: state.pop(key) for key in list(state) if key in shapes}


def attach_scales(model: nn.Module, scales: dict[str, torch.Tensor]) -> None:
    """Register each scale tensor as its module's float32 buffer; ModelError if it does not fit the layer."""
    for key, scale in scales.items():
        module = _owner(model, key)
        if module is None:
            raise ModelError(f"scale tensor {key!r} belongs to no linear layer of {type(model).__name__}")
        rows = module.out_features if hasattr(module, "out_features") else weight_2d(module).shape[0]
        if scale.dim() not in (1, 2) or scale.shape[0] != rows:
            raise ModelError(f"scale tensor {key!r} has shape {list(scale.shape)}, but the layer has {rows} output "
                             "channels; the checkpoint is corrupt")
        module.register_buffer(SCALE_BUFFER, scale.to(torch.float32).contiguous())
