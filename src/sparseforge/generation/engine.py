"""The native decode engine: one batch-1 decode step of a Llama-family causal LM as a plan of pre-bound calls.

transformers runs a decode step through the model's Python code: per decoder layer a few dozen
torch ops (the eager RMSNorm alone is seven), a dynamic KV cache grown by ``torch.cat``, masks and
position tensors rebuilt every step. :class:`DecodeEngine` reads the model's modules once and runs
the same arithmetic with fewer, pre-bound calls:

* **weights as they are**: every projection is a layer of the model (``nn.Linear`` of any dtype,
  :class:`~sparseforge.nn.SparseLinear` of any registered format and value dtype, or the stacked
  layer of a :mod:`~sparseforge.generation.fuse` group). q/k/v and gate/up are fused first
  (:func:`fuse_projections_`, in place, ``fuse=True``): one call each per layer. A layer is called
  through a pre-bound entry point where that gives its own output bitwise on a probe input at
  construction: ``torch.nn.functional.linear`` with the weights of an ``nn.Linear`` without hooks,
  :class:`sparseforge.ops.BoundLinear` (in the layer's activation mode) for a ``SparseLinear`` without hooks (a module
  call costs several times the native kernel at these sizes; in a bfloat16 model through :class:`CastBound`, which
  casts x to float32 and the output back as the layer's own forward does), a layer's own ``bound_gemv()`` where it offers one
  (the activation-sparse :class:`~sparseforge.activation.SparseInputLinear` / ``ColumnSparseLinear``); any layer whose own ``forward``
  computes differently (another compute mode, a subclass) is called as a module, so what it
  computes is what runs. :attr:`DecodeEngine.call_paths` counts both. A bfloat16 ``nn.Linear`` in a
  bfloat16 model (``bf16_gemv=True``, the default) is bound to the native bf16 GEMV
  (:class:`sparseforge.ops.dense_bf16.BoundDenseBf16`: it streams the weight 1.35-1.54x faster than
  torch's bf16 ``F.linear`` at batch 1, ``benchmarks/bench_bf16_gemv.py``) when its probe output is the layer's own
  up to float32 summation order (:func:`within_bf16_sum_order`): both sum bf16 products in float32 and
  round once, in different orders, so an element may round the other way (one bf16 step; more where
  the sum cancels). Outputs, and after many steps greedy tokens, can then differ from the model's own
  forward; ``bf16_gemv=False`` keeps ``F.linear`` (bitwise the layer's output). The GEMV runs on
  sparseforge's thread pool, so :meth:`DecodeEngine.step` then runs its torch ops (norms, rotary,
  SDPA) with ``torch.set_num_threads(1)`` and restores the setting after: torch's OpenMP workers spin
  after each parallel op and took the pool's cores (721 M bf16 Llama, 2 threads, Sapphire Rapids-class
  Xeon, quiet host: 9.5 tokens/s with torch at 2 threads, 15.2 with 1);
* **native glue**: a float32 or bfloat16 model with native attention, fused projections and SiLU runs each
  layer as nine calls over fixed buffers (:meth:`DecodeEngine._glue_plan`): q/k/v, rotary + KV write
  (:func:`sparseforge.ops.decode_glue.bind_rope_kv`, the model's rotary arithmetic bitwise), attention (its
  float32 output rounded for a bf16 model), o, residual add + RMSNorm
  (:func:`~sparseforge.ops.decode_glue.bind_rms_norm`), gate/up, SwiGLU
  (:func:`~sparseforge.ops.decode_glue.bind_swiglu`), down, residual add + the next norm; bf16 buffers round
  where the model rounds. Each projection is a :meth:`BoundLinear.bind` / :meth:`BoundDenseBf16.bind` call (the
  kernel alone) where the layer is bound, else the layer's own call into the buffer. The torch ops in between
  cost ~5 ms per token of a 16-layer float32 model and ~8-11 ms in bfloat16 (Zen 3 host); the glue calls
  ~0.5 ms. The norm's sum of squares and SiLU's exp round differently from torch's in the last float32 bits
  (greedy tokens of the engine tests are those of ``generate``). Other models take the torch ops below;
* **fewer element-wise ops**: RMSNorm uses the norm module's weight and epsilon: for float32, five
  ops (a BLAS dot for the sum of squares, three scalar ops, two in-place products into a
  preallocated buffer; measured ~2x faster than ``torch.rms_norm`` at hidden 256); for bfloat16 the
  same on a float32 copy, rounded where the model rounds (normalized in float32, rounded, times the
  weight), as does the
  rotary embedding (each product rounded), so bf16 greedy tokens match too; rotary embedding of q and k together is three ops over ``(heads, 2, head_dim / 2)``
  views with cos/sin tables the model's own rotary module computed once for every position (so
  llama3 / linear / yarn scalings and ``attention_scaling`` hold); SwiGLU is ``silu_`` + one ``mul``;
* **a static KV cache**: ``(layers, 1, kv_heads, capacity, head_dim)`` keys and values preallocated
  in the model's dtype, written in place at the step's position; attention reads only the valid
  length, with the native decode-attention kernel (:func:`sparseforge.ops.decode_attention.attend`,
  ``attention="native"``) or torch's ``scaled_dot_product_attention`` over a narrowed view
  (``attention="sdpa"``); ``"auto"`` takes the native kernel for float32 models (within noise of
  SDPA at batch 1, ``benchmarks/bench_generate.py``) and SDPA for bfloat16 ones (it rounds as the
  model's own attention does: a 16-layer bf16 model's greedy tokens stay those of ``generate``,
  where the native kernel's float32 arithmetic parted from them after a few tokens).

The prompt goes through the model's own forward (prefill: batched matmuls, transformers' attention; a
bfloat16 model's linears widened to float32 where that measured faster here, :mod:`~sparseforge.generation.prefill`)
and its KV cache is copied into the engine's. Supported: ``llama``, ``qwen2`` (q/k/v biases),
``mistral`` (without a sliding window shorter than the generation); grouped-query attention; tied
or untied ``lm_head``; rope types whose frequencies do not depend on the sequence length (not
``dynamic`` / ``longrope``). Anything else raises :class:`~sparseforge.errors.ModelError` naming
what is unsupported (:func:`unsupported_reason` says it without raising), so callers choose another
engine explicitly.

Example:
    >>> import torch
    >>> from sparseforge.generation.engine import DecodeEngine
    >>> engine = DecodeEngine(model, capacity=64)                    # doctest: +SKIP
    >>> logits = engine.prefill(torch.tensor([[1, 2, 3]]))           # (vocab,) float32  doctest: +SKIP
    >>> logits = engine.step(int(logits.argmax()))                   # the next position  doctest: +SKIP
"""

