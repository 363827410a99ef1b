"""One validation of a sparseforge checkpoint, shared by both loaders and ``sparseforge inspect``.

:func:`validate_checkpoint` checks a model directory before any tensor is built, so the loaders
(``sparseforge.load``, ``load(sparse=True)``) and ``inspect`` accept and refuse exactly the same
checkpoints; every problem is one :class:`~sparseforge.errors.ModelError` naming the file, the
tensor and what is wrong:

* ``config.json``: readable JSON object (at most :data:`MAX_JSON_BYTES`), ``architectures[0]`` a
  transformers model class; the ``sparsity_config`` block field by field (:func:`check_block`):
  ``format_version`` an integer this sparseforge knows, ``format``, ``layers`` (an object whose
  entries have a registered stored format (:mod:`sparseforge.formats.registry`) that the checkpoint's
  ``format_version`` may hold (the format's ``since_version``), ``shape`` ``[rows, cols]``, a value ``dtype``, a boolean
  ``transposed``, a parsable ``pattern``), ``tied``, ``targets``, ``checksums``;
* the safetensors headers (:mod:`sparseforge.io.safetensors_header`) and the shard index;
* the tensors against the config and the model (:func:`check_tensors`): every packed layer has all
  its buffers with the right dtypes, is a parameter of the model with the shape the config says,
  and ``transposed`` matches the module (``nn.Linear``: stored as is; ``Conv1D``: transposed); every
  dense tensor is expected by the model with its shape; ``tied`` names existing tensors; nothing
  is missing (a parameter the model ties to another, e.g. ``lm_head.weight``, must be listed in
  ``tied``, as the saver records every tie) and nothing is extra;
* the checksums (:func:`verify_checksums`): ``format_version`` 3 stores the CRC-32 of every tensor's
  bytes, dtype and shape in ``sparsity_config["checksums"]``; each is recomputed from the file, so a flipped bit or a
  moved bitmap bit is an error, never a silently different model. Versions 1 and 2 have none.

Example:
    >>> from sparseforge.io.validation import validate_checkpoint
    >>> checked = validate_checkpoint("pruned/")            # doctest: +SKIP
    >>> checked.block["format_version"]                      # doctest: +SKIP
    3
"""

from __future__ import annotations

import json
import mmap
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sparseforge.errors import ModelError
from sparseforge.formats import registry
from sparseforge.patterns import NM, parse
from sparseforge.io.safetensors_header import SafetensorsHeader, TensorEntry, read_header

__all__ = [
    "CheckedCheckpoint", "validate_checkpoint", "check_block", "check_tensors", "verify_checksums",
    "tensor_checksums", "architecture_class", "read_json", "weight_files", "FORMAT_VERSION", "CHECKSUM_VERSION",
    "ACTIVATION_VERSION", "check_activation", "INT8_VERSION",
    "MAX_JSON_BYTES", "stored_formats", "CONFIG_NAME", "WEIGHTS_NAME", "BLOCK",
]

FORMAT_VERSION = 4  # the newest checkpoint layout this sparseforge reads and writes
INT8_VERSION = 4  # from this format_version on, bitmap / N:M layers may store int8 values + scales
CHECKSUM_VERSION = 3  # from this format_version on, every tensor's CRC-32 is stored and required
ACTIVATION_VERSION = 4  # from this format_version on, sparsity_config may hold the "activation" section
MAX_JSON_BYTES = 64 << 20  # config.json / index files larger than this are refused unread
VALUE_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "int8": "I8"}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E5M2", "F8_E4M3")
TORCH_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "F8_E5M2": torch.float8_e5m2,
                "F8_E4M3": torch.float8_e4m3fn, "I16": torch.int16, "U16": torch.uint16, "F16": torch.float16,
                "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32,
                "I64": torch.int64, "U64": torch.uint64, "F64": torch.float64}
SAFETENSORS_DTYPES = {v: k for k, v in TORCH_DTYPES.items()}
CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "model.safetensors"
BLOCK = "sparsity_config"
_PARALLEL_BYTES = 64 << 20  # checksum in threads above this (zlib.crc32 releases the GIL)


