"""Generate text with a causal LM on the CPU: streamed as it is produced, prefill and decode timed apart.

:func:`generate` takes a model name (``"builtin"``, a Hugging Face causal-LM directory, a dense or
compressed sparseforge checkpoint) or an already loaded model and its tokenizer, tokenizes the
prompt, decodes it with one of two engines (greedy by default, or sampling with ``temperature`` /
``top_k`` / ``top_p`` / ``seed``), writes the new text to ``stream`` as each token arrives, and returns a
:class:`GenerationResult` with the text, the token ids, the engine that ran and the timings:

* **prefill**: from the call until the first new token exists (one forward over the prompt);
* **decode**: from the first new token to the last, over ``new_tokens - 1`` steps.

A compressed sparseforge checkpoint loads with its pruned layers sparse
(:func:`sparseforge.io.loading.load_sparse`) and runs inside :func:`sparseforge.kernels.sparse_threads`
(torch on one thread, the kernels on ``threads``); a dense model runs torch on ``threads``.
Engines (``engine=``): ``"native"`` is the native decode engine (:mod:`sparseforge.generation.engine`,
:func:`~sparseforge.generation.loop.native_generate`: Llama / Qwen2 / Mistral); ``"transformers"`` is
transformers' ``generate``, with ``lean=True`` (default) through :mod:`sparseforge.generation.lean`
(fused projections); ``"auto"`` (default) takes the native engine where it supports the model and no
``kv_policy`` (which needs transformers' paged cache) or compiled lean path is asked for, and says
why not in :attr:`GenerationResult.notes` otherwise. Greedy tokens are those of plain ``generate``.

Example:
    >>> import sys
    >>> from sparseforge.generation import generate
    >>> result = generate("builtin", "To be, or not to be", max_new_tokens=16, stream=sys.stdout)  # doctest: +SKIP
    >>> print(result.summary())                                                                  # doctest: +SKIP
    prompt 7 tokens: prefill 0.012 s (583.3 tokens/s); 16 new tokens: decode 0.151 s (99.3 tokens/s)
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TextIO

from sparseforge.errors import ConfigError, ModelError

__all__ = ["ENGINES", "GenerationResult", "GenerationSettings", "choose_engine", "generate", "load_causal_lm", "timing_streamer"]



@dataclass(frozen=True)
class GenerationSettings:
    """How to pick tokens: greedy (``temperature == 0``, the default) or sampling.

    ``temperature > 0`` samples from the softmax of ``logits / temperature``, restricted to the
    ``top_k`` most likely tokens (``0``: all) and to the ``top_p`` nucleus (``1``: all), seeded by
    ``seed`` (the numbers are checked by :class:`~sparseforge.generation.sampling.Sampling`).
    ``ignore_eos`` keeps generating past the end-of-sequence token (for timing a fixed length).
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 50
    top_p: float = 1.0
    seed: int = 0
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        from sparseforge.generation.sampling import Sampling

        Sampling(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, seed=self.seed)  # checks the numbers

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generate_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of transformers' ``generate`` these settings stand for."""
        kw: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": not self.greedy}
        if not self.greedy:
            kw.update(temperature=float(self.temperature), top_k=self.top_k or None, top_p=self.top_p if self.top_p < 1 else None)
        else:
            kw.update(temperature=None, top_k=None, top_p=None)
        if self.ignore_eos:
            kw["min_new_tokens"] = self.max_new_tokens
        return kw

    def sampling(self):
        """The :class:`~sparseforge.generation.sampling.Sampling` of the native engine for these settings."""
        from sparseforge.generation.sampling import Sampling

        if self.greedy:
            return Sampling()
        return Sampling(temperature=float(self.temperature), top_k=self.top_k or None,
                        top_p=self.top_p if self.top_p < 1 else None, seed=self.seed)


