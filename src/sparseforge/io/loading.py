"""Load a model directory: a plain Hugging Face checkpoint or a sparseforge one, dense or sparse.

* :func:`load`: bit-exact dense model; a compressed checkpoint is decompressed and handed to
  ``from_pretrained(None, config=..., state_dict=...)`` (built on the meta device, no random init);
* :func:`load_sparse`: the pruned layers stay compressed, as :class:`~sparseforge.nn.SparseLinear`
  built straight from the stored buffers (their dense matrices are never built).

Both take the model class from ``config.json``'s ``architectures`` (:func:`model_class`) and attach
``generation_config.json`` the same way. The on-disk layout is written by :mod:`sparseforge.io.checkpoint` and read by :mod:`sparseforge.io.layout`.
transformers is imported only when a model is loaded (``pip install 'sparseforge[hf]'``).

Example:
    >>> import sparseforge as sf
    >>> model = sf.load("pruned-2of4")                      # doctest: +SKIP
    >>> model = sf.load("pruned-2of4", sparse=True)         # doctest: +SKIP
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from sparseforge.errors import ConfigError, ModelError
from sparseforge.formats.rule import LOAD_FORMATS, load_format
from sparseforge.io.hf import import_transformers
from sparseforge.io.layout import (
    CONFIG_NAME, is_compressed, load_state_dict_compressed, model_dir, read_sparsity_config, weight_files,
)
from sparseforge.io.scales import add_scale_placeholders, attach_scales, pop_scales, stored_scale_shapes
from sparseforge.quant.config import SCALE_BUFFER
from sparseforge.io.validation import architecture_class, read_json, validate_checkpoint
from sparseforge.layers import is_linear, set_module
from sparseforge.nn.sparse_linear import SparseLinear

__all__ = ["load", "load_sparse", "model_class", "skeleton"]


def model_class(path: Path, transformers) -> type:
    """The transformers class named by ``config.json``'s ``architectures[0]`` in model directory ``path``
    (checked: a transformers ``PreTrainedModel`` subclass, see :func:`~sparseforge.io.validation.architecture_class`)."""
    return architecture_class(read_json(path / CONFIG_NAME), path / CONFIG_NAME, transformers)


def skeleton(path: "str | Path"):
    """The model of checkpoint ``path`` built on the meta device (no memory): the parameter shapes
    and module types its tensors must fit (:func:`sparseforge.io.validation.validate_checkpoint`).
    ModelError when ``architectures`` names no transformers model class or the config cannot build it."""
    p = model_dir(path)
    transformers = import_transformers()
    cls = model_class(p, transformers)
    try:
        config = transformers.AutoConfig.from_pretrained(str(p), local_files_only=True)
        with torch.device("meta"):
            model = cls(config)
    except (ValueError, TypeError, KeyError, AttributeError, OSError) as exc:
        raise ModelError(f"{p / CONFIG_NAME}: transformers cannot build {cls.__name__} from it: {exc}") from None
    add_scale_placeholders(model, stored_scale_shapes(weight_files(p)))  # quantized layers' scales
    return model


def _with_generation_config(model, path: Path, transformers):
    """``model`` with the directory's ``generation_config.json`` attached when it has one and can generate."""
    if (path / "generation_config.json").is_file() and model.can_generate():
        model.generation_config = transformers.GenerationConfig.from_pretrained(str(path))
    return model


def _apply_activation(model, block: "dict[str, Any] | None", path: Path, activation: bool):
    """``model`` with the thresholds of the checkpoint's ``activation`` section applied (its layers become
    :class:`~sparseforge.activation.SparseInputLinear` / CATS MLPs; checked against the model first)."""
    from sparseforge.activation.relufy import restore_mlp_variant_
    from sparseforge.activation.storage import apply_activation_layers_

    restore_mlp_variant_(model)  # dReLU MLPs recorded in the config: part of the model's function
    section = (block or {}).get("activation")
    if section is None or not activation:
        return model

    apply_activation_layers_(model, section["layers"], str(path / CONFIG_NAME))
    return model


