"""The expert matmuls of ``matmul_precision="bf16x3"``: float32-accurate products on AMX.

:class:`Bf16x3Matmul` computes each expert matmul of :mod:`sparseforge.moe.grouped` with the
bf16x3 kernel (:mod:`sparseforge.ops.bf16x3`: three bf16 products accumulated in float32, relative
error ~5e-6 against float32's ~6e-7). It keeps every expert weight's split and packed form (as
multiplied in the forward pass and transposed for the input gradient: twice the weights' bytes) and
packs it again when the weight changes: when its storage, shape, strides or version counter differ
(in-place updates by torch optimizers bump the version; writes through ``.data`` do not, so call
:meth:`clear` after those). Activations are split per call; an operand used by two consecutive
products (a slice's tokens for the gate and up projections) is split once.

Example:
    >>> import torch
    >>> from sparseforge.moe.bf16x3 import Bf16x3Matmul
    >>> from sparseforge.ops.bf16x3 import amx_available
    >>> x, w = torch.randn(4, 64), torch.randn(64, 32)
    >>> y = Bf16x3Matmul().mm(x, w, key=("up", 0)) if amx_available() else x @ w
    >>> y.shape
    torch.Size([4, 32])
"""

from __future__ import annotations

import torch

from sparseforge.errors import ConfigError
from sparseforge.ops.bf16x3 import Packed, matmul, pack, packed_size, require_amx

__all__ = ["Bf16x3Matmul", "PRECISIONS"]

# matmul_precision values of the MoE layer
PRECISIONS = ("fp32", "bf16x3")


def _fingerprint(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t._version)


class Bf16x3Matmul:
    """bf16x3 products with a cache of packed weights (see the module docstring).

    ``path="amx"`` (the layer's) needs AMX (:class:`~sparseforge.errors.ConfigError` otherwise);
    ``"scalar"`` runs the kernel's plain C++ reference on any CPU (slow: for tests)."""

    def __init__(self, path: str = "amx") -> None:
        if path not in ("amx", "scalar"):
            raise ConfigError(f"unknown bf16x3 path {path!r}; use 'amx' or 'scalar'")
        if path == "amx":
            require_amx()
        self.path = path
        self.park_workers = False  # the pool polls between products (set True to hand cores to torch at once)
        self._scratch: dict = {}  # "a" / "b" -> (hi, lo) uint16 buffers reused by activation packs
        self._weights: dict = {}  # key -> (fingerprint, the weight view (keeps its storage alive), Packed)
        self._last_a: tuple | None = None  # (fingerprint, tensor, Packed) of the last `a` operand

    def clear(self) -> None:
        """Forget every packed weight (after changing weights through ``.data``) and the scratch buffers."""
        self._weights.clear()
        self._last_a = None
        self._scratch.clear()

    def _buffers(self, role: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reused (hi, lo) buffers for packing activation ``x`` as operand ``role`` (grown on demand)."""
        n = packed_size(*x.shape)
        buf = self._scratch.get(role)
        if buf is None or buf[0].numel() < n:
            buf = (torch.empty(n, dtype=torch.uint16), torch.empty(n, dtype=torch.uint16))
            self._scratch[role] = buf
        return buf

    def _packed_a(self, a: torch.Tensor) -> Packed:
        fp = _fingerprint(a)
        if self._last_a is not None and self._last_a[0] == fp:
            return self._last_a[2]
        packed = pack(a, scratch=self._buffers("a", a))  # the cached `a` lives in the "a" buffers until replaced
        self._last_a = (fp, a, packed)  # holding `a` keeps its address from being reused while cached
        return packed

    def _packed_weight(self, w: torch.Tensor, key) -> Packed:
        fp = _fingerprint(w)
        hit = self._weights.get(key)
        if hit is not None and hit[0] == fp:
            return hit[2]
        packed = pack(w, as_b=True)  # its own memory: kept while the weight is unchanged
        self._weights[key] = (fp, w, packed)
        return packed

    def mm(self, a: torch.Tensor, b: torch.Tensor, key=None, out: torch.Tensor | None = None,
           accumulate: bool = False) -> torch.Tensor:
        """``a (n, K) @ b (K, N)``; ``key`` names ``b`` as a cached weight (e.g. ``("up", e)``), None
        packs it for this call; ``out`` / ``accumulate`` as :func:`sparseforge.ops.bf16x3.matmul`."""
        pb = self._packed_weight(b, key) if key is not None else pack(b, as_b=True, scratch=self._buffers("b", b))
        return matmul(self._packed_a(a), pb, out=out, accumulate=accumulate, path=self.path,
                      park_workers=self.park_workers)
