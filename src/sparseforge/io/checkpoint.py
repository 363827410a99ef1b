"""Save sparse Hugging Face models, dense or compressed (``save_pretrained`` style).

A compressed checkpoint is a normal model directory whose ``model.safetensors`` stores every pruned
weight in :class:`~sparseforge.formats.BitmapWeight`, :class:`~sparseforge.formats.NMWeight`,
:class:`~sparseforge.formats.FanInWeight` or :class:`~sparseforge.formats.BSRWeight` form (the last
two for layers pruned with a recorded ``FanIn`` / ``Block(h, w)`` pattern) and whose ``config.json``
carries a ``"sparsity_config"`` block describing them. The layout is
specified byte by byte in ``docs/checkpoint-format.md``. Writes are atomic: everything goes to a
temporary directory next to ``out_dir`` that replaces it atomically at the end, and an interrupted
save is finished or rolled back by the next save or load (:mod:`sparseforge.io.atomic_dir`).

Plain ``transformers`` cannot read a compressed checkpoint (it would report the pruned weights as
missing); use :func:`sparseforge.io.loading.load`. ``compressed=False`` writes a plain checkpoint
that transformers loads. Reading the layout back is :mod:`sparseforge.io.layout`.

Example:
    >>> from sparseforge.io.checkpoint import save_pretrained
    >>> from sparseforge.io.layout import checkpoint_sizes
    >>> from sparseforge.io.loading import load
    >>> save_pretrained(model, "out", sparsity_config={"method": "wanda", "pattern": "2:4",
    ...                 "sparsity": 0.5, "targets": None, "ignore": []})   # doctest: +SKIP
    >>> model = load("out")                                                 # doctest: +SKIP
    >>> checkpoint_sizes("out")["ratio"]                                    # doctest: +SKIP
    0.53
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from sparseforge.config import name_matches
from sparseforge.errors import ConfigError, ModelError, SparseforgeError
from sparseforge.formats import registry
from sparseforge.formats.rule import structured_format
from sparseforge.io.atomic_dir import recover, replace_dir
from sparseforge.io.layout import BLOCK, CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME, dtype_name
from sparseforge.io.validation import ACTIVATION_VERSION
from sparseforge.io.validation import tensor_checksums
from sparseforge.layers import linear_weights
from sparseforge.masks import satisfies
from sparseforge.patterns import NM, Block, FanIn, parse

__all__ = ["save_pretrained"]

# format_version written: FORMAT_VERSION by every compressed save (the layout with the CRC-32 of every
# tensor in sparsity_config.checksums, verified at load; from 4 on: int8 values with float32 row scales,
# and the activation section); 1 for a dense checkpoint's info block, or ACTIVATION_VERSION (4) when it
# holds the activation section (the thresholds of activation-sparse layers). Older compressed versions
# (1: bitmap / N:M, 2: + fan-in, BSR) carry no checksums and still load; a format's
# since_version (formats.registry) is the first format_version that may store it, and a reader refuses a
# layer whose format is newer than its checkpoint's version. The stored formats and classes: formats.registry.
_FORMAT_KEYS = ("format_version", "format", "layers", "tied", "activation")  # written by us, never inherited


# ---------------------------------------------------------------------------------------- save


def save_pretrained(
    model,
    out_dir: "str | Path",
    *,
    tokenizer=None,
    compressed: bool = True,
    sparsity_config: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (a transformers ``PreTrainedModel``) and ``tokenizer`` to ``out_dir``.

    Args:
        sparsity_config: ``{"method", "pattern", "sparsity", "targets", "ignore", ...}``.
            ``targets`` lists the pruned parameter names; ``None`` means every 2-D weight of an
            ``nn.Linear`` / ``Conv1D`` with some zeros (minus ``ignore`` glob patterns, matched
            against parameter and module names). ``None`` for the whole dict reuses the block of a
            model loaded from a sparseforge checkpoint (``model.config.sparsity_config``), else ``{}``.
        compressed: pack pruned weights (N:M format when ``pattern`` is N:M and the layer obeys it;
            BSR / fan-in when ``pattern`` is ``Block(h, w)`` / ``FanIn`` and the layer's zeros obey it
            (whole tiles / the same count in every row), values float32 or bfloat16; else bitmap);
            ``False`` writes a plain transformers checkpoint plus the info block.
        overwrite: replace an existing non-empty ``out_dir`` (only if it holds a ``config.json``).
    Returns:
        ``Path(out_dir)``.
    """
    out = Path(out_dir)
    recover(out)  # finish or roll back an earlier save of out_dir that was killed half-way
    _check_out_dir(out, overwrite)
    info = _caller_info(model, sparsity_config)
    from sparseforge.activation.plain import plain_layers
    from sparseforge.activation.storage import activation_layers

    activation = activation_layers(model)
    with replace_dir(out) as tmp, plain_layers(model):  # weights under the unmodified model's names
        if compressed:
            _save_compressed(model, tmp, info, activation)
        else:
            model.save_pretrained(tmp)
            wanted = info or sparsity_config is not None or activation
            _write_block(tmp, _with_activation(_block(model, info, layers=None), activation) if wanted else None)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {out} exists and is not a directory; choose another out_dir")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"output directory {out} exists and is not empty; pass overwrite=True to replace it")
        if not (out / CONFIG_NAME).is_file():
            raise ConfigError(
                f"refusing to replace {out}: it is not empty and holds no config.json, so it is not a model "
                "directory; choose an empty or new out_dir"
            )


