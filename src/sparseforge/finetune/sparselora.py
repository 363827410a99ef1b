"""SparseLoRA: LoRA fine-tuning whose frozen base MLPs skip the channels an SVD estimator deems idle.

Khaki et al. 2025, "SparseLoRA: Accelerating LLM Fine-Tuning with Contextual Sparsity" (reference
code z-lab/sparselora, ``spft/modules/{svd,pred,mlp}.py``). Each gated MLP
``down(act(gate(x)) * up(x))`` of the chosen blocks is replaced by a :class:`SparseLoRAMLP` that
keeps its children (state-dict names do not change) and, while training:

* scores every intermediate channel with the rank-``rank`` SVD of the frozen gate / up weights
  (:func:`~sparseforge.finetune.svd_estimator.ffn_channel_scores`, sequence-averaged inputs, one
  channel set per batch) and keeps the top ``1 - sparsity`` of them;
* computes the frozen base on the kept channels only (gate/up rows, down columns) for the
  **context tokens** (the first ``1 - dense_tokens`` of each window) and densely for the **output
  tokens** (the last ``dense_tokens``), the LoRA branches dense on every token: one pass over all
  tokens (:func:`~sparseforge.finetune.token_split_linear.token_split_linear` adds the base into
  the LoRA deltas; input gradient only), equal to
  :func:`~sparseforge.finetune.svd_estimator.skip_channel_mlp` on the context tokens joined with
  the dense MLP on the output tokens (the autograd path it takes when the base is trainable);
* stays dense for the first ``start`` fraction of the steps (:meth:`SparseLoRA.begin_step`), and
  whenever the model is in eval mode (held-out evaluation, ``generate``).

Defaults follow the paper's configurations: rank 8, the first 5 % of steps dense, the first
``round(3 L / 32)`` (at least 1) and the last ``round(L / 32)`` (at least 1) of the ``L`` blocks
dense (Llama-3-8B: 3 and 1), sparsity 0.9 (``configs/sparsity/llama2-7b-*.yaml``; the Llama-3
configs use 0.97-0.99). Where the reference splits tokens by their labels (prompt tokens sparse,
response tokens dense), plain-text fine-tuning has a loss on every token, so the split is
positional: the last ``dense_tokens`` of each window are the output tokens. The attention part
(q/k/v output channels and o input channels, :mod:`sparseforge.finetune.sparselora_attention`)
runs on the same blocks and schedule at its own ``attn_sparsity`` (0.6 in the reference's Llama-2-7B
configurations). Its default here is 0 (attention dense): on CPU at hidden sizes up to 1024 the
q/k/v/o matmuls it skips save about what the token split, gather and scatter cost
(``benchmarks/bench_finetune.py --cost``); turn it on where it measures faster.

Example:
    >>> from sparseforge.finetune.lora import attach_lora                      # doctest: +SKIP
    >>> attach_lora(model, rank=8)                                            # doctest: +SKIP
    >>> sparse = SparseLoRA.attach(model, sparsity=0.9, attn_sparsity=0.6)    # doctest: +SKIP
    >>> sparse.begin_step(step=10, total=100)     # active after the dense start  # doctest: +SKIP
    >>> sparse.remove()              # the original MLP and projection modules back  # doctest: +SKIP
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from sparseforge.errors import ConfigError, ModelError
from sparseforge.finetune.sparselora_attention import SparseLoRAAttention, attention_blocks
from sparseforge.finetune.svd_estimator import ffn_channel_scores, low_rank_factors, skip_channel_mlp, top_channels
from sparseforge.finetune.token_split_linear import token_split_linear
from sparseforge.layers import set_module

__all__ = ["SparseLoRA", "SparseLoRAMLP", "gated_mlps", "default_sparse_blocks", "parse_layers"]

_PROJ = ("gate_proj", "up_proj", "down_proj")


def _base(proj: nn.Module) -> nn.Module:
    return proj.get_base_layer() if hasattr(proj, "get_base_layer") else proj


def _lora_delta(proj: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The active LoRA branch of a peft layer as ``x -> scaling * B(A(dropout(x)))``; None for a plain layer."""
    if not hasattr(proj, "lora_A"):
        return None
    names = [a for a in proj.active_adapters if a in proj.lora_A]
    if not names:
        return None

    def delta(x: torch.Tensor) -> torch.Tensor:
        out = None
        for a in names:
            y = proj.lora_B[a](proj.lora_A[a](proj.lora_dropout[a](x))) * proj.scaling[a]
            out = y if out is None else out + y
        return out

    return delta


