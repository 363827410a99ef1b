"""Read and check a safetensors header before any tensor is loaded.

``safetensors`` reports a damaged file as a bare ``SafetensorError`` (and a hand-rolled parser as
``JSONDecodeError``, ``UnicodeDecodeError``, ``MemoryError`` or ``OverflowError``). This parser
checks everything the loaders rely on and raises one :class:`~sparseforge.errors.ModelError`
naming the file, the tensor and what is wrong:

* the 8-byte little-endian header length is present, at most :data:`MAX_HEADER_BYTES` (the limit
  safetensors itself applies) and within the file;
* the header is UTF-8 JSON (nesting depth bounded), an object of tensor entries plus an optional
  ``__metadata__`` object of strings;
* each entry has exactly ``dtype`` (a known safetensors dtype), ``shape`` (non-negative integers)
  and ``data_offsets`` ``[begin, end]`` with ``end - begin == prod(shape) * itemsize``;
* the tensors' byte ranges tile the data section exactly (no gap, overlap or trailing bytes), as
  safetensors requires; so no declared size can exceed the file.

Memory: at most ``MAX_HEADER_BYTES`` are read; no tensor data is touched.

Example:
    >>> from sparseforge.io.safetensors_header import read_header
    >>> header = read_header("pruned/model.safetensors")           # doctest: +SKIP
    >>> header.tensors["model.embed_tokens.weight"].shape           # doctest: +SKIP
    (96, 32)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from sparseforge.errors import ModelError

__all__ = ["TensorEntry", "SafetensorsHeader", "read_header", "DTYPE_SIZES", "MAX_HEADER_BYTES"]

MAX_HEADER_BYTES = 100_000_000  # safetensors refuses larger headers too
MAX_JSON_DEPTH = 64  # a real header nests 3 deep; deeper is an attack on the JSON parser's recursion
DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the header; ``begin`` / ``end`` are offsets into the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass
class SafetensorsHeader:
    """The checked header of one file: tensors by name, metadata, where the data section starts."""

    file: Path
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str] = field(default_factory=dict)
    data_start: int = 0  # file offset of data byte 0 (8 + header length)


def _depth(text: str) -> int:
    """Maximum bracket nesting of a JSON text (strings skipped)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _entry(file: Path, name: str, meta, data_size: int) -> TensorEntry:
    def bad(what: str) -> ModelError:
        return ModelError(f"{file}: tensor {name!r}: {what}; the file is corrupt, re-save or re-download it")

    if not isinstance(meta, dict) or set(meta) != {"dtype", "shape", "data_offsets"}:
        raise bad(f"header entry must have exactly dtype, shape and data_offsets, got {meta!r:.200}")
    dtype, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise bad(f"unknown dtype {dtype!r:.40} (expected one of {', '.join(DTYPE_SIZES)})")
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise bad(f"shape must be a list of non-negative integers, got {shape!r:.200}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise bad(f"data_offsets must be two integers, got {offsets!r:.200}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise bad(f"data_offsets [{begin}, {end}] lie outside the {data_size}-byte data section")
    numel = 1
    for s in shape:
        numel *= s
    if numel * DTYPE_SIZES[dtype] != end - begin:
        raise bad(f"shape {shape} of {dtype} needs {numel * DTYPE_SIZES[dtype]} bytes but data_offsets span {end - begin}")
    return TensorEntry(name, dtype, tuple(shape), begin, end)


def read_header(file: "str | Path") -> SafetensorsHeader:
    """Parse and check the header of the safetensors file ``file`` (see the module doc)."""
    file = Path(file)
    try:
        size = os.path.getsize(file)
        with open(file, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise ModelError(f"{file}: truncated to {size} bytes, shorter than the 8-byte header length; "
                                 "re-save or re-download it")
            length = int.from_bytes(prefix, "little")
            if length > MAX_HEADER_BYTES:
                raise ModelError(f"{file}: declares a {length}-byte header, above the {MAX_HEADER_BYTES}-byte limit; "
                                 "the file is corrupt or not safetensors")
            if length > size - 8:
                raise ModelError(f"{file}: declares a {length}-byte header but has only {size - 8} bytes after the "
                                 "length; the file is truncated or corrupt")
            raw = fh.read(length)
    except OSError as exc:
        raise ModelError(f"cannot read {file}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ModelError(f"{file}: the header is not UTF-8 (byte {exc.start}); the file is corrupt") from None
    if _depth(text) > MAX_JSON_DEPTH:
        raise ModelError(f"{file}: the header nests deeper than {MAX_JSON_DEPTH} levels; the file is corrupt")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ModelError(f"{file}: the header is not valid JSON ({str(exc)[:120]}); the file is corrupt") from None
    if not isinstance(data, dict):
        raise ModelError(f"{file}: the header must be a JSON object, got {type(data).__name__}")
    metadata = data.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ModelError(f"{file}: __metadata__ must map strings to strings")
    data_size = size - 8 - length
    tensors = {name: _entry(file, name, meta, data_size) for name, meta in data.items()}
    covered = 0
    for entry in sorted(tensors.values(), key=lambda e: (e.begin, e.end)):
        if entry.begin != covered:
            what = "overlaps the previous tensor" if entry.begin < covered else f"leaves a gap of {entry.begin - covered} bytes"
            raise ModelError(f"{file}: tensor {entry.name!r}: data_offsets [{entry.begin}, {entry.end}] {what}; "
                             "the file is corrupt")
        covered = entry.end
    if covered != data_size:
        raise ModelError(f"{file}: the tensors cover {covered} of the {data_size} data bytes; the file is "
                         "truncated or has trailing bytes")
    return SafetensorsHeader(file, tensors, metadata, 8 + length)
