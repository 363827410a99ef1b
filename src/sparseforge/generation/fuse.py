"""Fuse the projections that read the same input into one matmul: q/k/v, and gate/up.

A Llama-family attention block calls ``q_proj(x)``, ``k_proj(x)`` and ``v_proj(x)`` on the same
``x``, and its MLP calls ``gate_proj(x)`` and ``up_proj(x)``. :func:`fuse_projections_` stacks the
weights of each such group along the output dimension into one layer (``nn.Linear``, or
:class:`~sparseforge.nn.SparseLinear` in the group's format: every output row keeps its own
entries, so a 2:4 / bitmap / CSR layout stays valid, and the formats' buffers are joined as they are
by :func:`sparseforge.formats.concat.concat_rows`, without densifying) and puts a :class:`FusedSlice` in place of
each member. The first member called with a new input runs the fused matmul; the others return
their column range of that output while the input is the same tensor object (the group drops
both once every member has been served, so nothing is held between steps): at batch 1 this turns 7 matmuls per decoder layer into 4, and 112 sparse-kernel
launches per token of a 16-layer model into 64. The model's own code is not touched: it still
calls ``self.q_proj(x)``.

Fusion is for inference: the fused layers do not train, and a fused model's ``state_dict`` holds
the stacked weights (call :func:`unfuse_projections_` before saving it). Only groups whose members are all ``nn.Linear`` or all ``SparseLinear`` of one format (and dtype,
and activation mode: int8 values stay int8 on their row scales, ``activations="int8"`` is kept), with the
same input size, are fused; so are groups of activation-sparse
:class:`~sparseforge.activation.ColumnSparseLinear` layers, which are not stacked (each keeps its own
TEAL threshold) but held as they are by a
:class:`~sparseforge.activation.column_group.ColumnSparseSiblings` layer whose batch-1 product runs all
members in one native call (bitwise their own outputs; unfusing gives back the same layers); :class:`FuseReport` lists what was fused and what was not,
and why. The outputs equal the unfused layers' up to the floating-point summation order of the
underlying matmul (per output row, the same products are summed).

Example:
    >>> import torch
    >>> from tests.tiny_models import tiny_model                       # doctest: +SKIP
    >>> model = tiny_model("llama")                                    # doctest: +SKIP
    >>> report = fuse_projections_(model)                              # doctest: +SKIP
    >>> len(report.fused)  # 2 layers x (qkv, gate/up)                 # doctest: +SKIP
    4
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from sparseforge.formats import registry
from sparseforge.formats.concat import concat_rows
from sparseforge.measure.lanes_tile import BUCKETS, LanesTile, known_tile
from sparseforge.nn.sparse_linear import SparseLinear

__all__ = ["FUSED_GROUPS", "FusedProjections", "FusedSlice", "FuseReport", "fuse_projections_", "unfuse_projections_"]

#: attribute names of the sibling layers fused together when a module holds all of them
FUSED_GROUPS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class FusedProjections(nn.Module):
    """One layer computing several sibling projections of the same input; serves them by :class:`FusedSlice`.

    ``layer``: the stacked ``nn.Linear`` / ``SparseLinear`` of output size ``sum(sizes)``;
    ``names``: the members in stacking order; ``sizes``: their output sizes.
    """

    def __init__(self, layer: nn.Module, names: tuple[str, ...], sizes: tuple[int, ...]) -> None:
        super().__init__()
        self.layer = layer
        self.names = names
        self.sizes = sizes
        self.offsets = tuple(sum(sizes[:i]) for i in range(len(sizes) + 1))
        self._input: Optional[Tensor] = None
        self._output: Optional[Tensor] = None
        self._served = 0

    def output_slice(self, x: Tensor, index: int) -> Tensor:
        """Member ``index``'s output ``(..., sizes[index])`` for input ``x``: a column range of the fused output."""
        if self._input is not x or self._output is None:
            self._output = self.layer(x)  # (..., sum(sizes))
            self._input, self._served = x, 0
        out = self._output[..., self.offsets[index]:self.offsets[index + 1]]  # (..., sizes[index]) view
        self._served += 1
        if self._served >= len(self.sizes):  # every member has its output: hold no tensors between calls
            self._input = self._output = None
        return out

    def split(self) -> list[nn.Module]:
        """The members as separate layers again (``nn.Linear`` or ``SparseLinear``), in stacking order."""
        if isinstance(self.layer, _column_siblings()):
            return list(self.layer.members)
        return [_split_rows(self.layer, a, b) for a, b in zip(self.offsets[:-1], self.offsets[1:])]

    def extra_repr(self) -> str:
        return f"names={self.names}, sizes={self.sizes}"


