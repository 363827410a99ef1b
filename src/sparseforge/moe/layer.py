"""The mixture-of-experts layer: a router plus ``E`` stacked expert FFNs, optional shared expert.

``MoE(x)`` returns ``(output, aux)``; ``aux`` (:class:`~sparseforge.moe.losses.MoEAux`) carries the
auxiliary losses (Switch load balancing, ST-MoE z-loss) and routing statistics of *this* call:
nothing is stored on the module or in global state, so the caller adds ``aux.loss`` to its
training loss.

* Capacity: ``capacity_factor=None`` is dropless; a number ``c > 0`` allows
  ``ceil(c * T * k / E)`` assignments per expert and drops the rest (first choices first, then
  token order); dropped assignments contribute nothing (the residual connection outside the layer
  carries the token). Expert-choice routing always needs a capacity factor.
* ``input_jitter``: multiplicative noise ``U(1 - eps, 1 + eps)`` on the router input in training
  (Switch Transformer), drawn from the layer's generator.

Randomness: ``seed=None`` draws noise from torch's default generator (like dropout); an integer
seed gives the layer its own ``torch.Generator``; ``forward(x, generator=g)`` overrides both.
Eval mode draws no noise.

Example:
    >>> import torch
    >>> from sparseforge.moe import MoE
    >>> moe = MoE(d_model=16, d_hidden=32, num_experts=4, k=2)
    >>> y, aux = moe(torch.randn(2, 5, 16))
    >>> y.shape, aux.tokens_per_expert.sum().item()
    (torch.Size([2, 5, 16]), 20)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sparseforge.errors import ConfigError
from sparseforge.kernels import native
from sparseforge.kernels import num_threads as kernel_threads
from sparseforge.moe.bf16x3 import Bf16x3Matmul
from sparseforge.moe.config import DECODE_BACKENDS, MoEConfig
from sparseforge.moe.dispatch import apply_capacity, build_plan
from sparseforge.moe.grouped import ACTIVATIONS, FEW_SLOTS, few_tokens_ffn, grouped_ffn
from sparseforge.moe.losses import MoEAux
from sparseforge.moe.routers import Router, SoftmaxTopK, capacity_for, make_router
from sparseforge.ops.expert_ffn import expert_ffn as native_expert_ffn
from sparseforge.ops.expert_ffn import few_token_linear, native_applicable

__all__ = ["MoE", "MoEConfig", "DECODE_BACKENDS", "NATIVE_MAX_TOKENS", "DECODE_PATHS"]

# Forward-only calls with at most this many tokens go to the decode path (native kernel: each
# chosen expert's weights are read once for all of them).
NATIVE_MAX_TOKENS = 4

# What a decode call runs: the native kernel on the calling thread or on the kernels' thread
# pool, or the per-slot torch.mm chain (``"grouped"``: not a decode call, the sorted grouped path).
DECODE_PATHS = ("native", "native-parallel", "torch", "grouped")

# Expert weights (floats) a decode step must stream before the native kernel spreads its work over
# the thread pool (the kernel's own threshold, csrc/expert_gemv.cpp kParallelMinFloats): below it
# "native-parallel" runs on one thread and is not worth timing.
PARALLEL_MIN_WEIGHTS = 1 << 16


class _DenseFFN(nn.Module):
    """The shared expert: one always-on FFN with the experts' layout (d, h) / (h, d)."""

    def __init__(self, d_model: int, d_hidden: int, glu: bool, activation: str, **factory) -> None:
        super().__init__()
        self.activation = activation
        self.w_gate = nn.Parameter(torch.empty(d_model, d_hidden, **factory)) if glu else None
        self.w_up = nn.Parameter(torch.empty(d_model, d_hidden, **factory))
        self.w_down = nn.Parameter(torch.empty(d_hidden, d_model, **factory))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = ACTIVATIONS[self.activation][0]
        hid = act(x @ self.w_up) if self.w_gate is None else act(x @ self.w_gate) * (x @ self.w_up)  # (T, h)
        return hid @ self.w_down  # (T, d)


