"""``sparseforge::prefill_attention``: causal attention of many query tokens, dense or block-sparse.

Native kernel ``csrc/prefill_attention.h`` (AVX-512 / AVX2 / scalar chosen at run time, threads over
heads and blocks of 64 query rows, online softmax over blocks of 128 keys, key blocks the pattern
leaves out are never read). Shapes:

* ``q`` float32 ``(B, Hq, Tq, D)``: the queries, the last ``Tq`` of the ``n`` cached tokens (query
  row ``r`` at position ``i = n - Tq + r``);
* ``k``, ``v`` float32 or bfloat16 ``(B, Hkv, cap, D)``: the cache storage, tokens ``[0, n)`` valid,
  ``Hq`` a multiple of ``Hkv`` (query head ``h`` reads KV head ``h // (Hq // Hkv)``);
* returns float32 ``(B, Tq, Hq, D)`` (the layout transformers' attention functions return).

Query ``i`` attends to key ``j`` when ``j <= i``, ``i - j < horizon`` and (``j < sinks`` or
``i - j < window`` or ``i >= n - last``): TriangleMix's Triangle attention (He et al., 2025) with
``sinks``, ``window``, ``last``; dense causal attention with :func:`dense_pattern` (``window``
and ``horizon`` at least ``n``, ``last = 0``), which equals
``torch.nn.functional.scaled_dot_product_attention(..., is_causal=True)`` within float rounding.
``horizon`` is the model's own sliding window (Mistral), ``n`` when it has none. No autograd:
prefill attention here is inference only.

bfloat16 ``k``/``v`` run in bf16 compute where the CPU has it (:func:`bf16_compute_path`): the
queries and the softmax probabilities rounded to bf16, ``Q K^T`` and ``P V`` on AMX-BF16 tiles
(``amx``) or AVX512-BF16 ``vdpbf16ps`` (``avx512_bf16``) with float32 accumulation, the online
softmax in float32 (as torch's bf16 SDPA): outputs within ~1e-2 of float32 attention over the same
bf16 cache. ``SPARSEFORGE_BF16_PATH=scalar|avx512_bf16|amx`` forces a path (``scalar``: bf16
widened to float32, the float32 kernel of ``SPARSEFORGE_ISA``); unset (or ``auto``): ``amx`` where
the CPU has it, else ``scalar`` (``avx512_bf16`` measured ~10% slower than the float32 kernel on a
Sapphire Rapids host, so it runs only when named), and ``scalar`` whenever ``SPARSEFORGE_ISA`` forces
an ISA below AVX-512.

:func:`attend_prefill` is what the attention calls: the registered op under ``torch.compile``, the
native kernel directly in eager mode (same checks, no custom-op dispatch).

Example:
    >>> import torch
    >>> from sparseforge.ops.prefill_attention import dense_pattern, prefill_attention
    >>> q, k = torch.zeros(1, 1, 3, 4), torch.zeros(1, 1, 3, 4)
    >>> v = torch.arange(3.).view(1, 1, 3, 1).expand(1, 1, 3, 4).contiguous()
    >>> prefill_attention(q, k, v, 3, 0.5, **dense_pattern(3))[0, :, 0, 0].tolist()  # uniform over 1, 2, 3 keys
    [0.0, 0.5, 1.0]
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparseforge.errors import DataError, SparseforgeError
from sparseforge.kernels import native
from sparseforge.ops._define import np_view

__all__ = ["prefill_attention", "prefill_attention_ref", "attend_prefill", "dense_pattern", "check_prefill_args",
           "bf16_compute_path"]

KV_DTYPES = (torch.float32, torch.bfloat16)


def dense_pattern(n: int) -> dict:
    """The pattern arguments of dense causal attention over ``n`` tokens."""
    return {"sinks": 0, "window": max(1, n), "last": 0, "horizon": max(1, n)}


def bf16_compute_path() -> str:
    """The compute path a prefill over a bfloat16 cache takes now: ``"amx"``, ``"avx512_bf16"`` or
    ``"scalar"`` (bf16 widened to float32); see the module doc. Raises :class:`ConfigError` for a
    bad ``SPARSEFORGE_BF16_PATH`` / ``SPARSEFORGE_ISA``.

    Example:
        >>> bf16_compute_path() in ("amx", "avx512_bf16", "scalar")
        True
    """
    return str(native().prefill_bf16_path("", ""))


def check_prefill_args(q: Tensor, k: Tensor, v: Tensor, n: int, sinks: int, window: int, last: int, horizon: int) -> None:
    """Raises :class:`DataError` saying which argument of a prefill-attention call is wrong."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.device.type != "cpu":
            raise DataError(f"{name} is on {t.device}; prefill attention runs on the CPU")
        if not t.is_contiguous():
            raise DataError(f"{name} must be contiguous; call .contiguous() first")
    if q.dtype != torch.float32 or q.dim() != 4:
        raise DataError(f"q must be float32 (B, Hq, Tq, D), got {q.dtype} {tuple(q.shape)}")
    if k.dtype not in KV_DTYPES or k.dtype != v.dtype or k.dim() != 4 or k.shape != v.shape:
        raise DataError(
            f"k and v must both be float32 or bfloat16 (B, Hkv, cap, D) of one shape, got {k.dtype} {tuple(k.shape)} "
            f"and {v.dtype} {tuple(v.shape)}"
        )
    B, Hq, Tq, D = q.shape
    if k.shape[0] != B or k.shape[3] != D or Hq % k.shape[1]:
        raise DataError(f"k {tuple(k.shape)} does not fit q {tuple(q.shape)}: need (B, Hkv, cap, D) with Hq % Hkv == 0")
    if not 1 <= Tq <= n <= k.shape[2]:
        raise DataError(f"need 1 <= query tokens ({Tq}) <= n ({n}) <= the cache capacity ({k.shape[2]})")
    if sinks < 0 or last < 0 or window < 1 or horizon < 1:
        raise DataError(f"the pattern needs sinks >= 0, last >= 0, window >= 1, horizon >= 1; got sinks={sinks}, "
                        f"window={window}, last={last}, horizon={horizon}")