from __future__ import annotations

from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparseforge import kernels
from sparseforge.errors import ConfigError, ModelError
from sparseforge.nn.sparse_linear import SparseLinear
from sparseforge.ops import BoundLinear
from sparseforge.ops.dense_bf16 import BoundDenseBf16
from sparseforge.ops.decode_attention import BoundDecodeAttention
from sparseforge.ops.decode_glue import bind_rms_norm, bind_rope_kv, bind_swiglu, bind_to_bf16
from sparseforge.generation.prefill import prompt_forward

__all__ = ["DecodeEngine", "CastBound", "SUPPORTED_FAMILIES", "ATTENTION_KERNELS", "unsupported_reason", "check_supported",
           "within_bf16_sum_order"]

#: ``config.model_type`` values the engine runs
SUPPORTED_FAMILIES = ("llama", "qwen2", "mistral")
#: rope types whose inverse frequencies change with the sequence length (the engine tabulates them once)
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")
ATTENTION_KERNELS = ("auto", "native", "sdpa")


def within_bf16_sum_order(got: Tensor, own: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    """Whether ``got`` and ``own`` (bfloat16 ``(B, out)``) can both be ``x @ weight^T + bias`` summed in float32 in
    some order and rounded once to bf16: same shape, NaN and infinity positions, and elsewhere
    ``|got - own| <= (in + 1) 2^-23 (|x| @ |weight|^T + |bias|) + spacing`` per element: the float32 bound on two
    summation orders plus the bf16 spacing at ``max(|got|, |own|)`` (two round-to-nearest steps)."""
    if got.shape != own.shape or got.dtype != own.dtype or got.dtype != torch.bfloat16:
        return False
    a, b = got.float(), own.float()
    if not (torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf())):
        return False
    xa, rows = x.float().abs(), []
    for w in weight.detach().split(4096):  # (<= 4096, in) float32 at a time
        rows.append(xa @ w.float().abs().T)  # (B, rows)
    mag = torch.cat(rows, dim=-1) + (0 if bias is None else bias.detach().float().abs())  # (B, out)
    slack = (x.shape[-1] + 1) * 2.0**-23 * mag
    _, exponent = torch.frexp(torch.maximum(a.abs(), b.abs()))  # |v| in [2^(e-1), 2^e): bf16 spacing 2^(e-8)
    spacing = torch.ldexp(torch.ones_like(a), exponent - 8)
    finite = a.isfinite()
    return bool(((a == b) | ((a - b).abs() <= slack + spacing) | ~finite).all())


