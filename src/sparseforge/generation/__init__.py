"""Text generation on the CPU: ``sparseforge generate`` and its Python API, and the lean decode path.

* :func:`generate` (:mod:`sparseforge.generation.text`): load a causal LM (dense or compressed),
  stream its continuation of a prompt, report prefill and decode tokens/s and the engine that ran;
* :func:`native_generate` (:mod:`sparseforge.generation.loop`) / :class:`DecodeEngine`
  (:mod:`sparseforge.generation.engine`): the native decode engine for Llama / Qwen2 / Mistral, a
  static KV cache and a decode step of pre-bound calls; :class:`Sampling` (:mod:`sparseforge.generation.sampling`);
* :func:`lean_generate` / :class:`LeanConfig` (:mod:`sparseforge.generation.lean`): transformers'
  ``generate`` with fused projections, a static KV cache and optionally a compiled decode step;
* :func:`fuse_projections_` (:mod:`sparseforge.generation.fuse`): q/k/v and gate/up as one matmul.

Importing this package imports neither torch nor transformers (names resolve on first use). See docs/generate.md.

Example:
    >>> from sparseforge.generation import generate
    >>> result = generate("builtin", "To be, or not to be", max_new_tokens=8)   # doctest: +SKIP
    >>> result.new_tokens                                                        # doctest: +SKIP
    8
"""

from __future__ import annotations

import importlib

# public name -> module that defines it, imported on first access (keeps ``generation.cli`` torch-free)
_LAZY = {
    "generate": "text", "GenerationResult": "text", "GenerationSettings": "text", "load_causal_lm": "text", "timing_streamer": "text",
    "ENGINES": "text", "choose_engine": "text",
    "DecodeEngine": "engine", "unsupported_reason": "engine", "check_supported": "engine",
    "native_generate": "loop", "Sampling": "sampling", "TokenPicker": "sampling",
    "LeanConfig": "lean", "lean_generate": "lean", "lean_generate_kwargs": "lean", "prepare_lean_": "lean",
    "fuse_projections_": "fuse", "unfuse_projections_": "fuse", "FuseReport": "fuse",
}  # fmt: skip

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sparseforge.generation' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"sparseforge.generation.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
