"""Validation of the adapter options of :class:`~sparseforge.finetune.FinetuneConfig` (torch-free).

``adapter="lora"`` trains LoRA adapters (``peft``) on the frozen, possibly pruned student;
``adapter="sparselora"`` adds SparseLoRA's SVD channel skipping in the frozen base MLPs and
attention projections (:mod:`sparseforge.finetune.sparselora`); ``"none"`` (default) trains every weight. After training
the adapters are merged into the weights, masked so pruned weights stay zero unless
``merge_keep_mask=False``.

Example:
    >>> from sparseforge.finetune import FinetuneConfig
    >>> FinetuneConfig(loss="ce", adapter="sparselora", lora_rank=16).lora_rank
    16
"""

from __future__ import annotations

from typing import Any

from sparseforge.errors import ConfigError

__all__ = ["ADAPTERS", "check_adapter_options", "add_adapter_arguments", "adapter_kwargs"]

ADAPTERS = ("none", "lora", "sparselora", "s2ft")


def _fraction(name: str, value: Any, low_open: bool, high_open: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > 0 if low_open else value >= 0) and (value < 1 if high_open else value <= 1)
    if not ok:
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise ConfigError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


def _rank(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_adapter_options(cfg: Any) -> None:
    """Check (and normalise) the ``adapter`` / ``lora_*`` / ``sparselora_*`` fields of a FinetuneConfig."""
    if cfg.adapter is None:
        cfg.adapter = "none"
    if cfg.adapter not in ADAPTERS:
        raise ConfigError(f"adapter must be one of {', '.join(ADAPTERS)}, got {cfg.adapter!r}")
    _rank("lora_rank", cfg.lora_rank)
    if cfg.lora_alpha is not None:
        if isinstance(cfg.lora_alpha, bool) or not isinstance(cfg.lora_alpha, (int, float)) or not cfg.lora_alpha > 0:
            raise ConfigError(f"lora_alpha must be a positive number or None (2 x rank), got {cfg.lora_alpha!r}")
        cfg.lora_alpha = float(cfg.lora_alpha)
    cfg.lora_dropout = _fraction("lora_dropout", cfg.lora_dropout, low_open=False, high_open=True)
    if not isinstance(cfg.merge_keep_mask, bool):
        raise ConfigError(f"merge_keep_mask must be true or false, got {cfg.merge_keep_mask!r}")
    cfg.sparselora_sparsity = _fraction("sparselora_sparsity", cfg.sparselora_sparsity, low_open=False, high_open=True)
    cfg.sparselora_attn_sparsity = _fraction("sparselora_attn_sparsity", cfg.sparselora_attn_sparsity,
                                             low_open=False, high_open=True)
    _rank("sparselora_rank", cfg.sparselora_rank)
    cfg.sparselora_start = _fraction("sparselora_start", cfg.sparselora_start, low_open=False, high_open=False)
    cfg.sparselora_dense_tokens = _fraction("sparselora_dense_tokens", cfg.sparselora_dense_tokens,
                                            low_open=False, high_open=False)
    if not isinstance(cfg.sparselora_layers, str) or not cfg.sparselora_layers.strip():
        raise ConfigError(f"sparselora_layers must be 'auto', 'all' or block indices like '1,2,5-7', got {cfg.sparselora_layers!r}")
    if cfg.adapter != "none" and cfg.compute != "dense":
        raise ConfigError(f"adapter {cfg.adapter!r} trains on a frozen base: use compute='dense' (got {cfg.compute!r})")


def add_adapter_arguments(parser) -> None:
    """The ``sparseforge finetune`` options of the adapters (argparse, torch-free)."""
    import argparse

    g = parser.add_argument_group("adapters (LoRA / SparseLoRA on the frozen base, merged masked at the end; S²FT slices)")
    g.add_argument("--adapter", default="none", choices=list(ADAPTERS),
                   help="none: train every weight (default); lora: LoRA adapters (peft); sparselora: LoRA + SVD channel skipping; s2ft: dense slices of selected heads and channels (see --s2ft-*)")
    g.add_argument("--lora-rank", type=int, default=8, help="LoRA rank (default 8)")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--merge-keep-mask", action=argparse.BooleanOptionalAction, default=True,
                   help="mask the merged delta so pruned weights stay zero (default); --no-merge-keep-mask merges dense deltas")
    g.add_argument("--sparselora-sparsity", type=float, default=0.9, help="fraction of MLP channels the base skips (default 0.9)")
    g.add_argument("--sparselora-attn-sparsity", type=float, default=0.0,
                   help="fraction of key/value channels the base q/k/v/o skip (default 0: attention dense; the paper's 7B configs: 0.6-0.75)")
    g.add_argument("--sparselora-rank", type=int, default=8, help="rank of the SVD estimator (default 8)")
    g.add_argument("--sparselora-start", type=float, default=0.05, help="fraction of the first steps run dense (default 0.05)")
    g.add_argument("--sparselora-dense-tokens", type=float, default=0.25,
                   help="fraction of each window (its end: the output tokens) run dense (default 0.25)")
    g.add_argument("--sparselora-layers", default="auto", help="'auto' (paper: first and last blocks dense), 'all' or '1,2,5-7'")


def adapter_kwargs(args) -> dict[str, Any]:
    """The FinetuneConfig fields of the parsed :func:`add_adapter_arguments` options."""
    return {"adapter": args.adapter, "lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha,
            "lora_dropout": args.lora_dropout, "merge_keep_mask": args.merge_keep_mask,
            "sparselora_sparsity": args.sparselora_sparsity, "sparselora_rank": args.sparselora_rank,
            "sparselora_start": args.sparselora_start, "sparselora_dense_tokens": args.sparselora_dense_tokens,
            "sparselora_layers": args.sparselora_layers, "sparselora_attn_sparsity": args.sparselora_attn_sparsity}
