"""Sequential, block-by-block calibration (as in SparseGPT, Frantar & Alistarh 2023, section 3).

Calibration samples run through the model one transformer block at a time: the inputs reaching
block 0 are captured once; then for every block, hooks collect the statistics of its linear
layers from the inputs it *actually* receives, the caller prunes them, and the pruned block's
outputs become the next block's inputs. Only the current block is cast to float32 with its
calibration activations; the rest of the model stays in its stored dtype (a bf16 model is never
copied to float32 as a whole).

Example (what :func:`sparseforge.sparsify_` does)::

    inputs = capture_block_inputs(model, blocks, batches)        # activations entering block 0
    for block in blocks:
        with float32_block(block):
            stats = collect_stats(block, names, inputs, make_stats)  # hooks on the linear layers
            ...prune...
            inputs = propagate(block, inputs)                          # pruned outputs -> next block
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from sparseforge.errors import ModelError

__all__ = ["BlockInputs", "capture_block_inputs", "float32_block", "collect_stats", "propagate"]


@dataclass
class BlockInputs:
    """Per calibration batch: the hidden states entering a block and the other call arguments."""

    hidden: list[torch.Tensor]  # each (B, T, H) float32
    args: list[tuple]  # positional arguments after the hidden states
    kwargs: list[dict[str, Any]]
    hidden_as_kwarg: bool  # the model passes hidden_states=... instead of positionally

    def call(self, block: nn.Module, i: int, hidden: torch.Tensor) -> torch.Tensor:
        """Run ``block`` on batch ``i`` with ``hidden`` and return its output hidden states."""
        if self.hidden_as_kwarg:
            out = block(*self.args[i], hidden_states=hidden, **self.kwargs[i])
        else:
            out = block(hidden, *self.args[i], **self.kwargs[i])
        return out[0] if isinstance(out, (tuple, list)) else out


class _Captured(Exception):
    pass


def _to_float32(obj: Any) -> Any:
    """Cast floating tensors (also inside tuples, lists, dicts) to float32; leave the rest."""
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, tuple):
        return tuple(_to_float32(o) for o in obj)
    if isinstance(obj, list):
        return [_to_float32(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _to_float32(v) for k, v in obj.items()}
    return obj


def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, batches: list[torch.Tensor]) -> BlockInputs:
    """Run each batch of token ids (B, T) until the first block and record what it receives."""
    inputs = BlockInputs([], [], [], False)

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        if args:
            hidden, rest = args[0], args[1:]
        elif "hidden_states" in kwargs:
            hidden, rest = kwargs.pop("hidden_states"), ()
            inputs.hidden_as_kwarg = True
        else:
            raise ModelError(f"cannot find the hidden states passed to {type(module).__name__}")
        inputs.hidden.append(hidden.detach().float())
        inputs.args.append(_to_float32(rest))
        inputs.kwargs.append(_to_float32(kwargs))
        raise _Captured

    accepts = inspect.signature(model.forward).parameters
    extra = {"use_cache": False} if "use_cache" in accepts else {}
    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    model(input_ids=batch, **extra)
                except _Captured:
                    continue
                raise ModelError("the model finished a forward pass without calling its first block")
    finally:
        handle.remove()
    return inputs


@contextlib.contextmanager
def float32_block(block: nn.Module):
    """Hold ``block`` in float32 inside the context, then cast it back to its stored dtype."""
    dtype = next(block.parameters()).dtype
    block.float()
    try:
        yield block
    finally:
        block.to(dtype)


def collect_stats(
    block: nn.Module, names: list[str], inputs: BlockInputs, make_stats: Callable[[str, int], Any]
) -> dict[str, Any]:
    """Run the block on every batch with hooks feeding each named linear's inputs to its stats.

    ``names`` are relative to ``block``; ``make_stats(name, in_features)`` builds an accumulator
    with ``add_batch(x)``. Layers that receive the very same input tensor (q/k/v projections,
    gate/up projections) share one accumulator, so each Hessian is accumulated and stored once.
    """
    modules = dict(block.named_modules())
    stats: dict[str, Any] = {}
    owner_of: dict[str, str] = {}  # name -> the first name seen with the same input tensor
    last_input: dict[str, torch.Tensor] = {}  # owner -> its input in the current forward pass

    def hook(name: str, module, args, output) -> None:
        x = args[0]  # the very object the module received (under no_grad: nothing to detach)
        if name not in owner_of:  # first batch: find layers fed the identical tensor
            owner_of[name] = next((o for o, t in last_input.items() if t is x), name)
        owner = owner_of[name]
        if owner == name:
            if name not in stats:
                in_features = module.in_features if isinstance(module, nn.Linear) else module.weight.shape[0]
                stats[name] = make_stats(name, in_features)
            stats[name].add_batch(x)
            last_input[name] = x
        elif last_input.get(owner) is not x and not torch.equal(last_input[owner], x):
            raise ModelError(f"layers {owner} and {name} shared an input in the first batch but not later")

    handles = [modules[n].register_forward_hook(lambda m, a, o, n=n: hook(n, m, a, o)) for n in names]
    try:
        with torch.no_grad():
            for i, hidden in enumerate(inputs.hidden):
                last_input.clear()
                inputs.call(block, i, hidden)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in owner_of]
    if missing:
        raise ModelError(f"layers {missing} were not called during calibration; add them to ignore")
    return {n: stats[owner_of[n]] for n in names}


def propagate(block: nn.Module, inputs: BlockInputs) -> BlockInputs:
    """Replace each batch's hidden states by the block's outputs (in float32)."""
    with torch.no_grad():
        for i, hidden in enumerate(inputs.hidden):
            inputs.hidden[i] = inputs.call(block, i, hidden).float()
    return inputs
