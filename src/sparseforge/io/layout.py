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

import json
from pathlib import Path
from typing import Any

import torch

from sparseforge.errors import ModelError
from sparseforge.formats import registry
from sparseforge.formats.memory import hugepage_backed
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

FORMAT_VERSION = 2  # bump on any incompatible change of the on-disk layout
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
BLOCK = "sparsity_config"
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``, as ``layers[name]["dtype"]`` records it."""
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------- read


def model_dir(path: "str | Path") -> Path:
    """``Path(path)`` after checking it holds config.json and weights; ModelError otherwise."""
    p = Path(path)
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
    try:
        data = json.loads((p / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {p / CONFIG_NAME}: {exc}") from exc
    block = data.get(BLOCK)
    if block is None:
        return None
    if not isinstance(block, dict):
        raise ModelError(f"{p / CONFIG_NAME}: '{BLOCK}' must be a JSON object")
    version = block.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise ModelError(
            f"{p} was written with sparseforge checkpoint format_version {version}; this sparseforge reads "
            f"up to {FORMAT_VERSION}: upgrade sparseforge"
        )
    return block


def is_compressed(block: dict[str, Any] | None) -> bool:
    """Whether a ``sparsity_config`` block (:func:`read_sparsity_config`) describes packed weights."""
    return block is not None and block.get("format") in registry.names(stored=True)


def weight_files(path: "str | Path") -> list[Path]:
    """The safetensors weight files of a model directory (single file or shards)."""
    p = model_dir(path)
    if (p / WEIGHTS_NAME).is_file():
        return [p / WEIGHTS_NAME]
    index = p / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [p / s for s in shards]
    raise ModelError(f"{p} holds only PyTorch .bin weights; re-save it with safetensors (save_pretrained) to inspect it")


def read_safetensors_header(file: Path) -> dict[str, dict[str, Any]]:
    """``{tensor name: {"dtype", "shape", "data_offsets"}}`` from a safetensors header (no data read)."""
    with open(file, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
    header.pop("__metadata__", None)
    return header


def load_state_dict_compressed(path: "str | Path") -> dict[str, Any]:
    """Every tensor of a checkpoint; pruned weights stay compressed (format objects of
    :mod:`sparseforge.formats`, e.g. :class:`~sparseforge.formats.BitmapWeight`).

    Compressed buffers of 4 MB and more are moved into transparent huge pages (one at a time, so the
    peak stays one buffer above the checkpoint's size), like those built by ``from_dense``: the batch
    kernels stream hundreds of rows at once and miss the TLB less with 2 MB pages.

    Compressed objects always hold the ``(out_features, in_features)`` matrix; for layers whose
    ``layers[name]["transposed"]`` is true (transformers ``Conv1D``) the parameter is
    ``obj.to_dense().t()``. Tied aliases map to the same object as their canonical name.
    """
    from safetensors.torch import load_file

    block = read_sparsity_config(path)
    state: dict[str, Any] = {}
    for file in weight_files(path):
        state.update(load_file(str(file)))
    if not is_compressed(block):
        return state
    for name, layer in block.get("layers", {}).items():
        fmt, shape = layer.get("format"), tuple(layer.get("shape", ()))
        stored = registry.names(stored=True)
        if fmt not in stored:
            raise ModelError(f"{path}: layer {name} has unknown format {fmt!r} (expected one of {', '.join(stored)})")
        spec = registry.get(fmt)
        for field in spec.cls.FIELDS:  # large buffers into huge pages, as from_dense does (formats/memory.py);
            key = f"{name}.{spec.cls.KEY}{field}"  # the file's copy is released as each is replaced
            if key in state:
                state[key] = hugepage_backed(state[key])
        obj = spec.load(state, shape, layer.get("pattern", block.get("pattern")), prefix=f"{name}.")
        keys = obj.state_dict(f"{name}.")
        if fmt == "bsr" and layer.get("pattern") is not None and parse(layer["pattern"]) != obj.block:
            raise ModelError(f"{path}: layer {name} stores {obj.block} blocks but config.json says {layer['pattern']}")
        if dtype_name(obj.dtype) != layer.get("dtype"):
            raise ModelError(f"{path}: layer {name} stores {obj.dtype} values but config.json says {layer.get('dtype')}")
        for key in keys:
            del state[key]
        state[name] = obj
    for alias, canonical in (block.get("tied") or {}).items():
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
