"""``ColumnSparseSiblings``: sibling column-sparse projections of one input as one layer.

A decoder block feeds one input to q, k and v, and another to gate and up. TEAL (Liu et al. 2024,
arXiv:2408.14690) gives each of these projections its own threshold even where they share the input,
so they cannot be stacked into one weight with one threshold. This layer keeps the members as they
are (:class:`~sparseforge.activation.ColumnSparseLinear`, each with its own weight, threshold and
bias; no copy) and computes them together: its output is the members' outputs side by side. Its
batch-1 product (:meth:`ColumnSparseSiblings.bound_gemv`, what the native decode engine calls)
compacts the input once per member threshold and runs every member's channel parts as one native
thread-pool job (``sparseforge.ops.column_sparse.bind_group``), so a decode step wakes and joins the
pool once per group instead of once per projection; each member's output is bitwise the one it
computes alone. :func:`sparseforge.generation.fuse_projections_` builds these groups for
``ColumnSparseLinear`` siblings (the native engine fuses by default); ``unfuse_projections_`` puts the
same member layers back.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from sparseforge.activation import ColumnSparseLinear
    >>> from sparseforge.activation.column_group import ColumnSparseSiblings
    >>> q = ColumnSparseLinear.from_linear(nn.Linear(8, 4), threshold=0.5)
    >>> k = ColumnSparseLinear.from_linear(nn.Linear(8, 2), threshold=0.1)   # its own threshold
    >>> group = ColumnSparseSiblings([q, k])
    >>> x = torch.randn(1, 8)
    >>> torch.equal(group(x), torch.cat([q(x), k(x)], dim=-1))
    True
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from sparseforge.activation.column_linear import ColumnSparseLinear
from sparseforge.errors import ModelError
from sparseforge.ops.column_sparse import bind_group, uses_bf16_product

__all__ = ["ColumnSparseSiblings"]


class _BoundGroup:
    """``group(x.numpy(), y.numpy())`` on a float32 ``(1, in)`` row: the bound batch-1 call of the siblings."""

    __slots__ = ("group", "out_features")

    def __init__(self, group: object, out_features: int) -> None:
        self.group, self.out_features = group, out_features

    def __call__(self, x: Tensor) -> Tensor:
        y = torch.empty(1, self.out_features)  # (1, sum of the members' out)
        self.group(x.numpy(), y.numpy())
        return y


class ColumnSparseSiblings(nn.Module):
    """Sibling :class:`ColumnSparseLinear` layers of one input; ``forward(x)`` = their outputs side by side."""

    def __init__(self, members: Sequence[ColumnSparseLinear]) -> None:
        super().__init__()
        members = list(members)
        if not members or any(type(m) is not ColumnSparseLinear for m in members):
            raise ModelError("ColumnSparseSiblings needs one or more ColumnSparseLinear layers, got "
                             f"{[type(m).__name__ for m in members]}")
        if len({m.in_features for m in members}) > 1:
            raise ModelError(f"ColumnSparseSiblings members must share the input size, got "
                             f"{[m.in_features for m in members]}")
        self.members = nn.ModuleList(members)
        self.in_features = members[0].in_features
        self.out_features = sum(m.out_features for m in members)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([m(x) for m in self.members], dim=-1)  # (..., sum of out)

    def bound_gemv(self) -> Optional[Callable[[Tensor], Tensor]]:
        """The members' batch-1 products as one native call (module doc), bound once: ``f(x)`` for a float32
        C-contiguous ``x (1, in)`` in inference returns float32 ``(1, out_features)``; None where a member's
        own ``bound_gemv`` is None (its forward does more than the kernel). Bind again after replacing a
        member's threshold, weight or bias."""
        if any(m.track_sparsity or m.threshold.dtype != torch.float32 or uses_bf16_product(1, m.compute_dtype)
               or (m.bias is not None and m.bias.dtype != torch.float32) for m in self.members):
            return None  # the conditions under which a member's own bound_gemv is None
        specs = [(m.bitmap, m.block_ptr, m.values, m.threshold.detach().reshape(-1).contiguous(),
                  None if m.bias is None else m.bias.detach().contiguous(), m.out_features, m.scales)
                 for m in self.members]
        return _BoundGroup(bind_group(specs), self.out_features)
