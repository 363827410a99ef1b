"""The lean decode path: transformers' ``generate`` with less work per token outside the weights.

Per decoded token, a 16-layer Llama spends its time, beyond reading the weights, in per-op dispatch
(~25 torch ops per layer), in the dynamic KV cache growing by ``torch.cat`` every step, and in one
sparse-kernel launch (and thread hand-off) per projection. :func:`lean_generate` keeps
transformers' own ``generate`` loop (same logits processors, stopping criteria, streamers) and
changes only what goes through its extension points:

* **fused projections** (:func:`sparseforge.generation.fuse.fuse_projections_`): q/k/v and
  gate/up run as one matmul each, sparse in the layers' own format; dense groups are fused only for
  the compiled step (eagerly, the module call and slice each member then costs are about what the
  saved GEMV launches save: ``fuse="always"`` fuses them anyway);
* **static KV cache** (``cache_implementation="static"``, with ``compile`` by default): preallocated
  keys/values written in place instead of concatenated; its length is rounded up to
  ``cache_bucket`` tokens, so calls with different lengths reuse one cache (and one compiled graph).
  Without compilation it is slower than the dynamic cache (eager attention then runs over the whole
  preallocated length and builds its mask every step; ``benchmarks/bench_generate.py``), so eager
  decoding keeps the dynamic cache;
* **torch.compile** of the decode step (``compile=True``), through transformers' ``CompileConfig``:
  inductor fuses the norm / rotary / SwiGLU element-wise ops and removes most per-op dispatch; the
  sparse layers stay the ``sparseforge::*_linear`` custom ops inside the graph. Compiling a 16-layer model took
  60-90 s on a contended 2-core machine (``benchmarks/bench_generate.py`` measures it), so it pays only for
  long generations or a long-lived process; it is off by default.

Greedy decoding gives the tokens of plain ``model.generate`` (``tests/generation``); the fused
matmuls may differ from the separate ones in the last bits of float32 rounding.

For Llama / Qwen2 / Mistral models the native decode engine (:mod:`sparseforge.generation.engine`,
:func:`~sparseforge.generation.loop.native_generate`) costs less per token without compiling, and is what
``sparseforge generate`` runs by default; this path stays the one for other model families, KV
policies (transformers' paged cache) and the compiled step.

Example:
    >>> from sparseforge.generation.lean import LeanConfig, lean_generate
    >>> ids = tokenizer("To be", return_tensors="pt").input_ids                   # doctest: +SKIP
    >>> out = lean_generate(model, ids, LeanConfig(), max_new_tokens=32, do_sample=False)  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from sparseforge.errors import ConfigError, ModelError
from sparseforge.generation.fuse import FuseReport, fuse_projections_

__all__ = ["LeanConfig", "prepare_lean_", "lean_generate_kwargs", "lean_generate", "cache_length"]


@dataclass(frozen=True)
class LeanConfig:
    """Which parts of the lean decode path to use (see the module doc)."""

    fuse: "bool | str" = "auto"  # "auto": sparse groups always, dense groups when compiling; True/"always"; False/"never"
    compile: bool = False
    static_cache: Optional[bool] = None  # None: with compile only (eager decoding is faster on the dynamic cache)
    cache_bucket: int = 256
    compile_options: Optional[dict] = None  # inductor options for torch.compile, e.g. {"freezing": True}

    def __post_init__(self) -> None:
        if self.fuse not in (True, False, "auto", "always", "never"):
            raise ConfigError(f"fuse must be 'auto', 'always', 'never', True or False, got {self.fuse!r}")
        if isinstance(self.cache_bucket, bool) or not isinstance(self.cache_bucket, int) or self.cache_bucket < 1:
            raise ConfigError(f"cache_bucket must be a positive integer, got {self.cache_bucket!r}")
        if self.compile and self.static_cache is False:
            raise ConfigError("compile=True needs the static KV cache (a growing cache recompiles every step)")

    @property
    def uses_static_cache(self) -> bool:
        return self.compile if self.static_cache is None else self.static_cache


def cache_length(tokens: int, bucket: int, limit: Optional[int] = None) -> int:
    """``tokens`` rounded up to a multiple of ``bucket``, capped at ``limit`` (but never below ``tokens``)."""
    length = -(-int(tokens) // bucket) * bucket
    if limit is not None:
        length = max(int(tokens), min(length, int(limit)))
    return length


def prepare_lean_(model: nn.Module, config: LeanConfig = LeanConfig()) -> Optional[FuseReport]:
    """Apply the in-place parts of the lean path to ``model`` (the projection fusion); idempotent.

    Returns the fusion report (``None`` when ``config.fuse`` is off).
    """
    if not hasattr(model, "generate"):
        raise ModelError(f"the lean decode path needs a transformers causal LM, got {type(model).__name__}")
    if config.fuse in (False, "never"):
        return None
    return fuse_projections_(model, dense=config.fuse in (True, "always") or config.compile)


def lean_generate_kwargs(model: nn.Module, total_tokens: int, config: LeanConfig = LeanConfig()) -> dict[str, Any]:
    """Keyword arguments for ``model.generate`` that select the static cache (sized for ``total_tokens``
    = prompt + new tokens, rounded up to the bucket) and, with ``config.compile``, the compiled decode step."""
    kw: dict[str, Any] = {}
    if config.uses_static_cache:
        limit = getattr(model.config, "max_position_embeddings", None)
        kw.update(cache_implementation="static", max_cache_len=cache_length(total_tokens, config.cache_bucket, limit))
    if config.compile:
        from transformers import CompileConfig

        options = dict(config.compile_options) if config.compile_options else None
        # torch.compile takes a mode or options, not both; mode "default" is inductor's defaults
        compile_config = CompileConfig(fullgraph=False, dynamic=False, mode=None if options else "default", options=options)
        # transformers compiles the decode step only on accelerators unless this documented flag is set
        compile_config._compile_all_devices = True
        kw["compile_config"] = compile_config
    else:
        kw["disable_compile"] = True
    return kw


def lean_generate(model: nn.Module, input_ids: torch.Tensor, config: LeanConfig = LeanConfig(), **generate_kwargs):
    """``model.generate(input_ids, **generate_kwargs)`` through the lean decode path (module doc).

    Fuses ``model``'s projections in place on first use (see :func:`prepare_lean_`); every other
    ``generate`` argument (``max_new_tokens``, ``do_sample``, ``streamer``, ...) passes through.
    """
    prepare_lean_(model, config)
    new = generate_kwargs.get("max_new_tokens")
    if new is None:
        raise ConfigError("lean_generate needs max_new_tokens= (it sizes the static KV cache)")
    kw = lean_generate_kwargs(model, input_ids.shape[-1] + int(new), config)
    kw.update(generate_kwargs)
    return model.generate(input_ids, **kw)
