"""Native few-token expert FFN (MoE decode): ``sparseforge::moe_expert_ffn``.

Batch-1 decode of an MoE layer is bound by memory bandwidth: every chosen expert's weights are
read once per token (8 experts top-2, d=1024, h=2816: 69 MB in float32). The native kernel
(``csrc/expert_gemv*``, scalar / AVX2 / AVX-512 chosen at run time like the other kernels) groups
the routing slots by expert so each expert's weights are streamed once for all the tokens that
chose it, as contiguous row sweeps (AXPY form on the input-major layout, partial sums in L1),
fuses ``act(x W_gate) * (x W_up)``, the down product and the gate-weighted sum over each token's
slots. The result equals :func:`sparseforge.moe.grouped.few_tokens_ffn` up to float32 rounding
order and does not depend on the thread count. Layering: ``csrc/expert_gemv*`` -> ``sparseforge._native``
-> this op -> :class:`sparseforge.moe.MoE` (``decode_backend="native"``).

* :func:`moe_expert_ffn` is the registered custom op (fake impl for ``torch.compile``);
  :func:`expert_ffn` calls it, or the implementation directly in eager mode (skipping the op
  dispatcher: 14 us instead of 22 us per call on a tiny problem here).
* ``parallel=False`` runs on the calling thread; ``True`` spreads row blocks over the kernels'
  thread pool (``sparseforge.kernels.set_num_threads``). Which is faster depends on the CPU (one
  core streams at the machine's bandwidth on some, at half of it on others), so
  :class:`~sparseforge.moe.MoE` measures both.
* ``park_workers=True`` (default) sends the pool's workers to sleep as soon as the kernel is done
  instead of letting them poll ~0.2 ms for another kernel call: in a decode step the next work is
  torch's (the router's matmul, attention), and a polling worker holds the core torch's own thread
  needs (``docs/moe.md``, Threads). ``False`` suits a caller that runs another pool kernel at once.

* :func:`few_token_linear` computes a decode step's router logits ``x @ weight^T`` on the calling
  thread (no parallel region to wake torch's threads for a product of a few microseconds).

Forward only: no autograd formula is registered (the layer uses it only when no gradient is needed).

Example:
    >>> import torch
    >>> from sparseforge.ops.expert_ffn import expert_ffn
    >>> E, d, h = 3, 4, 5
    >>> w_gate, w_up, w_down = torch.randn(E, d, h), torch.randn(E, d, h), torch.randn(E, h, d)
    >>> experts, weights = torch.tensor([[0, 2]]), torch.tensor([[0.6, 0.4]])
    >>> expert_ffn(torch.randn(1, d), experts, weights, w_up, w_down, w_gate).shape
    torch.Size([1, 4])
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from sparseforge.errors import ConfigError, DataError
from sparseforge.kernels import native

__all__ = ["moe_expert_ffn", "expert_ffn", "few_token_linear", "native_applicable", "NATIVE_ACTIVATIONS"]

NATIVE_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")


def native_applicable(*tensors: Optional[Tensor]) -> bool:
    """Whether the kernel's domain covers these tensors: float32 on the CPU."""
    return all(t is None or (t.dtype == torch.float32 and t.device.type == "cpu") for t in tensors)


def _check(x, experts, weights, w_up, w_down, w_gate, activation) -> None:
    if activation not in NATIVE_ACTIVATIONS:
        raise ConfigError(f"activation {activation!r} has no native kernel; use one of {list(NATIVE_ACTIVATIONS)}")
    for name, t in (("x", x), ("weights", weights), ("w_up", w_up), ("w_down", w_down), ("w_gate", w_gate)):
        if t is not None and not native_applicable(t):
            raise DataError(f"{name} must be a float32 CPU tensor for the native expert FFN, got {t.dtype} on {t.device}")
    if experts.dtype != torch.int64 or experts.device.type != "cpu":
        raise DataError(f"experts must be an int64 CPU tensor, got {experts.dtype} on {experts.device}")
    if x.dim() != 2 or experts.dim() != 2 or weights.shape != experts.shape or experts.shape[0] != x.shape[0]:
        raise DataError(
            f"expected x (T, d), experts and weights (T, k); got {tuple(x.shape)}, {tuple(experts.shape)}, {tuple(weights.shape)}"
        )