@dataclass
class CheckedCheckpoint:
    """What :func:`validate_checkpoint` read and checked; the loaders build from it."""

    path: Path
    config: dict[str, Any]
    block: dict[str, Any] | None
    headers: list[SafetensorsHeader]
    entries: dict[str, tuple[SafetensorsHeader, TensorEntry]] = field(default_factory=dict)

    @property
    def compressed(self) -> bool:
        return self.block is not None and self.block.get("format") in stored_formats()

    @property
    def layers(self) -> dict[str, dict[str, Any]]:
        return (self.block or {}).get("layers") or {} if self.compressed else {}

    @property
    def tied(self) -> dict[str, str]:
        return (self.block or {}).get("tied") or {}


def stored_formats() -> tuple[str, ...]:
    """The formats a checkpoint may store packed layers in (the registry's stored formats)."""
    return registry.names(stored=True)


def _bad(where: "Path | str", what: str) -> ModelError:
    return ModelError(f"{where}: {what}")


def read_json(file: Path) -> Any:
    """The JSON of ``file``; ModelError if missing, too large, not UTF-8 or not JSON."""
    try:
        size = file.stat().st_size
        if size > MAX_JSON_BYTES:
            raise _bad(file, f"is {size} bytes, above the {MAX_JSON_BYTES}-byte limit for a JSON file; it is corrupt")
        raw = file.read_bytes()
    except OSError as exc:
        raise _bad(file, f"cannot be read ({exc.strerror or exc})") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise _bad(file, f"is not UTF-8 text (byte {exc.start}); it is corrupt") from None
    except (ValueError, RecursionError) as exc:
        raise _bad(file, f"is not valid JSON ({str(exc)[:120]}); it is corrupt") from None


def architecture_class(config: dict[str, Any], where: Path, transformers=None):
    """The transformers model class named by ``config["architectures"][0]``; ModelError otherwise."""
    arch = config.get("architectures")
    if not (isinstance(arch, list) and arch and all(isinstance(a, str) for a in arch)):
        raise _bad(where, f"'architectures' must be a non-empty list of class names, got {arch!r:.100}")
    name = arch[0]
    if transformers is None:
        import transformers
    cls = getattr(transformers, name, None) if name.isidentifier() and not name.startswith("_") else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise _bad(where, f"names architecture {name!r:.80}, which is not a model class of transformers "
                          f"{transformers.__version__}; set 'architectures' to a transformers model class")
    return cls


def _is_int(v) -> bool:
    return type(v) is int


def _check_layer(name, layer, block, where, compressed: bool) -> None:
    def bad(what: str) -> ModelError:
        return _bad(where, f"sparsity_config.layers[{name!r}]: {what}")

    if not isinstance(layer, dict):
        raise bad(f"must be an object, got {type(layer).__name__}")
    fmt = layer.get("format")
    allowed = stored_formats() if compressed else ("dense",)
    if not isinstance(fmt, str) or fmt not in allowed:
        raise bad(f"unknown format {fmt!r:.40} (expected one of {', '.join(allowed)})")
    since = registry.get(fmt).since_version if compressed else 1
    if since > block["format_version"]:
        raise bad(f"format {fmt} is stored from format_version {since} on, but the checkpoint says "
                  f"format_version {block['format_version']}; the config is corrupt")
    shape = layer.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(s) and s >= 0 for s in shape)):
        raise bad(f"shape must be [rows, cols] of non-negative integers, got {shape!r:.80}")
    if not isinstance(layer.get("dtype"), str) or layer["dtype"] not in VALUE_DTYPES:
        raise bad(f"dtype {layer.get('dtype')!r:.40} is not one of {', '.join(VALUE_DTYPES)}")
    if layer["dtype"] == "int8":
        if not (compressed and registry.get(fmt).int8_values):
            held = [n for n in registry.int8_names() if n in stored_formats()]
            raise bad(f"int8 values are stored only by the {', '.join(held)} formats, not {fmt}")
        if block["format_version"] < INT8_VERSION:
            raise bad(f"int8 values are stored from format_version {INT8_VERSION} on, but the checkpoint says "
                      f"format_version {block['format_version']}; the config is corrupt")
    if not isinstance(layer.get("transposed", False), bool):
        raise bad(f"transposed must be true or false, got {layer.get('transposed')!r:.40}")
    nnz = layer.get("nnz", 0)
    if not (_is_int(nnz) and 0 <= nnz <= shape[0] * shape[1]):
        raise bad(f"nnz must be an integer in [0, {shape[0] * shape[1]}], got {nnz!r:.40}")
    pattern = layer.get("pattern", block.get("pattern") if fmt == "nm" else None)
    if pattern is not None:
        try:
            parsed = parse(pattern) if isinstance(pattern, str) else None
        except Exception as exc:  # the pattern parser's own message says what is wrong
            raise bad(f"pattern {pattern!r:.40}: {exc}") from None
        if parsed is None:
            raise bad(f"pattern must be a string, got {pattern!r:.40}")
        if fmt == "nm" and not isinstance(parsed, NM):
            raise bad(f"an nm layer needs an N:M pattern, got {pattern!r:.40}")
    elif fmt == "nm":
        raise bad("an nm layer needs its N:M 'pattern'")