class CastBound:
    """A :class:`~sparseforge.ops.BoundLinear` called on ``x`` of another float dtype: ``x`` cast to float32 for the
    kernel, the float32 output cast back, as :meth:`SparseLinear.forward` does for a non-float32 ``x`` at batch 1.

    Example:
        >>> import torch
        >>> from sparseforge.formats import BitmapWeight
        >>> from sparseforge.ops import BoundLinear
        >>> w = BitmapWeight.from_dense(torch.tensor([[1., 0.], [0., -2.]]).bfloat16())
        >>> CastBound(BoundLinear(w), torch.bfloat16)(torch.ones(1, 2, dtype=torch.bfloat16)).tolist()
        [[1.0, -2.0]]
    """

    def __init__(self, bound: BoundLinear, dtype: torch.dtype) -> None:
        self.bound, self.dtype = bound, dtype

    def __call__(self, x: Tensor) -> Tensor:
        return self.bound(x.to(torch.float32)).to(self.dtype)  # (1, out)


def _family_module(module: nn.Module, family: str) -> bool:
    return type(module).__module__.startswith(f"transformers.models.{family}.")


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _layer_reason(layer: nn.Module, family: str, index: int) -> Optional[str]:
    """Why decoder layer ``index`` cannot run in the engine (``None`` when it can)."""
    where = f"model.layers.{index}"
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    parts = {"": layer, ".self_attn": attn, ".mlp": mlp, ".input_layernorm": getattr(layer, "input_layernorm", None),
             ".post_attention_layernorm": getattr(layer, "post_attention_layernorm", None)}
    for name, module in parts.items():
        if module is None:
            return f"{where}{name} is missing"
        if not _family_module(module, family):
            return f"{where}{name} is a {type(module).__name__}, not the {family} module the engine reads"
        if _has_hooks(module):
            return f"{where}{name} has forward hooks the engine would not run"
    for name in (".input_layernorm", ".post_attention_layernorm"):
        norm = parts[name]
        if not type(norm).__name__.endswith("RMSNorm") or not hasattr(norm, "variance_epsilon"):
            return f"{where}{name} is a {type(norm).__name__}, not an RMSNorm"
    for owner, names in ((attn, ("q_proj", "k_proj", "v_proj", "o_proj")), (mlp, ("gate_proj", "up_proj", "down_proj"))):
        for n in names:
            if not isinstance(getattr(owner, n, None), nn.Module):
                return f"{where} has no {n} layer"
    if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
        return f"{where}.self_attn normalizes q/k (q_norm / k_norm)"
    return None


def unsupported_reason(model: nn.Module) -> Optional[str]:
    """Why :class:`DecodeEngine` cannot run ``model``, in a few words; ``None`` when it can.

    Example:
        >>> from tests.tiny_models import tiny_model                  # doctest: +SKIP
        >>> unsupported_reason(tiny_model("gpt2"))                     # doctest: +SKIP
        "model type 'gpt2' (the native engine runs llama, qwen2, mistral)"
    """
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        return f"model type {family!r} (the native engine runs {', '.join(SUPPORTED_FAMILIES)})"
    inner = getattr(model, "model", None)
    for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(inner, name):
            return f"a {family} model without model.{name}"
    if not isinstance(getattr(model, "lm_head", None), nn.Module):
        return "a model without lm_head"
    if any(p.device.type != "cpu" for p in model.parameters()):
        return "a model that is not on the CPU"
    rope_type = getattr(inner.rotary_emb, "rope_type", "default")
    if rope_type in _LENGTH_DEPENDENT_ROPE:
        return f"rope type {rope_type!r} (its frequencies depend on the sequence length)"
    for module in (model, inner, inner.embed_tokens, inner.norm):
        if _has_hooks(module):
            return f"forward hooks on {type(module).__name__} that the engine would not run"
    if not type(inner.norm).__name__.endswith("RMSNorm"):
        return f"a final norm {type(inner.norm).__name__}, not an RMSNorm"
    for i, layer in enumerate(inner.layers):
        reason = _layer_reason(layer, family, i)
        if reason is not None:
            return reason
    return None


def check_supported(model: nn.Module) -> None:
    """Raise :class:`ModelError` (one line) when :class:`DecodeEngine` cannot run ``model``."""
    reason = unsupported_reason(model)
    if reason is not None:
        raise ModelError(f"the native decode engine does not support {reason}; use engine='transformers'")


