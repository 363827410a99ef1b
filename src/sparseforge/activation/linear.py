"""``SparseInputLinear``: an ``nn.Linear`` replacement that skips its small input channels.

The weight is held input-channel-major (``weight_t`` = ``linear.weight.T``, contiguous, ``(in, out)``,
float32 or bfloat16) with a threshold per layer (or per input channel): channels with
``|x| <= threshold`` are skipped, and the native kernel never reads their weights, so a decode step
(one token) reads ``(1 - s)`` of the layer's bytes (TEAL, Liu et al. 2024, arXiv:2408.14690).
Multi-token calls (prefill) apply the same mask and run a GEMM over the same stored weights.

``token_fraction`` < 1 sparsifies only the last ``int(T * token_fraction)`` positions of a
multi-token call (TEAL's published perplexities use 0.5: a dense prefix, a sparse suffix); single
tokens are always sparsified. ``track_sparsity`` counts the skipped channels seen (``skipped /
seen`` = the measured activation sparsity).

A quantized ``nn.Linear`` (``sparseforge.quant``: weight ``q * scale`` plus the float32 buffer
``weight_scale``) keeps its scale buffer here, so saving the model stores the layer quantized again
(int8 values and row scales in a compressed checkpoint).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from sparseforge.activation import SparseInputLinear
    >>> dense = nn.Linear(4, 3)
    >>> layer = SparseInputLinear.from_linear(dense, threshold=0.0)   # threshold 0: exact
    >>> x = torch.randn(2, 4)
    >>> torch.allclose(layer(x), dense(x), atol=1e-6)
    True
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from sparseforge.errors import ConfigError, ModelError
from sparseforge.ops.sparse_input import gemv_args, sparse_input_linear
from sparseforge.quant.config import SCALE_BUFFER

__all__ = ["SparseInputLinear"]


def _check_threshold(t: Tensor, in_features: int, name: str = "") -> Tensor:
    t = torch.as_tensor(t, dtype=torch.float32).detach().reshape(-1).clone()
    where = f" for {name}" if name else ""
    if t.numel() not in (1, in_features):
        raise ConfigError(f"threshold{where} must be a scalar or have {in_features} entries, got {t.numel()}")
    if torch.isnan(t).any() or (t < 0).any():
        raise ConfigError(f"threshold{where} must be >= 0 (0 = dense, +inf = skip every channel), got {t.tolist()[:4]}")
    return t


class _BoundRow:
    """``kernel(x.numpy(), *views, y.numpy())`` on a float32 ``(1, in)`` row: the bound batch-1 call."""

    __slots__ = ("kernel", "views", "out_features")

    def __init__(self, kernel: Callable, views: list, out_features: int) -> None:
        self.kernel, self.views, self.out_features = kernel, views, out_features

    def __call__(self, x: Tensor) -> Tensor:
        y = torch.empty(1, self.out_features)  # (1, out)
        self.kernel(x.numpy(), *self.views, y.numpy())
        return y


class SparseInputLinear(nn.Module):
    """``y = mask(x) @ weight_t + bias`` with ``mask`` zeroing the channels ``|x| <= threshold``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, threshold: "float | Tensor" = 0.0,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if dtype not in (torch.float32, torch.bfloat16):
            raise ConfigError(f"SparseInputLinear stores float32 or bfloat16 weights, got {dtype}")
        self._init_common(in_features, out_features, bias, threshold)
        self.weight_t = nn.Parameter(torch.zeros(self.in_features, self.out_features, dtype=dtype), requires_grad=False)

    def _init_common(self, in_features: int, out_features: int, bias: bool, threshold: "float | Tensor") -> None:
        """Sizes, bias, threshold and the tracking state (shared with layers that store the weight
        in another layout, :class:`~sparseforge.activation.ColumnSparseLinear`)."""
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.bias = nn.Parameter(torch.zeros(self.out_features), requires_grad=False) if bias else None
        self.register_buffer("threshold", _check_threshold(torch.as_tensor(threshold), self.in_features))
        self.token_fraction = 1.0
        self.track_sparsity = False
        self.seen = 0  # input channels seen while tracking
        self.skipped = 0  # of which skipped
        self.activation_info: dict = {}  # method / sparsity / calibrated_sparsity recorded by calibration
        self._gemv = None  # (data pointers, gemv_args): the batch-1 eager fast path

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: "float | Tensor" = 0.0,
                    dtype: Optional[torch.dtype] = None) -> "SparseInputLinear":
        """The layer of ``linear`` (weight transposed once, bias kept in float32; a quantized layer's
        ``weight_scale`` buffer kept).

        ``dtype``: weight storage; default bfloat16 for a bfloat16 layer, else float32.
        """
        if not isinstance(linear, nn.Linear):
            raise ModelError(f"SparseInputLinear.from_linear needs an nn.Linear, got {type(linear).__name__}")
        if dtype is None:
            dtype = torch.bfloat16 if linear.weight.dtype == torch.bfloat16 else torch.float32
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, threshold=threshold, dtype=dtype)
        with torch.no_grad():
            layer.weight_t.copy_(linear.weight.detach().t().to(dtype))  # (in, out)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach().float())
        scale = getattr(linear, SCALE_BUFFER, None)
        if isinstance(scale, Tensor):  # (out,) or (out, groups): the grid of the quantized weight
            layer.register_buffer(SCALE_BUFFER, scale.detach().float().clone())
        return layer

    def __getstate__(self):
        state = dict(super().__getstate__())
        state["_gemv"] = None  # numpy views of the buffers: never copied or pickled
        return state

    @property
    def weight(self) -> Tensor:
        """``(out, in)`` view of the stored weight (for code that inspects ``.weight``)."""
        return self.weight_t.t()

    def set_threshold(self, threshold: "float | Tensor") -> None:
        """Replace the threshold (scalar or per input channel; >= 0, +inf allowed)."""
        self.threshold = _check_threshold(torch.as_tensor(threshold), self.in_features)

    def measured_sparsity(self) -> float:
        """Fraction of input channels skipped since tracking started (NaN when nothing was seen)."""
        return self.skipped / self.seen if self.seen else float("nan")

    def _eager_gemv(self, x2: Tensor) -> Optional[Tensor]:
        """One float32 row, no autograd, not compiling: the native GEMV on views checked once per
        storage (a new weight, threshold or bias tensor is rechecked); None where that does not apply."""
        w, t, b = self.weight_t, self.threshold, self.bias
        if (x2.shape[0] != 1 or t.dtype != torch.float32 or (b is not None and b.dtype != torch.float32)
                or torch.compiler.is_compiling() or (torch.is_grad_enabled() and (x2.requires_grad or w.requires_grad
                                                                                  or (b is not None and b.requires_grad)))):
            return None
        key = (w.data_ptr(), w.dtype, t.data_ptr(), t.shape, None if b is None else b.data_ptr())
        if self._gemv is None or self._gemv[0] != key:
            self._gemv = (key, gemv_args(w, t, b))
        kernel, *views = self._gemv[1]
        y = torch.empty(1, self.out_features)  # (1, out)
        kernel(x2.detach().numpy(), *views, y.numpy())
        return y

    def bound_gemv(self) -> Optional[Callable[[Tensor], Tensor]]:
        """The batch-1 product bound once, for a decode loop that calls this layer every token:
        ``f(x)`` for a float32 C-contiguous ``x (1, in)`` in inference returns float32 ``(1, out)``,
        the kernel :meth:`forward` runs, without its per-call checks; None where this layer's forward
        does more than that kernel (sparsity tracking, a non-float32 threshold or bias). Bind again
        after replacing the threshold, weight or bias.

        Example:
            >>> import torch
            >>> layer = SparseInputLinear(4, 2, threshold=0.5)
            >>> x = torch.tensor([[1.0, 0.1, -2.0, 0.3]])
            >>> with torch.inference_mode():
            ...     torch.equal(layer.bound_gemv()(x), layer(x))
            True
        """
        if self.track_sparsity or self.threshold.dtype != torch.float32 or (
                self.bias is not None and self.bias.dtype != torch.float32):
            return None
        row = self._row_kernel()
        return None if row is None else _BoundRow(row[0], row[1], self.out_features)

    def _row_kernel(self) -> Optional[tuple[Callable, list]]:
        """``(kernel, views)`` of :meth:`bound_gemv` (``kernel(x, *views, y)``), or None: the layer's
        batch-1 forward is not that one kernel (a subclass with more terms, another compute path)."""
        if type(self) is not SparseInputLinear:
            return None
        kernel, *views = gemv_args(self.weight_t, self.threshold, self.bias)
        return kernel, views

    def _product(self, x2: Tensor, threshold: Tensor) -> Tensor:
        if threshold is self.threshold and not self.track_sparsity:
            y = self._eager_gemv(x2)
            if y is not None:
                return y
        if self.track_sparsity:
            self.seen += x2.numel()
            self.skipped += int((x2.abs() <= threshold).sum())
        bias = self.bias if self.bias is None or self.bias.dtype == torch.float32 else self.bias.float()
        return sparse_input_linear(x2, self.weight_t, threshold.float(), bias)  # (N, out); .to(dtype) may have cast them

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x32 = x.float()
        if self.token_fraction < 1.0 and x.dim() >= 2 and x.shape[-2] > 1:
            tokens = x.shape[-2]
            n_sparse = int(tokens * self.token_fraction)
            dense_part = x32[..., : tokens - n_sparse, :].reshape(-1, self.in_features).contiguous()
            sparse_part = x32[..., tokens - n_sparse :, :].reshape(-1, self.in_features).contiguous()
            y_dense = self._product(dense_part, torch.zeros(1))
            y_sparse = self._product(sparse_part, self.threshold)
            y = torch.cat([y_dense.reshape(*lead[:-1], tokens - n_sparse, self.out_features),
                           y_sparse.reshape(*lead[:-1], n_sparse, self.out_features)], dim=-2)
        else:
            y = self._product(x32.reshape(-1, self.in_features).contiguous(), self.threshold)
            y = y.reshape(*lead, self.out_features)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def extra_repr(self) -> str:
        t = self.threshold
        shown = f"{t.item():.4g}" if t.numel() == 1 else f"per-channel[{t.numel()}]"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"threshold={shown}, weight={str(self.weight_t.dtype).replace('torch.', '')}")
