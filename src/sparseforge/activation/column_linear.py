"""``ColumnSparseLinear``: a layer that is both pruned and activation-sparse.

A :class:`~sparseforge.activation.SparseInputLinear` whose weight is stored in the column bitmap
format (:class:`~sparseforge.formats.colbitmap.ColumnBitmapWeight`: per input channel a bitmap over
the outputs plus the packed kept values, float32, bfloat16 or int8 with one float32 scale per output
row) instead of a dense ``(in, out)``
matrix. A decode step skips the inactive input channels entirely and reads only the kept weights of
the active ones, so the bytes fall as ``(1 - s_act) * ((1 - s_w) * value_size + 1/8)`` per weight
(TEAL, Liu et al. 2024, arXiv:2408.14690, for the channels; ``docs/activation.md``). Multi-token
calls decode the same stored layout panel by panel into a dense GEMM (no second copy);
``compute_dtype=torch.bfloat16`` runs calls of 16 rows and more in bf16 compute instead (AMX /
AVX512_BF16 where the CPU has them, ``sparseforge.ops.column_sparse``).

Thresholds, ``token_fraction``, ``track_sparsity`` and saving behave as in ``SparseInputLinear``
(``weight_t`` / ``weight`` give the dense weight on demand, for saving and inspection).
:func:`column_sparse_` converts a model's sparse-input layers whose weights are pruned;
``sparseforge.load(path, sparse=True)`` builds these layers for a checkpoint whose layers are both
compressed and listed in its ``activation`` section.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from sparseforge.activation import ColumnSparseLinear
    >>> dense = nn.Linear(8, 4)
    >>> with torch.no_grad():
    ...     dense.weight[:, ::2] = 0.0                      # 50% of the weights pruned
    >>> layer = ColumnSparseLinear.from_linear(dense, threshold=0.0)
    >>> x = torch.randn(1, 8)
    >>> torch.allclose(layer(x), dense(x), atol=1e-6), round(layer.weight_sparsity(), 2)
    (True, 0.5)
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from sparseforge.activation.linear import SparseInputLinear
from sparseforge.errors import ConfigError, ModelError
from sparseforge.formats.colbitmap import ColumnBitmapWeight
from sparseforge.nn.sparse_linear import SparseLinear
from sparseforge.kernels import native
from sparseforge.quant.config import SCALE_BUFFER
from sparseforge.ops.column_sparse import (check_compute_dtype, column_sparse_bf16_op, column_sparse_op, kernel_args,
                                           uses_bf16_product)

__all__ = ["ColumnSparseLinear", "column_sparse_"]


class ColumnSparseLinear(SparseInputLinear):
    """``y = mask(x) @ W^T + bias``, ``W`` a :class:`ColumnBitmapWeight` (see the module doc)."""

    _compute_dtype = torch.float32  # class default: modules pickled before compute_dtype existed load as float32

    def __init__(self, weight: ColumnBitmapWeight, bias: Optional[Tensor] = None, *,
                 threshold: "float | Tensor" = 0.0, compute_dtype: torch.dtype = torch.float32) -> None:
        nn.Module.__init__(self)  # no dense weight_t: the weight lives in the column buffers
        if not isinstance(weight, ColumnBitmapWeight):
            raise ModelError(f"ColumnSparseLinear needs a ColumnBitmapWeight, got {type(weight).__name__}")
        out_features, in_features = weight.shape
        self._init_common(in_features, out_features, bias is not None, threshold)
        if bias is not None:
            if tuple(bias.shape) != (out_features,):
                raise ModelError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
            with torch.no_grad():
                self.bias.copy_(bias.detach().float())
        # not persistent: checkpoints store the plain nn.Linear weight (sparseforge.activation.plain)
        self.register_buffer("bitmap", weight.bitmap, persistent=False)  # int64 (in, ceil(out / 64))
        self.register_buffer("block_ptr", weight.block_ptr, persistent=False)  # int64 (in * nblk + 1,)
        self.register_buffer("values", weight.values, persistent=False)  # (nnz,) float32 / bfloat16 / int8
        self.register_buffer("scales", weight.scales, persistent=False)  # float32 (out,) with int8 values, else None
        self._views = None  # (buffer pointers, kernel_args): checked once per set of buffers
        self.set_compute_dtype(compute_dtype)

    @property
    def compute_dtype(self) -> torch.dtype:
        """``torch.float32``, or ``torch.bfloat16`` for the bf16 product at 16 rows and more."""
        return self._compute_dtype

    def set_compute_dtype(self, dtype: torch.dtype) -> "ColumnSparseLinear":
        """Run calls of at least 16 rows in bf16 compute (``torch.bfloat16``: the kept inputs and the
        weights rounded to bf16, float32 accumulation) or in float32; returns ``self``.

        Example:
            >>> import torch
            >>> from sparseforge.activation import ColumnSparseLinear
            >>> layer = ColumnSparseLinear.from_linear(torch.nn.Linear(64, 32), threshold=0.1)
            >>> layer.set_compute_dtype(torch.bfloat16).compute_dtype
            torch.bfloat16
        """
        check_compute_dtype(dtype)
        if dtype != torch.float32 and getattr(self, "scales", None) is not None:
            raise ConfigError("bf16 compute takes float32 or bfloat16 column values, not int8; keep "
                              "compute_dtype=torch.float32 for an int8 layer")
        self._compute_dtype = dtype
        return self

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: "float | Tensor" = 0.0,
                    dtype: Optional[torch.dtype] = None) -> "ColumnSparseLinear":
        """The layer of ``linear``, its zero weights pruned; ``dtype`` the values' (default bfloat16 for
        a bfloat16 layer, else float32; int8: one scale per output row, round to nearest)."""
        if not isinstance(linear, nn.Linear):
            raise ModelError(f"ColumnSparseLinear.from_linear needs an nn.Linear, got {type(linear).__name__}")
        weight = ColumnBitmapWeight.from_dense(linear.weight.detach(), values_dtype=dtype)
        return cls(weight, linear.bias, threshold=threshold)

    @classmethod
    def from_module(cls, module: nn.Module, threshold: "float | Tensor | None" = None,
                    dtype: Optional[torch.dtype] = None) -> "ColumnSparseLinear":
        """From an ``nn.Linear``, a ``SparseInputLinear`` (its threshold, ``token_fraction`` and
        calibration info kept; a quantized one, with a per-row ``weight_scale`` buffer, gets int8
        values on that grid unless ``dtype`` says otherwise) or a ``SparseLinear`` (its format
        converted one layer at a time); ``threshold`` overrides the module's (default 0 for layers
        without one)."""
        if isinstance(module, SparseLinear):
            weight = ColumnBitmapWeight.from_format(module.weight_format, values_dtype=dtype)
            layer = cls(weight, module.bias, threshold=0.0 if threshold is None else threshold)
        elif isinstance(module, SparseInputLinear):
            w = module.weight  # (out, in)
            scale = getattr(module, SCALE_BUFFER, None)
            if dtype is None and isinstance(scale, Tensor) and scale.dim() == 1:  # quantized: q * scale, int8 again
                weight = ColumnBitmapWeight.from_dense(w.float(), values_dtype=torch.int8, scales=scale.float())
            else:
                weight = ColumnBitmapWeight.from_dense(w, values_dtype=dtype or w.dtype)
            layer = cls(weight, module.bias, threshold=module.threshold if threshold is None else threshold)
            layer.token_fraction = module.token_fraction
            layer.activation_info = dict(module.activation_info)
        elif isinstance(module, nn.Linear):
            layer = cls.from_linear(module, 0.0 if threshold is None else threshold, dtype)
        else:
            raise ModelError(f"ColumnSparseLinear.from_module needs an nn.Linear, SparseInputLinear or SparseLinear, "
                             f"got {type(module).__name__}")
        return layer

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.scales is not None and self.scales.dtype != torch.float32:  # a dtype cast of the module: the
            self.scales = self.scales.float()  # row scales of int8 values stay float32 (the kernel's contract)
        return self

    def __getstate__(self):
        state = dict(super().__getstate__())
        state["_views"] = None  # numpy views of the buffers: never copied or pickled
        return state

    @property
    def weight_format(self) -> ColumnBitmapWeight:
        """The stored weight as a format object over the module's buffers."""
        return ColumnBitmapWeight((self.out_features, self.in_features), self.bitmap, self.values, self.scales)

    @property
    def weight_t(self) -> Tensor:  # type: ignore[override]
        """Dense ``(in, out)`` copy of the weight (pruned entries 0), built on each access."""
        return self.weight_format.to_dense().t()

    def weight_sparsity(self) -> float:
        """Fraction of the weights pruned (not stored)."""
        total = self.in_features * self.out_features
        return 1.0 - self.values.numel() / total if total else 0.0

    def _row_kernel(self) -> Optional[tuple[Callable, list]]:
        if uses_bf16_product(1, self._compute_dtype):
            return None
        kernel, *views = kernel_args(self.bitmap, self.block_ptr, self.values, self.out_features, self.scales)
        thr = self.threshold.detach().reshape(-1).contiguous().numpy()
        bias = None if self.bias is None else self.bias.detach().contiguous().numpy()
        return kernel, [*views, thr, bias]

    def _product(self, x2: Tensor, threshold: Tensor) -> Tensor:
        if self.track_sparsity:
            self.seen += x2.numel()
            self.skipped += int((x2.abs() <= threshold).sum())
        bias = self.bias if self.bias is None or self.bias.dtype == torch.float32 else self.bias.float()
        t = threshold.float()
        bf16 = uses_bf16_product(x2.shape[0], self._compute_dtype)
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (
                x2.requires_grad or (bias is not None and bias.requires_grad))):
            args = (x2, self.bitmap, self.block_ptr, self.values, t, bias, self.out_features)
            return column_sparse_bf16_op(*args) if bf16 else column_sparse_op(*args, self.scales)
        scales_ptr = None if self.scales is None else self.scales.data_ptr()
        key = (self.bitmap.data_ptr(), self.block_ptr.data_ptr(), self.values.data_ptr(), self.values.dtype, scales_ptr)
        if self._views is None or self._views[0] != key:
            self._views = (key, kernel_args(self.bitmap, self.block_ptr, self.values, self.out_features, self.scales))
        kernel, *views = self._views[1]
        y = torch.empty(x2.shape[0], self.out_features)  # (N, out)
        thr = t.detach().contiguous().numpy()
        if thr.shape[0] not in (1, self.in_features):
            raise ConfigError(f"threshold must be a scalar or have {self.in_features} entries, got {thr.shape[0]}")
        args = (x2.detach().numpy(), *views, thr, None if bias is None else bias.detach().contiguous().numpy(), y.numpy())
        if bf16:
            native().column_sparse_linear_bf16(*args, "")
        else:
            kernel(*args)
        return y

    def extra_repr(self) -> str:
        extra = "" if self._compute_dtype == torch.float32 else ", compute_dtype=bfloat16"
        extra += ", values=int8" if self.scales is not None else ""
        return super().extra_repr().replace("weight=", f"weight_sparsity={self.weight_sparsity():.3f}, weight=colbitmap ") + extra


