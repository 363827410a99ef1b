"""``SparseLinear``: a linear layer whose weight is stored in a sparse format and multiplied natively.

The weight is one :class:`~sparseforge.formats.BitmapWeight`, :class:`~sparseforge.formats.NMWeight`,
:class:`~sparseforge.formats.csr.CSRWeight`, :class:`~sparseforge.formats.FanInWeight` or
:class:`~sparseforge.formats.BSRWeight` (float32 or bfloat16 values); ``forward`` runs
``y = x @ W^T + bias`` through :func:`sparseforge.ops.linear` (the native kernels of
``docs/kernels.md``), for any leading batch dimensions. The format's buffers are registered as
module buffers under the format's own on-disk names (``bitmap``/``values``, ``nm_values``/
``nm_indices``, ``csr_row_ptr``/``csr_col``/``csr_values``), so ``.to()``, ``state_dict()`` and
``load_state_dict()`` work; a loaded state may hold a different number of kept weights (the buffers
are replaced, not copied into) and is validated by the format class once.

Training: by default the stored values are buffers and the bias a parameter with
``requires_grad=False`` (inference; the gradient with respect to the *input* still works, so a
SparseLinear can sit inside a model that trains other layers). ``SparseLinear(..., trainable=True)``,
``from_linear(..., trainable=True)``, ``set_trainable(True)`` or ``requires_grad_()`` turn the stored
values into an ``nn.Parameter`` (same name in ``state_dict``) and let the bias train: the gradient of
the values is dW restricted to the mask (the native SDDMM kernels, ``docs/kernels.md``), so the sparsity
structure (bitmap, indices, row pointers: still buffers) never changes while the kept weights learn.

int8 values (``from_linear(..., dtype=torch.int8)``, bitmap, N:M and CSR): the weight is ``scales[r] * q``
with a float32 ``scales`` buffer (``scales`` / ``nm_scales`` / ``csr_scales``), multiplied by the int8 kernels of
:mod:`sparseforge.ops.int8`; ``to_dense()`` gives the float32 dequantized weight. They are not trainable
(the gradient with respect to the input works).

Activations: the kernels take float32 ``x``; a bfloat16/float16 ``x`` is cast to float32 on the way
in and the output cast back to ``x.dtype`` (documented cost: two casts per call).
``activations="int8"`` (constructor, :meth:`from_linear`, :meth:`set_activation_precision`,
``compress_(..., activations="int8")``; bitmap and N:M layers with int8 values) quantizes each token of
``x`` per call (``max|x| / 127``) and sums in integers (:mod:`sparseforge.ops.int8`): fewer instructions
per weight byte at batch 1, at the cost of the quantization error of ``x`` (``docs/kernels.md``: its
relative L2 error and the perplexity change, measured on the built-in model). Inference only: a forward
that needs a gradient raises ConfigError. A runtime setting, not saved in ``state_dict``.

Compute dtype: ``compute_dtype=torch.bfloat16`` (constructor, :meth:`from_linear`,
:meth:`set_compute_dtype`, ``compress_``) runs batches of at least
:data:`~sparseforge.ops.bf16_compute.BF16_MIN_BATCH` rows through the bf16 product
(:func:`sparseforge.ops.linear_bf16`: ``x`` converted to bf16 at the layer edge, AMX / AVX512_BF16 /
scalar, float32 accumulation, output cast back to ``x.dtype``); smaller batches keep the float32
kernels (memory-bound, where bf16 compute does not pay). :meth:`kernel_path` and the repr say which
path runs. Bitmap, N:M and CSR weights only.

Kernel tiles: batches of 4+ rows run the batch-in-lanes kernels (CSR, bitmap, N:M, BSR; float32 /
bfloat16 values), whose column tile and rows per task are measured on this machine
(:mod:`sparseforge.measure.lanes_tile`): with ``lanes_tile="auto"`` (default) a layer of at least
:data:`~sparseforge.measure.lanes_tile.MIN_WEIGHTS` weights uses, per batch bucket, the tile
:meth:`measure_lanes_tiles` measured (``compress_`` calls it), else the answer in the per-machine
tuning cache (``sparseforge cache clear`` forgets it), else the built-in rule: a forward never times
anything, so a first call costs what the others do. Set ``layer.lanes_tile = LanesTile(256, 0)`` to
fix them, ``LanesTile()`` for the built-in rule. :attr:`lanes_tiles` shows what each batch bucket uses. The tile never changes the
result beyond float32 summation order.

Example:
    >>> import torch
    >>> from sparseforge.nn import SparseLinear
    >>> lin = torch.nn.Linear(8, 2)
    >>> with torch.no_grad():
    ...     _ = lin.weight.mul_(torch.tensor([1., 0.] * 4))   # 50% zeros, 2:4-compatible
    >>> sl = SparseLinear.from_linear(lin, format="nm", pattern="2:4")
    >>> x = torch.randn(3, 8)
    >>> torch.allclose(sl(x), lin(x), atol=1e-5)
    True
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from sparseforge import kernels, ops
from sparseforge.errors import ConfigError, ModelError
from sparseforge.formats import BitmapWeight, BSRWeight, CSRWeight, FanInWeight, NMWeight, registry
from sparseforge.formats.rule import auto_format
from sparseforge.measure.lanes_tile import BUCKETS, LANES_MIN_BATCH, RULE, LanesTile, batch_bucket, tile_for, tiles_apply
from sparseforge.measure.bf16_method import linear_bf16_auto
from sparseforge.ops.bf16_compute import BF16_MIN_BATCH, bf16_formats, supports_bf16
from sparseforge.ops.int8 import INT8_ACT_FORMATS, check_activations
from sparseforge.patterns import NM, parse

__all__ = ["SparseLinear", "FORMATS", "STRUCTURED_FORMATS", "ALL_FORMATS"]

# The built-in formats as registered (sparseforge.formats.registry, which is live: ask it for formats
# registered later). FORMATS hold general masks; STRUCTURED_FORMATS need a structure (equal row counts
# / whole blocks) and are chosen explicitly or from a recorded FanIn / Block pattern.
FORMATS = registry.names(general=True, sparse_linear=True)
STRUCTURED_FORMATS = registry.names(general=False, sparse_linear=True)
ALL_FORMATS = FORMATS + STRUCTURED_FORMATS
_VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.int8)
_COMPUTE_DTYPES = (torch.float32, torch.bfloat16)


def _format_name(weight) -> str:
    return registry.spec_of(weight).name


class SparseLinear(nn.Module):
    """Linear layer with a sparse-format weight (see the module doc). ``weight`` is (out, in)."""

    _compute_dtype = torch.float32  # class default: modules pickled before compute_dtype existed load as float32
    _lanes_tile: "str | LanesTile" = "auto"  # class default, for modules pickled before lanes_tile existed
    _activations = "float"  # likewise for activations

    def __init__(
        self, weight: "BitmapWeight | NMWeight | CSRWeight | FanInWeight | BSRWeight", bias: Optional[Tensor] = None, *,
        trainable: bool = False, compute_dtype: torch.dtype = torch.float32, activations: str = "float",
    ) -> None:
        super().__init__()
        self.format = _format_name(weight)
        if weight.dtype not in _VALUE_DTYPES:
            raise ModelError(f"SparseLinear values must be float32, bfloat16 or int8, got {weight.dtype}; convert the weight first")
        self.out_features, self.in_features = weight.shape
        self.pattern: Optional[NM] = weight.pattern if isinstance(weight, NMWeight) else None
        state = weight.state_dict()
        self._keys = tuple(state)
        self._values_key = next(k for k, t in state.items() if t is weight.values)
        for key, buf in state.items():
            self.register_buffer(key, buf)
        self._weight = weight
        self._cached = self._current()
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise ModelError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
            bias = nn.Parameter(bias.detach().to(torch.float32).clone(), requires_grad=False)
        self.bias = bias
        self._compute_dtype = torch.float32
        self.set_compute_dtype(compute_dtype)
        self._lanes_tile = "auto"
        self._tiles: dict[int, LanesTile] = {}  # batch bucket -> the tile in use (lanes_tile="auto")
        self.set_activation_precision(activations)
        if trainable:
            self.set_trainable(True)

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        format: str = "bitmap",
        pattern: "NM | str | None" = None,
        dtype: Optional[torch.dtype] = None,
        trainable: bool = False,
        compute_dtype: torch.dtype = torch.float32,
        scales: Optional[Tensor] = None,
        activations: str = "float",
    ) -> "SparseLinear":
        """Compress an ``nn.Linear`` or transformers ``Conv1D``; zeros of its weight are the pruned entries.

        Args:
            format: ``"bitmap"``, ``"nm"``, ``"csr"`` or ``"auto"`` (the rule of
                :func:`sparseforge.formats.rule.auto_format`).
            pattern: the N:M pattern for ``format="nm"`` (default ``"2:4"``); the block pattern
                (e.g. ``"block4x4"``, required) for ``format="bsr"``; for ``"auto"``, a recorded
                pattern tried first. ``format="fanin"`` needs every row to keep the same count.
            dtype: values dtype (float32, bfloat16 or int8); default the weight's own. ``torch.int8``
                (formats ``"bitmap"``, ``"nm"`` and ``"csr"``; ``"auto"`` picks among them) stores int8 values with
                one float32 scale per output row (:mod:`sparseforge.formats.quantized`).
            trainable: store the values as a trainable parameter (see :meth:`set_trainable`).
            compute_dtype: ``torch.bfloat16`` for the bf16 product at batch >= 16 (module doc,
                :meth:`set_compute_dtype`); default float32.
            scales: with ``dtype=torch.int8``, the (out,) float32 scales the weight was quantized with
                (it must lie on their grid); default the layer's ``weight_scale`` buffer (left by
                :mod:`sparseforge.quant`) if it has one, else ``max|w_row| / 127`` per row.
            activations: ``"int8"`` quantizes ``x`` per token (int8 values, bitmap / N:M; module doc,
                :meth:`set_activation_precision`); default ``"float"``.
        Raises:
            ModelError: ``linear`` is not a linear layer. ConfigError: unknown format, or the weight does
            not fit it (e.g. ``"nm"`` on a weight that keeps more than N of some M).
        """
        from sparseforge.layers import is_linear, weight_2d

        if not is_linear(linear):
            raise ModelError(
                f"SparseLinear.from_linear needs an nn.Linear or transformers Conv1D, got {type(linear).__name__}"
            )
        w = weight_2d(linear).detach()  # (out, in), a view
        dtype = dtype or w.dtype
        if dtype not in _VALUE_DTYPES:
            raise ConfigError(f"sparse values must be float32, bfloat16 or int8, got {dtype}; pass dtype=torch.float32, torch.bfloat16 or torch.int8")
        if format == "auto":
            format, pattern = auto_format(w, pattern)
            if dtype == torch.int8 and format not in registry.int8_names():
                format = "bitmap"  # the general int8 format
        if format not in registry.names(sparse_linear=True):
            raise ConfigError(f"unknown sparse format {format!r}; use one of {registry.names(sparse_linear=True)} or 'auto'")
        keep = w != 0  # (out, in), pruned entries are exact zeros
        pattern = parse(pattern) if pattern else None
        if dtype != torch.int8:
            if scales is not None:
                raise ConfigError("scales= needs dtype=torch.int8")
            weight = registry.get(format).build(w.to(dtype), pattern, keep)
            return cls(weight, linear.bias, trainable=trainable, compute_dtype=compute_dtype, activations=activations)
        if format not in registry.int8_names():
            raise ConfigError(f"int8 values are stored in the {' / '.join(registry.int8_names())} formats, not {format!r}")
        if trainable:
            raise ConfigError("int8 values cannot be trainable; train in float32 and quantize afterwards")
        if scales is None:
            scales = getattr(linear, "weight_scale", None)
        weight = registry.get(format).build(w, pattern, keep, values_dtype=torch.int8, scales=scales)
        return cls(weight, linear.bias, compute_dtype=compute_dtype, activations=activations)

    # ---- the weight object, kept in sync with the buffers -----------------------------------

    def _held(self, key: str) -> Tensor:
        """The tensor stored under ``key``: a Parameter (trainable values) or a buffer."""
        return self._parameters[key] if key in self._parameters else self._buffers[key]

    def _current(self) -> tuple:
        return tuple(self._held(k) for k in self._keys)

    # ---- training ----------------------------------------------------------------------------

    @property
    def trainable(self) -> bool:
        """Whether the stored values are an ``nn.Parameter`` (trained through dW at the mask)."""
        return self._values_key in self._parameters

    def set_trainable(self, flag: bool = True) -> "SparseLinear":
        """Make the stored values a trainable ``nn.Parameter`` (``flag=True``) or a buffer again.

        The structure buffers stay buffers; the bias (if any) gets ``requires_grad=flag``.
        """
        key = self._values_key
        if flag and self.weight_format.dtype == torch.int8:
            raise ConfigError("int8 values cannot be trainable; train in float32 and quantize afterwards")
        if flag and self._activations != "float":
            raise ConfigError(f"activations={self._activations!r} is inference-only; call "
                              "set_activation_precision('float') before training")
        if flag and key not in self._parameters:
            values = self._buffers.pop(key)
            self.register_parameter(key, nn.Parameter(values.detach(), requires_grad=True))
        elif not flag and key in self._parameters:
            values = self._parameters.pop(key)
            self.register_buffer(key, values.detach())
        if self.bias is not None:
            self.bias.requires_grad_(flag)
        self._refresh()  # the format object must hold the new tensor (rebuilt now, not in a compiled forward)
        return self

    @property
    def stored_values(self) -> Tensor:
        """The stored values tensor: an ``nn.Parameter`` when :attr:`trainable`, else a buffer."""
        return self._held(self._values_key)

    def replace_weight(self, weight: "BitmapWeight | NMWeight | CSRWeight | FanInWeight | BSRWeight") -> Tensor:
        """Hold ``weight`` instead (same format, shape and N:M pattern), e.g. after a mask update.

        The structure buffers are replaced. Trainable values are copied into the current
        ``nn.Parameter`` when the stored count is unchanged (an optimizer holding it keeps working);
        otherwise a new Parameter replaces it, and the caller must hand it to its optimizer.
        Returns :attr:`stored_values` as now held.

        Example:
            >>> import torch
            >>> from sparseforge.formats.csr import CSRWeight
            >>> w = torch.randn(4, 8)
            >>> layer = SparseLinear(CSRWeight.from_dense(w, w > 0), trainable=True)
            >>> p = layer.stored_values
            >>> mask = torch.zeros(4, 8, dtype=torch.bool); mask[:, :2] = True
            >>> layer.replace_weight(CSRWeight.from_dense(w, mask)) is p  # 8 kept now, not the same count
            False
        """
        if _format_name(weight) != self.format or tuple(weight.shape) != (self.out_features, self.in_features):
            raise ModelError(
                f"replace_weight needs a {self.format} weight of shape ({self.out_features}, {self.in_features}), "
                f"got {_format_name(weight)} {tuple(weight.shape)}"
            )
        if self.pattern is not None and weight.pattern != self.pattern:
            raise ModelError(f"replace_weight needs N:M pattern {self.pattern}, got {weight.pattern}")
        state = weight.state_dict()
        new_values = state.pop(self._values_key)
        for key, buf in state.items():
            self._buffers[key] = buf
        key = self._values_key
        if key in self._parameters:
            param = self._parameters[key]
            if param.shape == new_values.shape:
                param.data = new_values
            else:
                self._parameters[key] = nn.Parameter(new_values, requires_grad=param.requires_grad)
        else:
            self._buffers[key] = new_values
        self._refresh()
        return self.stored_values

    def _refresh(self) -> None:
        self._weight = self._build(dict(zip(self._keys, self._current())))
        self._cached = self._current()
        self.__dict__.get("_tiles", {}).clear()  # the density may have changed: measure again

    def requires_grad_(self, requires_grad: bool = True) -> "SparseLinear":
        """Same as :meth:`set_trainable`: the kept weights (and bias) train, the structure does not."""
        return self.set_trainable(requires_grad)

    def _build(self, state: dict[str, Tensor]):
        return registry.get(self.format).load(state, (self.out_features, self.in_features), self.pattern)

    @property
    def weight_format(self) -> "BitmapWeight | NMWeight | CSRWeight | FanInWeight | BSRWeight":
        """The format object over the current buffers (rebuilt, and validated, after ``.to()``)."""
        buffers, params = self._buffers, self._parameters
        for key, held in zip(self._keys, self._cached):  # cheap identity check per call
            if (params[key] if key in params else buffers[key]) is not held:
                bufs = self._current()
                self._weight = self._build(dict(zip(self._keys, bufs)))
                self._cached = bufs
                break
        return self._weight

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        present = {k: state_dict[prefix + k] for k in self._keys if prefix + k in state_dict}
        if len(present) == len(self._keys):
            try:
                weight = self._build({k: v.detach().clone() for k, v in present.items()})
            except (ModelError, ConfigError) as exc:
                error_msgs.append(f"{prefix[:-1] or 'SparseLinear'}: {exc}")
                return
            self.replace_weight(weight)  # the stored count of kept weights may differ; super() below refills in place
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    # ---- compute dtype -----------------------------------------------------------------------

    @property
    def compute_dtype(self) -> torch.dtype:
        """``torch.float32`` (the float32 kernels) or ``torch.bfloat16`` (bf16 product at batch >= 16)."""
        return self._compute_dtype

    def set_compute_dtype(self, dtype: torch.dtype) -> "SparseLinear":
        """Choose the arithmetic of ``forward`` (module doc). Raises ConfigError for another dtype or,
        with bfloat16, a format without a bf16 product (fan-in, BSR) or a bf16 path the machine lacks
        (``SPARSEFORGE_BF16_PATH``).

        Example:
            >>> import torch
            >>> from sparseforge.formats import BitmapWeight
            >>> layer = SparseLinear(BitmapWeight.from_dense(torch.eye(4)))
            >>> layer.set_compute_dtype(torch.bfloat16).kernel_path(64).startswith("bf16:")
            True
        """
        if dtype not in _COMPUTE_DTYPES:
            raise ConfigError(f"compute_dtype must be torch.float32 or torch.bfloat16, got {dtype}")
        if dtype == torch.bfloat16:
            if not supports_bf16(self.weight_format):
                raise ConfigError(
                    f"compute_dtype=torch.bfloat16 needs a {', '.join(bf16_formats())} weight, this layer is {self.format}; "
                    "rebuild it in one of those formats or keep float32"
                )
            if self.weight_format.dtype == torch.int8:
                raise ConfigError("compute_dtype=torch.bfloat16 needs float32 or bfloat16 values; int8 values run "
                                  "the int8 kernels: keep compute_dtype=torch.float32")
            kernels.bf16_path()  # ConfigError now, not at the first batch, if SPARSEFORGE_BF16_PATH is unusable
        self._compute_dtype = dtype
        return self

    # ---- activation precision ----------------------------------------------------------------

    @property
    def activations(self) -> str:
        """``"float"`` (float32 ``x``) or ``"int8"`` (``x`` quantized per token, integer sums; module doc)."""
        return self._activations

    def set_activation_precision(self, activations: str) -> "SparseLinear":
        """Choose how ``forward`` multiplies ``x``: ``"float"`` or ``"int8"`` (module doc). ``"int8"`` needs
        int8 values in the bitmap or N:M format and a layer that does not train; ConfigError otherwise.

        Example:
            >>> import torch
            >>> from sparseforge.formats import NMWeight
            >>> w = torch.tensor([[2., 0., -1., 0.]])
            >>> layer = SparseLinear(NMWeight.from_dense(w, "2:4", values_dtype=torch.int8))
            >>> layer.set_activation_precision("int8").kernel_path(1).startswith("int8:")
            True
        """
        check_activations(activations)
        if activations != "float":
            weight = self.weight_format
            if weight.dtype != torch.int8 or registry.spec_of(weight).kernel_family not in INT8_ACT_FORMATS:
                raise ConfigError(
                    f"activations={activations!r} needs int8 values in the {' or '.join(INT8_ACT_FORMATS)} format; this "
                    f"layer is {self.format} with {str(weight.dtype).removeprefix('torch.')} values (build it with "
                    "dtype=torch.int8, format 'bitmap' or 'nm'), or keep activations='float'"
                )
            if self.trainable:
                raise ConfigError(f"activations={activations!r} is inference-only; call set_trainable(False) first")
        self._activations = activations
        return self

    def kernel_path(self, batch: int) -> str:
        """The path ``forward`` takes for ``batch`` rows: ``"bf16:<amx|avx512_bf16|scalar>"``,
        ``"int8:<path>"`` (int8 activations, :func:`sparseforge.kernels.int8_act_path`) or
        ``"fp32:<avx512|avx2|scalar>"`` (the float32 kernels)."""
        if self._compute_dtype == torch.bfloat16 and batch >= BF16_MIN_BATCH:
            return f"bf16:{kernels.bf16_path()}"
        if self._activations == "int8":
            return f"int8:{kernels.int8_act_path()}"
        return f"fp32:{kernels.isa()}"

    # ---- kernel tiles ------------------------------------------------------------------------

    @property
    def lanes_tile(self) -> "str | LanesTile":
        """``"auto"`` (measured per batch bucket, module doc) or the fixed :class:`LanesTile`."""
        return self._lanes_tile

    @lanes_tile.setter
    def lanes_tile(self, tile: "str | LanesTile") -> None:
        if not (tile == "auto" or isinstance(tile, LanesTile)):
            raise ConfigError(f"lanes_tile must be 'auto' or a sparseforge.measure.lanes_tile.LanesTile, got {tile!r}")
        if isinstance(tile, LanesTile) and tile != RULE and not tiles_apply(self.weight_format):
            raise ConfigError(f"lanes_tile applies to csr, bitmap, nm and bsr layers with float32 / bfloat16 values; "
                              f"this one is {self.format} with {self.weight_format.dtype} values: keep 'auto'")
        self._lanes_tile = tile
        self.__dict__.setdefault("_tiles", {}).clear()

    @property
    def lanes_tiles(self) -> dict[int, LanesTile]:
        """``{batch bucket: tile}`` that ``lanes_tile="auto"`` measured (or read from the cache) so far."""
        return dict(self.__dict__.get("_tiles", {}))

    def _tile(self, weight, rows: int) -> dict[str, int]:
        """The ``col_tile`` / ``block_rows`` keywords of :func:`sparseforge.ops.linear` for ``rows`` batch rows."""
        if rows < LANES_MIN_BATCH:
            return {}
        if isinstance(self._lanes_tile, LanesTile):
            return self._lanes_tile.kwargs()
        if torch.compiler.is_compiling():
            return {}
        tiles = self.__dict__.setdefault("_tiles", {})
        bucket = batch_bucket(rows)
        tile = tiles.get(bucket)
        if tile is None:  # a cache lookup or the rule: a forward never times anything
            tile = tiles[bucket] = tile_for(weight, rows, measure=False)[0]
        return tile.kwargs()

    def measure_lanes_tiles(self, batches: "tuple[int, ...]" = BUCKETS, *, budget_s: float = 0.05) -> dict[int, LanesTile]:
        """Measure (or read from the tuning cache) the tile of every batch bucket of ``batches`` now, so that
        forwards use it (``lanes_tile="auto"``; :func:`~sparseforge.measure.lanes_tile.tile_for`, ``budget_s``
        per candidate). ``compress_`` calls it; a fixed :attr:`lanes_tile` is left alone. Returns :attr:`lanes_tiles`.

        Example:
            >>> import torch
            >>> from sparseforge.formats import BitmapWeight
            >>> layer = SparseLinear(BitmapWeight.from_dense(torch.eye(4)))
            >>> layer.measure_lanes_tiles((64,))  # 16 weights: below MIN_WEIGHTS, the rule
            {64: LanesTile(col_tile=0, block_rows=0)}
        """
        if self._lanes_tile == "auto":
            weight = self.weight_format
            tiles = self.__dict__.setdefault("_tiles", {})
            for b in batches:
                if b >= LANES_MIN_BATCH:
                    tiles[batch_bucket(b)] = tile_for(weight, b, budget_s=budget_s)[0]
        return self.lanes_tiles

    def set_lanes_tiles(self, tiles: "dict[int, LanesTile]") -> "SparseLinear":
        """Use ``tiles`` (``{batch bucket: tile}``, e.g. measured on a layer of the same input width and density)
        for those buckets under ``lanes_tile="auto"``; the other buckets keep their own lookup.
        Raises ConfigError for a bucket that is not one of :data:`~sparseforge.measure.lanes_tile.BUCKETS`."""
        bad = [b for b in tiles if b not in BUCKETS]
        if bad or not all(isinstance(t, LanesTile) for t in tiles.values()):
            raise ConfigError(f"set_lanes_tiles takes {{bucket: LanesTile}} with buckets in {BUCKETS}, got {tiles!r}")
        self.__dict__.setdefault("_tiles", {}).update(tiles)
        return self

    # ---- use ---------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight_format
        bias = self.bias
        if bias is not None and bias.dtype != torch.float32:
            bias = bias.to(torch.float32)
        if self._compute_dtype == torch.bfloat16 and x.is_floating_point() and x.numel() >= BF16_MIN_BATCH * self.in_features:
            return linear_bf16_auto(x, weight, bias).to(x.dtype)  # (..., out); x converted to bf16 inside
        act = self._activations
        tile = {} if act != "float" else self._tile(weight, x.numel() // max(1, self.in_features))
        if x.dtype == torch.float32:
            return ops.linear(x.contiguous(), weight, bias, activations=act, **tile)  # (..., out)
        if not x.is_floating_point():
            self._raise_like_linear(x)
        # the kernels take float32 activations: cast in, and the output back to x.dtype
        return ops.linear(x.to(torch.float32).contiguous(), weight, bias, activations=act, **tile).to(x.dtype)

    def _raise_like_linear(self, x: Tensor) -> None:
        """Raise the error ``nn.Linear`` raises for a non-floating ``x`` (torch's own, with a stride-0 weight)."""
        dtype = self.weight_format.dtype  # the dtype of the equivalent nn.Linear (to_linear)
        w0 = torch.empty(1, 1, dtype=dtype).expand(self.out_features, self.in_features)  # (out, in), no memory
        b0 = None if self.bias is None else torch.empty(1, dtype=dtype).expand(self.out_features)  # (out,)
        torch.nn.functional.linear(x, w0, b0)
        raise TypeError(f"SparseLinear needs a floating-point input, got {x.dtype}")

    def to_dense(self) -> Tensor:
        """The dense (out, in) weight with pruned entries ``+0.0`` (materialises it)."""
        return self.weight_format.to_dense()

    def to_linear(self) -> nn.Linear:
        """A dense ``nn.Linear`` with the same weight and bias."""
        weight = self.to_dense()
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, dtype=weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(weight)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    @property
    def nnz(self) -> int:
        """Stored entries (N:M padding zeros included)."""
        return self.weight_format.nnz

    @property
    def sparsity(self) -> float:
        """Fraction of the (out, in) weight not stored."""
        return 1.0 - self.nnz / max(1, self.in_features * self.out_features)

    def extra_repr(self) -> str:
        fmt = registry.label(self.weight_format)
        dtype = str(self.weight_format.dtype).removeprefix("torch.")
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"format={fmt}, values={dtype}, nnz={self.nnz}, sparsity={self.sparsity:.3f}"
            + (f", compute=bfloat16 ({self.kernel_path(BF16_MIN_BATCH)} from batch {BF16_MIN_BATCH})"
               if self._compute_dtype == torch.bfloat16 else "")
            + (f", activations={self._activations}" if self._activations != "float" else "")
        )