def _np(t: Optional[Tensor]):
    """Zero-copy numpy view (contiguous) for the native call."""
    if t is None:
        return None
    return t.detach().contiguous().numpy()


def _impl(x, experts, weights, w_up, w_down, w_gate, activation, parallel, park_workers):
    _check(x, experts, weights, w_up, w_down, w_gate, activation)
    y = torch.empty(x.shape, dtype=torch.float32)  # (T, d)
    # The native side checks shapes, expert ids in [-1, E) and contiguity; ValueError -> DataError
    try:
        native().expert_ffn(
            _np(x), _np(experts), _np(weights), _np(w_up), _np(w_down), _np(w_gate), y.numpy(), activation, "",
            0, parallel, park_workers,
        )
    except ValueError as exc:
        raise DataError(f"native expert FFN: {exc}") from exc
    return y


@torch.library.custom_op("sparseforge::moe_expert_ffn", mutates_args=())
def moe_expert_ffn(
    x: Tensor, experts: Tensor, weights: Tensor, w_up: Tensor, w_down: Tensor, w_gate: Optional[Tensor],
    activation: str, parallel: bool, park_workers: bool = True,
) -> Tensor:
    """``y (T, d) = sum over t's slots of weight * FFN_expert(x[t])`` (expert -1 = empty slot)."""
    return _impl(x, experts, weights, w_up, w_down, w_gate, activation, parallel, park_workers)


@moe_expert_ffn.register_fake
def _(x, experts, weights, w_up, w_down, w_gate, activation, parallel, park_workers=True):
    return x.new_empty(x.shape)


def expert_ffn(
    x: Tensor,
    experts: Tensor,
    weights: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    w_gate: Optional[Tensor] = None,
    activation: str = "silu",
    parallel: bool = False,
    park_workers: bool = True,
) -> Tensor:
    """Forward-only mixture output (T, d) for ``x`` (T, d), ``experts`` / ``weights`` (T, k) as a
    router returns them, stacked input-major expert weights (see :mod:`sparseforge.moe.grouped`)."""
    if torch.compiler.is_compiling():
        return moe_expert_ffn(x, experts, weights, w_up, w_down, w_gate, activation, parallel, park_workers)
    return _impl(x, experts, weights, w_up, w_down, w_gate, activation, parallel, park_workers)


def few_token_linear(x: Tensor, weight: Tensor) -> Tensor:
    """``x (T, d) @ weight^T`` for ``weight`` (N, d) (``nn.Linear``'s layout, no bias), float32 CPU,
    on the calling thread: the router projection of an MoE decode step. Forward only (eager).

    Why not ``F.linear``: for a few tokens torch's matmul may still open a parallel region, and the
    step then waits for a second thread to wake and find a free core (on the Intel AMX host of
    ``docs/moe.md`` the E=64 router took longer than the expert kernel that way on a busy machine).

    Example:
        >>> import torch
        >>> from sparseforge.ops.expert_ffn import few_token_linear
        >>> x, w = torch.randn(2, 8), torch.randn(4, 8)
        >>> torch.allclose(few_token_linear(x, w), x @ w.t(), atol=1e-5)
        True
    """
    for name, t in (("x", x), ("weight", weight)):
        if not native_applicable(t) or t.dim() != 2:
            raise DataError(f"{name} must be a 2-D float32 CPU tensor, got {tuple(t.shape)} {t.dtype} on {t.device}")
    if weight.shape[1] != x.shape[1]:
        raise DataError(f"weight {tuple(weight.shape)} must be (N, d) with d = x.shape[1] = {x.shape[1]}")
    y = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32)  # (T, N)
    native().few_token_linear(_np(x), _np(weight), y.numpy())
    return y