def check_block(block: Any, where: Path) -> dict[str, Any]:
    """Type-check the ``sparsity_config`` block of ``where`` (config.json); returns it."""
    if not isinstance(block, dict):
        raise _bad(where, f"'{BLOCK}' must be a JSON object, got {type(block).__name__}")
    version = block.get("format_version")
    if not _is_int(version):
        raise _bad(where, f"{BLOCK}.format_version must be an integer, got {version!r:.40}")
    if version > FORMAT_VERSION:
        raise ModelError(f"{where.parent} was written with sparseforge checkpoint format_version {version}; this "
                         f"sparseforge reads up to {FORMAT_VERSION}: upgrade sparseforge")
    if version < 1:
        raise _bad(where, f"{BLOCK}.format_version {version} is not a version (1 to {FORMAT_VERSION})")
    fmt = block.get("format")
    if fmt not in ("dense", *stored_formats()):
        raise _bad(where, f"{BLOCK}.format {fmt!r:.40} is not one of dense, {', '.join(stored_formats())}")
    compressed = fmt in stored_formats()
    layers = block.get("layers", {} if not compressed else None)
    if not isinstance(layers, dict):
        raise _bad(where, f"{BLOCK}.layers must be an object of layer entries, got {type(layers).__name__}")
    pattern = block.get("pattern")
    if pattern is not None:
        if not isinstance(pattern, str):
            raise _bad(where, f"{BLOCK}.pattern must be a string, got {pattern!r:.40}")
        try:
            parse(pattern)
        except Exception as exc:  # the pattern parser's own message says what is wrong
            raise _bad(where, f"{BLOCK}.pattern {pattern!r:.40}: {exc}") from None
    for name, layer in layers.items():
        _check_layer(name, layer, block, where, compressed)
    tied = block.get("tied", {})
    if not (isinstance(tied, dict) and all(isinstance(v, str) for v in tied.values())):
        raise _bad(where, f"{BLOCK}.tied must map tensor names to tensor names, got {tied!r:.80}")
    targets = block.get("targets", [])
    if not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise _bad(where, f"{BLOCK}.targets must be a list of parameter names, got {targets!r:.80}")
    checksums = block.get("checksums")
    if checksums is not None or (compressed and version >= CHECKSUM_VERSION):
        if not (isinstance(checksums, dict) and checksums.get("algorithm") == "crc32"
                and isinstance(checksums.get("tensors"), dict)
                and all(isinstance(v, str) and len(v) == 8 for v in checksums["tensors"].values())):
            raise _bad(where, f"{BLOCK}.checksums must be {{'algorithm': 'crc32', 'tensors': {{name: 8 hex digits}}}} "
                              f"(required from format_version {CHECKSUM_VERSION}), got {checksums!r:.80}")
    if "activation" in block:
        check_activation(block, where)
    return block


# ---- the activation section (format_version ACTIVATION_VERSION) ----------------------------------------