def sliding_window(config) -> Optional[int]:
    """The attention window the model applies (Mistral's ``sliding_window``, Qwen2's when ``use_sliding_window``)."""
    window = getattr(config, "sliding_window", None)
    if window is None or (config.model_type == "qwen2" and not getattr(config, "use_sliding_window", False)):
        return None
    return int(window)


def _projection(owner: nn.Module, names: tuple[str, ...]) -> tuple[Optional[nn.Module], tuple[nn.Module, ...]]:
    """``(fused layer, ())`` when ``names`` are the members of one fused group in order (and none has hooks, which
    calling the fused layer would skip), else ``(None, members)``."""
    members = tuple(getattr(owner, n) for n in names)
    group = getattr(members[0], "group", None)
    if group is not None and tuple(group.names) == names and all(getattr(m, "group", None) is group for m in members) \
            and not any(_has_hooks(m) for m in members):
        return group.layer, ()
    return None, members


@dataclass
class _LayerPlan:
    """One decoder layer's pre-bound modules and constants."""

    norm1_w: Tensor
    norm1_eps: float
    qkv: Optional[Callable[[Tensor], Tensor]]  # the fused q/k/v layer, or None (then q, k, v separately)
    q_k_v: tuple[Callable[[Tensor], Tensor], ...]
    o_proj: Callable[[Tensor], Tensor]
    norm2_w: Tensor
    norm2_eps: float
    gate_up: Optional[Callable[[Tensor], Tensor]]
    gate_and_up: tuple[Callable[[Tensor], Tensor], ...]
    down: Callable[[Tensor], Tensor]
    act: Optional[Callable[[Tensor], Tensor]]  # None: SiLU, applied in place
    keys: Tensor  # (1, kv_heads, capacity, head_dim)
    values: Tensor
    attend: Optional[BoundDecodeAttention] = None  # the native kernel over this layer's cache (attention="native")


@dataclass
class _GluedLayer:
    """One decoder layer of the native-glue step (float32 or bfloat16) as zero-argument calls over the engine's fixed buffers (module
    doc): norm1 is the previous layer's ``norm_next`` (or the engine's first norm)."""

    qkv: Callable[[], object]  # normed -> qkv
    rope: Callable[[int], None]  # qkv -> rotated q, k and v into the cache at a position
    attend: Callable[[int], object]  # attend(n): q over the cache -> the o projection's input
    o_proj: Callable[[], object]  # attention out -> o
    norm2: Callable[[], None]  # h += o; normed = norm2(h)
    gate_up: Callable[[], object]  # normed -> gate_up
    swiglu: Callable[[], None]  # gate_up -> act
    down: Callable[[], object]  # act -> d
    norm_next: Callable[[], None]  # h += d; normed = the next layer's norm1 (the final norm after the last layer)