def _call(fn_name: str, q: Tensor, k: Tensor, v: Tensor, n: int, scale: float, sinks: int, window: int, last: int,
          horizon: int) -> Tensor:
    check_prefill_args(q, k, v, n, sinks, window, last, horizon)
    B, Hq, Tq, D = q.shape
    out = torch.empty(B, Tq, Hq, D, dtype=torch.float32)
    try:
        getattr(native(), fn_name)(np_view(q), np_view(k), np_view(v), int(n), float(scale), int(sinks), int(window),
                                   int(last), int(horizon), out.numpy())
    except SparseforgeError:
        raise  # a bad SPARSEFORGE_ISA (ConfigError)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    return out


@torch.library.custom_op("sparseforge::prefill_attention", mutates_args=())
def prefill_attention(q: Tensor, k: Tensor, v: Tensor, n: int, scale: float, sinks: int, window: int, last: int,
                      horizon: int) -> Tensor:
    """``(B, Tq, Hq, D)`` causal attention of ``q`` over the first ``n`` tokens of ``k``/``v`` under the
    pattern (see the module doc)."""
    return _call("prefill_attention", q, k, v, n, scale, sinks, window, last, horizon)


@prefill_attention.register_fake
def _(q, k, v, n, scale, sinks, window, last, horizon):
    if not isinstance(n, torch.SymInt):
        check_prefill_args(q, k, v, n, sinks, window, last, horizon)
    B, Hq, Tq, D = q.shape
    return q.new_empty(B, Tq, Hq, D)


def prefill_attention_ref(q: Tensor, k: Tensor, v: Tensor, n: int, scale: float, sinks: int, window: int, last: int,
                          horizon: int) -> Tensor:
    """The scalar reference kernel (test oracle) on the same arguments."""
    return _call("prefill_attention_ref", q, k, v, n, scale, sinks, window, last, horizon)


def attend_prefill(q: Tensor, k: Tensor, v: Tensor, n: int, scale: float, sinks: int, window: int, last: int,
                   horizon: int) -> Tensor:
    """:func:`prefill_attention`, without the custom-op dispatch in eager mode."""
    if torch.compiler.is_compiling():
        return prefill_attention(q, k, v, n, scale, sinks, window, last, horizon)
    return _call("prefill_attention", q, k, v, n, scale, sinks, window, last, horizon)