def load(path: "str | Path", dtype: "torch.dtype | str | None" = None, sparse: bool = False, format: "str | None" = None,
         activation: bool = True):
    """Load a dense Hugging Face checkpoint or a sparseforge one (compressed or not), bit-exact.

    The class comes from ``config.architectures[0]``. Compressed weights are decompressed and
    handed to ``from_pretrained(None, config=..., state_dict=...)``, which builds the model on the
    meta device (no random initialisation). ``dtype=None`` keeps the stored dtype.

    ``sparse=True`` (compressed checkpoints only) keeps the pruned layers sparse instead: they come
    back as :class:`~sparseforge.nn.SparseLinear` running the native kernels, built straight from the
    stored buffers without ever materialising the dense weights (:func:`load_sparse`); ``format`` is
    its ``format`` (``"rule"``, the default: bitmap layers of >= 85% sparsity run as CSR; ``"stored"``:
    every layer as stored).

    ``activation=True`` (default) restores the activation sparsity the checkpoint records
    (``sparsity_config.activation``, written when the saved model had
    :class:`~sparseforge.activation.SparseInputLinear` layers or CATS MLPs): those layers come back
    sparse-input with their thresholds, so the loaded model runs as the saved one did.
    ``activation=False`` loads them as plain ``nn.Linear`` / MLP modules.
    """
    p = model_dir(path)
    if format is not None and not sparse:
        raise ConfigError("format= chooses the sparse layers' format; it needs sparse=True")
    if sparse:
        if dtype is not None:
            raise ConfigError("sparse=True loads the values in their stored dtype; drop dtype= (or load dense)")
        return load_sparse(p, format or "rule", activation=activation)
    block = read_sparsity_config(p)
    transformers = import_transformers()
    if isinstance(dtype, str) and not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ConfigError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16' or 'float16'")
    cls = model_class(p, transformers)
    if not is_compressed(block):
        validate_checkpoint(p)  # safetensors headers and the info block, before transformers reads them
        model = cls.from_pretrained(str(p), dtype=dtype or "auto", local_files_only=True)
        _attach_stored_scales(model, p)
        return _apply_activation(model, block, p, activation)
    dense, int8_scales = {}, {}
    for name, value in load_state_dict_compressed(p, skeleton(p)).items():  # validated against the model
        if not isinstance(value, torch.Tensor):  # a packed format object
            if getattr(value, "scales", None) is not None:  # int8 values: the layer comes back quantized
                int8_scales[name.removesuffix(".weight") + "." + SCALE_BUFFER] = value.scales
            mat = value.to_dense()  # (out, in), dequantized
            value = mat.t().contiguous() if block["layers"].get(name, {}).get("transposed") else mat
        dense[name] = value
    for alias, canonical in (block.get("tied") or {}).items():
        dense[alias] = dense[canonical]
    scales = pop_scales(dense, stored_scale_shapes(weight_files(p)))  # buffers transformers does not declare
    scales.update(int8_scales)  # weight = q * scale with its weight_scale buffer, as sparseforge.quant leaves it
    config = transformers.AutoConfig.from_pretrained(str(p), local_files_only=True)
    model, info = cls.from_pretrained(None, config=config, state_dict=dense, dtype=dtype or "auto",
                                      output_loading_info=True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise ModelError(f"{p}: the stored weights do not match {cls.__name__}: {bad}; the checkpoint is corrupt or incomplete")
    attach_scales(model, scales)
    return _apply_activation(_with_generation_config(model, p, transformers), block, p, activation)


def _attach_stored_scales(model, path: Path) -> None:
    """Register the quantization scales stored in a dense checkpoint (transformers skips them; those
    the model class declares itself it has loaded already)."""
    from safetensors import safe_open

    files = weight_files(path)
    state = model.state_dict()
    shapes = {k: v for k, v in stored_scale_shapes(files).items() if k not in state}
    scales = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            scales.update({k: f.get_tensor(k) for k in f.keys() if k in shapes})
    attach_scales(model, scales)


@contextmanager
def _linear_weights_on_meta() -> Iterator[None]:
    """While building a skeleton: ``nn.Linear`` parameters go to the meta device (no memory), while
    everything else (embeddings, norms, non-persistent buffers such as RoPE ``inv_freq``) is built
    normally on the CPU, so those buffers get their real values from the model's own code."""
    original = nn.Linear.__init__

    def init(self, in_features, out_features, bias=True, device=None, dtype=None):
        original(self, in_features, out_features, bias=bias, device=device or "meta", dtype=dtype)

    nn.Linear.__init__ = init
    try:
        yield
    finally:
        nn.Linear.__init__ = original


def load_sparse(path: "str | Path", format: str = "rule", activation: bool = True) -> nn.Module:
    """A transformers model from a compressed sparseforge checkpoint, its pruned layers as SparseLinear.

    The compressed weights (:func:`sparseforge.io.layout.load_state_dict_compressed`) go straight
    into SparseLinear layers; their dense matrices are never built. ``format="rule"`` (default) runs
    bitmap layers of at least 85% sparsity (:data:`~sparseforge.formats.rule.CSR_FROM`) as CSR,
    converted from the bits (:meth:`~sparseforge.formats.csr.CSRWeight.from_bitmap`; CSR is 1.5-2.6x
    faster there at batch 1, ``docs/benchmarks.md``) and keeps N:M, bitmap, fan-in and BSR layers
    otherwise; ``format="stored"`` keeps every layer in its stored format.
    Exception: a compressed tensor tied to a non-linear module (an embedding tied to ``lm_head``
    that the saver compressed because of its zero padding row) is decompressed for that module.
    The skeleton is built with every ``nn.Linear`` parameter on the meta device; the remaining dense
    tensors are assigned (not copied) from the checkpoint. Known cost: transformers ``Conv1D``
    (GPT-2) weights are allocated dense in the skeleton before being replaced. ``activation``: as
    :func:`load`; a layer both packed and activation-sparse (a ``"linear"`` entry) becomes a
    :class:`~sparseforge.activation.ColumnSparseLinear`, its format converted to the column layout here.
    """
    if format not in LOAD_FORMATS:
        raise ConfigError(f"load format must be one of {', '.join(LOAD_FORMATS)}, got {format!r}")
    p = model_dir(path)
    block = read_sparsity_config(p)
    if not is_compressed(block):
        raise ModelError(f"{p} is not a compressed sparseforge checkpoint; load it with sparseforge.load(path) and call compress_(model)")
    transformers = import_transformers()
    cls = model_class(p, transformers)
    config = transformers.AutoConfig.from_pretrained(str(p), local_files_only=True)
    with _linear_weights_on_meta(), torch.no_grad():
        model = cls(config)
    shapes = stored_scale_shapes(weight_files(p))
    add_scale_placeholders(model, shapes)
    state = load_state_dict_compressed(p, model)  # validated against this skeleton, as load validates
    scales = pop_scales(state, shapes)
    modules = dict(model.named_modules())
    layers = block.get("layers", {})
    # a compressed tensor tied to a non-linear owner (e.g. an embedding tied to lm_head) is needed
    # dense by that owner: it, and every alias of it, is decompressed once (as load does)
    needs_dense = {id(v) for n, v in state.items()
                   if not isinstance(v, torch.Tensor) and not is_linear(modules.get(n.rsplit(".", 1)[0], nn.Identity()))}
    dense: dict[str, torch.Tensor] = {}
    decompressed: dict[int, torch.Tensor] = {}
    runs_as: dict[int, Any] = {}  # id(stored object) -> the object its layers run; tied layers share one conversion
    sparse_prefixes = []
    for name, value in state.items():
        if isinstance(value, torch.Tensor):
            dense[name] = value
        elif id(value) in needs_dense:
            if id(value) not in decompressed:
                canonical = next(n for n, v in state.items() if v is value and n in layers)
                mat = value.to_dense()  # (out, in)
                decompressed[id(value)] = mat.t().contiguous() if layers[canonical].get("transposed") else mat
            dense[name] = decompressed[id(value)]
        else:
            owner = name.rsplit(".", 1)[0]
            if id(value) not in runs_as:
                runs_as[id(value)] = load_format(value, format)
            set_module(model, owner, SparseLinear(runs_as[id(value)], state.get(f"{owner}.bias")))
            sparse_prefixes.append(owner + ".")
            if getattr(value, "scales", None) is not None:  # int8 values: the layer keeps its quantization scales
                scales[f"{owner}.{SCALE_BUFFER}"] = value.scales
    missing, unexpected = model.load_state_dict(dense, strict=False, assign=True)
    attach_scales(model, scales)
    missing = [k for k in missing if not any(k.startswith(s) for s in sparse_prefixes) and k not in scales]
    if unexpected or missing:
        raise ModelError(f"{p}: the stored weights do not match {cls.__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    on_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if on_meta:
        raise ModelError(f"{p}: tensors {on_meta[:5]} were not in the checkpoint; it is incomplete")
    return _apply_activation(_with_generation_config(model, p, transformers).eval(), block, p, activation)