class FusedSlice(nn.Module):
    """Stands in for one member of a :class:`FusedProjections` group (same call signature as a linear layer)."""

    def __init__(self, group: FusedProjections, index: int) -> None:
        super().__init__()
        object.__setattr__(self, "group", group)  # not a submodule: the owner holds the group once
        self.index = index
        self.in_features = _in_features(group.layer)
        self.out_features = group.sizes[index]

    def forward(self, x: Tensor) -> Tensor:
        return self.group.output_slice(x, self.index)

    def extra_repr(self) -> str:
        return f"{self.group.names[self.index]} of fused {'/'.join(self.group.names)}, out_features={self.out_features}"


@dataclass
class FuseReport:
    """What :func:`fuse_projections_` did: ``fused`` group paths (``"model.layers.0.self_attn:q_proj+k_proj+v_proj"``)
    and ``skipped`` ``(path, reason)`` pairs."""

    fused: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"fused {len(self.fused)} projection group(s)"]
        lines += [f"  not fused {path}: {why}" for path, why in self.skipped]
        return "\n".join(lines)


def _in_features(layer: nn.Module) -> int:
    return layer.in_features


def _column_siblings():
    """The activation package's sibling group class (imported on use: ``import sparseforge`` stays cheap)."""
    from sparseforge.activation.column_group import ColumnSparseSiblings

    return ColumnSparseSiblings


def _kind(layer: nn.Module) -> Optional[tuple]:
    """What must agree for layers to stack: type, dtype and (for SparseLinear) format and N:M pattern;
    ColumnSparseLinear siblings are grouped, not stacked (each keeps its own threshold)."""
    if type(layer) is nn.Linear:
        return ("dense", layer.weight.dtype)
    column = sys.modules.get("sparseforge.activation.column_linear")  # loaded wherever such a layer exists
    if column is not None and type(layer) is column.ColumnSparseLinear:
        return ("column",)
    if isinstance(layer, SparseLinear):
        w = layer.weight_format
        return ("sparse", registry.spec_of(w).name, w.dtype, registry.spec_of(w).pattern_of(w), layer.activations)
    return None


def _sparse_like(like: SparseLinear, dense: Tensor, bias: Optional[Tensor], scales: Optional[Tensor]) -> SparseLinear:
    """A SparseLinear in ``like``'s format, values dtype (int8 on the grid of ``scales``) and activation mode
    holding ``dense`` (out, in), whose pruned entries are exactly 0."""
    w0 = like.weight_format
    spec = registry.spec_of(w0)
    int8 = {"values_dtype": torch.int8, "scales": scales} if w0.dtype == torch.int8 else {}
    weight = spec.build(dense.contiguous(), spec.pattern_of(w0), dense != 0, **int8)
    return SparseLinear(weight, bias, activations=like.activations)


def _stack(layers: list[nn.Module]) -> nn.Module:
    """One layer whose output rows are the members' rows, in order."""
    if _kind(layers[0]) == ("column",):
        return _column_siblings()(layers)  # the members themselves, computed together
    biases = [layer.bias for layer in layers]
    bias = torch.cat([b.detach() for b in biases]) if all(b is not None for b in biases) else None  # (sum out,)
    if isinstance(layers[0], SparseLinear):
        weight = concat_rows([layer.weight_format for layer in layers])  # (sum out, in), buffers joined, not densified
        fused = SparseLinear(weight, bias, activations=layers[0].activations)
        _take_tiles(fused, layers)
        return fused
    weight = torch.cat([layer.weight.detach() for layer in layers])  # (sum out, in)
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    return out.requires_grad_(False)