class MoE(nn.Module):
    """Sparse mixture of ``num_experts`` FFN experts, ``k`` per token.

    ``MoE(MoEConfig(...))`` or ``MoE(d_model, d_hidden, num_experts, k, **options)`` (the options are
    the fields of :class:`~sparseforge.moe.config.MoEConfig`); ``device`` / ``dtype`` place the weights.

    Args:
        d_model: model width ``d``.
        d_hidden: expert hidden width ``h``.
        num_experts: ``E``.
        k: experts per token (for expert-choice: average experts per token).
        router: a name from :data:`~sparseforge.moe.routers.ROUTERS` or a :class:`Router`.
        router_options: keyword options of the named router (e.g. ``{"renormalize": False}``).
        expert: ``"glu"`` (gated, SwiGLU with ``silu``) or ``"mlp"`` (``act(x W1) W2``).
        activation: ``"silu"``, ``"gelu"``, ``"gelu_tanh"`` or ``"relu"``.
        shared_hidden: hidden width of an always-on shared expert (``None``: no shared expert).
        shared_gate: scale the shared expert by ``sigmoid(x w)`` (Qwen2-MoE).
        capacity_factor: ``None`` = dropless, else ``> 0`` (see module docstring).
        input_jitter: router input noise in training (0 = off).
        lb_coef, z_coef: weights of the two auxiliary losses in ``aux.loss``.
        seed: ``None`` = torch's default generator, else the seed of the layer's own generator.
        backend: expert matmuls: ``"auto"`` (= ``"loop"``, public torch API), ``"loop"`` or the opt-in
            ``"onednn"`` (a private torch op; see :mod:`sparseforge.moe.grouped`).
        decode_backend: forward-only calls with at most :data:`NATIVE_MAX_TOKENS` tokens (decode):
            ``"native"`` runs the native expert FFN kernel (:mod:`sparseforge.ops.expert_ffn`; float32
            CPU only, anything else is a :class:`ConfigError` at call time), ``"torch"`` the
            per-slot ``torch.mm`` chain (:func:`~sparseforge.moe.grouped.few_tokens_ffn`, at most
            ``FEW_SLOTS`` slots, else the grouped path), ``"auto"`` measures both on the first decode
            call of each shape (float32 CPU inputs and weights; torch otherwise) and keeps the faster
            (:func:`sparseforge.measure.choose.choose_by_timing`, cached per CPU on disk; the choice
            is in :attr:`decode_choice`).
        decode_parallel: where the native decode kernel runs: ``None`` (default) times it on the
            calling thread and on the kernels' thread pool (:func:`sparseforge.kernels.num_threads`)
            together with the other candidates and keeps the fastest (whether one core saturates
            memory bandwidth depends on the CPU); ``True`` / ``False`` fix it (pool / calling thread).
        matmul_precision: the expert matmuls of the grouped path (training, prefill): ``"fp32"``
            (default, float32 GEMM) or the opt-in ``"bf16x3"``: three bf16 products on AMX with float32
            accumulation (:mod:`sparseforge.moe.bf16x3`), relative error ~5e-6 instead of ~6e-7, the
            expert weights kept split and packed (twice their bytes); float32 CPU layers on a CPU with
            AMX-BF16 only (:class:`ConfigError` otherwise, at construction). Decode and the shared
            expert stay float32.
    """

    def __init__(self, *args, config: MoEConfig | None = None, device=None, dtype=None, **options) -> None:
        super().__init__()
        if config is None and args and isinstance(args[0], MoEConfig):
            config, args = args[0], args[1:]
        if config is not None and (args or options):
            raise ConfigError("pass either a MoEConfig or MoE's arguments (d_model, d_hidden, num_experts, ...), not both")
        cfg = config if config is not None else MoEConfig(*args, **options)
        self.config = cfg
        self.d_model, self.d_hidden, self.num_experts = cfg.d_model, cfg.d_hidden, cfg.num_experts
        if isinstance(cfg.router, Router):
            self.router = cfg.router
        else:
            self.router = make_router(cfg.router, cfg.num_experts, cfg.k, **(cfg.router_options or {}))
        if not self.router.token_choice and cfg.capacity_factor is None:
            raise ConfigError(
                "expert-choice routing needs a capacity: set capacity_factor (e.g. 1.0) on the MoE layer"
            )
        self.k = self.router.k
        self.expert = cfg.expert
        self.activation = cfg.activation
        self.capacity_factor = cfg.capacity_factor
        self.input_jitter = float(cfg.input_jitter)
        self.lb_coef, self.z_coef = float(cfg.lb_coef), float(cfg.z_coef)
        self.backend = cfg.backend
        self.decode_backend = cfg.decode_backend
        self.decode_parallel = cfg.decode_parallel
        self.matmul_precision = cfg.matmul_precision
        self._bf16x3 = Bf16x3Matmul() if cfg.matmul_precision == "bf16x3" else None
        self._decode_choices: dict = {}  # measured decode path per call shape
        self._decode_steps: dict = {}  # (tokens, decode_backend, decode_parallel, threads) -> native path of the fused step
        self._native_views: tuple | None = None  # (data pointers, numpy views) of the weights for the fused step
        self.decode_park_workers = True  # the native decode kernel's pool sleeps right after it (see ops.expert_ffn)
        self.seed = cfg.seed
        self._generator: torch.Generator | None = None
        self._build_weights(device, dtype)
        self.reset_parameters()

    def _build_weights(self, device, dtype) -> None:
        """Allocate the router, the stacked expert weights and the optional shared expert (uninitialised)."""
        cfg = self.config
        factory = {"device": device, "dtype": dtype}
        E, d, h = cfg.num_experts, cfg.d_model, cfg.d_hidden
        self.gate = nn.Linear(d, E, bias=False, **factory)  # router, weight (E, d)
        self.w_gate = nn.Parameter(torch.empty(E, d, h, **factory)) if cfg.expert == "glu" else None
        self.w_up = nn.Parameter(torch.empty(E, d, h, **factory))
        self.w_down = nn.Parameter(torch.empty(E, h, d, **factory))
        self.shared = None
        self.shared_gate = None
        if cfg.shared_hidden is not None:
            self.shared = _DenseFFN(d, cfg.shared_hidden, cfg.expert == "glu", cfg.activation, **factory)
            if cfg.shared_gate:
                self.shared_gate = nn.Linear(d, 1, bias=False, **factory)

    def reset_parameters(self) -> None:
        """Uniform init like ``nn.Linear``: bound ``1/sqrt(fan_in)``."""
        self.gate.reset_parameters()
        experts = [self.w_gate, self.w_up, self.w_down]
        if self.shared is not None:
            experts += [self.shared.w_gate, self.shared.w_up, self.shared.w_down]
        with torch.no_grad():
            for w in experts:
                if w is not None:
                    bound = 1.0 / math.sqrt(w.shape[-2])  # fan_in = rows of an input-major weight
                    w.uniform_(-bound, bound)
        if self.shared_gate is not None:
            self.shared_gate.reset_parameters()

    @classmethod
    def from_weights(
        cls,
        router_weight: torch.Tensor,
        w_up: torch.Tensor,
        w_down: torch.Tensor,
        w_gate: torch.Tensor | None = None,
        **kwargs,
    ) -> "MoE":
        """A layer holding copies of the given weights: ``router_weight`` (E, d), ``w_up`` and
        ``w_gate`` (E, d, h), ``w_down`` (E, h, d); ``w_gate=None`` makes a plain-MLP layer.
        Shapes that do not fit together raise :class:`ConfigError`."""
        if router_weight.dim() != 2 or w_up.dim() != 3 or w_down.dim() != 3:
            raise ConfigError(
                "expert weights must be router (E, d), w_up (E, d, h), w_down (E, h, d); got "
                f"{tuple(router_weight.shape)}, {tuple(w_up.shape)}, {tuple(w_down.shape)}"
            )
        E, d = router_weight.shape
        h = w_up.shape[2]
        expected = {"w_up": (E, d, h), "w_down": (E, h, d)}
        if w_gate is not None:
            expected["w_gate"] = (E, d, h)
        given = {"w_up": w_up, "w_down": w_down, "w_gate": w_gate}
        for name, shape in expected.items():
            if tuple(given[name].shape) != shape:
                raise ConfigError(
                    f"mismatched expert shapes: {name} is {tuple(given[name].shape)} but router (E, d) = "
                    f"({E}, {d}) and w_up (E, d, h) = {tuple(w_up.shape)} need {shape}"
                )
        if "expert" in kwargs and kwargs["expert"] != ("mlp" if w_gate is None else "glu"):
            raise ConfigError("expert= contradicts the weights given (w_gate is what makes a GLU expert)")
        kwargs["expert"] = "mlp" if w_gate is None else "glu"
        kwargs.setdefault("dtype", w_up.dtype)
        kwargs.setdefault("device", w_up.device)
        layer = cls(d, h, E, **kwargs)
        with torch.no_grad():
            layer.gate.weight.copy_(router_weight)
            layer.w_up.copy_(w_up)
            layer.w_down.copy_(w_down)
            if w_gate is not None:
                layer.w_gate.copy_(w_gate)
        return layer

    def _rng(self, generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
        if generator is not None or self.seed is None:
            return generator
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    def forward(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> tuple[torch.Tensor, MoEAux]:
        """``x`` (..., d) -> ``(y (..., d), aux)``."""
        if self._decode_steps and not torch.is_grad_enabled() and x.shape[-1] == self.d_model:
            fused = self._fused_decode(x)
            if fused is not None:
                return fused
        if x.shape[-1] != self.d_model:
            raise ConfigError(f"MoE expects inputs (..., {self.d_model}), got {tuple(x.shape)}")
        shape = x.shape
        x = x.reshape(-1, self.d_model)  # (T, d)
        num_tokens = x.shape[0]
        rng = self._rng(generator, x.device) if self.training else None
        x_router = x
        if self.training and self.input_jitter > 0:
            noise = torch.empty_like(x).uniform_(1.0 - self.input_jitter, 1.0 + self.input_jitter, generator=rng)
            x_router = x * noise  # (T, d)
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or self.gate.weight.requires_grad or self.w_up.requires_grad
        )
        logits = self._router_logits(x_router, decode=not needs_grad)  # (T, E)
        capacity = None
        if self.capacity_factor is not None:
            capacity = capacity_for(self.capacity_factor, num_tokens, self.k, self.num_experts)
        chosen, weights, probs = self.router(logits, capacity=capacity, generator=rng)  # (T, k) (T, k) (T, E)
        experts, dropped = chosen, 0
        if capacity is not None and self.router.token_choice:
            experts, weights, dropped = apply_capacity(chosen, weights, capacity, self.num_experts)
        expert_weights = (self.w_up, self.w_down, self.w_gate)
        decode = self._decode_backend(x, experts, weights) if not needs_grad else "grouped"
        if decode in ("native", "native-parallel"):  # decode: native kernel
            parallel = decode == "native-parallel"
            y = native_expert_ffn(x, experts, weights, *expert_weights, self.activation, parallel,
                                  self.decode_park_workers)  # (T, d)
            if self._fusable(rng) and not torch.is_grad_enabled():
                self._decode_steps[self._fused_key(num_tokens)] = decode
            counts = torch.bincount(experts.reshape(-1) + 1, minlength=self.num_experts + 1)[1:]  # (E,)
        elif decode == "torch":  # decode: skip the sort
            y = few_tokens_ffn(x, experts, weights, *expert_weights, self.activation)  # (T, d)
            counts = torch.bincount(experts.reshape(-1) + 1, minlength=self.num_experts + 1)[1:]  # (E,)
        else:
            plan = build_plan(experts, self.num_experts)
            matmuls = self._bf16x3 if self._bf16x3 is not None else self.backend
            y = grouped_ffn(x, weights, plan, *expert_weights, self.activation, matmuls)  # (T, d)
            counts = torch.tensor(plan.counts, dtype=torch.long)  # (E,)
        if self.shared is not None:
            shared = self.shared(x)  # (T, d)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(x)) * shared
            y = y + shared
        total_slots = int(counts.sum()) + dropped
        aux = MoEAux(
            logits, probs, chosen, counts, dropped / total_slots if total_slots else 0.0, self.lb_coef, self.z_coef,
        )
        return y.reshape(shape), aux

    def _fusable(self, rng) -> bool:
        """Whether a native decode call may run as one fused step (router included): softmax top-k
        routing of float32 logits without capacity, bias, input noise or a generator in use."""
        return (type(self.router) is SoftmaxTopK and self.capacity_factor is None and self.gate.bias is None
                and rng is None and not (self.training and self.input_jitter > 0)
                and not torch.compiler.is_compiling())

    def _fused_key(self, num_tokens: int) -> tuple:
        return (num_tokens, self.decode_backend, self.decode_parallel, kernel_threads(), self.training)

    def _weight_views(self) -> tuple | None:
        """numpy views of the router and expert weights for the fused step (rebuilt when a weight's
        storage changes; None when one is not a contiguous float32 CPU tensor)."""
        ws = (self.gate.weight, self.w_up, self.w_down, self.w_gate)
        ptrs = tuple(None if w is None else w.data_ptr() for w in ws)
        if self._native_views is None or self._native_views[0] != ptrs:
            if not all(w is None or (native_applicable(w) and w.is_contiguous()) for w in ws):
                return None
            self._native_views = (ptrs, tuple(None if w is None else w.detach().numpy() for w in ws))
        return self._native_views[1]

    def _fused_decode(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEAux] | None:
        """A decode step whose path was measured (or fixed) as native: router, top-k and expert FFN in
        one native call (``expert_decode_step``), the same routing as :class:`SoftmaxTopK` and the same
        kernel as the unfused native path; None when this call does not qualify."""
        shape = x.shape
        x = x.reshape(-1, self.d_model)  # (T, d)
        path = self._decode_steps.get(self._fused_key(x.shape[0]))
        if path is None or not native_applicable(x) or torch.compiler.is_compiling():
            return None
        views = self._weight_views()
        if views is None:
            return None
        T, E, k = x.shape[0], self.num_experts, self.k
        y = torch.empty(T, self.d_model)  # (T, d)
        logits, probs = torch.empty(T, E), torch.empty(T, E)  # (T, E)
        experts, weights = torch.empty(T, k, dtype=torch.long), torch.empty(T, k)  # (T, k)
        counts = torch.empty(E, dtype=torch.long)  # (E,)
        native().expert_decode_step(
            x.detach().contiguous().numpy(), *views, self.router.renormalize, y.numpy(), logits.numpy(), probs.numpy(),
            experts.numpy(), weights.numpy(), counts.numpy(), self.activation, path == "native-parallel",
            self.decode_park_workers,
        )
        if self.shared is not None:
            shared = self.shared(x)  # (T, d)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(x)) * shared
            y = y + shared
        return y.reshape(shape), MoEAux(logits, probs, experts, counts, 0.0, self.lb_coef, self.z_coef)

    def _router_logits(self, x: torch.Tensor, decode: bool) -> torch.Tensor:
        """Router logits (T, E) of ``x`` (T, d). A forward-only call with at most
        :data:`NATIVE_MAX_TOKENS` float32 CPU tokens whose decode may run natively (``decode_backend``
        not ``"torch"``) projects on the calling thread (:func:`~sparseforge.ops.expert_ffn.few_token_linear`):
        a torch matmul there may open a parallel region and wait for a thread the expert kernel's
        pool or another process holds; same product up to float32 summation order."""
        if (decode and x.shape[0] <= NATIVE_MAX_TOKENS and self.decode_backend != "torch" and self.gate.bias is None
                and native_applicable(x, self.gate.weight) and not torch.compiler.is_compiling()):
            return few_token_linear(x, self.gate.weight)
        return self.gate(x)

    def _decode_backend(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> str:
        """The path of this forward-only call, one of :data:`DECODE_PATHS`."""
        if x.shape[0] > NATIVE_MAX_TOKENS:
            return "grouped"
        torch_fits = experts.numel() <= FEW_SLOTS
        if self.decode_backend == "torch":
            return "torch" if torch_fits else "grouped"
        if not native_applicable(x, weights, self.w_up, self.w_down, self.w_gate):
            if self.decode_backend == "native":
                raise ConfigError(
                    "decode_backend='native' needs float32 CPU inputs and expert weights, got "
                    f"{x.dtype} input and {self.w_up.dtype} weights on {x.device}; use decode_backend='auto' or 'torch'"
                )
            return "torch" if torch_fits else "grouped"
        candidates = []
        if self.decode_parallel is not True:
            candidates.append("native")
        if self.decode_parallel is True or (self.decode_parallel is None and self._parallel_may_help(experts)):
            candidates.append("native-parallel")
        if self.decode_backend == "auto" and torch_fits:
            candidates.append("torch")
        if len(candidates) == 1:
            return candidates[0]
        return self._measured_decode(x, experts, weights, candidates)

    def _parallel_may_help(self, experts: torch.Tensor) -> bool:
        """Whether the kernels' pool has a second thread and the step streams enough weights to use it."""
        mats = 2 if self.w_gate is None else 3
        return kernel_threads() > 1 and experts.numel() * self.d_model * self.d_hidden * mats >= PARALLEL_MIN_WEIGHTS

    def _measured_decode(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, paths: list[str]) -> str:
        """Time the candidate decode ``paths`` on this call's shape once (then per CPU from the
        on-disk cache) and remember the fastest; the native kernel on the calling thread is kept
        unless another path is clearly faster.

        Each timed call runs the router's projection before the experts, as consecutive decode
        steps do: the pool's workers and torch's own threads take turns on the cores there, and
        timing the expert paths alone would hide what one costs the other."""
        key = (int(x.shape[0]), tuple(paths), kernel_threads())  # what varies between calls of one layer
        if key not in self._decode_choices:
            from sparseforge.measure.choose import choose_by_timing

            question = {"d_model": self.d_model, "d_hidden": self.d_hidden, "experts": self.num_experts, "k": self.k,
                        "expert": self.expert, "activation": self.activation, "tokens": key[0],
                        "paths": ",".join(paths), "kernel_threads": key[2], "shared": self.shared is not None,
                        "timed": "router+experts"}
            ew = (self.w_up, self.w_down, self.w_gate)
            experts_of = {
                "native": lambda: native_expert_ffn(x, experts, weights, *ew, self.activation, False),
                "native-parallel": lambda: native_expert_ffn(x, experts, weights, *ew, self.activation, True),
                "torch": lambda: few_tokens_ffn(x, experts, weights, *ew, self.activation),
            }

            def step(path: str):
                return lambda: (self._router_logits(x, decode=True), experts_of[path]())

            run = {p: step(p) for p in paths}
            with torch.no_grad():
                choice = choose_by_timing("moe_decode", question, {p: run[p] for p in paths}, default=paths[0])
            self._decode_choices[key] = choice
        return self._decode_choices[key].name

    def clear_matmul_cache(self) -> None:
        """Forget the packed expert weights of ``matmul_precision="bf16x3"`` (after writing weights
        through ``.data``, which torch's version counter does not see); a no-op for ``"fp32"``."""
        if self._bf16x3 is not None:
            self._bf16x3.clear()

    @property
    def decode_choice(self) -> dict:
        """``{tokens: Choice}`` measured by ``decode_backend="auto"`` so far (name, timings, reason)."""
        return {k[0]: c for k, c in self._decode_choices.items()}

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_hidden={self.d_hidden}, num_experts={self.num_experts}, k={self.k}, "
            f"expert={self.expert!r}, activation={self.activation!r}, capacity_factor={self.capacity_factor}"
        )
