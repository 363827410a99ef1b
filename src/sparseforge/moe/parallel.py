"""Expert parallelism over ``torch.distributed``: experts sharded across ranks, tokens exchanged
with all-to-all (GShard, Lepikhin et al. 2020; works with the gloo backend on CPU).

Every rank holds a replica of the router (and of the shared expert, if any) and a contiguous
slice of ``E / world_size`` experts: rank ``r`` owns experts ``r * E_local ... (r + 1) * E_local - 1``.
A forward call on a rank's own tokens:

1. routes them locally (the same routers as :class:`~sparseforge.moe.MoE`);
2. sorts the routing assignments by owning rank and sends the token vectors there
   (``all_to_all``; the split sizes are exchanged first);
3. each rank runs its experts on what it received (the sort-based grouped FFN of
   :mod:`sparseforge.moe.grouped`);
4. sends the expert outputs back (``all_to_all``) and combines them with the gate weights locally,
   so the routing gradient never leaves the rank.

Both all-to-alls are differentiable (the backward pass exchanges gradients the opposite way), so
expert weight gradients on a rank sum over the tokens of *all* ranks routed to its experts, as a
single-process layer over the union of the tokens would. Router and shared-expert gradients are
per rank: all-reduce them as for data parallelism (``DistributedDataParallel`` or
:meth:`ExpertParallelMoE.sync_replicated_grads`). Dropless routing only (no capacity factor,
no expert choice).

Example (one process per rank, after ``dist.init_process_group("gloo", ...)``)::

    full = MoE(512, 1408, num_experts=8, k=2, seed=0)       # same weights on every rank
    layer = ExpertParallelMoE.from_moe(full)               # keeps experts of this rank only
    y, aux = layer(x_of_this_rank)
    (y.pow(2).mean() + aux.loss).backward()
    layer.sync_replicated_grads()
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from sparseforge.errors import ConfigError
from sparseforge.moe.dispatch import build_plan
from sparseforge.moe.grouped import grouped_ffn
from sparseforge.moe.layer import MoE
from sparseforge.moe.losses import MoEAux

__all__ = ["ExpertParallelMoE", "all_to_all"]


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with variable splits; backward sends gradients the opposite way."""

    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group):
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _AllToAll.apply(grad.contiguous(), ctx.recv_splits, ctx.send_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group=None) -> torch.Tensor:
    """Differentiable variable-size all-to-all along dim 0: rows ``send_splits[r]`` go to rank ``r``."""
    return _AllToAll.apply(x, list(send_splits), list(recv_splits), group)