def column_sparse_(model: nn.Module, min_weight_sparsity: float = 0.0,
                   dtype: Optional[torch.dtype] = None, compute_dtype: torch.dtype = torch.float32) -> list[str]:
    """Swap the model's ``SparseInputLinear`` layers whose weights are at least ``min_weight_sparsity``
    zeros for :class:`ColumnSparseLinear` (thresholds kept), in place; returns the names swapped.
    ``dtype``: the stored values' dtype; ``compute_dtype``: see :meth:`ColumnSparseLinear.set_compute_dtype`.

    R-Sparse layers (their low-rank term reads the skipped channels) stay as they are.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from sparseforge.activation import SparseInputLinear
        >>> model = nn.Sequential(SparseInputLinear.from_linear(nn.Linear(4, 4), threshold=0.1))
        >>> column_sparse_(model, min_weight_sparsity=0.5)   # a dense weight: not swapped
        []
    """
    from sparseforge.activation.rsparse import RSparseLinear
    from sparseforge.layers import set_module

    if not 0.0 <= float(min_weight_sparsity) <= 1.0:
        raise ConfigError(f"min_weight_sparsity must be in [0, 1], got {min_weight_sparsity}")
    check_compute_dtype(compute_dtype)
    swapped = []
    for name, m in list(model.named_modules()):
        if type(m) is not SparseInputLinear or isinstance(m, RSparseLinear):
            continue
        w = m.weight_t  # (in, out)
        if float((w == 0).float().mean()) >= float(min_weight_sparsity):
            set_module(model, name, ColumnSparseLinear.from_module(m, dtype=dtype).set_compute_dtype(compute_dtype))
            swapped.append(name)
    return swapped
