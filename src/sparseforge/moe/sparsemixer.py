"""SparseMixer: a scalable estimator of the routing gradient that standard MoE training drops.

Paper: Liu, Gao, Chen, "Sparse Backpropagation for MoE Training" (2023, arXiv:2310.00811); the
paper's code is ``microsoft/SparseMixer`` (``sparsemixer/sparsemixer.py``). Its successor,
SparseMixer-v2 (Liu et al., "GRIN: GRadient-INformed MoE", 2024, arXiv:2409.12136), is what
transformers' PhiMoE model implements as ``sparsemixer`` (top-2, hard-wired).

How it works (per routing stage; stage 2 repeats it with the stage-1 expert removed)
----------------------------------------------------------------------------------------
1. **Sparsity mask.** With ``m = max_i z_i`` over the logits still available, expert ``i`` is
   masked out when ``(m - z_i) / max(|z_i|, m) > 2 * jitter_eps`` (it could not win under
   multiplicative jitter of size ``jitter_eps``). ``pi = softmax`` of the masked logits.
2. **Sampling.** Training draws the expert ``D ~ pi`` with the Gumbel-max trick
   (``argmax(z_masked - log(E))``, ``E ~ Exp(1)``); eval takes ``argmax`` (deterministic).
3. **Gradient estimate.** The gradient of ``E_D[L(pi_D f_D(x))]`` w.r.t. the router has a term
   ``sum_i (L(pi_i f_i) - L(0)) d pi_i`` that needs every expert, which standard training drops.
   SparseMixer approximates ``L(pi_i f_i) - L(0)`` by an ODE step that needs only the sampled
   expert, using the forward pass at a *scaled* gate ``omega * pi_D``:

   ==========================  =================================  ===============================
   ``estimator``               forward weight (training)          gradient w.r.t. logits ``z``
   ==========================  =================================  ===============================
   ``"midpoint"`` (default;    ``pi_D`` if ``D == argmax pi`` or  ``2 * g * pi_D * (e_D - pi)``
   the 2023 paper, code v1)    ``u > 0.5``, else ``pi_D / 2``
   ``"heun3"`` (GRIN,          ``pi_D`` if ``D == argmax pi`` or  ``g * pi_D * (e_D - pi)``
   = transformers PhiMoE)      ``u > 0.75``, else ``0.3333 pi_D``
   ==========================  =================================  ===============================

   ``g`` is the gradient w.r.t. the forward weight, ``u ~ U(0, 1)``, and the gradient is zero on
   masked logits. ``"midpoint"``: the mid-point rule ``L(x) - L(0) ~ L'(x/2) x`` evaluated at
   half the gate, mixed 50/50 with the first-order (Euler) rule; the factor 2 counts the dropped
   term and the ordinary gate term, both estimated by the same quantity (``SparseMixerCore``
   returns twice the gradient). ``"heun3"``: Heun's third-order rule
   ``L(x) - L(0) ~ L'(x)/4 + 3 L'(x/3)/4`` (weights 1/4, 3/4 realised by the coin ``u``),
   reporting the dropped term once; it reproduces ``transformers.models.phimoe.sparsemixer``
   bit for bit given the same noise (tested). Both pass the scale ``omega`` straight through in
   the backward pass. Not included: the paper code's learnable per-channel output scale
   ``omega`` (add a scale after the layer if you want it).

Top-k
-----
``k=1`` is the paper (Switch). ``k=2`` follows GRIN/PhiMoE: stage 2 samples from the remaining
experts with the same rules, and its gradient flows only to the logits of the remaining experts.
``k > 2`` raises :class:`ConfigError`: neither the paper nor GRIN defines or tested it (the GRIN
code asserts ``top_k in [1, 2]``), so we do not guess. Weights are not renormalised.

Example:
    >>> import torch
    >>> from sparseforge.moe.sparsemixer import SparseMixer
    >>> router = SparseMixer(num_experts=4, k=2).eval()
    >>> r = router(torch.tensor([[0.1, 2.0, 1.9, -1.0]]))
    >>> r.experts.tolist()
    [[1, 2]]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from sparseforge.errors import ConfigError
from sparseforge.moe.routers import Router, Routing, router_float

__all__ = ["SparseMixer", "SparseMixerNoise", "sparsemixer_route", "ESTIMATORS"]


class _Estimator(NamedTuple):
    """Gate scale = ``low + high * first_order`` (1 or ``low``), written with the references' constants."""

    coin: float  # the first-order branch is taken when u > coin (or when D is the argmax)
    low: float  # gate scale of the higher-order (mid-point / Heun) branch
    high: float  # low + high = 1: gate scale of the first-order branch
    grad_factor: float  # multiplies the gradient w.r.t. the gate