def gated_mlps(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: module}`` of the gated MLPs (children ``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``)."""
    out = {}
    for name, module in model.named_modules():
        if all(hasattr(module, p) for p in (*_PROJ, "act_fn")) and isinstance(_base(module.gate_proj), nn.Linear):
            out[name] = module
    return out


def default_sparse_blocks(n_blocks: int) -> list[int]:
    """The paper's layer choice scaled to ``n_blocks``: the first ``round(3n/32)`` and last ``round(n/32)`` (>= 1 each) dense."""
    first = max(1, round(3 * n_blocks / 32))
    last = max(1, round(n_blocks / 32))
    return list(range(first, n_blocks - last))


def parse_layers(spec: str, n_blocks: int) -> list[int]:
    """``"auto"`` (:func:`default_sparse_blocks`), ``"all"``, or block indices ``"1,2,5-7"`` -> sorted indices."""
    spec = spec.strip()
    if spec == "auto":
        return default_sparse_blocks(n_blocks)
    if spec == "all":
        return list(range(n_blocks))
    out: set[int] = set()
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ConfigError(f"sparselora layers {spec!r} is not 'auto', 'all' or block indices like '1,2,5-7'") from None
    bad = sorted(i for i in out if not 0 <= i < n_blocks)
    if bad:
        raise ConfigError(f"sparselora layers {bad} are outside the model's {n_blocks} blocks (0..{n_blocks - 1})")
    return sorted(out)


