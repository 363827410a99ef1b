"""The sparse-training lifecycle: attach masks to a model and an optimizer, keep everything consistent.

A method (static, GMP, SET, RigL in :mod:`sparseforge.train.methods`) only says *when* masks
change and *what* the new masks are; this base class owns the bookkeeping:

* **Masks** are bool buffers ``weight_mask`` on each sparsified module, in the weight's own
  layout (so they follow ``model.to(...)`` and appear in ``model.state_dict()``), ``True`` = active.
* **Gradients of pruned weights are masked** by a hook on the weight, before the optimizer sees
  them. So the optimizer state of a pruned weight stays exactly zero (momentum, Adam moments) and
  weight decay cannot move it: a later regrowth starts from a clean slate, and the step costs no
  state for weights that do not exist. RigL needs the *dense* gradient at mask-update steps: the
  same hook stores it before masking, on those steps only.
* **Weights are masked after every optimizer step** (``masked_fill``, so pruned entries are
  ``+0.0``), which keeps them exactly zero whatever the optimizer does.
* **When a mask changes**, every optimizer-state tensor shaped like the weight (SGD
  ``momentum_buffer``, Adam ``exp_avg`` / ``exp_avg_sq`` / ``max_exp_avg_sq``, ...) is zeroed at the
  dropped and at the grown entries, and grown weights start at zero (RigL's choice: a new
  connection does not change the network's output). Scalar state (Adam's ``step``) is per tensor
  and is left alone. State of any other shape (e.g. Adafactor's factored moments) cannot be kept
  consistent per entry and is an error.

Usage::

    trainer = sparseforge.train.RigL(model, optimizer, sparsity=0.9, schedule={"end_step": 750})
    for x, y in batches:
        loss_fn(model(x), y).backward()
        optimizer.step(); optimizer.zero_grad()
        trainer.step()            # after optimizer.step(): re-mask, and update masks when due
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from sparseforge.errors import ConfigError, ModelError
from sparseforge.layers import is_linear, linear_layers, select_targets, weight_2d
from sparseforge.masks import resolve_sparsity
from sparseforge.patterns import NM, FanIn, check_fits
from sparseforge.config import build_config
from sparseforge.train.config import SparseTrainConfig
from sparseforge.train.density import layer_sparsities

__all__ = ["SparseTrainer", "SparseLayer", "MaskUpdate", "MASK_BUFFER"]

MASK_BUFFER = "weight_mask"


@dataclass(eq=False)
class SparseLayer:
    """One sparsified linear layer. ``sparsity`` is its final target sparsity."""

    name: str
    module: nn.Module
    sparsity: float
    grad: torch.Tensor | None = None  # dense gradient summed over the backward passes of an update step
    hook: Any = None

    @property
    def param(self) -> nn.Parameter:
        return self.module.weight

    @property
    def transposed(self) -> bool:
        return not isinstance(self.module, nn.Linear)  # transformers' Conv1D stores (in, out)

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        """A weight-layout tensor as an ``(out, in)`` view that writes through."""
        return tensor.t() if self.transposed else tensor

    @property
    def mask(self) -> torch.Tensor:
        """The mask as an ``(out, in)`` view of the buffer."""
        return self.view(getattr(self.module, MASK_BUFFER))

    @property
    def weight(self) -> torch.Tensor:
        """The weight data as an ``(out, in)`` view."""
        return weight_2d(self.module)


@dataclass
class MaskUpdate:
    """What one mask update changed: per layer ``(dropped, grown)`` weights, and the schedule value."""

    step: int
    value: float  # GMP: mean target sparsity; SET / RigL: drop fraction
    changed: dict[str, tuple[int, int]] = field(default_factory=dict)


class SparseTrainer:
    """Base class of the sparse-training methods; see the module doc for the lifecycle."""

    config_class: ClassVar[type[SparseTrainConfig]] = SparseTrainConfig
    needs_grad: ClassVar[bool] = False  # store the dense gradient at update steps (RigL)

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, config: SparseTrainConfig | None = None,
                 **fields: Any) -> None:
        if config is None:
            config = build_config(self.config_class, fields, f"{self.config_class.method} config")
        elif fields:
            raise ConfigError(f"pass either a config or keyword options, not both (got {sorted(fields)})")
        if type(config) is not self.config_class:
            raise ConfigError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.config = config
        self.model = model
        self.optimizer = optimizer
        self.pattern = config.pattern_value
        self.step_count = 0  # optimizer steps taken (t = 1 after the first)
        self.reducer = None  # data-parallel: averages a tensor over ranks in place (train.distributed.distribute)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.layers = self._select_layers()
        self._collect = False
        with torch.no_grad():
            for layer in self.layers:
                mask = self.initial_mask(layer).to(layer.param.device)  # (out, in)
                layer.module.register_buffer(MASK_BUFFER, (mask.t() if layer.transposed else mask).contiguous())
                layer.hook = layer.param.register_hook(self._grad_hook(layer))
                self._zero(layer, ~layer.mask)
        self._collect = self.collects_grad(1)

    # -- what a method overrides --------------------------------------------------------------
    def initial_mask(self, layer: SparseLayer) -> torch.Tensor:
        """The ``(out, in)`` mask at attach time (default: random at the layer's sparsity)."""
        from sparseforge.train.updates import random_mask

        return random_mask(tuple(layer.weight.shape), self.pattern, layer.sparsity, self.generator)

    def is_update_step(self, t: int) -> bool:
        return False

    def synchronize(self) -> None:
        """Before a mask update: average what the update reads and ranks see differently (the stored
        dense gradients) over the data-parallel ranks, so every rank computes the same masks."""
        if self.reducer is not None:
            for layer in self.layers:
                if layer.grad is not None:
                    self.reducer(layer.grad)

    def collects_grad(self, t: int) -> bool:
        """Whether the backward pass(es) of step ``t`` store the dense gradient in ``layer.grad``."""
        return self.needs_grad and self.is_update_step(t)

    def update_masks(self, t: int) -> tuple[float, dict[str, torch.Tensor]]:
        """New ``(out, in)`` masks at update step ``t``, and the schedule value used."""
        raise NotImplementedError

    # -- lifecycle ----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> MaskUpdate | None:
        """Call after every ``optimizer.step()``: re-mask the weights and update masks when due."""
        if not self.layers:
            raise ConfigError("this sparse trainer was removed; create a new one to keep training sparse")
        self.step_count += 1
        t = self.step_count
        for layer in self.layers:
            layer.param.data.masked_fill_(~getattr(layer.module, MASK_BUFFER), 0.0)
        update = None
        if self.is_update_step(t):
            self.synchronize()
            value, masks = self.update_masks(t)
            update = MaskUpdate(t, value)
            for layer in self.layers:
                update.changed[layer.name] = self._set_mask(layer, masks[layer.name])
        for layer in self.layers:
            layer.grad = None
        self._collect = self.collects_grad(t + 1)
        return update

    def _set_mask(self, layer: SparseLayer, new: torch.Tensor) -> tuple[int, int]:
        old = layer.mask
        dropped, grown = old & ~new, new & ~old  # (out, in)
        changed = dropped | grown
        if bool(changed.any()):
            self._zero(layer, changed)  # weights: dropped -> 0, grown start at 0; optimizer state too
            old.copy_(new)
        return int(dropped.sum()), int(grown.sum())

    def _zero(self, layer: SparseLayer, entries: torch.Tensor) -> None:
        """Zero the weight and every per-entry optimizer state at ``entries`` (out, in)."""
        layer.weight.masked_fill_(entries, 0.0)
        for key, value in self.optimizer.state.get(layer.param, {}).items():
            if not torch.is_tensor(value):
                continue
            if value.shape == layer.param.shape:
                layer.view(value).masked_fill_(entries, 0)
            elif value.numel() > 1:
                raise ConfigError(
                    f"optimizer state {key!r} of layer {layer.name} has shape {tuple(value.shape)}, not the weight's "
                    f"{tuple(layer.param.shape)}; sparse training keeps per-entry state (SGD momentum, Adam/AdamW "
                    "moments) consistent, so use such an optimizer (factored ones like Adafactor are not supported)"
                )

    def _grad_hook(self, layer: SparseLayer):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            if self._collect:  # dense gradient of this update step (RigL's growth criterion)
                layer.grad = grad.detach().clone() if layer.grad is None else layer.grad.add_(grad.detach())
            return grad.masked_fill(~getattr(layer.module, MASK_BUFFER), 0.0)

        return hook

    def _select_layers(self) -> list[SparseLayer]:
        cfg = self.config
        if is_linear(self.model):
            raise ModelError("the model is a single linear layer; wrap it in a module, e.g. nn.Sequential(layer)")
        if not any(True for _ in linear_layers(self.model)):
            raise ModelError(f"{type(self.model).__name__} has no linear layers to train sparse")
        names = select_targets(self.model, cfg.targets if cfg.targets is not None else ["*"], cfg.ignore, None)
        names = names[1 if cfg.dense_first else 0: len(names) - (1 if cfg.dense_last else 0)]
        if not names:
            raise ConfigError("dense_first / dense_last leave no layer to train sparse; select more layers")
        modules = dict(self.model.named_modules())
        params = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        owners: dict[int, list[str]] = {}
        for pname, p in self.model.named_parameters(remove_duplicate=False):
            owners.setdefault(id(p), []).append(pname)
        shapes = {}
        for name in names:
            module = modules[name]
            if hasattr(module, MASK_BUFFER):
                raise ConfigError(
                    f"layer {name} already has a '{MASK_BUFFER}' (another sparse trainer or torch.nn.utils.prune); "
                    "call .remove() on the other trainer first"
                )
            if id(module.weight) not in params:
                raise ConfigError(
                    f"the optimizer does not hold the weight of layer {name}; build the optimizer over "
                    "model.parameters() before attaching the sparse trainer"
                )
            if len(owners.get(id(module.weight), [])) > 1:
                raise ConfigError(
                    f"the weight of layer {name} is shared with {owners[id(module.weight)]} (tied weights): a mask "
                    f"would sparsify all of them; add '{name}' to ignore (or use dense_last for an LM head)"
                )
            shapes[name] = tuple(weight_2d(module).shape)
            check_fits(self.pattern, shapes[name], layer=name)
        if isinstance(self.pattern, NM) or (isinstance(self.pattern, FanIn) and self.pattern.k is not None):
            sparsities = {n: resolve_sparsity(self.pattern, None, shapes[n][1]) for n in names}
        else:
            sparsities = layer_sparsities(shapes, cfg.sparsity, cfg.distribution)
        return [SparseLayer(n, modules[n], sparsities[n]) for n in names]

    # -- inspection, checkpoints, detaching -----------------------------------------------------
    def sparsities(self) -> dict[str, float]:
        """Achieved sparsity of every sparsified layer (fraction of inactive mask entries)."""
        return {l.name: 1.0 - l.mask.float().mean().item() for l in self.layers}

    def num_active(self) -> int:
        """Active weights over all sparsified layers (constant during SET / RigL)."""
        return sum(int(l.mask.sum()) for l in self.layers)

    def state_dict(self) -> dict[str, Any]:
        """Config, step, masks and RNG state: with the model's and optimizer's, a bit-exact resume."""
        return {
            "config": self.config.to_dict(),
            "step": self.step_count,
            "masks": {l.name: getattr(l.module, MASK_BUFFER).clone() for l in self.layers},
            "rng": self.generator.get_state(),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.config.to_dict()
        theirs = state.get("config", {})
        if theirs != mine:
            keys = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise ConfigError(f"resuming with a different recipe: {keys} differ from the checkpoint's; use its recipe")
        if set(state["masks"]) != {l.name for l in self.layers}:
            raise ConfigError("checkpoint masks are for other layers than this model's sparsified layers")
        for layer in self.layers:
            getattr(layer.module, MASK_BUFFER).copy_(state["masks"][layer.name])
            self._zero(layer, ~layer.mask)
        self.step_count = int(state["step"])
        self.generator.set_state(state["rng"])
        self._collect = self.collects_grad(self.step_count + 1)

    def remove(self) -> None:
        """Detach: remove hooks and mask buffers; the weights keep their zeros."""
        for layer in self.layers:
            layer.hook.remove()
            del layer.module._buffers[MASK_BUFFER]
        self.layers = []