ESTIMATORS = {
    "midpoint": _Estimator(coin=0.5, low=0.5, high=0.5, grad_factor=2.0),  # paper code v1
    "heun3": _Estimator(coin=0.75, low=0.3333, high=0.6667, grad_factor=1.0),  # GRIN / PhiMoE
}


@dataclass(frozen=True)
class SparseMixerNoise:
    """The random numbers of one training step, one entry per routing stage.

    ``exponential[j]`` ``(T, E)`` ~ Exp(1) (Gumbel noise is ``-log`` of it), ``uniform[j]`` ``(T, 1)``
    ~ U(0, 1) (the first-order/higher-order coin).
    """

    exponential: tuple[torch.Tensor, ...]
    uniform: tuple[torch.Tensor, ...]

    @staticmethod
    def draw(num_tokens: int, num_experts: int, k: int, *, dtype=torch.float32, device=None,
             generator: torch.Generator | None = None) -> "SparseMixerNoise":
        exps, unis = [], []
        for _ in range(k):
            exps.append(torch.empty(num_tokens, num_experts, dtype=dtype, device=device).exponential_(generator=generator))
            unis.append(torch.rand(num_tokens, 1, dtype=dtype, device=device, generator=generator))
        return SparseMixerNoise(tuple(exps), tuple(unis))


class _ScaledGate(torch.autograd.Function):
    """Forward ``pi_D * scale``; backward ``factor * g * pi_D * (e_D - pi)`` into the logits."""

    @staticmethod
    def forward(ctx, logits, pi_sel, selected, pi, scale, factor: float):
        ctx.save_for_backward(pi_sel, selected, pi)
        ctx.factor = factor
        return pi_sel * scale  # (T, 1)

    @staticmethod
    def backward(ctx, grad):
        pi_sel, selected, pi = ctx.saved_tensors
        if ctx.factor != 1.0:
            grad = grad * ctx.factor  # exact: a power of two
        grad = grad * pi_sel  # (T, 1)
        grad_logits = pi * grad.mul(-1)  # (T, E)
        grad_logits.scatter_add_(dim=-1, index=selected, src=grad)
        return grad_logits, None, None, None, None, None


def _stage(logits, available, training, noise_exp, noise_uni, est: _Estimator, jitter_eps: float):
    """One routing stage on ``available`` (the logits with earlier picks set to -inf)."""
    with torch.no_grad():
        top, top_idx = available.max(dim=-1, keepdim=True)  # (T, 1)
        factor = logits.abs().clamp(min=top)  # (T, E)
        masked = ((top - logits) / factor) > (2 * jitter_eps)  # (T, E) never-sampled experts
    gated = available.masked_fill(masked, float("-inf"))  # (T, E)
    if training:
        selected = (gated - noise_exp.log()).max(dim=-1)[1].unsqueeze(-1)  # (T, 1) Gumbel-max
        with torch.no_grad():
            pi = torch.softmax(gated, dim=-1)  # (T, E)
            pi_sel = pi.gather(-1, selected)  # (T, 1)
            first_order = torch.logical_or(selected == pi.max(dim=-1, keepdim=True)[1], noise_uni > est.coin)
            scale = torch.add(est.low, first_order, alpha=est.high).type_as(pi)  # (T, 1) 1 or low
        weight = _ScaledGate.apply(logits, pi_sel, selected, pi, scale, est.grad_factor)  # (T, 1)
    else:
        selected = top_idx  # (T, 1)
        weight = torch.softmax(gated, dim=-1).gather(-1, selected)  # (T, 1), plain gradient
    return selected, weight