class SparseLoRAMLP(nn.Module):
    """A gated MLP whose frozen base skips the estimator's idle channels on context tokens (module doc)."""

    def __init__(self, mlp: nn.Module, controller: "SparseLoRA", sparsity: float, rank: int) -> None:
        super().__init__()
        for name in (*_PROJ, "act_fn"):
            setattr(self, name, getattr(mlp, name))  # the same children: state-dict names unchanged
        self._original = (mlp,)  # a tuple: not registered as a submodule
        self._controller = (controller,)
        self.sparsity = sparsity
        gate_w, up_w = _base(self.gate_proj).weight, _base(self.up_proj).weight  # (intermediate, hidden)
        ga, gb = low_rank_factors(gate_w, rank)
        ua, ub = low_rank_factors(up_w, rank)
        for key, value in (("gate_a", ga), ("gate_b", gb), ("up_a", ua), ("up_b", ub)):
            self.register_buffer(key, value, persistent=False)  # computed from the frozen base, not saved
        self.last_kept: torch.Tensor | None = None  # (k,) channels of the last sparse forward

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    def keep(self, x: torch.Tensor) -> torch.Tensor:
        """``(k,)`` channel indices the estimator keeps for the batch ``x`` ``(batch, tokens, hidden)``."""
        scores = ffn_channel_scores(x, (self.gate_a, self.gate_b), (self.up_a, self.up_b), self.act_fn,
                                    seq_avg=self._controller[0].seq_avg)
        return top_channels(scores, self.sparsity)

    def sparse(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The MLP on ``x`` with the base restricted to the channels ``keep`` (LoRA dense)."""
        g, u, d = (_base(getattr(self, p)) for p in _PROJ)
        return skip_channel_mlp(x, keep, (g.weight, g.bias), (u.weight, u.bias), (d.weight, d.bias), self.act_fn,
                                _lora_delta(self.gate_proj), _lora_delta(self.up_proj), _lora_delta(self.down_proj))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, tokens, hidden)
        controller = self._controller[0]
        if not (self.training and controller.active) or x.dim() < 2:
            return self.dense(x)
        n_ctx = controller.context_tokens(x.shape[-2])
        if n_ctx == 0:
            return self.dense(x)
        keep = self.keep(x)
        self.last_kept = keep
        if self._base_frozen():
            return self.split_pass(x, keep, n_ctx)
        if n_ctx == x.shape[-2]:
            return self.sparse(x, keep)
        # one split (its backward is one concatenation) into contiguous parts: 2-D matmuls, not the batched path
        x_ctx, x_out = (part.contiguous() for part in x.split([n_ctx, x.shape[-2] - n_ctx], dim=-2))
        return torch.cat([self.sparse(x_ctx, keep), self.dense(x_out)], dim=-2)  # context sparse | output dense

    def _base_frozen(self) -> bool:
        return not any(p.requires_grad for name in _PROJ for p in _base(getattr(self, name)).parameters())

    def split_pass(self, x: torch.Tensor, keep: torch.Tensor, n_ctx: int) -> torch.Tensor:
        """The MLP on every token in one pass: LoRA dense, the frozen base on ``keep`` for the first ``n_ctx`` tokens.

        Equals ``cat([sparse(x[:, :n_ctx], keep), dense(x[:, n_ctx:])])``; the LoRA deltas run once
        over all tokens and :func:`~sparseforge.finetune.token_split_linear.token_split_linear`
        adds the base into them (no token split or join, no weight gradients).
        """
        squeeze = x.dim() == 2
        x3 = x[None] if squeeze else x.reshape(-1, *x.shape[-2:])  # (B, T, hidden)
        g, u, d = (_base(getattr(self, p)) for p in _PROJ)
        lora_g, lora_u, lora_d = (_lora_delta(getattr(self, p)) for p in _PROJ)
        gate = token_split_linear(x3, lora_g(x3) if lora_g else None, g.weight, g.bias, keep, n_ctx, "rows")  # (B, T, I)
        up = token_split_linear(x3, lora_u(x3) if lora_u else None, u.weight, u.bias, keep, n_ctx, "rows")  # (B, T, I)
        h = self.act_fn(gate) * up  # (B, T, I)
        out = token_split_linear(h, lora_d(h) if lora_d else None, d.weight, d.bias, keep, n_ctx, "cols")  # (B, T, hidden)
        return out[0] if squeeze else out.reshape(x.shape)

    def restore(self) -> nn.Module:
        """The original MLP module, holding this module's current children."""
        mlp = self._original[0]
        for name in _PROJ:
            setattr(mlp, name, getattr(self, name))
        return mlp


class SparseLoRA:
    """Swaps the chosen gated MLPs of ``model`` for :class:`SparseLoRAMLP`, hooks the chosen attention
    blocks (:class:`~sparseforge.finetune.sparselora_attention.SparseLoRAAttention`) and drives their schedule.

    Args (of :meth:`attach`):
        sparsity: fraction of the intermediate channels the base skips on context tokens, in [0, 1).
        attn_sparsity: fraction of the key and value channels the base q/k/v/o skip, in [0, 1); 0: dense.
        rank: rank of the SVD estimator. start: fraction of the steps that run dense first.
        dense_tokens: fraction of each window (its end) run dense as output tokens, in [0, 1].
        layers: ``"auto"``, ``"all"`` or block indices ``"1,2,5-7"`` (indices among the gated MLPs,
            and among the attention blocks for the attention part).
        seq_avg: average each sequence before scoring (the reference's MLP default).
    """

    def __init__(self, model: nn.Module, modules: dict[str, SparseLoRAMLP], start: float, dense_tokens: float,
                 seq_avg: bool) -> None:
        self.model, self.modules = model, modules
        self.attention: dict[str, SparseLoRAAttention] = {}
        self.start, self.dense_tokens, self.seq_avg = start, dense_tokens, seq_avg
        self.active = True

    @classmethod
    def attach(cls, model: nn.Module, sparsity: float = 0.9, rank: int = 8, start: float = 0.05,
               dense_tokens: float = 0.25, layers: str = "auto", seq_avg: bool = True,
               attn_sparsity: float = 0.0) -> "SparseLoRA":
        for label, value in (("sparsity", sparsity), ("attention sparsity", attn_sparsity)):
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0 <= value < 1):
                raise ConfigError(f"sparselora {label} must be in [0, 1), got {value!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise ConfigError(f"sparselora estimator rank must be a positive integer, got {rank!r}")
        mlps = gated_mlps(model)
        if not mlps:
            raise ModelError(f"SparseLoRA skips channels of gated MLPs (gate_proj / up_proj / down_proj), and "
                             f"{type(model).__name__} has none; use adapter 'lora'")
        names = list(mlps)
        blocks = parse_layers(layers, len(names))
        attentions = attention_blocks(model) if attn_sparsity > 0 else {}
        if attn_sparsity > 0 and len(attentions) != len(names):
            raise ModelError(f"SparseLoRA attention sparsity needs one attention block with separate q_proj / k_proj / "
                             f"v_proj / o_proj per MLP ({type(model).__name__} has {len(attentions)} for {len(names)}); "
                             f"pass attention sparsity 0")
        controller = cls(model, {}, start, dense_tokens, seq_avg)
        try:
            for index in blocks:
                if attentions:
                    name = list(attentions)[index]
                    controller.attention[name] = SparseLoRAAttention(attentions[name], controller, float(attn_sparsity), rank)
                wrapped = SparseLoRAMLP(mlps[names[index]], controller, float(sparsity), rank)
                set_module(model, names[index], wrapped)
                controller.modules[names[index]] = wrapped
        except BaseException:
            controller.remove()
            raise
        return controller

    def begin_step(self, step: int, total: int) -> None:
        """Before optimizer step ``step`` (0-based) of ``total``: dense during the first ``ceil(start * total)``."""
        self.active = step >= math.ceil(self.start * total)

    def context_tokens(self, tokens: int) -> int:
        """How many leading tokens of a ``tokens``-long window run sparse."""
        return tokens - math.ceil(self.dense_tokens * tokens)

    def remove(self) -> None:
        """Put the original MLP modules and attention base layers back (LoRA layers stay, with their adapters)."""
        for name, module in self.modules.items():
            set_module(self.model, name, module.restore())
        for block in self.attention.values():
            block.remove()
        self.modules, self.attention = {}, {}