class ExpertParallelMoE(nn.Module):
    """The experts of this rank plus replicated router / shared expert; see the module docstring."""

    def __init__(self, moe: MoE, group=None) -> None:
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise ConfigError("expert parallelism needs torch.distributed: call dist.init_process_group first")
        if moe.capacity_factor is not None or not moe.router.token_choice:
            raise ConfigError("ExpertParallelMoE is dropless: use a token-choice router and capacity_factor=None")
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if moe.num_experts % self.world:
            raise ConfigError(f"{moe.num_experts} experts cannot be split evenly over {self.world} ranks")
        self.num_experts = moe.num_experts
        self.local = moe.num_experts // self.world
        lo, hi = self.rank * self.local, (self.rank + 1) * self.local
        self.first_expert = lo
        self.d_model, self.k, self.activation, self.backend = moe.d_model, moe.k, moe.activation, moe.backend
        self.lb_coef, self.z_coef = moe.lb_coef, moe.z_coef
        self.router, self.gate, self.shared, self.shared_gate = moe.router, moe.gate, moe.shared, moe.shared_gate
        self.seed = moe.seed
        self._generator: torch.Generator | None = None
        self.w_up = nn.Parameter(moe.w_up.detach()[lo:hi].clone())  # (E_local, d, h)
        self.w_down = nn.Parameter(moe.w_down.detach()[lo:hi].clone())  # (E_local, h, d)
        self.w_gate = None if moe.w_gate is None else nn.Parameter(moe.w_gate.detach()[lo:hi].clone())
        if moe.input_jitter > 0:
            raise ConfigError("input_jitter is not supported with expert parallelism (set it to 0)")
        self.train(moe.training)

    def _rng(self, generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
        if generator is not None or self.seed is None:
            return generator
        if self._generator is None or self._generator.device != device:
            # each rank draws its own noise: seed + rank
            self._generator = torch.Generator(device=device).manual_seed(self.seed + self.rank)
        return self._generator

    @classmethod
    def from_moe(cls, moe: MoE, group=None) -> "ExpertParallelMoE":
        """Shard ``moe`` (identical on every rank) and keep this rank's experts."""
        return cls(moe, group)

    def replicated_parameters(self) -> list[nn.Parameter]:
        """Parameters every rank holds a copy of (router, shared expert)."""
        mods = [self.gate, self.shared, self.shared_gate]
        return [p for m in mods if m is not None for p in m.parameters()]

    def sync_replicated_grads(self) -> None:
        """Sum the replicated parameters' gradients over ranks (data-parallel all-reduce)."""
        for p in self.replicated_parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, group=self.group)

    def forward(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> tuple[torch.Tensor, MoEAux]:
        if x.shape[-1] != self.d_model:
            raise ConfigError(f"expects inputs (..., {self.d_model}), got {tuple(x.shape)}")
        shape = x.shape
        x = x.reshape(-1, self.d_model)  # (T, d)
        rng = self._rng(generator, x.device) if self.training else None
        logits = self.gate(x)  # (T, E)
        experts, weights, probs = self.router(logits, generator=rng)  # (T, k) (T, k) (T, E)
        # --- sort the assignments by owning rank
        flat_e = experts.reshape(-1)  # (T*k,)
        valid = (flat_e >= 0).nonzero().reshape(-1)  # (S,) slots with an expert
        owner = flat_e[valid] // self.local  # (S,)
        order = torch.sort(owner, stable=True).indices  # (S,)
        slots = valid[order]  # (S,) flat slot ids grouped by rank
        send = torch.bincount(owner, minlength=self.world)  # (W,)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        send_splits, recv_splits = send.tolist(), recv.tolist()
        # --- ship the tokens and their (local) expert ids
        token = slots // self.k  # (S,)
        x_recv = all_to_all(x.index_select(0, token), send_splits, recv_splits, self.group)  # (R, d)
        local_ids = flat_e[slots] - owner[order] * self.local  # (S,)
        ids_recv = local_ids.new_empty(sum(recv_splits))
        dist.all_to_all_single(ids_recv, local_ids.contiguous(), recv_splits, send_splits, group=self.group)
        # --- local experts on what arrived (gate weights are applied at home)
        plan = build_plan(ids_recv.unsqueeze(1), self.local)
        ones = x_recv.new_ones(x_recv.shape[0], 1)  # (R, 1)
        y_recv = grouped_ffn(x_recv, ones, plan, self.w_up, self.w_down, self.w_gate, self.activation, self.backend)
        # --- outputs home, weighted combine
        y_slots = all_to_all(y_recv, recv_splits, send_splits, self.group)  # (S, d)
        w_slots = weights.reshape(-1).index_select(0, slots).to(y_slots.dtype)  # (S,)
        y = torch.zeros_like(x).index_add(0, token, y_slots * w_slots.unsqueeze(1))  # (T, d)
        if self.shared is not None:
            s = self.shared(x)
            y = y + (torch.sigmoid(self.shared_gate(x)) * s if self.shared_gate is not None else s)
        counts = torch.bincount(flat_e[valid], minlength=self.num_experts)  # (E,) this rank's tokens
        aux = MoEAux(logits, probs, experts, counts, 0.0, self.lb_coef, self.z_coef)
        return y.reshape(shape), aux

    def extra_repr(self) -> str:
        return (f"rank={self.rank}/{self.world}, experts={self.first_expert}..{self.first_expert + self.local - 1} "
                f"of {self.num_experts}, k={self.k}")