class DecodeEngine:
    """Batch-1 prefill + decode steps of a Llama-family causal LM over a static KV cache (module doc).

    Args:
        model: a supported transformers causal LM (:func:`unsupported_reason`), in eval mode.
        capacity: tokens the KV cache holds (prompt + new tokens).
        attention: ``"auto"`` (the native kernel for float32 models, SDPA otherwise), ``"native"`` or ``"sdpa"``.
        fuse: stack q/k/v and gate/up into one layer each first (in place on ``model``:
            :func:`sparseforge.generation.fuse.fuse_projections_`; undo with ``unfuse_projections_``).
        bf16_gemv: call bfloat16 ``nn.Linear`` layers through the native bf16 GEMV where its probe output is the
            layer's up to float32 summation order (module doc); ``False``: torch's ``F.linear``, bitwise the layer's.

    Raises:
        ModelError: an unsupported model; a capacity beyond the model's context or sliding window.
        ConfigError: a bad ``capacity`` or ``attention``.
    """

    def __init__(self, model: nn.Module, capacity: int, *, attention: str = "auto", fuse: bool = True,
                 bf16_gemv: bool = True) -> None:
        check_supported(model)
        if not isinstance(bf16_gemv, bool):
            raise ConfigError(f"bf16_gemv must be True or False, got {bf16_gemv!r}")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ConfigError(f"capacity must be a positive integer, got {capacity!r}")
        if attention not in ATTENTION_KERNELS:
            raise ConfigError(f"attention must be one of {ATTENTION_KERNELS}, got {attention!r}")
        config = model.config
        context = getattr(config, "max_position_embeddings", None)
        if context is not None and capacity > context:
            raise ModelError(f"{capacity} tokens exceed the model's context of {context}; ask for fewer new tokens")
        window = sliding_window(config)
        if window is not None and capacity > window:
            raise ModelError(f"{capacity} tokens exceed the model's sliding attention window of {window}, which the "
                             "native engine does not apply; ask for fewer tokens or use engine='transformers'")
        if fuse:
            from sparseforge.generation.fuse import fuse_projections_

            fuse_projections_(model, dense=True)
        self.model = model
        self.capacity = capacity
        inner = model.model
        self.dtype = inner.embed_tokens.weight.dtype
        self.bf16_gemv = bf16_gemv and self.dtype == torch.bfloat16
        if attention == "auto":
            attention = "native" if self.dtype == torch.float32 else "sdpa"
        self.attention = attention
        attn0 = inner.layers[0].self_attn
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = attn0.head_dim
        self.scale = float(attn0.scaling)
        self.hidden = inner.embed_tokens.weight.shape[1]
        self._embed = inner.embed_tokens.weight.detach()  # (vocab, hidden)
        self._norm_w, self._norm_eps = inner.norm.weight.detach(), float(inner.norm.variance_epsilon)
        silu = getattr(config, "hidden_act", None) in ("silu", "swish")
        self._cos, self._sin = self._rope_tables(inner.rotary_emb, capacity)
        self._length = 0
        qk = self.heads + self.kv_heads
        self._token = torch.zeros(1, dtype=torch.long)
        self._position = torch.zeros(1, dtype=torch.long)
        self._h = torch.empty(1, self.hidden, dtype=self.dtype)  # the residual stream
        self._qk = torch.empty(qk, 2, self.head_dim // 2, dtype=self.dtype)  # rotated q and k, halves apart
        self._spans = torch.zeros(1, self.kv_heads, 1, 2, dtype=torch.int32)  # one span [0, n) per KV head
        self._span_ends = self._spans[..., 1]
        self._normed = torch.empty(1, self.hidden, dtype=self.dtype)  # an RMSNorm output (float32 models)
        self.call_paths: Counter = Counter()  # "bound" / "module": how the projections are called
        self._bf16_gemv_bound = False  # some projection runs the native bf16 GEMV (step: torch ops on one thread)
        # the native kernel reads q in float32: the rotated q itself, or a float32 copy of it for a bf16 model
        self._q32 = self._qk[:self.heads].view(1, self.heads, self.head_dim) if self.dtype == torch.float32 \
            else torch.empty(1, self.heads, self.head_dim, dtype=torch.float32)
        self._layers = [self._plan(layer, None if silu else layer.mlp.act_fn) for layer in inner.layers]
        self._lm_head = self._caller(model.lm_head)
        # a torch lm_head (not a native one: SparseLinear, the bound bf16 GEMV) runs on the kernels' thread
        # count: inside kernels.sparse_threads torch has one thread, and the vocab-sized GEMV is the step's
        # largest dense product (4096x2048 fp32, 2 threads, quiet: 2.30 -> 1.40 ms; on a loaded machine
        # torch's statically split threads measured slower)
        self._lm_head_on_torch = not isinstance(model.lm_head, SparseLinear) and not isinstance(self._lm_head, BoundDenseBf16)
        # some projection runs on sparseforge's thread pool (native bf16 GEMV or sparse kernels): step() then holds it
        self._pool_projections = self._bf16_gemv_bound or any(isinstance(m, SparseLinear) for m in model.modules())
        self._glued = self._glue_plan()  # the step as native calls, or None: torch ops between the projections (module doc)

    def _caller(self, layer: nn.Module) -> Callable[[Tensor], Tensor]:
        """How to call projection ``layer`` on ``(1, in)``: the first pre-bound entry point whose output on a probe
        input is the layer's own (bitwise; for the native bf16 GEMV, :func:`within_bf16_sum_order`), else the module
        itself (module doc)."""
        candidates: list[tuple[Callable[[Tensor], Tensor], bool]] = []  # (entry point, bitwise rule)
        if not _has_hooks(layer) and type(layer) is nn.Linear:
            w = layer.weight
            if self.bf16_gemv and w.dtype == torch.bfloat16 and w.is_contiguous() and w.device.type == "cpu":
                candidates.append((BoundDenseBf16(w, layer.bias), False))
            candidates.append((partial(F.linear, weight=layer.weight, bias=layer.bias), True))
        elif not _has_hooks(layer) and type(layer) is SparseLinear:
            bias = None if layer.bias is None else layer.bias.detach().to(torch.float32)
            bound = BoundLinear(layer.weight_format, bias, activations=layer.activations)
            # a bf16 model's layer casts x to float32 for the kernel and its output back: the same casts around the bound call
            candidates.append((bound if self.dtype == torch.float32 else CastBound(bound, self.dtype), True))
        elif not _has_hooks(layer) and self.dtype == torch.float32 and callable(getattr(layer, "bound_gemv", None)):
            gemv = layer.bound_gemv()  # activation-sparse layers: their batch-1 kernel, bound once (or None)
            if gemv is not None:
                candidates.append((gemv, True))
        if candidates:
            probe = torch.randn(1, layer.in_features, generator=torch.Generator().manual_seed(0)).to(self.dtype)
            with torch.inference_mode():
                own = layer(probe)
                for bound, bitwise in candidates:
                    got = bound(probe)
                    if torch.equal(got, own) if bitwise else within_bf16_sum_order(got, own, probe, layer.weight, layer.bias):
                        self.call_paths["bound"] += 1
                        self._bf16_gemv_bound |= isinstance(bound, BoundDenseBf16)
                        return bound
        self.call_paths["module"] += 1
        return layer

    def _plan(self, layer: nn.Module, act: Optional[Callable]) -> _LayerPlan:
        attn, mlp = layer.self_attn, layer.mlp
        qkv, q_k_v = _projection(attn, ("q_proj", "k_proj", "v_proj"))
        gate_up, gate_and_up = _projection(mlp, ("gate_proj", "up_proj"))
        call = self._caller
        shape = (1, self.kv_heads, self.capacity, self.head_dim)
        keys, values = torch.zeros(shape, dtype=self.dtype), torch.zeros(shape, dtype=self.dtype)
        bound = BoundDecodeAttention(self._q32, keys, values, self._spans, self.scale) if self.attention == "native" else None
        return _LayerPlan(
            norm1_w=layer.input_layernorm.weight.detach(), norm1_eps=float(layer.input_layernorm.variance_epsilon),
            qkv=None if qkv is None else call(qkv), q_k_v=tuple(call(m) for m in q_k_v), o_proj=call(attn.o_proj),
            norm2_w=layer.post_attention_layernorm.weight.detach(),
            norm2_eps=float(layer.post_attention_layernorm.variance_epsilon),
            gate_up=None if gate_up is None else call(gate_up), gate_and_up=tuple(call(m) for m in gate_and_up), down=call(mlp.down_proj), act=act,
            keys=keys, values=values, attend=bound,
        )  # fmt: skip

    def _glue_plan(self) -> Optional[tuple[Callable[[], None], list[_GluedLayer]]]:
        """The step's native calls over fixed buffers: (first norm, layers), or None where the step keeps its torch ops
        (a dtype other than float32 / bfloat16, SDPA attention, unfused projections, an activation other than SiLU)."""
        plans = self._layers
        if self.dtype not in (torch.float32, torch.bfloat16) or self.attention != "native" or any(
                p.qkv is None or p.gate_up is None or p.act is not None for p in plans):
            return None
        hd, qkv_rows, dt = self.head_dim, self.heads + 2 * self.kv_heads, self.dtype
        ffn = self.model.model.layers[0].mlp.down_proj.in_features
        h, normed = self._h, self._normed
        qkv, o, d = (torch.empty(1, n, dtype=dt) for n in (qkv_rows * hd, self.hidden, self.hidden))
        gu, act = torch.empty(1, 2 * ffn, dtype=dt), torch.empty(1, ffn, dtype=dt)
        attn16 = torch.empty(1, self.heads * hd, dtype=dt) if dt != torch.float32 else None  # the o projection's input
        cos, sin = self._cos.view(self.capacity, hd), self._sin.view(self.capacity, hd)
        self._glue_buffers = (qkv, o, d, gu, act, attn16)  # the views below share their memory

        def into(layer: Callable[[Tensor], Tensor], x: Tensor, out: Tensor) -> Callable[[], object]:
            if isinstance(layer, (BoundLinear, BoundDenseBf16)):
                return layer.bind(x, out)
            return lambda: out.copy_(layer(x))

        def attend_into(bound: BoundDecodeAttention) -> Callable[[int], object]:
            if attn16 is None:
                return bound  # its float32 out is the o projection's input
            rounded = bind_to_bf16(bound.out.view(1, self.heads * hd), attn16)
            return lambda n: (bound(n), rounded())

        norms = [(p.norm1_w, p.norm1_eps) for p in plans[1:]] + [(self._norm_w, self._norm_eps)]
        glued = []
        for p, (next_w, next_eps) in zip(plans, norms):
            attn_in = p.attend.out.view(1, self.heads * hd) if attn16 is None else attn16  # (1, heads head_dim)
            glued.append(_GluedLayer(
                qkv=into(p.qkv, normed, qkv), rope=bind_rope_kv(qkv, cos, sin, self.heads, self._q32, p.keys, p.values),
                attend=attend_into(p.attend), o_proj=into(p.o_proj, attn_in, o),
                norm2=bind_rms_norm(h, p.norm2_w, p.norm2_eps, normed, residual=o),
                gate_up=into(p.gate_up, normed, gu), swiglu=bind_swiglu(gu, act), down=into(p.down, act, d),
                norm_next=bind_rms_norm(h, next_w, next_eps, normed, residual=d),
            ))  # fmt: skip
        first = bind_rms_norm(h, plans[0].norm1_w, plans[0].norm1_eps, normed)
        return first, glued

    def _rope_tables(self, rotary: nn.Module, capacity: int) -> tuple[Tensor, Tensor]:
        """cos ``(capacity, 2, head_dim / 2)`` and signed sin ``[-sin, +sin]`` of the same shape, in the model's dtype,
        from the model's rotary module (its ``inv_freq`` and ``attention_scaling``) for positions ``[0, capacity)``."""
        with torch.inference_mode(False), torch.no_grad():
            probe = torch.zeros(1, dtype=self.dtype)
            cos, sin = rotary(probe, torch.arange(capacity).unsqueeze(0))  # (1, capacity, head_dim) each
        half = self.head_dim // 2
        cos = cos[0].reshape(capacity, 2, half).to(self.dtype)
        sin = sin[0].reshape(capacity, 2, half).to(self.dtype)
        signed = torch.stack((-sin[:, 0], sin[:, 1]), dim=1)  # rotate_half(x) * sin == roll(x halves) * [-sin, sin]
        return cos.contiguous(), signed.contiguous()

    def _rms_norm(self, h: Tensor, weight: Tensor, eps: float) -> Tensor:
        """``weight * h / sqrt(mean(h^2) + eps)`` for ``h (1, hidden)``, the sum of squares as one BLAS dot; float32
        into a reused buffer (valid until the next call); other dtypes normalized in float32, rounded, then times the
        weight (``torch.rms_norm`` took ~0.1 ms per bf16 call on a Zen 3 host, ~4.5 ms per token of a 16-layer model)."""
        if self.dtype != torch.float32:  # as the model rounds it: normalized in float32, rounded, then times the weight
            f = h.float()  # (1, hidden)
            flat = f.view(-1)
            inv_rms = torch.dot(flat, flat).mul_(1.0 / self.hidden).add_(eps).rsqrt_()  # 0-d
            return f.mul_(inv_rms).to(self.dtype).mul_(weight)
        flat = h.view(-1)
        inv_rms = torch.dot(flat, flat).mul_(1.0 / self.hidden).add_(eps).rsqrt_()  # 0-d
        return torch.mul(h, weight, out=self._normed).mul_(inv_rms)

    @property
    def length(self) -> int:
        """Tokens in the KV cache (the position the next :meth:`step` writes)."""
        return self._length

    # ---- prefill --------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, input_ids: Tensor) -> Tensor:
        """Run the prompt ``(1, T)`` through the model's own forward, copy its KV into the engine's cache;
        returns the float32 logits ``(vocab,)`` of the last prompt token. Resets the cache first."""
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ConfigError(f"the native engine decodes one sequence: input_ids must be (1, T), got {tuple(input_ids.shape)}")
        length = input_ids.shape[1]
        if not 1 <= length < self.capacity:
            raise ConfigError(f"a prompt of {length} tokens does not fit an engine of capacity {self.capacity} "
                              "(it needs room for at least one new token)")
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        out = prompt_forward(self.model, input_ids, use_cache=True, cache=cache, logits_to_keep=1)
        for i, plan in enumerate(self._layers):
            layer = cache.layers[i]
            plan.keys[:, :, :length].copy_(layer.keys)  # (1, kv_heads, T, head_dim)
            plan.values[:, :, :length].copy_(layer.values)
        self._length = length
        return out.logits[0, -1].to(torch.float32)

    # ---- decode ---------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, token: int) -> Tensor:
        """Append ``token`` at position :attr:`length`; returns the float32 logits ``(vocab,)`` of the next token."""
        if self._length >= self.capacity:
            raise ConfigError(f"the KV cache is full ({self.capacity} tokens); build the engine with a larger capacity")
        threads = torch.get_num_threads()
        narrow = self._bf16_gemv_bound and threads > 1
        if narrow:
            torch.set_num_threads(1)  # the step's torch ops on this thread: torch's spinning workers would take the GEMV's cores
        try:
            # with torch on one thread, the pool's workers poll through the layers' torch ops, so each projection
            # starts on every kernel thread: a worker asleep after its ~0.2 ms of polling woke late and left the
            # start of the next projection to this thread alone (721M bf16 Llama, Zen 3, 2 threads: the
            # projections streamed ~15 GB/s inside the step against ~24 GB/s called back to back)
            held = self._pool_projections and torch.get_num_threads() == 1 and kernels.num_threads() > 1
            with kernels.pool_held() if held else nullcontext():
                x = self._hidden(token) if self._glued is None else self._hidden_glued(token)
            return self._logits(x)
        finally:
            if narrow:
                torch.set_num_threads(threads)

    def _hidden(self, token: int) -> Tensor:
        """The decode step up to the final norm: ``(1, hidden)`` for the lm_head."""
        pos = self._length
        n = pos + 1
        heads, kv_heads, hd = self.heads, self.kv_heads, self.head_dim
        qk_rows = heads + kv_heads
        self._token.fill_(token)
        self._position.fill_(pos)
        self._span_ends.fill_(n)
        cos, sin = self._cos[pos], self._sin[pos]  # (2, head_dim / 2)
        h = self._h
        torch.index_select(self._embed, 0, self._token, out=h)  # (1, hidden)
        qk = self._qk
        native = self.attention == "native"
        for p in self._layers:
            x = self._rms_norm(h, p.norm1_w, p.norm1_eps)
            if p.qkv is not None:
                qkv = p.qkv(x)  # (1, (heads + 2 kv_heads) head_dim)
            else:
                qkv = torch.cat([m(x) for m in p.q_k_v], dim=-1)
            raw = qkv[0, :qk_rows * hd].view(qk_rows, 2, hd // 2)  # q and k heads, each as its two halves
            v = qkv[0, qk_rows * hd:].view(1, kv_heads, 1, hd)
            torch.mul(raw, cos, out=qk)
            if self.dtype == torch.float32:
                qk.addcmul_(raw.roll(1, 1), sin)  # q * cos + rotate_half(q) * sin, for q and k at once
            else:
                qk.add_(raw.roll(1, 1).mul_(sin))  # each product rounded to the model's dtype, as the model does
            p.keys.index_copy_(2, self._position, qk[heads:].view(1, kv_heads, 1, hd))
            p.values.index_copy_(2, self._position, v)
            if native:
                if self._q32.data_ptr() != qk.data_ptr():
                    self._q32.copy_(qk[:heads].view(1, heads, hd))
                o = p.attend(n).view(1, heads * hd)
                if o.dtype != self.dtype:
                    o = o.to(self.dtype)
            else:
                q = qk[:heads].view(1, heads, 1, hd)
                o = F.scaled_dot_product_attention(q, p.keys.narrow(2, 0, n), p.values.narrow(2, 0, n), scale=self.scale,
                                                   enable_gqa=heads != kv_heads).reshape(1, heads * hd)
            h.add_(p.o_proj(o))
            x = self._rms_norm(h, p.norm2_w, p.norm2_eps)
            if p.gate_up is not None:
                gu = p.gate_up(x)  # (1, 2 ffn)
                gate, up = gu.chunk(2, dim=-1)
            else:
                gate, up = (m(x) for m in p.gate_and_up)
            if p.act is None:
                gate = F.silu(gate, inplace=True)
            else:
                gate = p.act(gate)
            h.add_(p.down(gate.mul_(up)))  # SwiGLU: act(gate) * up, in the fused output's buffer
        self._length = n
        return self._rms_norm(h, self._norm_w, self._norm_eps)

    def _hidden_glued(self, token: int) -> Tensor:
        """:meth:`_hidden` as native calls over fixed buffers (:meth:`_glue_plan`)."""
        pos = self._length
        n = pos + 1
        self._span_ends.fill_(n)
        torch.index_select(self._embed, 0, self._token.fill_(token), out=self._h)  # (1, hidden)
        first, layers = self._glued
        first()
        for g in layers:
            g.qkv()
            g.rope(pos)
            g.attend(n)
            g.o_proj()
            g.norm2()
            g.gate_up()
            g.swiglu()
            g.down()
            g.norm_next()
        self._length = n
        return self._normed

    def _logits(self, x: Tensor) -> Tensor:
        """The lm_head on ``x (1, hidden)`` as float32 ``(vocab,)``: a torch lm_head with torch's thread count raised to
        the kernels' for the call (:func:`sparseforge.kernels.sparse_threads` leaves torch one thread)."""
        torch_threads, kernel_threads = torch.get_num_threads(), kernels.num_threads()
        wide = self._lm_head_on_torch and kernel_threads > torch_threads
        if wide:
            torch.set_num_threads(kernel_threads)
        try:
            return self._lm_head(x)[0].to(torch.float32)
        finally:
            if wide:
                torch.set_num_threads(torch_threads)
