"""Save sparse Hugging Face models, dense or compressed (``save_pretrained`` style), and read the layout.

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
that transformers loads.

Example:
    >>> from sparseforge.io.checkpoint import save_pretrained, checkpoint_sizes
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
import os
from pathlib import Path
from typing import Any

import torch

from sparseforge.io.atomic_dir import recover, replace_dir
from sparseforge.io.validation import (
    FORMAT_VERSION,
    architecture_class,
    check_block,
    read_json,
    tensor_checksums,
    validate_checkpoint,
)
from sparseforge.io.validation import weight_files as checked_weight_files
from sparseforge.config import name_matches
from sparseforge.errors import ConfigError, ModelError
from sparseforge.formats import BitmapWeight, BSRWeight, FanInWeight, NMWeight
from sparseforge.formats.memory import hugepage_backed
from sparseforge.formats.rule import structured_format
from sparseforge.layers import linear_weights
from sparseforge.masks import satisfies
from sparseforge.io.hf import import_transformers
from sparseforge.io.safetensors_header import read_header
from sparseforge.patterns import NM, Block, FanIn, parse

__all__ = [
    "FORMAT_VERSION",
    "save_pretrained",
    "load_state_dict_compressed",
    "read_sparsity_config",
    "checkpoint_sizes",
    "weight_files",
    "read_safetensors_header",
    "model_dir",
    "is_compressed",
]

# FORMAT_VERSION (sparseforge.io.validation): bump on any incompatible change of the on-disk layout.
# format_version 3: compressed checkpoints carry the CRC-32 of every tensor (sparsity_config.checksums),
# verified at load. Versions 1 (bitmap / N:M layers) and 2 (+ fan-in, BSR) have none and still load.
PACKED = {"nm": NMWeight, "bsr": BSRWeight, "fanin": FanInWeight, "bitmap": BitmapWeight}  # by priority
PACKED_TYPES = tuple(PACKED.values())
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
BLOCK = "sparsity_config"
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_FORMAT_KEYS = ("format_version", "format", "layers", "tied")  # written by us, never inherited


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
    recover(out)
    _check_out_dir(out, overwrite)
    info = _caller_info(model, sparsity_config)
    with replace_dir(out) as tmp:
        if compressed:
            _save_compressed(model, tmp, info)
        else:
            model.save_pretrained(tmp)
            _write_block(tmp, _block(model, info, layers=None) if info or sparsity_config is not None else None)
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
            if n in linear and t.dim() == 2 and t.is_floating_point() and bool((t == 0).any())
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


def _encode(mat: torch.Tensor, pattern) -> "BitmapWeight | NMWeight | FanInWeight | BSRWeight":
    """Compress a pruned (out, in) matrix: N:M when the pattern is N:M and the matrix obeys it; BSR /
    fan-in when the pattern is ``Block`` / ``FanIn``, the zeros obey it (whole tiles / equal row
    counts) and the values are float32 or bfloat16; else bitmap."""
    if isinstance(pattern, NM) and mat.shape[1] % pattern.m == 0 and satisfies(mat != 0, pattern):
        return NMWeight.from_dense(mat, pattern)
    if isinstance(pattern, (Block, FanIn)) and mat.dtype in (torch.float32, torch.bfloat16):
        found = structured_format(mat, pattern)  # the rule compress_(format="rule") uses
        if found is not None:
            return BSRWeight.from_dense(mat, found[1]) if found[0] == "bsr" else FanInWeight.from_dense(mat)
    return BitmapWeight.from_dense(mat)


def format_name(obj) -> str:
    """``"bitmap"``, ``"nm"``, ``"fanin"`` or ``"bsr"`` for a packed weight object."""
    return next(name for name, cls in PACKED.items() if isinstance(obj, cls))


def _layer_pattern(obj) -> "str | None":
    """The ``layers[name]["pattern"]`` entry: ``N:M``, ``blockHxW`` or ``fanin<k>``; none for bitmap."""
    if isinstance(obj, NMWeight):
        return str(obj.pattern)
    if isinstance(obj, BSRWeight):
        return str(obj.block)
    if isinstance(obj, FanInWeight):
        return str(FanIn(obj.k)) if obj.k else None
    return None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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
            layers[name] = {"format": "dense", "shape": shape, "dtype": _dtype_name(t.dtype),
                                "nnz": int((t != 0).sum()), "transposed": transposed}
        block["format"] = "dense"
    else:  # the most structured format of any layer: nm, then bsr, fanin, bitmap
        used = {v["format"] for v in layers.values()}
        block["format"] = next((f for f in PACKED if f in used), "bitmap")
        block["format_version"] = FORMAT_VERSION
    block["targets"] = list(layers)
    block["layers"] = layers
    return block


def _save_compressed(model, tmp: Path, info: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    state = model.state_dict()
    aliases = _aliases(state)
    targets = _resolve_targets(model, state, aliases, info)
    pattern = parse(info["pattern"]) if info.get("pattern") is not None else None
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    storages: set[int] = set()
    for name, t in state.items():
        if name in aliases:
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
        enc = _encode(mat, pattern)
        layers[name] = {"format": format_name(enc), "shape": list(enc.shape),
                        "dtype": _dtype_name(enc.dtype), "nnz": int((mat != 0).sum()), "transposed": transposed}
        if _layer_pattern(enc) is not None:
            layers[name]["pattern"] = _layer_pattern(enc)
        for key, buf in enc.state_dict(prefix=f"{name}.").items():
            if key in state:
                raise ModelError(f"cannot compress {name}: the model already has a tensor named {key}")
            tensors[key] = buf.contiguous()
    block = _block(model, info, layers=layers)
    if aliases:
        block["tied"] = dict(aliases)
    block["checksums"] = tensor_checksums(tensors)
    save_file(tensors, str(tmp / WEIGHTS_NAME),
              metadata={"format": "pt", "sparseforge_format_version": str(block["format_version"])})
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    config.dtype = _dtype_name(model.dtype)
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


# ---------------------------------------------------------------------------------------- read


def model_dir(path: "str | Path") -> Path:
    """``Path(path)`` after checking it holds config.json and weights; ModelError otherwise."""
    p = Path(path)
    recover(p)
    if not p.exists():
        raise ModelError(f"model path {p} does not exist")
    if not p.is_dir() or not (p / CONFIG_NAME).is_file():
        raise ModelError(f"{p} is not a model directory: it has no config.json")
    if not any((p / f).is_file() for f in _WEIGHT_FILES):
        raise ModelError(f"{p} is not a model directory: it has no weights ({' / '.join(_WEIGHT_FILES)})")
    return p


def read_sparsity_config(path: "str | Path") -> dict[str, Any] | None:
    """The ``sparsity_config`` block of a model directory (``None`` for a plain checkpoint)."""
    p = model_dir(path)
    data = read_json(p / CONFIG_NAME)
    if not isinstance(data, dict):
        raise ModelError(f"{p / CONFIG_NAME}: must be a JSON object, got {type(data).__name__}")
    block = data.get(BLOCK)
    return None if block is None else check_block(block, p / CONFIG_NAME)


def is_compressed(block: dict[str, Any] | None) -> bool:
    """Whether a ``sparsity_config`` block (:func:`read_sparsity_config`) describes packed weights."""
    return block is not None and block.get("format") in PACKED


def weight_files(path: "str | Path") -> list[Path]:
    """The safetensors weight files of a model directory (single file or shards)."""
    return checked_weight_files(model_dir(path))


def read_safetensors_header(file: Path) -> dict[str, dict[str, Any]]:
    """``{tensor name: {"dtype", "shape", "data_offsets"}}`` from a safetensors header (no data read),
    checked by :func:`sparseforge.io.safetensors_header.read_header` (ModelError when corrupt)."""
    return {name: {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.begin, e.end]}
            for name, e in read_header(file).tensors.items()}


def skeleton(path: "str | Path"):
    """The model of checkpoint ``path`` built on the meta device (no memory): the shapes and module
    types its tensors must fit. ModelError when ``architectures`` names no transformers model class."""
    p = model_dir(path)
    transformers = import_transformers()
    cls = architecture_class(read_json(p / CONFIG_NAME), p / CONFIG_NAME, transformers)
    try:
        config = transformers.AutoConfig.from_pretrained(str(p), local_files_only=True)
        with torch.device("meta"):
            return cls(config)
    except (ValueError, TypeError, KeyError, AttributeError, OSError) as exc:
        raise ModelError(f"{p / CONFIG_NAME}: transformers cannot build {cls.__name__} from it: {exc}") from None


def _load_files(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(str(file)))
        except (SafetensorError, OSError) as exc:  # after read_header's checks: I/O errors, races
            raise ModelError(f"{file}: cannot be loaded: {exc}") from None
    return state


def load_state_dict_compressed(path: "str | Path", model=None) -> dict[str, "torch.Tensor | BitmapWeight | NMWeight | FanInWeight | BSRWeight"]:
    """Every tensor of a checkpoint; pruned weights stay compressed.

    The directory is validated first (:func:`sparseforge.io.validation.validate_checkpoint`,
    checksums included); ``model`` is the skeleton its tensors must fit (default: built on the meta
    device from ``config.json`` for compressed checkpoints), so a damaged or inconsistent checkpoint
    is a ModelError here, never later.

    Compressed buffers of 4 MB and more are moved into transparent huge pages (one at a time, so the
    peak stays one buffer above the checkpoint's size), like those built by ``from_dense``: the batch
    kernels stream hundreds of rows at once and miss the TLB less with 2 MB pages.

    Compressed objects always hold the ``(out_features, in_features)`` matrix; for layers whose
    ``layers[name]["transposed"]`` is true (transformers ``Conv1D``) the parameter is
    ``obj.to_dense().t()``. Tied aliases map to the same object as their canonical name.
    """
    p = model_dir(path)
    block = read_sparsity_config(p)
    if model is None and is_compressed(block):
        model = skeleton(p)
    checked = validate_checkpoint(p, model)
    state: dict[str, Any] = _load_files([h.file for h in checked.headers])
    if not checked.compressed:
        return state
    block = checked.block
    for name, layer in checked.layers.items():
        fmt, shape = layer["format"], tuple(layer["shape"])
        for field in PACKED[fmt].FIELDS:  # large buffers into huge pages, as from_dense does (formats/memory.py);
            key = f"{name}.{PACKED[fmt].KEY}{field}"  # the file's copy is released as each is replaced
            state[key] = hugepage_backed(state[key])
        try:
            if fmt == "nm":
                obj = NMWeight.from_state_dict(state, shape, layer.get("pattern", block.get("pattern")), prefix=f"{name}.")
            else:
                obj = PACKED[fmt].from_state_dict(state, shape, prefix=f"{name}.")
        except (ModelError, ConfigError, ValueError, RuntimeError, IndexError) as exc:
            raise ModelError(f"{p}: layer {name} ({fmt}): {exc}") from None
        if fmt == "bsr" and layer.get("pattern") is not None and parse(layer["pattern"]) != obj.block:
            raise ModelError(f"{p}: layer {name} stores {obj.block} blocks but config.json says {layer['pattern']}")
        if _dtype_name(obj.dtype) != layer["dtype"]:
            raise ModelError(f"{p}: layer {name} stores {obj.dtype} values but config.json says {layer['dtype']}")
        for key in obj.state_dict(f"{name}."):
            del state[key]
        state[name] = obj
    for alias, canonical in checked.tied.items():
        state[alias] = state[canonical]
    return state


# ---------------------------------------------------------------------------------------- sizes


def checkpoint_sizes(path: "str | Path") -> dict[str, Any]:
    """Bytes of a checkpoint vs the same weights stored dense (safetensors only).

    Returns ``{"file_bytes": weight files on disk (headers included), "stored_bytes": tensor data
    on disk, "dense_bytes": the same tensors dense (pruned layers at numel x itemsize), "ratio":
    file_bytes / dense_bytes}``.
    """
    block = read_sparsity_config(path)
    layers = block.get("layers", {}) if is_compressed(block) else {}
    files = weight_files(path)
    stored = dense = 0
    for file in files:
        for name, meta in read_safetensors_header(file).items():
            begin, end = meta["data_offsets"]
            stored += end - begin
            owner = name.rsplit(".", 1)[0]
            if owner not in layers:
                dense += end - begin
    for layer in layers.values():
        numel = 1
        for s in layer["shape"]:
            numel *= int(s)
        dense += numel * getattr(torch, layer["dtype"]).itemsize
    file_bytes = sum(f.stat().st_size for f in files)
    return {"file_bytes": file_bytes, "stored_bytes": stored, "dense_bytes": dense,
            "ratio": file_bytes / dense if dense else float("nan")}