def _take_tiles(fused: SparseLinear, members: list[SparseLinear]) -> None:
    """Give ``fused`` the lanes-kernel tiles of its members (same input width and density), so that its first
    batched call times nothing: a tile fixed on every member, else per batch bucket the fused layer's own
    cached answer, else the tile every member uses or has cached when they agree (else the rule, at use)."""
    fixed = {m.lanes_tile for m in members}
    if len(fixed) == 1 and isinstance(next(iter(fixed)), LanesTile):
        fused.lanes_tile = fixed.pop()
        return
    tiles = {}
    for bucket in BUCKETS:
        own = known_tile(fused.weight_format, bucket)
        theirs = {m.lanes_tiles.get(bucket) or known_tile(m.weight_format, bucket) for m in members}
        if own is not None:
            tiles[bucket] = own
        elif len(theirs) == 1 and None not in theirs:
            tiles[bucket] = theirs.pop()
    fused.set_lanes_tiles(tiles)


def _split_rows(layer: nn.Module, start: int, stop: int) -> nn.Module:
    if isinstance(layer, SparseLinear):
        dense = layer.to_dense()[start:stop]  # (stop - start, in)
        bias = None if layer.bias is None else layer.bias[start:stop].detach().clone()
        scales = getattr(layer.weight_format, "scales", None)
        return _sparse_like(layer, dense, bias, None if scales is None else scales[start:stop].clone())
    out = nn.Linear(layer.in_features, stop - start, bias=layer.bias is not None, dtype=layer.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(layer.weight[start:stop])
        if layer.bias is not None:
            out.bias.copy_(layer.bias[start:stop])
    return out.requires_grad_(False)


def _group_reason(module: nn.Module, names: tuple[str, ...], dense: bool) -> Optional[str]:
    layers = [getattr(module, n) for n in names]
    if any(isinstance(layer, FusedSlice) for layer in layers):
        return "already fused"
    kinds = [_kind(layer) for layer in layers]
    if any(k is None for k in kinds):
        return "a member is neither nn.Linear, SparseLinear nor ColumnSparseLinear: " + ", ".join(
            f"{n}={type(layer).__name__}" for n, layer in zip(names, layers) if _kind(layer) is None)
    if len(set(kinds)) > 1:
        return "members differ in kind/format/dtype: " + ", ".join(f"{n}={k[:2]}" for n, k in zip(names, kinds))
    if len({_in_features(layer) for layer in layers}) > 1:
        return "members differ in input size"
    if not dense and kinds[0][0] == "dense":
        return "dense group left separate (dense=False)"
    return None


@torch.no_grad()
def fuse_projections_(model: nn.Module, groups: tuple[tuple[str, ...], ...] = FUSED_GROUPS, *,
                      dense: bool = True) -> FuseReport:
    """Fuse every module's sibling projections named in ``groups`` (default :data:`FUSED_GROUPS`), in place.

    ``dense=False`` fuses only groups of SparseLinear layers: in eager mode a dense group gains one
    GEMV launch per member but pays a module call and a slice per member, about even at batch 1,
    while each sparse-kernel launch saved also saves a thread hand-off.
    Idempotent (a fused group is reported as such). :func:`unfuse_projections_` undoes it.
    """
    report = FuseReport()
    for path, module in list(model.named_modules()):
        for names in groups:
            if not all(isinstance(getattr(module, n, None), nn.Module) for n in names):
                continue
            where = f"{path or '<root>'}:{'+'.join(names)}"
            reason = _group_reason(module, names, dense)
            if reason is not None:
                report.skipped.append((where, reason))
                continue
            layers = [getattr(module, n) for n in names]
            group = FusedProjections(_stack(layers), names, tuple(layer.out_features for layer in layers))
            module.add_module("fused_" + "_".join(n.removesuffix("_proj") for n in names), group)
            for i, n in enumerate(names):
                setattr(module, n, FusedSlice(group, i))
            report.fused.append(where)
    return report


@torch.no_grad()
def unfuse_projections_(model: nn.Module) -> int:
    """Put separate layers back in place of every fused group of ``model``; returns the number of groups split."""
    count = 0
    for _, module in list(model.named_modules()):
        for attr, group in list(module.named_children()):
            if not isinstance(group, FusedProjections):
                continue
            for name, layer in zip(group.names, group.split()):
                setattr(module, name, layer)
            delattr(module, attr)
            count += 1
    return count