def _caller_info(model, sparsity_config: dict[str, Any] | None) -> dict[str, Any]:
    if sparsity_config is None:
        sparsity_config = getattr(getattr(model, "config", None), BLOCK, None) or {}
    if not isinstance(sparsity_config, dict):
        raise ConfigError(f"sparsity_config must be a dict, got {type(sparsity_config).__name__}")
    info = {k: copy.deepcopy(v) for k, v in sparsity_config.items() if k not in _FORMAT_KEYS}
    try:
        json.dumps(info)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"sparsity_config must be JSON-serializable (str, numbers, lists, dicts): {exc}") from exc
    if info.get("pattern") is not None:
        info["pattern"] = str(parse(info["pattern"]))
    return info


def _aliases(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """Tied tensors: ``{alias: canonical}``, the canonical name being the first in state order."""
    seen: dict[tuple, str] = {}
    aliases = {}
    for name, t in state.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
    return aliases


def _resolve_targets(model, state, aliases, info) -> dict[str, bool]:
    """``{canonical param name: transposed}`` of the weights to compress, in state order."""
    linear = linear_weights(model)
    ignore = info.get("ignore") or []
    targets = info.get("targets")
    if targets is None:
        chosen = [
            n for n, t in state.items()
            if n in linear and t.dim() == 2 and t.is_floating_point()
            and (bool((t == 0).any()) or _scale_key(n) in state)
            and not any(name_matches(n, p) or name_matches(n.rsplit(".", 1)[0], p) for p in ignore)
        ]
    else:
        if isinstance(targets, str):
            raise ConfigError("sparsity_config['targets'] must be a list of parameter names, not a string")
        for n in targets:
            if n not in state:
                hint = f"; did you mean '{n}.weight'?" if f"{n}.weight" in state else ""
                raise ConfigError(f"target {n!r} is not a parameter of the model{hint}")
            if state[n].dim() != 2 or not state[n].is_floating_point():
                raise ConfigError(f"target {n!r} has shape {tuple(state[n].shape)} / {state[n].dtype}: only 2-D float weights are compressed")
        chosen = list(targets)
    chosen = {aliases.get(n, n) for n in chosen}
    return {n: linear.get(n, False) for n in state if n in chosen}


def _scale_key(name: str) -> str:
    """``a.b.weight`` -> ``a.b.weight_scale``: the (out,) scales :mod:`sparseforge.quant` registers on a
    quantized linear layer."""
    return f"{name.rsplit('.', 1)[0]}.weight_scale"


def _encode(mat: torch.Tensor, pattern, scales: "torch.Tensor | None" = None):
    """Compress a pruned (out, in) matrix: N:M when the pattern is N:M and the matrix obeys it; BSR /
    fan-in when the pattern is ``Block`` / ``FanIn``, the zeros obey it (whole tiles / equal row
    counts) and the values are float32 or bfloat16; else bitmap. With ``scales`` (a quantized
    layer's ``weight_scale``), int8 values on that grid in N:M or bitmap."""
    if scales is not None:
        quant = {"values_dtype": torch.int8, "scales": scales}
        if isinstance(pattern, NM) and mat.shape[1] % pattern.m == 0 and satisfies(mat != 0, pattern):
            return registry.get("nm").build(mat, pattern, None, **quant)
        return registry.get("bitmap").build(mat, None, None, **quant)
    if isinstance(pattern, NM) and mat.shape[1] % pattern.m == 0 and satisfies(mat != 0, pattern):
        return registry.get("nm").build(mat, pattern, None)
    if isinstance(pattern, (Block, FanIn)) and mat.dtype in (torch.float32, torch.bfloat16):
        found = structured_format(mat, pattern)  # the rule compress_(format="rule") uses
        if found is not None:
            return registry.get(found[0]).build(mat, found[1], None)
    return registry.get("bitmap").build(mat, None, None)


def _layer_pattern(obj) -> "str | None":
    """The ``layers[name]["pattern"]`` entry: ``N:M``, ``blockHxW`` or ``fanin<k>``; none for bitmap."""
    pattern = registry.spec_of(obj).pattern_of(obj)
    return None if pattern is None else str(pattern)


def _block(model, info, layers: dict[str, dict] | None) -> dict[str, Any]:
    """The config.json block. ``layers=None``: dense checkpoint, layers described from the model."""
    block = {"format_version": 1, **info}
    if layers is None:
        state = model.state_dict()
        targets = _resolve_targets(model, state, _aliases(state), info)
        layers = {}
        for name, transposed in targets.items():
            t = state[name]
            shape = list(t.t().shape if transposed else t.shape)
            layers[name] = {"format": "dense", "shape": shape, "dtype": dtype_name(t.dtype),
                                "nnz": int((t != 0).sum()), "transposed": transposed}
        block["format"] = "dense"
    else:  # the most structured format of any layer (lowest rank): nm, then bsr, fanin, bitmap
        used = [registry.get(v["format"]) for v in layers.values()]
        block["format"] = min(used, key=lambda s: s.rank).name if used else "bitmap"
        block["format_version"] = FORMAT_VERSION  # 3: checksums of every tensor; 4: + int8 values and scales, activation
    block["targets"] = list(layers)
    block["layers"] = layers
    return block


# ---- activation sparsity (format_version ACTIVATION_VERSION): one optional section ----------------------


def _with_activation(block: dict[str, Any], activation: dict[str, dict]) -> dict[str, Any]:
    """``block`` with ``activation: {"layers": ...}`` (the thresholds of the model's activation-sparse
    layers, :func:`sparseforge.activation.storage.activation_layers`) and the version that holds it."""
    if activation:
        block["activation"] = {"layers": activation}
        block["format_version"] = max(block["format_version"], ACTIVATION_VERSION)
    return block


# ---------------------------------------------------------------------------------------- compressed


def _save_compressed(model, tmp: Path, info: dict[str, Any], activation: dict[str, dict]) -> None:
    from safetensors.torch import save_file

    state = model.state_dict()
    aliases = _aliases(state)
    targets = _resolve_targets(model, state, aliases, info)
    pattern = parse(info["pattern"]) if info.get("pattern") is not None else None
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    storages: set[int] = set()
    scale_keys = {_scale_key(n): n for n in targets if _scale_key(n) in state}
    for key in state:
        if key.endswith(".weight_scale") and key not in scale_keys:
            raise ConfigError(f"{key} belongs to a quantized layer whose weight is not compressed; add "
                              f"{key.removesuffix('_scale')} to the targets (int8 values are stored packed only)")
    for name, t in state.items():
        if name in aliases or name in scale_keys:
            continue
        if name not in targets:
            t = t.detach().to("cpu").contiguous()
            if t.untyped_storage().data_ptr() in storages:  # shares memory with another tensor
                t = t.clone()
            storages.add(t.untyped_storage().data_ptr())
            tensors[name] = t
            continue
        transposed = targets[name]
        mat = t.detach().to("cpu")
        mat = mat.t() if transposed else mat  # (out, in)
        scales = state.get(_scale_key(name))
        try:
            enc = _encode(mat, pattern, None if scales is None else scales.detach().to("cpu"))
        except SparseforgeError as exc:
            raise type(exc)(f"layer {name}: {exc}") from None
        layers[name] = {"format": registry.spec_of(enc).name, "shape": list(enc.shape),
                        "dtype": dtype_name(enc.dtype), "nnz": int((mat != 0).sum()), "transposed": transposed}
        if _layer_pattern(enc) is not None:
            layers[name]["pattern"] = _layer_pattern(enc)
        for key, buf in enc.state_dict(prefix=f"{name}.").items():
            if key in state:
                raise ModelError(f"cannot compress {name}: the model already has a tensor named {key}")
            tensors[key] = buf.contiguous()
    block = _with_activation(_block(model, info, layers=layers), activation)
    if aliases:
        block["tied"] = dict(aliases)
    block["checksums"] = tensor_checksums(tensors)
    save_file(tensors, str(tmp / WEIGHTS_NAME),
              metadata={"format": "pt", "sparseforge_format_version": str(block["format_version"])})
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    config.dtype = dtype_name(model.dtype)
    config.save_pretrained(tmp)
    _write_block(tmp, block)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(tmp)


def _write_block(directory: Path, block: dict[str, Any] | None) -> None:
    path = directory / CONFIG_NAME
    data = json.loads(path.read_text(encoding="utf-8"))
    data.pop(BLOCK, None)
    if block is not None:
        data[BLOCK] = block
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
