"""Fuzz the checkpoint readers with corrupted checkpoints (hypothesis, fixed example budget).

Rule, for every generated checkpoint and each reader (``sparseforge.load``, ``load(sparse=True)``,
``inspect_path``): a ``SparseforgeError`` subclass or a correct result, never a crash, a hang, an
allocation over a stated bound or a silently different model:

* all three readers accept or refuse the same checkpoints (one shared validation);
* a checkpoint that is accepted gives the original model's logits, except where the mutation
  rewrote packed buffers *and* their checksums (a different but self-consistent checkpoint): then
  the dense and the sparse loader must give the same logits;
* each reader finishes within :data:`SECONDS_PER_READ` (SIGALRM) and raises the process peak RSS by
  at most :data:`RSS_BOUND_MIB` (the checkpoints are ~50 KB; a damaged header declaring terabytes
  must never be allocated).

Generators: raw bytes of ``model.safetensors`` (bit flips, overwrites, truncation, insertion in the
length prefix, header and data regions), the parsed header (hostile dtypes, shapes, offsets, names,
missing / extra keys), the ``sparsity_config`` block (any JSON value in any field, keys removed),
and packed buffers rewritten with matching checksums (exercising the formats' own index checks).
Budget: ``EXAMPLES`` (40) examples per test, 4 tests, about 35 s on one busy core; set
``SPARSEFORGE_FUZZ_EXAMPLES`` to fuzz longer locally.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from checkpoint_corruption import block, save_pruned, split_file, write_file

from sparseforge.io.loading import load
from sparseforge.io.validation import tensor_checksums
from sparseforge.errors import SparseforgeError
from sparseforge.io.inspection import inspect_path

EXAMPLES = int(os.environ.get("SPARSEFORGE_FUZZ_EXAMPLES", "40"))  # raise it locally to fuzz longer
SECONDS_PER_READ = 30
RSS_BOUND_MIB = 128  # per read; the checkpoints are ~50 KB
KINDS = ("bitmap", "nm", "gpt2", "bsr", "fanin")
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
X = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(0))  # (batch, tokens)


def _save_structured(out: Path, pattern: str) -> Path:
    import sparseforge
    from sparseforge.config import SparsifyConfig
    from tiny_models import tiny_model

    model = tiny_model("llama")
    report = sparseforge.sparsify_(model, SparsifyConfig(method="magnitude", pattern=pattern, sparsity=0.5),
                                   progress=False)
    return sparseforge.save_pretrained(model, out, sparsity_config=report.sparsity_config())


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-originals")
    paths = {
        "bitmap": save_pruned(root / "bitmap", "llama", "unstructured", 0.5),
        "nm": save_pruned(root / "nm", "llama", "2:4", None),
        "gpt2": save_pruned(root / "gpt2", "gpt2", "unstructured", 0.5),
        "bsr": _save_structured(root / "bsr", "block4x4"),
        "fanin": _save_structured(root / "fanin", "fanin"),
    }
    assert {k: block(p)["format"] for k, p in paths.items()} == {k: k if k != "gpt2" else "bitmap" for k in paths}
    with torch.no_grad():
        return {k: (p, load(p)(X).logits) for k, p in paths.items()}


@contextmanager
def time_limit(seconds: int):
    def expired(*_):
        raise TimeoutError(f"a reader ran longer than {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


READERS = {
    "load": lambda p: load(p),
    "load_sparse": lambda p: load(p, sparse=True),
    "inspect": lambda p: inspect_path(p),
}


def _outcome(path: Path):
    """``{reader: result or the SparseforgeError}``; anything else propagates and fails the test."""
    results = {}
    for name, read in READERS.items():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with time_limit(SECONDS_PER_READ):
            try:
                results[name] = read(path)
            except SparseforgeError as exc:
                results[name] = exc
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        assert grown <= RSS_BOUND_MIB, f"{name} raised the peak RSS by {grown:.0f} MiB (bound {RSS_BOUND_MIB} MiB)"
    return results


def check(path: Path, reference: torch.Tensor, self_consistent_only: bool = False) -> None:
    results = _outcome(path)
    refused = {n for n, r in results.items() if isinstance(r, SparseforgeError)}
    assert refused in (set(), set(READERS)), (
        f"the readers disagree: {sorted(refused)} refused, others accepted: "
        f"{ {n: str(r) for n, r in results.items() if n in refused} }")
    if refused:
        return
    with torch.no_grad():
        dense, sparse = results["load"](X).logits, results["load_sparse"](X).logits
    torch.testing.assert_close(sparse, dense, atol=1e-4, rtol=1e-4, equal_nan=True)  # the loaders agree
    if not self_consistent_only:
        torch.testing.assert_close(dense, reference, atol=0, rtol=0)  # nothing silently changed


@contextmanager
def mutable_copy(src: Path):
    with tempfile.TemporaryDirectory() as d:
        dst = Path(d) / src.name
        shutil.copytree(src, dst)
        yield dst


# ---- raw bytes ----------------------------------------------------------------------------------

byte_edits = st.lists(
    st.tuples(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]),
              st.sampled_from(["length", "header", "data", "anywhere"]),
              st.floats(0, 1, exclude_max=True), st.integers(0, 255), st.integers(1, 64)),
    min_size=1, max_size=3)


def _apply_bytes(raw: bytearray, header_len: int, edit) -> bytearray:
    op, region, where, value, size = edit
    lo, hi = {"length": (0, 8), "header": (8, 8 + header_len), "data": (8 + header_len, len(raw)),
              "anywhere": (0, len(raw))}[region]
    lo, hi = min(lo, len(raw)), min(hi, len(raw))  # earlier edits may have shortened the file
    if hi <= lo:
        return raw
    pos = lo + int(where * (hi - lo))
    if op == "flip":
        raw[pos] ^= 1 << (value % 8)
    elif op == "set":
        raw[pos] = value
    elif op == "truncate":
        del raw[pos:]
    elif op == "insert":
        raw[pos:pos] = bytes([value]) * size
    else:
        del raw[pos:pos + size]
    return raw


@FUZZ
@given(kind=st.sampled_from(KINDS), edits=byte_edits)
def test_byte_level_damage(originals, kind, edits):
    src, reference = originals[kind]
    with mutable_copy(src) as out:
        file = out / "model.safetensors"
        raw = bytearray(file.read_bytes())
        header_len = int.from_bytes(raw[:8], "little")
        for edit in edits:
            raw = _apply_bytes(raw, header_len, edit)
        file.write_bytes(bytes(raw))
        check(out, reference)


# ---- the parsed header --------------------------------------------------------------------------

hostile_ints = st.one_of(st.integers(-2**64, 2**64), st.sampled_from([0, 1, -1, 2**31 - 1, 2**31, 2**32, 2**62, 2**63 - 1, 2**63, 2**64]))
json_scalars = st.one_of(st.none(), st.booleans(), hostile_ints, st.floats(allow_nan=False), st.text(max_size=8))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                                  st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                           max_leaves=8)
header_edits = st.lists(
    st.tuples(st.sampled_from(["dtype", "shape", "data_offsets", "drop_key", "extra_key", "rename", "drop_tensor",
                               "metadata", "swap_offsets"]),
              st.integers(0, 10**6),
              st.one_of(st.sampled_from(["F32", "BF16", "F16", "U8", "I32", "I64", "BOOL", "Q7", "", "f32"]),
                        st.lists(hostile_ints, max_size=4), json_values)),
    min_size=1, max_size=3)


@FUZZ
@given(kind=st.sampled_from(KINDS), edits=header_edits)
def test_header_damage(originals, kind, edits):
    src, reference = originals[kind]
    with mutable_copy(src) as out:
        file = out / "model.safetensors"
        header, data = split_file(file)
        names = sorted(n for n in header if n != "__metadata__")
        for op, pick, value in edits:
            if not names:
                break
            name = names[pick % len(names)]
            entry = header.get(name)
            if op in ("dtype", "shape", "data_offsets") and isinstance(entry, dict):
                entry[op] = value
            elif op == "drop_key" and isinstance(entry, dict) and entry:
                entry.pop(sorted(entry)[pick % len(entry)])
            elif op == "extra_key" and isinstance(entry, dict):
                entry["extra"] = value
            elif op == "rename":
                header[f"{name}{pick % 7}"] = header.pop(name)
            elif op == "drop_tensor":
                header.pop(name)
            elif op == "metadata":
                header["__metadata__"] = value
            elif op == "swap_offsets" and len(names) > 1:
                other = header.get(names[(pick + 1) % len(names)])
                if isinstance(entry, dict) and isinstance(other, dict):
                    entry["data_offsets"], other["data_offsets"] = other.get("data_offsets"), entry.get("data_offsets")
            names = sorted(n for n in header if n != "__metadata__")
        write_file(file, header, data)
        check(out, reference)


# ---- the sparsity_config block ------------------------------------------------------------------

LAYER_FIELDS = ["format", "shape", "dtype", "nnz", "transposed", "pattern"]
BLOCK_FIELDS = ["format_version", "format", "layers", "tied", "targets", "pattern", "checksums", "activation"]
config_edits = st.lists(
    st.tuples(st.sampled_from(["layer_field", "block_field", "drop_layer_field", "drop_block_field", "checksum"]),
              st.integers(0, 10**6), json_values,
              st.sampled_from([None, "nm", "bitmap", "bsr", "fanin", "dense", [64, 32], [32, 32], [32, 64], "2:4",
                               "1:4", "block4x4", "block2x8", "fanin8", True, False, 1, 2, 3, "float16", "bfloat16"])),
    min_size=1, max_size=3)


@FUZZ
@given(kind=st.sampled_from(KINDS), edits=config_edits)
def test_config_block_damage(originals, kind, edits):
    src, reference = originals[kind]
    with mutable_copy(src) as out:
        path = out / "config.json"
        config = json.loads(path.read_text())
        b = config["sparsity_config"]
        layers = sorted(b["layers"])
        for op, pick, value, plausible in edits:
            value = plausible if pick % 2 else value  # half the time a plausible-looking value
            layer = b["layers"].get(layers[pick % len(layers)]) if isinstance(b.get("layers"), dict) and layers else None
            if op == "layer_field" and isinstance(layer, dict):
                layer[LAYER_FIELDS[pick % len(LAYER_FIELDS)]] = value
            elif op == "drop_layer_field" and isinstance(layer, dict):
                layer.pop(LAYER_FIELDS[pick % len(LAYER_FIELDS)], None)
            elif op == "block_field":
                b[BLOCK_FIELDS[pick % len(BLOCK_FIELDS)]] = value
            elif op == "drop_block_field":
                b.pop(BLOCK_FIELDS[pick % len(BLOCK_FIELDS)], None)
            elif op == "checksum" and isinstance(b.get("checksums"), dict) and isinstance(b["checksums"].get("tensors"), dict):
                sums = b["checksums"]["tensors"]
                name = sorted(sums)[pick % len(sums)]
                sums[name] = f"{(int(sums[name], 16) ^ (1 << (pick % 32))):08x}"
        path.write_text(json.dumps(config))
        check(out, reference)  # tensors and checksums are untouched: accepted means the same model


# ---- packed buffers rewritten with matching checksums -------------------------------------------

packed_edits = st.lists(st.tuples(st.integers(0, 10**6), st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
                        min_size=1, max_size=4)


@FUZZ
@given(kind=st.sampled_from(KINDS), edits=packed_edits)
def test_packed_buffers_with_valid_checksums(originals, kind, edits):
    """Buffers changed and checksums recomputed: the formats' own checks (indices in range, row
    pointers monotone, popcounts matching values) must refuse what is inconsistent, and whatever is
    accepted must be the same model for the dense and the sparse loader."""
    from safetensors.torch import load_file, save_file

    src, reference = originals[kind]
    with mutable_copy(src) as out:
        file = out / "model.safetensors"
        tensors = load_file(str(file))
        layers = block(out)["layers"]
        packed = sorted(k for k in tensors if k.rsplit(".", 1)[0] in layers)
        for pick, where, value in edits:
            name = packed[pick % len(packed)]
            raw = tensors[name].contiguous().view(torch.uint8).reshape(-1).clone()
            if raw.numel():
                raw[int(where * raw.numel())] = value
            tensors[name] = raw.view(tensors[name].dtype).reshape(tensors[name].shape)
        save_file(tensors, str(file), metadata={"format": "pt"})
        config = json.loads((out / "config.json").read_text())
        config["sparsity_config"]["checksums"] = tensor_checksums(tensors)
        (out / "config.json").write_text(json.dumps(config))
        check(out, reference, self_consistent_only=True)
