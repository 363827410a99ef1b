"""Sparse training on the sparse kernels: weights, gradients and optimizer state stored sparse.

SparseProp (Nikdan et al. 2023) shows that backpropagation through unstructured sparse weights pays
off on CPUs when all three products run sparse. :class:`SparseCompute` takes a sparse trainer
(static, GMP, SET, RigL, SRigL, sparse momentum: anything whose masks are plain ``(out, in)`` bool
masks) right after it was attached, and moves each of its layers onto a trainable
:class:`~sparseforge.nn.SparseLinear` (CSR or bitmap):

* forward ``y = x W^T + b`` and backward ``dX = dY W`` run the native sparse kernels, ``dW`` is
  computed only at the kept entries (the SDDMM kernels), and the optimizer updates the packed
  values: a step costs memory traffic proportional to the kept weights, not the dense matrix;
* the trainer's method decides *when* and *how* masks change, exactly as in dense-mask training
  (:mod:`sparseforge.train.updates` does the selection). At an update step each layer is
  materialised dense once (weights, current mask and, for RigL-style growth, the dense gradient
  ``dY^T X`` of that step's backward passes, captured by hooks on those steps only), the method
  computes the new masks, and the packed format is rebuilt: kept weights keep their values and
  their optimizer state, grown weights start at zero with zero state, as in
  :class:`~sparseforge.train.base.SparseTrainer`;
* the optimizer keeps working unchanged: each dense weight parameter is replaced in its
  ``param_groups`` by the layer's packed values parameter (and again whenever a mask update changes
  the number of kept weights, e.g. under GMP), with the per-entry state (momentum, Adam moments)
  carried over entry by entry.

Usage (call :meth:`SparseCompute.step` instead of ``trainer.step()``)::

    trainer = sparseforge.train.RigL(model, optimizer, sparsity=0.9, schedule={"end_step": 1000})
    sc = sparseforge.train.SparseCompute(trainer, format="csr")
    for x, y in batches:
        loss_fn(model(x), y).backward()
        optimizer.step(); optimizer.zero_grad()
        sc.step()

Limits: N:M methods (STE family) keep a dense weight by design and are refused; the activations are
float32 (the kernels' input type); ``format="bitmap"`` or ``"csr"`` (their values are the kept
entries in row-major order, which the state carry-over relies on and tests check).

Example:
    >>> import torch, torch.nn as nn
    >>> import sparseforge.train as sft
    >>> net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    >>> opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    >>> sc = sft.SparseCompute(sft.SET(net, opt, sparsity=0.75, schedule={"end_step": 10, "update_interval": 2}))
    >>> type(net[0]).__name__, round(sc.sparsities()["0"], 2)
    ('SparseLinear', 0.75)
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from sparseforge.errors import ConfigError
from sparseforge.layers import set_module
from sparseforge.train.base import MASK_BUFFER, MaskUpdate, SparseLayer, SparseTrainer

__all__ = ["SparseCompute", "COMPUTE_FORMATS"]

COMPUTE_FORMATS = ("csr", "bitmap")


def _format_class(fmt: str):
    from sparseforge.formats import BitmapWeight
    from sparseforge.formats.csr import CSRWeight

    if fmt not in COMPUTE_FORMATS:
        raise ConfigError(f"sparse-compute training supports formats {COMPUTE_FORMATS}, got {fmt!r}")
    return CSRWeight if fmt == "csr" else BitmapWeight


class SparseCompute:
    """Run ``trainer``'s layers as trainable SparseLinear layers on the native kernels (module doc)."""

    def __init__(self, trainer: SparseTrainer, format: str = "csr") -> None:
        from sparseforge.train.nm import STE

        if not isinstance(trainer, SparseTrainer):
            raise ConfigError(f"SparseCompute wraps a sparseforge.train trainer, got {type(trainer).__name__}")
        if isinstance(trainer, STE):
            raise ConfigError("N:M training (STE, SR-STE, ...) keeps a dense weight by design; run it without SparseCompute")
        if trainer.step_count:
            raise ConfigError("wrap the trainer in SparseCompute right after creating it, before training starts")
        self.trainer = trainer
        self.format = format
        self._cls = _format_class(format)
        self.modules: dict[str, nn.Module] = {}
        self._hooks = []
        self._collecting = False
        opt = trainer.optimizer
        with torch.no_grad():
            for layer in trainer.layers:
                if layer.transposed:
                    raise ConfigError(f"layer {layer.name} is a transformers Conv1D; SparseCompute supports nn.Linear layers")
                if layer.param.dtype != torch.float32:
                    raise ConfigError(f"layer {layer.name} is {layer.param.dtype}; sparse-compute training runs float32 weights")
                layer.hook.remove()
                mask = layer.mask.clone()  # (out, in)
                weight = self._cls.from_dense(layer.weight.detach() * mask, mask)
                from sparseforge.nn import SparseLinear

                sl = SparseLinear(weight, None, trainable=True)
                sl.bias = layer.module.bias  # the same Parameter: the optimizer keeps it
                old = layer.param
                new_state = {k: (v[mask].clone() if torch.is_tensor(v) and v.shape == old.shape else v)
                             for k, v in opt.state.get(old, {}).items()}
                self._swap_param(old, sl.stored_values, new_state)
                set_module(trainer.model, layer.name, sl)
                self.modules[layer.name] = sl
                self._hooks.append(sl.register_forward_hook(self._capture(layer)))
                layer.module = None  # materialised only at update steps
        self._collecting = trainer.collects_grad(1)

    # ---- helpers ------------------------------------------------------------------------------
    def _swap_param(self, old: nn.Parameter, new: nn.Parameter, state: dict[str, Any]) -> None:
        opt = self.trainer.optimizer
        for group in opt.param_groups:
            group["params"] = [new if p is old else p for p in group["params"]]
        opt.state.pop(old, None)
        if state:
            opt.state[new] = state

    def _capture(self, layer: SparseLayer):
        """Forward hook: on gradient-collecting steps, accumulate the dense dW = dY^T X of this layer."""

        def hook(module, inputs, output):
            if not self._collecting or not torch.is_grad_enabled() or not output.requires_grad:
                return
            x = inputs[0].detach().reshape(-1, module.in_features).float()  # (B, in)

            def grad_hook(dy):
                g = dy.detach().reshape(-1, module.out_features).float().t() @ x  # (out, in)
                layer.grad = g if layer.grad is None else layer.grad.add_(g)

            output.register_hook(grad_hook)

        return hook

    # ---- lifecycle ----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> Optional[MaskUpdate]:
        """Call after every ``optimizer.step()`` (instead of ``trainer.step()``)."""
        tr = self.trainer
        tr.step_count += 1
        t = tr.step_count
        update = None
        if tr.is_update_step(t):
            for layer in tr.layers:  # dense view of each layer for the method's mask math
                sl = self.modules[layer.name]
                shadow = nn.Linear(sl.in_features, sl.out_features, bias=False, device="meta")
                shadow.weight = nn.Parameter(sl.to_dense(), requires_grad=False)  # (out, in)
                shadow.register_buffer(MASK_BUFFER, sl.weight_format.mask())
                layer.module = shadow
            try:
                value, masks = tr.update_masks(t)
                update = MaskUpdate(t, value)
                for layer in tr.layers:
                    update.changed[layer.name] = self._set_mask(layer, masks[layer.name])
            finally:
                for layer in tr.layers:
                    layer.module = None
        for layer in tr.layers:
            layer.grad = None
        self._collecting = tr.collects_grad(t + 1)
        tr._collect = self._collecting
        return update

    def _set_mask(self, layer: SparseLayer, new: torch.Tensor) -> tuple[int, int]:
        """Rebuild the layer's packed weight for mask ``new`` (out, in); carry values and state over."""
        old = layer.mask  # (out, in), the shadow's buffer
        dropped, grown = old & ~new, new & ~old
        if not bool((dropped | grown).any()):
            return 0, 0
        sl = self.modules[layer.name]
        survivors = old & new
        dense = layer.weight * survivors  # (out, in): dropped removed, grown start at zero
        fmt = self._cls.from_dense(dense, new)
        param = sl.stored_values
        opt = self.trainer.optimizer
        state = {}
        for key, value in opt.state.get(param, {}).items():
            if torch.is_tensor(value) and value.shape == param.shape:
                full = torch.zeros(new.shape, dtype=value.dtype)  # (out, in)
                full[old] = value
                value = (full * survivors)[new].contiguous()
            elif torch.is_tensor(value) and value.numel() > 1:
                raise ConfigError(f"optimizer state {key!r} of layer {layer.name} is not per entry; use SGD/Adam-style optimizers")
            state[key] = value
        held = sl.replace_weight(fmt)
        if held is param:
            for key, value in state.items():
                opt.state[param][key] = value
        else:  # the kept count changed (GMP, redistribution): a new parameter replaces the old one
            self._swap_param(param, held, state)
        return int(dropped.sum()), int(grown.sum())

    # ---- inspection ---------------------------------------------------------------------------
    def sparsities(self) -> dict[str, float]:
        return {name: sl.sparsity for name, sl in self.modules.items()}

    def num_active(self) -> int:
        return sum(sl.nnz for sl in self.modules.values())

    def remove(self) -> None:
        """Stop collecting gradients; the SparseLinear layers stay (``to_linear()`` gives dense ones)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