ACTIVATION_KINDS = ("linear", "cats", "rsparse")
ACTIVATION_COMPUTE_DTYPES = ("float32", "bfloat16")  # an entry's optional compute_dtype (column layers)


def _is_threshold(v) -> bool:
    return v == "inf" or (type(v) in (int, float) and v >= 0)  # NaN fails v >= 0


def check_activation(block: dict[str, Any], where: Path) -> None:
    """Type-check ``sparsity_config.activation``: ``{"layers": {module name: {"kind": "linear" | "cats" | "rsparse",
    "threshold": number >= 0 | "inf" | [one per input channel], optional "method", "sparsity",
    "calibrated_sparsity"; rsparse: "rank"; linear: "compute_dtype"}}}``. Whether the layers exist in the model is
    checked when they are applied."""
    section = block["activation"]
    if block["format_version"] < ACTIVATION_VERSION:
        raise _bad(where, f"{BLOCK}.activation needs format_version >= {ACTIVATION_VERSION}, but the checkpoint says "
                          f"{block['format_version']}; the config is corrupt")
    layers = section.get("layers") if isinstance(section, dict) else None
    if not isinstance(layers, dict) or not layers:
        raise _bad(where, f"{BLOCK}.activation must be {{'layers': {{module name: entry}}}} with at least one layer, "
                          f"got {section!r:.80}")
    for name, entry in layers.items():
        def bad(what: str) -> ModelError:
            return _bad(where, f"{BLOCK}.activation.layers[{name!r}]: {what}")

        if not isinstance(entry, dict):
            raise bad(f"must be an object, got {type(entry).__name__}")
        if entry.get("kind") not in ACTIVATION_KINDS:
            raise bad(f"kind must be one of {', '.join(ACTIVATION_KINDS)}, got {entry.get('kind')!r:.40}")
        t = entry.get("threshold")
        if not (_is_threshold(t) or (isinstance(t, list) and t and entry["kind"] != "cats" and all(map(_is_threshold, t)))):
            raise bad(f"threshold must be a number >= 0, \"inf\" or (linear, rsparse) a list of them, got {t!r:.60}")
        if entry["kind"] == "rsparse" and not (_is_int(entry.get("rank")) and entry["rank"] >= 0):
            raise bad(f"an rsparse layer needs an integer rank >= 0, got {entry.get('rank')!r:.40}")
        if entry.get("compute_dtype", "float32") not in ACTIVATION_COMPUTE_DTYPES or (
                entry["kind"] != "linear" and "compute_dtype" in entry):
            raise bad(f"compute_dtype must be one of {', '.join(ACTIVATION_COMPUTE_DTYPES)} on a linear entry, got "
                      f"{entry.get('compute_dtype')!r:.40}")
        for key in ("sparsity", "calibrated_sparsity"):
            v = entry.get(key, 0.0)
            if not (type(v) in (int, float) and 0.0 <= v <= 1.0):
                raise bad(f"{key} must be a fraction in [0, 1], got {v!r:.40}")


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of model directory ``path``: ``model.safetensors`` or the shards of a checked index."""
    if (path / WEIGHTS_NAME).is_file():
        return [path / WEIGHTS_NAME]
    index = path / INDEX_NAME
    if not index.is_file():
        raise ModelError(f"{path} holds only PyTorch .bin weights; re-save it with safetensors (save_pretrained)")
    data = read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())):
        raise _bad(index, "'weight_map' must map tensor names to shard file names")
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if Path(shard).name != shard or shard in (".", ".."):
            raise _bad(index, f"shard {shard!r:.80} must be a file name in the model directory")
        if not (path / shard).is_file():
            raise _bad(index, f"shard {shard} does not exist")
    return [path / s for s in shards]


def _packed_names(name: str, layer: dict) -> dict[str, str]:
    cls = registry.get(layer["format"]).cls
    fields = cls.FIELDS + (("scales",) if layer["dtype"] == "int8" else ())
    return {f: f"{name}.{cls.KEY}{f}" for f in fields}


def check_tensors(checked: CheckedCheckpoint, model: "torch.nn.Module | None") -> None:
    """Check the stored tensors against the config block and ``model`` (a skeleton, e.g. on the
    meta device): see the module doc. ``model=None`` checks against the config alone."""
    from sparseforge.layers import is_linear

    path, entries, layers, tied = checked.path, checked.entries, checked.layers, checked.tied
    cfg = path / CONFIG_NAME
    packed: set[str] = set()
    for name, layer in layers.items():
        fmt = layer["format"]
        if name in entries:
            raise _bad(entries[name][0].file, f"tensor {name!r} is stored dense but config.json lists it as a {fmt} layer")
        for fld, key in _packed_names(name, layer).items():
            if key not in entries:
                raise _bad(cfg, f"layer {name!r} ({fmt}) needs tensor {key!r}, which is not in the weight files")
            header, entry = entries[key]
            if fld == "values" and entry.dtype != VALUE_DTYPES[layer["dtype"]]:
                raise _bad(header.file, f"tensor {key!r} holds {entry.dtype} but config.json says {layer['dtype']}")
            if fld == "bitmap" and entry.dtype != "U8":
                raise _bad(header.file, f"tensor {key!r} must be U8, got {entry.dtype}")
            if fld == "scales" and (entry.dtype != "F32" or list(entry.shape) != layer["shape"][:1]):
                raise _bad(header.file, f"tensor {key!r} must be F32 of shape {layer['shape'][:1]}, got {entry.dtype} {list(entry.shape)}")
            packed.add(key)
    for alias, canonical in tied.items():
        if canonical not in layers and canonical not in entries:
            raise _bad(cfg, f"tied names {canonical!r} (for {alias!r}), which is not in the weight files")
        if alias in entries or alias in layers:
            raise _bad(cfg, f"tied alias {alias!r} is also stored; a tied alias has no tensor of its own")
    dense = {n for n in entries if n not in packed}
    if model is None:
        return
    expected = {n: tuple(t.shape) for n, t in model.state_dict(keep_vars=True).items()}
    expected_dtypes = {n: t.dtype for n, t in model.state_dict(keep_vars=True).items()}
    transposed_of = {f"{n}.weight": not isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if n and is_linear(m)}
    arch = type(model).__name__
    for name, layer in layers.items():
        if name not in expected:
            raise _bad(cfg, f"layer {name!r} is not a parameter of {arch}")
        rows, cols = layer["shape"]
        must = transposed_of.get(name, False)
        if layer.get("transposed", False) != must:
            kind = "a Conv1D weight, stored transposed" if must else "not transposed (an nn.Linear or other weight)"
            raise _bad(cfg, f"layer {name!r} says transposed: {str(layer.get('transposed', False)).lower()}, but it "
                            f"is {kind} in {arch}")
        param = (cols, rows) if must else (rows, cols)
        if param != expected[name]:
            raise _bad(cfg, f"layer {name!r} has shape {layer['shape']} but {arch} expects "
                            f"{list(expected[name][::-1] if must else expected[name])} (out, in)")
    for name in sorted(dense):
        header, entry = entries[name]
        if name not in expected:
            raise _bad(header.file, f"tensor {name!r} is not a parameter or buffer of {arch}")
        if entry.shape != expected[name]:
            raise _bad(header.file, f"tensor {name!r} has shape {list(entry.shape)} but {arch} expects "
                                    f"{list(expected[name])}")
        want = expected_dtypes[name]
        if (entry.dtype in FLOAT_DTYPES) != want.is_floating_point or (not want.is_floating_point and TORCH_DTYPES[entry.dtype] != want):
            raise _bad(header.file, f"tensor {name!r} holds {entry.dtype} but {arch} expects {str(want).removeprefix('torch.')}")
    for alias, canonical in tied.items():
        if alias not in expected:
            raise _bad(cfg, f"tied alias {alias!r} is not a parameter of {arch}")
        if expected[alias] != expected.get(canonical):
            raise _bad(cfg, f"tied alias {alias!r} has shape {list(expected[alias])} in {arch}, "
                            f"not that of {canonical!r}")
    missing = sorted(set(expected) - dense - set(layers) - set(tied))
    if missing:
        raise _bad(path, f"the weight files lack {len(missing)} tensor(s) of {arch}: {missing[:5]}; the checkpoint "
                         "is incomplete")


def _descriptor(dtype: str, shape) -> bytes:
    """What the checksum covers besides the bytes: dtype and shape (a reinterpreted tensor differs)."""
    return f"{dtype}{list(shape)}".encode()


def tensor_checksums(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The ``checksums`` entry for tensors about to be saved: for each, the CRC-32 of its bytes
    continued over its safetensors dtype and shape (e.g. ``F32[64, 32]``)."""
    sums = {}
    for n, t in tensors.items():
        data = zlib.crc32(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
        sums[n] = f"{zlib.crc32(_descriptor(SAFETENSORS_DTYPES[t.dtype], t.shape), data):08x}"
    return {"algorithm": "crc32", "tensors": sums}


def verify_checksums(checked: CheckedCheckpoint) -> None:
    """Recompute the CRC-32 of every stored tensor and compare with ``sparsity_config.checksums``."""
    sums = (checked.block or {}).get("checksums")
    if sums is None:
        return
    stored = sums["tensors"]
    cfg = checked.path / CONFIG_NAME
    unlisted = sorted(set(checked.entries) - set(stored))
    if unlisted:
        raise _bad(checked.path, f"tensor(s) {unlisted[:5]} have no checksum in config.json; the weight files do not "
                                 "belong to this config")
    absent = sorted(set(stored) - set(checked.entries))
    if absent:
        raise _bad(cfg, f"checksums list tensor(s) {absent[:5]} that are not in the weight files")
    for header in checked.headers:
        names = [n for n, (h, _) in checked.entries.items() if h is header]
        got = _file_checksums(header, names)
        for name in names:
            if got[name] != stored[name].lower():
                raise _bad(header.file, f"tensor {name!r} fails its checksum (crc32 {got[name]}, config.json says "
                                        f"{stored[name]}): the file is corrupt; re-save or re-download it")


def _file_checksums(header: SafetensorsHeader, names: list[str]) -> dict[str, str]:
    """CRC-32 (8 hex digits) of the bytes of each tensor in ``names``, read through one mmap."""
    if not any(header.tensors[n].nbytes for n in names):
        return {n: f"{zlib.crc32(_descriptor(header.tensors[n].dtype, header.tensors[n].shape)):08x}" for n in names}
    with open(header.file, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        view = memoryview(mm)
        try:
            def crc(name: str) -> str:
                e = header.tensors[name]
                data = zlib.crc32(view[header.data_start + e.begin:header.data_start + e.end])
                return f"{zlib.crc32(_descriptor(e.dtype, e.shape), data):08x}"

            if sum(header.tensors[n].nbytes for n in names) > _PARALLEL_BYTES:
                with ThreadPoolExecutor(max_workers=4) as pool:  # zlib.crc32 releases the GIL
                    return dict(zip(names, pool.map(crc, names)))
            return {n: crc(n) for n in names}
        finally:
            view.release()


def validate_checkpoint(path: "str | Path", model: "torch.nn.Module | None" = None, *,
                        verify: bool = True) -> CheckedCheckpoint:
    """Check the model directory ``path`` (see the module doc); ``model`` is the skeleton the
    tensors must fit (``None``: the config alone). ``verify=False`` skips the checksums."""
    path = Path(path)
    cfg = path / CONFIG_NAME
    config = read_json(cfg)
    if not isinstance(config, dict):
        raise _bad(cfg, f"must be a JSON object, got {type(config).__name__}")
    block = config.get(BLOCK)
    if block is not None:
        block = check_block(block, cfg)
    headers = [read_header(f) for f in weight_files(path)]
    checked = CheckedCheckpoint(path, config, block, headers)
    for header in headers:
        for name, entry in header.tensors.items():
            if name in checked.entries:
                raise _bad(header.file, f"tensor {name!r} is also stored in {checked.entries[name][0].file.name}")
            checked.entries[name] = (header, entry)
    if checked.compressed:
        check_tensors(checked, model)
    if verify:
        verify_checksums(checked)
    return checked
