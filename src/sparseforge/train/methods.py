"""Sparse-training methods: static random sparsity, GMP, SET and RigL.

Each method says when masks change and how; :class:`~sparseforge.train.base.SparseTrainer` does
the bookkeeping (buffers, gradient masking, optimizer state).

* :class:`StaticSparse`: a random mask at attach time, never changed (the baseline of the DST
  papers; any pattern, N:M included).
* :class:`GMP`: gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or not to prune"): start
  dense; at each step of the cubic schedule prune the smallest ``|w|`` among active weights to
  ``s_t``. Pruned weights never come back.
* :class:`SET`: sparse evolutionary training (Mocanu et al. 2018): start from a random mask; at
  each update drop the fraction ``zeta`` of active weights with the smallest ``|w|`` and regrow as
  many at random (seeded) among the inactive ones. Deviations from the paper, as in the RigL and
  jaxpruner implementations of SET: the drop ranks ``|w|`` rather than the smallest positive and
  largest negative weights separately, and grown weights start at zero, not at a random value.
* :class:`RigL`: rigging the lottery (Evci et al. 2020, Algorithm 1): start from a random mask;
  every ``dT`` steps until ``T_end`` drop ``k = f(t) * active`` weights with the smallest ``|w|``
  and grow the ``k`` with the largest dense ``|grad|`` among the weights not kept (a just-dropped
  weight may be chosen again and then keeps its value), ``f`` the cosine-decayed drop fraction;
  grown weights start at zero. The dense gradient is the one of the update step's mini-batch.

Example:
    >>> import torch, torch.nn as nn
    >>> from sparseforge.train import RigL
    >>> net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    >>> opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    >>> trainer = RigL(net, opt, sparsity=0.75, schedule={"end_step": 30, "update_interval": 10})
    >>> active = trainer.num_active()
    >>> for _ in range(20):
    ...     net(torch.randn(8, 16)).square().mean().backward()
    ...     opt.step(); opt.zero_grad()
    ...     update = trainer.step()
    >>> trainer.num_active() == active, update.step, round(update.value, 3)  # RigL keeps the count
    (True, 20, 0.075)
"""

from __future__ import annotations

import torch

from sparseforge.errors import ConfigError
from sparseforge.train.base import SparseLayer, SparseTrainer
from sparseforge.train.config import GMPConfig, RigLConfig, SETConfig, SparseTrainConfig, StaticConfig
from sparseforge.train.schedules import constant_drop_fraction, cosine_drop_fraction, cubic_sparsity
from sparseforge.train.nm import SRSTE, STE
from sparseforge.train.updates import drop_and_grow, prune_mask

__all__ = ["StaticSparse", "GMP", "SET", "RigL", "TRAINERS", "from_config"]


class StaticSparse(SparseTrainer):
    """Static random sparse training: the mask drawn at attach time stays."""

    config_class = StaticConfig


class GMP(SparseTrainer):
    """Gradual magnitude pruning along Zhu & Gupta's cubic schedule."""

    config_class = GMPConfig

    def initial_mask(self, layer: SparseLayer) -> torch.Tensor:
        return torch.ones(tuple(layer.weight.shape), dtype=torch.bool)

    def is_update_step(self, t: int) -> bool:
        return self.config.schedule.is_gradual_step(t)

    def target_sparsity(self, layer: SparseLayer, t: int) -> float:
        """``s_t`` of one layer: the cubic ramp from ``min(initial, final)`` to its final sparsity."""
        final = layer.sparsity
        return cubic_sparsity(t, self.config.schedule, min(self.config.initial_sparsity, final), final)

    def update_masks(self, t: int) -> tuple[float, dict[str, torch.Tensor]]:
        masks, total, weighted = {}, 0, 0.0
        for layer in self.layers:
            target = self.target_sparsity(layer, t)
            masks[layer.name] = prune_mask(layer.mask, layer.weight.abs(), self.pattern, target)
            total += layer.mask.numel()
            weighted += target * layer.mask.numel()
        return weighted / total, masks


class SET(SparseTrainer):
    """SET: magnitude drop, random regrowth (seeded by ``config.seed``)."""

    config_class = SETConfig

    def is_update_step(self, t: int) -> bool:
        return self.config.schedule.is_dst_step(t)

    def drop_fraction(self, t: int) -> float:
        decay = cosine_drop_fraction if self.config.drop_fraction_decay == "cosine" else constant_drop_fraction
        return decay(t, self.config.schedule, self.config.drop_fraction)

    def grow_scores(self, layer: SparseLayer) -> torch.Tensor:
        """Uniform random scores (out, in), drawn on the CPU generator so runs repeat on any device."""
        return torch.rand(tuple(layer.weight.shape), generator=self.generator).to(layer.weight.device)

    def update_masks(self, t: int) -> tuple[float, dict[str, torch.Tensor]]:
        fraction = self.drop_fraction(t)
        masks = {}
        for layer in self.layers:
            grow = self.grow_scores(layer)
            masks[layer.name] = drop_and_grow(layer.mask, layer.weight.abs(), grow, self.pattern, fraction).mask
        return fraction, masks


class RigL(SET):
    """RigL: magnitude drop, growth by the largest dense ``|grad|``, cosine-decayed drop fraction."""

    config_class = RigLConfig
    needs_grad = True

    def grow_scores(self, layer: SparseLayer) -> torch.Tensor:
        if layer.grad is None:
            raise ConfigError(
                f"RigL needs the gradient of layer {layer.name} at update step {self.step_count}: call "
                "loss.backward() and optimizer.step() before trainer.step(), and use the layer in the forward pass"
            )
        return layer.view(layer.grad).abs()  # (out, in)


TRAINERS: dict[str, type[SparseTrainer]] = {
    "static": StaticSparse,
    "gmp": GMP,
    "set": SET,
    "rigl": RigL,
    "ste": STE,
    "srste": SRSTE,
}


def from_config(model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: SparseTrainConfig) -> SparseTrainer:
    """The trainer of ``config.method`` attached to ``model`` and ``optimizer``."""
    return TRAINERS[config.method](model, optimizer, config)