def sparsemixer_route(
    logits: torch.Tensor,
    k: int,
    *,
    jitter_eps: float = 0.01,
    training: bool = True,
    estimator: str = "midpoint",
    noise: SparseMixerNoise | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseMixer routing of ``logits`` (T, E): returns ``experts (T, k)`` and ``weights (T, k)``.

    A pure function: in training, ``noise`` supplies every random number (see
    :class:`SparseMixerNoise`). Same dtype handling as the reference: everything is computed in
    the dtype of ``logits``.
    """
    if estimator not in ESTIMATORS:
        raise ConfigError(f"unknown SparseMixer estimator {estimator!r}; choose one of {sorted(ESTIMATORS)}")
    if k not in (1, 2):
        raise ConfigError(
            f"SparseMixer is defined for top-1 (the paper) and top-2 (GRIN), got k={k}; "
            "use softmax_topk or sigmoid routing for k > 2"
        )
    if k > logits.shape[-1]:
        raise ConfigError(f"k={k} experts per token but only {logits.shape[-1]} experts exist")
    if training and (noise is None or len(noise.exponential) < k or len(noise.uniform) < k):
        raise ConfigError("SparseMixer in training mode needs noise for every stage (SparseMixerNoise.draw)")
    available = logits
    experts, weights = [], []
    for j in range(k):
        if j:
            available = torch.scatter(available, -1, experts[-1], float("-inf"))  # drop earlier picks
        sel, w = _stage(
            logits, available, training,
            noise.exponential[j] if training else None,
            noise.uniform[j] if training else None,
            ESTIMATORS[estimator],
            jitter_eps,
        )
        experts.append(sel)
        weights.append(w)
    return torch.cat(experts, dim=-1), torch.cat(weights, dim=-1)  # (T, k), (T, k)


class SparseMixer(Router):
    """SparseMixer router (top-1 or top-2); see the module docstring for the estimator.

    ``jitter_eps`` sets the sparsity mask (PhiMoE's ``router_jitter_noise``, default 0.01).
    Training samples with noise from ``generator`` (an explicit ``torch.Generator``; ``None`` uses
    torch's default generator, like dropout); eval is deterministic (argmax, no noise).
    """

    def __init__(self, num_experts: int, k: int = 2, jitter_eps: float = 0.01, estimator: str = "midpoint") -> None:
        super().__init__(num_experts, k)
        if k not in (1, 2):
            raise ConfigError(
                f"SparseMixer is defined for top-1 (the paper) and top-2 (GRIN), got k={k}; "
                "use softmax_topk or sigmoid routing for k > 2"
            )
        if estimator not in ESTIMATORS:
            raise ConfigError(f"unknown SparseMixer estimator {estimator!r}; choose one of {sorted(ESTIMATORS)}")
        if not jitter_eps >= 0.0:
            raise ConfigError(f"jitter_eps must be >= 0, got {jitter_eps!r}")
        self.jitter_eps = float(jitter_eps)
        self.estimator = estimator

    def forward(self, logits, *, capacity=None, generator=None) -> Routing:
        self._check_logits(logits)
        logits = router_float(logits)
        noise = None
        if self.training:
            noise = SparseMixerNoise.draw(
                *logits.shape, self.k, dtype=logits.dtype, device=logits.device, generator=generator
            )
        experts, weights = sparsemixer_route(
            logits, self.k, jitter_eps=self.jitter_eps, training=self.training,
            estimator=self.estimator, noise=noise,
        )
        probs = torch.softmax(logits, dim=-1)  # (T, E) unmasked, for the load-balancing loss
        return Routing(experts, weights, probs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, jitter_eps={self.jitter_eps}, estimator={self.estimator!r}"
