"""The on-disk layout of a sparseforge checkpoint, read side: validate a model directory, read its
``sparsity_config`` block and its tensors (pruned weights kept packed), and size it.

A checkpoint is a Hugging Face ``save_pretrained`` directory; a compressed one stores each pruned
weight as the buffers of its registered format (:mod:`sparseforge.formats.registry`) and describes
them in ``config.json``'s ``"sparsity_config"`` block. The layout is specified byte by byte in
``docs/checkpoint-format.md``; :mod:`sparseforge.io.checkpoint` writes it, :mod:`sparseforge.io.loading`
builds models from it. Nothing here imports transformers.

Example:
    >>> from sparseforge.io.layout import checkpoint_sizes, read_sparsity_config
    >>> read_sparsity_config("out")["format"]                              # doctest: +SKIP
    'nm'
    >>> checkpoint_sizes("out")["ratio"]                                    # doctest: +SKIP
    0.53
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sparseforge.errors import ConfigError, ModelError
from sparseforge.formats import registry
from sparseforge.formats.memory import hugepage_backed
from sparseforge.io.atomic_dir import recover
from sparseforge.io.safetensors_header import read_header
from sparseforge.io.validation import BLOCK, CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME, check_block, read_json, validate_checkpoint
from sparseforge.io.validation import weight_files as checked_weight_files
from sparseforge.patterns import parse

__all__ = [
    "FORMAT_VERSION",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "BLOCK",
    "model_dir",
    "read_sparsity_config",
    "is_compressed",
    "weight_files",
    "read_safetensors_header",
    "load_state_dict_compressed",
    "checkpoint_sizes",
    "dtype_name",
]

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``, as ``layers[name]["dtype"]`` records it."""
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------- read


def model_dir(path: "str | Path") -> Path:
    """``Path(path)`` after checking it holds config.json and weights; ModelError otherwise. An
    interrupted save of the directory is finished or rolled back first (:mod:`sparseforge.io.atomic_dir`)."""
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
    """The ``sparsity_config`` block of a model directory (``None`` for a plain checkpoint), its
    fields type-checked (:func:`sparseforge.io.validation.check_block`)."""
    p = model_dir(path)
    data = read_json(p / CONFIG_NAME)
    if not isinstance(data, dict):
        raise ModelError(f"{p / CONFIG_NAME}: must be a JSON object, got {type(data).__name__}")
    block = data.get(BLOCK)
    return None if block is None else check_block(block, p / CONFIG_NAME)


def is_compressed(block: dict[str, Any] | None) -> bool:
    """Whether a ``sparsity_config`` block (:func:`read_sparsity_config`) describes packed weights."""
    return block is not None and block.get("format") in registry.names(stored=True)


def weight_files(path: "str | Path") -> list[Path]:
    """The safetensors weight files of a model directory (single file or the shards of a checked index)."""
    return checked_weight_files(model_dir(path))


def read_safetensors_header(file: Path) -> dict[str, dict[str, Any]]:
    """``{tensor name: {"dtype", "shape", "data_offsets"}}`` from a safetensors header (no data read),
    checked by :func:`sparseforge.io.safetensors_header.read_header` (ModelError when corrupt)."""
    return {name: {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.begin, e.end]}
            for name, e in read_header(file).tensors.items()}


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


def load_state_dict_compressed(path: "str | Path", model=None) -> dict[str, Any]:
    """Every tensor of a checkpoint; pruned weights stay compressed (format objects of
    :mod:`sparseforge.formats`, e.g. :class:`~sparseforge.formats.BitmapWeight`).

    The directory is validated first (:func:`sparseforge.io.validation.validate_checkpoint`, checksums
    included), against ``model`` when given: a skeleton of the model (e.g. built on the meta device,
    :func:`sparseforge.io.loading.skeleton`) whose parameters the tensors must fit. The loaders and
    ``inspect`` always pass one; without it the tensors are checked against the config alone.

    Compressed buffers of 4 MB and more are moved into transparent huge pages (one at a time, so the
    peak stays one buffer above the checkpoint's size), like those built by ``from_dense``: the batch
    kernels stream hundreds of rows at once and miss the TLB less with 2 MB pages.

    Compressed objects always hold the ``(out_features, in_features)`` matrix; for layers whose
    ``layers[name]["transposed"]`` is true (transformers ``Conv1D``) the parameter is
    ``obj.to_dense().t()``. Tied aliases map to the same object as their canonical name.
    """
    p = model_dir(path)
    checked = validate_checkpoint(p, model)
    state: dict[str, Any] = _load_files([h.file for h in checked.headers])
    if not checked.compressed:
        return state
    block = checked.block
    for name, layer in checked.layers.items():
        fmt, shape = layer["format"], tuple(layer["shape"])
        spec = registry.get(fmt)
        for field in spec.cls.FIELDS:  # large buffers into huge pages, as from_dense does (formats/memory.py);
            key = f"{name}.{spec.cls.KEY}{field}"  # the file's copy is released as each is replaced
            state[key] = hugepage_backed(state[key])  # (an int8 layer's small scales stay as loaded)
        try:
            obj = spec.load(state, shape, layer.get("pattern", block.get("pattern")), prefix=f"{name}.")
        except (ModelError, ConfigError, ValueError, RuntimeError, IndexError) as exc:
            raise ModelError(f"{p}: layer {name} ({fmt}): {exc}") from None
        if fmt == "bsr" and layer.get("pattern") is not None and parse(layer["pattern"]) != obj.block:
            raise ModelError(f"{p}: layer {name} stores {obj.block} blocks but config.json says {layer['pattern']}")
        if dtype_name(obj.dtype) != layer["dtype"]:
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
    on disk, "dense_bytes": the same tensors dense (pruned layers at numel x itemsize, int8 layers
    at float32, the dtype they dequantize to), "ratio":
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
        dense += numel * (4 if layer["dtype"] == "int8" else getattr(torch, layer["dtype"]).itemsize)  # int8: vs float32
    file_bytes = sum(f.stat().st_size for f in files)
    return {"file_bytes": file_bytes, "stored_bytes": stored, "dense_bytes": dense,
            "ratio": file_bytes / dense if dense else float("nan")}
