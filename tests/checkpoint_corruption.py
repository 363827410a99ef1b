"""Helpers that save a tiny pruned checkpoint and damage it in controlled ways (for the validation
tests and the checkpoint fuzz suite)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from tiny_models import tiny_model

from sparseforge.io.checkpoint import save_pretrained
from sparseforge.layers import linear_layers, weight_2d
from sparseforge.masks import mask_from_scores

TINY = {"llama": torch.float32, "gpt2": torch.float32}


def pruned_model(family: str = "llama", pattern: str = "unstructured", sparsity: "float | None" = 0.5, dtype=torch.float32):
    """A tiny model whose linear layers (but lm_head) are magnitude-pruned to ``pattern``."""
    model = tiny_model(family, dtype=dtype)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in linear_layers(model):
            if name == "lm_head":
                continue
            w = weight_2d(modules[name])  # (out, in) view
            mask = mask_from_scores(w.abs().float(), pattern, sparsity)
            w.copy_(torch.where(mask, w, torch.zeros((), dtype=w.dtype)))
    return model


def save_pruned(out: Path, family: str = "llama", pattern: str = "unstructured", sparsity: "float | None" = 0.5) -> Path:
    model = pruned_model(family, pattern, sparsity)
    return save_pretrained(model, out, sparsity_config={"method": "magnitude", "pattern": pattern,
                                                        "sparsity": sparsity, "targets": None, "ignore": []})


def copy_checkpoint(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def split_file(file: Path) -> tuple[dict, bytes]:
    """(header JSON with ``__metadata__``, data section) of a well-formed safetensors file."""
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_file(file: Path, header: "dict | bytes", data: bytes, declared: "int | None" = None) -> None:
    """Write a safetensors file from a header (dict or raw bytes) and data; ``declared`` overrides
    the 8-byte header length."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    file.write_bytes((len(text) if declared is None else declared).to_bytes(8, "little") + text + data)


def edit_config(out: Path, fn) -> None:
    """Apply ``fn(config_dict)`` to ``out/config.json``."""
    path = out / "config.json"
    config = json.loads(path.read_text())
    fn(config)
    path.write_text(json.dumps(config))


def block(out: Path) -> dict:
    return json.loads((out / "config.json").read_text())["sparsity_config"]