@dataclass
class GenerationResult:
    """What :func:`generate` produced and how long it took (see the module doc for the two phases)."""

    text: str  # the generated continuation, prompt excluded
    token_ids: list[int]  # the new tokens
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    lean: bool = False
    threads: int = 1
    notes: list[str] = field(default_factory=list)
    engine: str = "transformers"  # "native" (the native decode engine) or "transformers" (its generate)

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens/s of the decode phase: ``new_tokens - 1`` steps after the first new token (NaN for one token)."""
        steps = self.new_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else float("nan")

    def summary(self) -> str:
        decode = (f"decode {self.decode_s:.3f} s ({self.decode_tokens_per_s:.1f} tokens/s, "
                  f"{1e3 * self.decode_s / (self.new_tokens - 1):.1f} ms/token)") if self.new_tokens > 1 else "no decode step"
        return (f"prompt {self.prompt_tokens} tokens: prefill {self.prefill_s:.3f} s ({self.prefill_tokens_per_s:.1f} tokens/s); "
                f"{self.new_tokens} new tokens: {decode}; {self.threads} thread(s), {self.engine_label}")

    @property
    def engine_label(self) -> str:
        """Which engine decoded: ``native engine``, ``transformers generate (lean path)`` or ``transformers generate``."""
        if self.engine == "native":
            return "native engine"
        return "transformers generate (lean path)" if self.lean else "transformers generate"


def load_causal_lm(name_or_path: "str | Path", *, sparse: bool = True):
    """``(model, tokenizer, is_sparse)`` for generation: a compressed sparseforge checkpoint with its pruned
    layers as SparseLinear (``sparse=True``) or dense; any other causal LM as
    :func:`sparseforge.io.models.load_model` loads it.

    Raises:
        ModelError: unknown path, not a model directory, or not a causal LM (an encoder such as MiniLM).
    """
    from sparseforge.io.layout import is_compressed, read_sparsity_config
    from sparseforge.io.models import load_model, load_tokenizer, model_kind, resolve_model_path
    from sparseforge.io.validation import read_json

    path = resolve_model_path(name_or_path)
    config = read_json(path / "config.json")
    kind = model_kind(config)
    if kind != "causal-lm":
        raise ModelError(
            f"{name_or_path} is a {config.get('model_type', kind)} {kind}, not a causal language model: generation needs a "
            "*ForCausalLM model (e.g. 'builtin' or a Llama/Qwen/GPT-2 directory)"
        )
    if sparse and is_compressed(read_sparsity_config(path)):
        from sparseforge.io.loading import load_sparse

        return load_sparse(path), load_tokenizer(path), True  # the dense weights are never built
    loaded = load_model(path)
    return loaded.model, loaded.tokenizer, False


def timing_streamer(tokenizer: Any = None, stream: Optional[TextIO] = None):
    """A transformers streamer that records ``time.perf_counter()`` as each new token arrives (``.arrivals``).

    With a ``tokenizer`` it is a ``TextStreamer`` that also writes the new text to ``stream``; without
    one it only keeps the times (for benchmarks: no decoding cost per token). The prompt, which
    ``generate`` hands to the streamer first, is neither timed nor written.

    Example:
        >>> clock = timing_streamer()                                              # doctest: +SKIP
        >>> _ = model.generate(ids, max_new_tokens=8, streamer=clock)               # doctest: +SKIP
        >>> len(clock.arrivals)                                                     # doctest: +SKIP
        8
    """
    from transformers import TextStreamer
    from transformers.generation.streamers import BaseStreamer

    base = TextStreamer if tokenizer is not None else BaseStreamer

    class TimingStreamer(base):
        def __init__(self) -> None:
            if tokenizer is not None:
                super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.arrivals: list[float] = []  # perf_counter() at each new token
            self.prompt_seen = False

        def put(self, value) -> None:
            if self.prompt_seen:
                self.arrivals.append(time.perf_counter())
                if tokenizer is None or stream is None:
                    return
            elif tokenizer is None:
                self.prompt_seen = True
                return
            self.prompt_seen = True
            super().put(value)

        def end(self) -> None:
            if tokenizer is not None:
                super().end()

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if stream is not None:
                stream.write(text + ("\n" if stream_end else ""))
                stream.flush()

    return TimingStreamer()


def _check_prompt(prompt: Any) -> str:
    if not isinstance(prompt, str):
        raise ConfigError(f"prompt must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise ConfigError("the prompt is empty; give some text to continue (--prompt 'Once upon a time')")
    return prompt


ENGINES = ("auto", "native", "transformers")


def choose_engine(model: Any, engine: str, *, kv_policy: Any = None, compiled: bool = False) -> tuple[str, Optional[str]]:
    """``(engine that runs, why auto did not take the native one or None)`` for ``engine`` in :data:`ENGINES`.

    Raises:
        ConfigError: an unknown engine; ``"native"`` with a KV policy or the compiled lean path.
        ModelError: ``"native"`` for a model the native engine does not run.
    """
    from sparseforge.generation.engine import check_supported, unsupported_reason

    if engine not in ENGINES:
        raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "native":
        if kv_policy is not None:
            raise ConfigError("a KV policy (--kv-policy) runs on transformers' paged cache, not the native engine's static "
                              "one; use --engine transformers (or auto)")
        if compiled:
            raise ConfigError("--compile is part of the transformers engine's lean path; use --engine transformers")
        check_supported(model)
        return "native", None
    if engine == "transformers":
        return "transformers", None
    if kv_policy is not None:
        return "transformers", "a KV policy needs transformers' paged cache"
    if compiled:
        return "transformers", "--compile asks for the compiled lean path"
    reason = unsupported_reason(model)
    if reason is not None:
        return "transformers", f"the native engine does not support {reason}"
    return "native", None


def generate(model: "str | Path | Any", prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int = 50, top_p: float = 1.0, seed: int = 0, ignore_eos: bool = False, threads: Optional[int] = None,
             tokenizer: Any = None, sparse: Optional[bool] = None, lean: "bool | Any" = True,
             stream: Optional[TextIO] = None, kv_policy: Any = None, engine: str = "auto",
             attention: str = "auto") -> GenerationResult:
    """Continue ``prompt`` with ``model``; stream the new text to ``stream``; return text, tokens and timings.

    Args:
        model: ``"builtin"``, a causal-LM directory (Hugging Face, or a sparseforge checkpoint, dense
            or compressed: see :func:`load_causal_lm`), or a loaded transformers causal LM (then pass
            ``tokenizer``).
        prompt: the text to continue (not empty).
        max_new_tokens, temperature, top_k, top_p, seed, ignore_eos: see :class:`GenerationSettings`
            (``temperature=0``, the default, is greedy).
        threads: threads for torch and the sparse kernels (default: torch's current count).
        sparse: run in :func:`sparseforge.kernels.sparse_threads` (torch single-threaded, the kernels on
            ``threads``); default: when the model holds SparseLinear layers.
        engine: ``"auto"`` (default: the native engine where it runs the model, see the module doc),
            ``"native"`` or ``"transformers"``; :attr:`GenerationResult.engine` says which ran.
        attention: the native engine's decode attention (:class:`~sparseforge.generation.engine.DecodeEngine`):
            ``"auto"`` (default: the native kernel for float32 models, torch SDPA for bf16 ones, which rounds
            as the model does), ``"native"`` (also for bf16: faster, float32 arithmetic, so greedy tokens may
            part from the model's own after some steps) or ``"sdpa"``.
        lean: for the transformers engine: ``True`` (default) decodes through
            :func:`sparseforge.generation.lean.lean_generate` with its default
            :class:`~sparseforge.generation.lean.LeanConfig`, or pass a ``LeanConfig``; ``False``: plain
            ``model.generate``. A loaded model passed in gets its projections fused in place (both engines).
        stream: a text stream (e.g. ``sys.stdout``) the new text is written to as it is produced.
        kv_policy: a sparse-attention policy (:mod:`sparseforge.attention`: ``Quest(budget=...)``,
            ``StreamingLLM(...)``, ``Mustafar(...)``, ...): the model decodes with
            ``attn_implementation="sparseforge"`` over a :class:`~sparseforge.attention.PagedKVCache`
            carrying it (the dynamic cache: not with a static-cache ``LeanConfig``).

    Raises:
        ConfigError: empty prompt, bad numbers, a prompt plus ``max_new_tokens`` longer than the model's context.
        ModelError: a bad model path, a model that is not a causal LM, or ``engine="native"`` for a model it
            does not run.
    """
    import torch

    from sparseforge import kernels
    from sparseforge.generation.lean import LeanConfig, lean_generate
    from sparseforge.nn.sparse_linear import SparseLinear
    from sparseforge.runtime.machine import set_threads

    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                  seed=seed, ignore_eos=ignore_eos)
    prompt = _check_prompt(prompt)
    from sparseforge.generation.engine import ATTENTION_KERNELS

    if attention not in ATTENTION_KERNELS:  # before the model loads; the engine checks the same list
        *first, last = (repr(a) for a in ATTENTION_KERNELS)
        raise ConfigError(f"attention must be {', '.join(first)} or {last}, got {attention!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads must be a positive integer, got {threads!r}")
    if lean is True:
        lean = LeanConfig()
    elif lean is not False and not isinstance(lean, LeanConfig):
        raise ConfigError(f"lean must be True, False or a LeanConfig, got {lean!r}")
    if kv_policy is not None:
        from sparseforge.attention import Policy

        if not isinstance(kv_policy, Policy):
            raise ConfigError(f"kv_policy must be a sparseforge.attention policy (Quest(budget=...), ...), got {kv_policy!r}")
        if lean is not False and lean.uses_static_cache:
            raise ConfigError("a KV policy runs on the paged dynamic cache, not the static one of the compiled lean "
                              "path; drop --compile (or pass LeanConfig(static_cache=False))")
    if isinstance(model, (str, Path)):
        if tokenizer is not None:
            raise ConfigError("tokenizer= is for a loaded model; a model directory brings its own tokenizer")
        model, tokenizer, _ = load_causal_lm(model)
    elif tokenizer is None:
        raise ConfigError("a loaded model needs its tokenizer: generate(model, prompt, tokenizer=tokenizer)")
    if not hasattr(model, "generate") or not callable(getattr(model, "can_generate", None)) or not model.can_generate():
        raise ModelError(f"{type(model).__name__} is not a causal language model: generation needs a *ForCausalLM model")
    engine, why_not_native = choose_engine(model, engine, kv_policy=kv_policy,
                                           compiled=lean is not False and lean.compile)
    if attention != "auto" and engine != "native":
        raise ConfigError(f"attention={attention!r} chooses the native engine's decode attention, but the "
                          f"{engine} engine runs here{f' ({why_not_native})' if why_not_native else ''}; leave it 'auto'")
    if sparse is None:
        sparse = any(isinstance(m, SparseLinear) for m in model.modules())
    threads = set_threads(threads)
    ids = tokenizer(prompt, return_tensors="pt").input_ids  # (1, T)
    if ids.shape[1] == 0:
        raise ConfigError("the prompt encodes to no tokens; give some text to continue")
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and ids.shape[1] + settings.max_new_tokens > context:
        raise ConfigError(
            f"the prompt ({ids.shape[1]} tokens) plus max_new_tokens ({settings.max_new_tokens}) exceeds the model's "
            f"context of {context} tokens; shorten the prompt or ask for fewer new tokens"
        )
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if isinstance(eos, int) else 0)
    streamer = timing_streamer(tokenizer, stream)
    kwargs = dict(settings.generate_kwargs(), attention_mask=torch.ones_like(ids), pad_token_id=pad, streamer=streamer)
    if kv_policy is not None and engine == "transformers":
        from sparseforge.attention import PagedKVCache, enable

        model.set_attn_implementation(enable())
        kwargs["cache"] = PagedKVCache(model.config, policy=kv_policy)
    if not settings.greedy and engine == "transformers":
        torch.manual_seed(settings.seed)
    with (kernels.sparse_threads(threads) if sparse else nullcontext()), torch.inference_mode():
        start = time.perf_counter()
        if engine == "native":
            from sparseforge.generation.loop import native_generate

            out = native_generate(model, ids, max_new_tokens=settings.max_new_tokens, sampling=settings.sampling(),
                                  min_new_tokens=settings.max_new_tokens if settings.ignore_eos else 0,
                                  eos_token_id=eos, streamer=streamer, attention=attention)
        elif lean is False:
            out = model.generate(ids, **kwargs)
        else:
            out = lean_generate(model, ids, lean, **kwargs)
        end = time.perf_counter()
    new_ids = out[0, ids.shape[1]:].tolist()
    arrivals = streamer.arrivals
    first = arrivals[0] if arrivals else end
    return GenerationResult(
        text=tokenizer.decode(new_ids, skip_special_tokens=True), token_ids=new_ids, prompt_tokens=int(ids.shape[1]),
        prefill_s=first - start, decode_s=(arrivals[-1] - first) if len(arrivals) > 1 else 0.0,
        lean=engine == "transformers" and lean is not False, threads=threads, engine=engine,
        notes=[f"transformers engine: {why_not_native}"] if why_not_native else [],
    )
