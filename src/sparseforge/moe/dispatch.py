"""Sort-based dispatch bookkeeping: group routing assignments by expert, capacity, combine.

The ``S`` kept (token, expert) assignments are sorted by expert with one stable sort of the flat
expert ids, so each expert's tokens form a contiguous slice of the sorted token list: no
per-expert boolean masks over all tokens, no padding. The expert
FFNs then run slice by slice (:mod:`sparseforge.moe.grouped`) and write their output rows in
sorted order; :func:`combine_slots` gathers them back per token through the plan's ``position``
map and sums each token's ``k`` rows weighted by its gates: a gather and a sum, never a
scatter-add (CPU ``index_add_`` of many rows ran slower than the expert matmuls themselves).

Example:
    >>> import torch
    >>> from sparseforge.moe.dispatch import build_plan
    >>> plan = build_plan(torch.tensor([[0, 2], [2, -1]]), num_experts=3)  # -1 = empty slot
    >>> plan.counts, plan.token.tolist(), plan.position.tolist()
    ([1, 0, 2], [0, 0, 1], [0, 1, 2, 3])
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from sparseforge.errors import ConfigError

__all__ = ["DispatchPlan", "build_plan", "apply_capacity", "combine_slots", "COMBINE_CHUNK_BYTES"]

# combine_slots gathers the rows of this many bytes of tokens at a time into one reused buffer.
# Gathering all T * k rows at once (134 MB for E=64 top-8 at 4096 tokens, d=1024) asked the
# allocator for a block above glibc's largest mmap threshold (32 MiB) on every call, so every page
# was mapped and zeroed afresh: 13% of the E=64 forward in a profile on the Intel Xeon host.
COMBINE_CHUNK_BYTES = 8 << 20


class DispatchPlan(NamedTuple):
    """Assignments grouped by expert. ``S`` = number of non-empty slots."""

    token: torch.Tensor  # (S,) token of each assignment, grouped by expert
    slot: torch.Tensor  # (S,) flat index into the (T * k) routing slots
    counts: list[int]  # (E,) assignments per expert; slices are consecutive in expert order
    position: torch.Tensor  # (T*k,) sorted position of each routing slot; S for an empty slot


def build_plan(experts: torch.Tensor, num_experts: int) -> DispatchPlan:
    """Sort the slots of ``experts`` (T, k) by expert; empty slots (-1) are left out.

    Within an expert, assignments keep token order (stable sort).
    """
    k = experts.shape[1]
    flat = experts.reshape(-1)  # (T*k,)
    order = torch.sort(flat, stable=True).indices  # (T*k,) empty slots (-1) first
    counts = torch.bincount(flat + 1, minlength=num_experts + 1).tolist()  # (E+1,)
    if len(counts) > num_experts + 1:
        raise ConfigError(f"routing chose expert {len(counts) - 2} but the layer has {num_experts} experts")
    slot = order[counts[0]:]  # (S,)
    position = torch.full_like(flat, slot.numel())  # (T*k,) empty slots point one past the end
    position[slot] = torch.arange(slot.numel(), device=flat.device)
    return DispatchPlan(slot // k, slot, counts[1:], position)


def apply_capacity(
    experts: torch.Tensor, weights: torch.Tensor, capacity: int, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Keep at most ``capacity`` assignments per expert; the rest become empty slots.

    Priority: all first choices before any second choice, then token order (GShard/Switch).
    Returns ``(experts, weights, number dropped)``.
    """
    num_tokens, k = experts.shape
    flat = experts.t().reshape(-1)  # (k*T,) choice-major
    order = torch.sort(flat, stable=True).indices  # (k*T,)
    sorted_e = flat[order]
    counts = torch.bincount(flat + 1, minlength=num_experts + 1)  # (E+1,)
    start = torch.cumsum(counts, 0) - counts  # (E+1,) first position of each expert (and of -1)
    pos = torch.arange(flat.numel(), device=flat.device) - start[sorted_e + 1]  # (k*T,) rank in expert
    over_sorted = (pos >= capacity) & (sorted_e >= 0)
    over = torch.empty_like(over_sorted)
    over[order] = over_sorted
    drop = over.view(k, num_tokens).t()  # (T, k)
    return experts.masked_fill(drop, -1), weights.masked_fill(drop, 0.0), int(over_sorted.sum())


def combine_slots(
    rows: torch.Tensor, position: torch.Tensor, slot_weights: torch.Tensor | None = None, *,
    chunk_bytes: int = COMBINE_CHUNK_BYTES,
) -> torch.Tensor:
    """``out[t] = sum_j w[t, j] * rows[position[t, j]]`` (T, d) in slot order (deterministic).

    ``rows`` (S + 1, d): one row per sorted assignment plus a zero row that empty slots point to;
    ``position`` (T, k) from :class:`DispatchPlan` (reshaped); ``slot_weights`` (T, k) or None (all 1).
    Tokens are combined in chunks whose gathered rows fill about ``chunk_bytes`` (see
    :data:`COMBINE_CHUNK_BYTES`); every token's sum is the same whatever the chunk size.
    """
    num_tokens, k = position.shape
    d = rows.shape[1]
    if k == 1 and slot_weights is None:
        return rows.index_select(0, position.reshape(-1))  # (T, d)
    out = rows.new_empty(num_tokens, d)  # (T, d)
    chunk = max(1, min(num_tokens, chunk_bytes // max(1, k * d * rows.element_size())))
    picked = rows.new_empty(chunk * k, d)  # (chunk * k, d) reused for every chunk
    flat_pos = position.reshape(-1)  # (T*k,)
    flat_w = None if slot_weights is None else slot_weights.reshape(-1, 1)  # (T*k, 1)
    for t0 in range(0, num_tokens, chunk):
        n = min(chunk, num_tokens - t0)
        part = torch.index_select(rows, 0, flat_pos[t0 * k:(t0 + n) * k], out=picked[: n * k])  # (n*k, d)
        if flat_w is not None:
            part.mul_(flat_w[t0 * k:(t0 + n) * k])
        if k == 1:
            out[t0:t0 + n].copy_(part)
        else:
            torch.sum(part.view(n, k, d), 1, out=out[t0:t0 + n])  # (n, d)
    return out
