"""Sparse momentum: prune by magnitude, redistribute and regrow by momentum.

Dettmers & Zettlemoyer 2019, "Sparse Networks from Scratch: Faster Training without Losing
Performance" (reference code TimDettmers/sparse_learning, ``Masking.truncate_weights`` with
``momentum_redistribution`` / ``momentum_growth``). At an update step ``t`` with prune rate
``p = f(t)`` (cosine-decayed from ``drop_fraction``, the paper's 0.5):

1. **Prune** in every layer ``l`` the ``floor(p * active_l)`` active weights with the smallest
   ``|w|``; ``K`` weights are removed in total.
2. **Redistribute**: layer ``l`` gets a share of ``K`` proportional to the mean momentum magnitude
   of its active weights, ``mean_{i active} |M_i|`` (normalised over layers). A layer that would
   get more than it has free entries is capped and the rest is shared among the others again;
   shares are whole weights (largest remainders), so exactly ``K`` weights regrow and the total
   parameter count stays constant (per-layer counts move).
3. **Grow** in every layer its share at the zero weights with the largest ``|M|`` (just-pruned
   weights included, as in the reference); grown weights start at zero.

``M`` is the momentum of the *dense* gradient, ``M <- momentum * M + dL/dW``, kept by the trainer
for every entry of each sparsified layer. (The reference reads the optimizer's momentum buffer;
it lets the optimizer update pruned weights and re-zeroes them, so that buffer holds the dense
gradient's momentum. Here the gradient of a pruned weight is masked before the optimizer sees
it, whose state for it stays zero, so the trainer keeps its own buffer. With SGD momentum ``mu``
and ``momentum = mu`` it is the reference's buffer without the weight-decay term.) The dense
gradient is read at every step, which costs one weight-sized copy per layer and step.

Example:
    >>> import torch, torch.nn as nn
    >>> from sparseforge.train.momentum import SparseMomentum
    >>> net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    >>> opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    >>> tr = SparseMomentum(net, opt, sparsity=0.8, schedule={"end_step": 30, "update_interval": 10})
    >>> total = tr.num_active()
    >>> for _ in range(20):
    ...     net(torch.randn(8, 16)).square().mean().backward()
    ...     opt.step(); opt.zero_grad()
    ...     _ = tr.step()
    >>> tr.num_active() == total  # weights move between layers, the total stays
    True
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from sparseforge.errors import ConfigError
from sparseforge.masks import mask_from_scores
from sparseforge.patterns import Unstructured
from sparseforge.train.config import SparseMomentumConfig
from sparseforge.train.methods import SET
from sparseforge.train.updates import exclude_scores, prune_mask

__all__ = ["SparseMomentum", "apportion"]


def apportion(total: int, weights: Sequence[float], caps: Sequence[int]) -> list[int]:
    """Split ``total`` whole units over entries in proportion to ``weights``, entry ``i`` at most ``caps[i]``.

    Entries whose proportional share reaches their cap get the cap and the rest is split again
    among the others; the final fractional parts are rounded by largest remainder (ties: lower
    index). Entries with zero weight get nothing unless every open entry has zero weight, when the
    split is by remaining capacity.
    """
    if total < 0 or total > sum(caps):
        raise ConfigError(f"cannot place {total} units into capacities {list(caps)}")
    alloc = [0] * len(caps)
    open_ = [i for i, c in enumerate(caps) if c > 0]
    left = total
    while left and open_:
        w = [max(float(weights[i]), 0.0) for i in open_]
        if sum(w) <= 0.0:
            w = [float(caps[i]) for i in open_]
        ideal = [left * x / sum(w) for x in w]
        full = [i for i, share in zip(open_, ideal) if share >= caps[i]]
        if full:
            for i in full:
                alloc[i] = caps[i]
                left -= caps[i]
            open_ = [i for i in open_ if i not in full]
            continue
        floors = [math.floor(share) for share in ideal]
        extra = left - sum(floors)
        if extra:
            frac = torch.tensor([share - f for share, f in zip(ideal, floors)]).reshape(1, -1)  # (1, open)
            bump = mask_from_scores(frac, Unstructured(), (len(open_) - extra) / len(open_)).reshape(-1)
            floors = [f + int(b) for f, b in zip(floors, bump.tolist())]
        for i, f in zip(open_, floors):
            alloc[i] = f
        left = 0
    return alloc


class SparseMomentum(SET):
    """Sparse momentum (see the module doc). Unstructured masks only."""

    config_class = SparseMomentumConfig

    def __init__(self, model, optimizer, config: SparseMomentumConfig | None = None, **fields: Any) -> None:
        super().__init__(model, optimizer, config, **fields)
        self.momentum = {l.name: torch.zeros(tuple(l.weight.shape), device=l.param.device) for l in self.layers}  # (out, in)
        self.last_shares: dict[str, float] = {}  # momentum proportions of the last update

    def collects_grad(self, t: int) -> bool:
        return True  # the momentum of the dense gradient needs every step

    @torch.no_grad()
    def step(self):
        for layer in self.layers:
            if layer.grad is None:
                raise ConfigError(
                    f"sparse momentum needs the gradient of layer {layer.name} at every step: call loss.backward() "
                    "and optimizer.step() before trainer.step(), and use the layer in the forward pass"
                )
            self.momentum[layer.name].mul_(self.config.momentum).add_(layer.view(layer.grad))
        return super().step()

    def synchronize(self) -> None:
        super().synchronize()
        if self.reducer is not None:  # the mean of the ranks' momenta is the momentum of the mean gradient
            for buf in self.momentum.values():
                self.reducer(buf)

    def update_masks(self, t: int) -> tuple[float, dict[str, torch.Tensor]]:
        p = self.drop_fraction(t)
        kept, means, caps, removed = {}, [], [], 0
        for layer in self.layers:
            mask, n = layer.mask, layer.mask.numel()
            active = int(mask.sum())
            drop = math.floor(p * active + 1e-9)
            kept[layer.name] = prune_mask(mask, layer.weight.abs(), "unstructured", (n - (active - drop)) / n)
            removed += drop
            mom = self.momentum[layer.name].abs()
            means.append(float(mom[mask].mean()) if active else 0.0)
            caps.append(n - (active - drop))
        total = sum(means)
        self.last_shares = {l.name: (m / total if total > 0 else 0.0) for l, m in zip(self.layers, means)}
        grow = apportion(removed, means, caps)
        masks = {}
        for layer, g in zip(self.layers, grow):
            keep = kept[layer.name]
            if g == 0:
                masks[layer.name] = keep
                continue
            n = keep.numel()
            grown = mask_from_scores(exclude_scores(self.momentum[layer.name].abs(), keep), Unstructured(), (n - g) / n)
            masks[layer.name] = keep | (grown & ~keep)
        return p, masks

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["momentum"] = {name: buf.clone() for name, buf in self.momentum.items()}
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if set(state.get("momentum", {})) != set(self.momentum):
            raise ConfigError("checkpoint has no sparse-momentum buffers for these layers; was it saved by SparseMomentum?")
        for name, buf in self.momentum.items():
            buf.copy_(state["momentum"][name])
