"""Save and restore a model's activation-sparsity thresholds (a small JSON file).

The weights stay where they are (the dense checkpoint, e.g. ``save_pretrained`` of the model before
``sparsify_activations_``); the file holds, per layer, its kind (a ``SparseInputLinear`` projection
or a CATS MLP) and its threshold. :func:`load_activation_sparsity_` checks every entry against the
model before it changes anything, then swaps the layers in.

File (``activation_sparsity.json``; ``version`` guards future changes)::

    {"version": 1,
     "layers": {"model.layers.0.self_attn.q_proj": {"kind": "linear", "threshold": 0.23},
                "model.layers.0.mlp": {"kind": "cats", "threshold": 0.05}, ...}}

``threshold`` is a number, or a list with one entry per input channel. Optional, informational:
``method``, ``sparsity`` (the calibration target) and ``calibrated_sparsity`` (the fraction of
calibration inputs skipped). Optional, applied: ``compute_dtype`` (``"bfloat16"``, written only for a
:class:`~sparseforge.activation.ColumnSparseLinear` running bf16 compute; absent = float32), restored
on the layers built in the column layout. The same entries form ``sparsity_config.activation.layers`` of a
compressed checkpoint (``docs/checkpoint-format.md``).

Example:
    >>> import torch, tempfile
    >>> from torch import nn
    >>> from sparseforge.activation import SparseInputLinear
    >>> from sparseforge.activation.storage import load_activation_sparsity_, save_activation_sparsity
    >>> model = nn.Sequential(SparseInputLinear.from_linear(nn.Linear(4, 4), threshold=0.5))
    >>> d = tempfile.mkdtemp()
    >>> path = save_activation_sparsity(model, d)
    >>> fresh = nn.Sequential(nn.Linear(4, 4))
    >>> load_activation_sparsity_(fresh, path)
    >>> fresh[0].threshold.item()
    0.5
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Union

import torch
from torch import nn

from sparseforge.activation.cats import CATSMLP, is_swiglu_mlp
from sparseforge.activation.column_linear import ColumnSparseLinear
from sparseforge.activation.linear import SparseInputLinear
from sparseforge.activation.plain import as_linear
from sparseforge.activation.rsparse import RSparseLinear
from sparseforge.errors import ConfigError, ModelError
from sparseforge.layers import set_module
from sparseforge.nn.sparse_linear import SparseLinear

__all__ = [
    "save_activation_sparsity", "load_activation_sparsity_", "activation_layers", "apply_activation_layers_",
    "FILE_NAME", "FORMAT_VERSION", "INFO_KEYS", "COMPUTE_DTYPES",
]

FILE_NAME = "activation_sparsity.json"
FORMAT_VERSION = 1
KINDS = ("linear", "cats", "rsparse")
INFO_KEYS = ("method", "sparsity", "calibrated_sparsity")  # optional, informational entry keys
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # entry "compute_dtype" -> dtype


def _target(path: Union[str, Path]) -> Path:
    path = Path(path)
    return path / FILE_NAME if path.is_dir() else path


def _is_nan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)


def _number(t: float):
    return "inf" if math.isinf(t) else t  # JSON has no infinity


def activation_layers(model: nn.Module) -> dict[str, dict]:
    """``{layer name: entry}`` of ``model``'s sparse-input layers and CATS MLPs, as the JSON file and
    the compressed checkpoint's ``sparsity_config.activation.layers`` store them: ``kind``
    (``"linear"`` / ``"cats"`` / ``"rsparse"`` with its ``rank``), ``threshold`` (a number, ``"inf"``,
    or one per input channel), ``compute_dtype`` for a column layer running bf16 compute and,
    where calibration recorded them, ``method``, ``sparsity`` (the target) and
    ``calibrated_sparsity`` (the fraction of calibration inputs skipped). Empty when there are none."""
    layers = {}
    cats = {name for name, m in model.named_modules() if isinstance(m, CATSMLP)}
    for name, m in model.named_modules():
        if name in cats:
            entry = {"kind": "cats", "threshold": _number(m.threshold.item())}
        elif isinstance(m, SparseInputLinear) and name.rpartition(".")[0] not in cats:  # not a CATS down_proj
            t = m.threshold.float()
            entry = {"kind": "linear",
                     "threshold": _number(t.item()) if t.numel() == 1 else [_number(v) for v in t.tolist()]}
            if isinstance(m, RSparseLinear):
                entry.update(kind="rsparse", rank=m.rank)
            if isinstance(m, ColumnSparseLinear) and m.compute_dtype != torch.float32:
                entry["compute_dtype"] = next(k for k, v in COMPUTE_DTYPES.items() if v == m.compute_dtype)
        else:
            continue
        entry.update({k: v for k, v in m.activation_info.items() if k in INFO_KEYS and not _is_nan(v)})
        layers[name] = entry
    return layers


def save_activation_sparsity(model: nn.Module, path: Union[str, Path]) -> Path:
    """Write the thresholds of ``model``'s sparse-input layers and CATS MLPs; returns the file.

    ``path``: a directory (the file is ``activation_sparsity.json`` in it) or a file path. Written to a
    temporary file first and renamed, so an existing file is never left half-written.
    """
    layers = activation_layers(model)
    if not layers:
        raise ModelError("the model has no SparseInputLinear layers or CATS MLPs; run sparsify_activations_ first")
    target = _target(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".activation_sparsity.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"version": FORMAT_VERSION, "layers": layers}, f, indent=1)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _threshold(value, name: str) -> torch.Tensor:
    values = value if isinstance(value, list) else [value]
    try:
        t = torch.tensor([math.inf if v == "inf" else float(v) for v in values], dtype=torch.float32)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"activation sparsity: threshold of {name} is not a number or a list of numbers") from exc
    if torch.isnan(t).any() or (t < 0).any():
        raise ConfigError(f"activation sparsity: threshold of {name} must be >= 0, got {values[:4]}")
    return t


def _compute_dtype(value, name: str, where: str) -> torch.dtype:
    if value not in COMPUTE_DTYPES:
        raise ConfigError(f"{where}: activation-sparsity layer {name} has compute_dtype {value!r:.40}; use one of "
                          f"{', '.join(COMPUTE_DTYPES)}")
    return COMPUTE_DTYPES[value]


def _int8_values(module: nn.Module) -> bool:
    """Whether ``module`` stores int8 values with row scales (a ``SparseLinear`` or column layer)."""
    if isinstance(module, ColumnSparseLinear):
        return module.scales is not None
    return isinstance(module, SparseLinear) and getattr(module.weight_format, "scales", None) is not None


def load_activation_sparsity_(model: nn.Module, path: Union[str, Path]) -> None:
    """Swap the layers named in the file for sparse-input layers / CATS MLPs with its thresholds.

    Raises:
        ConfigError: unreadable file, unknown version or kind, a bad threshold.
        ModelError: a named layer is missing, is not an ``nn.Linear`` (or GLU MLP for CATS), or its
            per-channel threshold count does not match its input features. Nothing is changed then.
    """
    target = _target(path)
    try:
        data = json.loads(target.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the activation-sparsity file {target}: {exc}") from exc
    if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION or not isinstance(data.get("layers"), dict):
        raise ConfigError(f"{target} is not an activation-sparsity file of version {FORMAT_VERSION}")
    apply_activation_layers_(model, data["layers"], str(target))


def apply_activation_layers_(model: nn.Module, layers: dict, where: str) -> None:
    """Swap the layers named in ``layers`` (entries of :func:`activation_layers`) for sparse-input
    layers / CATS MLPs with their thresholds; ``where`` names the source in error messages. A
    ``"linear"`` entry on a weight-sparse ``SparseLinear`` becomes a
    :class:`~sparseforge.activation.ColumnSparseLinear` (its format converted to the column layout).

    Every entry is checked against the model before anything changes (errors as
    :func:`load_activation_sparsity_`).
    """
    modules = dict(model.named_modules())
    plan = []
    for name, entry in layers.items():
        module = modules.get(name)
        kind = entry.get("kind") if isinstance(entry, dict) else None
        if kind not in KINDS:
            raise ConfigError(f"{where}: activation-sparsity layer {name} has unknown kind {kind!r}")
        t = _threshold(entry.get("threshold"), name)
        compute_dtype = _compute_dtype(entry.get("compute_dtype", "float32"), name, where)
        if compute_dtype != torch.float32 and kind != "linear":
            raise ConfigError(f"{where}: activation-sparsity layer {name}: compute_dtype applies to 'linear' "
                              f"entries (column layers) only, not {kind!r}")
        if module is None:
            raise ModelError(f"the thresholds in {where} do not match this model: it has no layer {name}")
        if kind == "cats":
            if not (isinstance(module, CATSMLP) or is_swiglu_mlp(module)) or t.numel() != 1:
                raise ModelError(f"layer {name} is not a GLU MLP (gate_proj, up_proj, down_proj) with one CATS threshold")
        else:
            if not isinstance(module, (nn.Linear, SparseInputLinear, SparseLinear)):
                raise ModelError(f"the thresholds in {where} do not match this model: {name} is a {type(module).__name__}, "
                                 "not a linear layer")
            if kind == "rsparse" and isinstance(module, SparseLinear):
                raise ModelError(f"R-Sparse layer {name} is loaded weight-sparse (SparseLinear); its low-rank term needs "
                                 "the dense weight: load the checkpoint with sparse=False")
            if t.numel() not in (1, module.in_features):
                raise ModelError(f"layer {name} has {module.in_features} input features but {t.numel()} thresholds")
            if compute_dtype == torch.bfloat16 and _int8_values(module):
                raise ModelError(f"{where}: layer {name} has int8 values, which run float32 compute only; its "
                                 "compute_dtype 'bfloat16' does not apply (the checkpoint is corrupt)")
            rank = entry.get("rank")
            if kind == "rsparse" and (isinstance(rank, bool) or not isinstance(rank, int)
                                      or not 0 <= rank <= min(module.in_features, module.out_features)):
                raise ModelError(f"{where}: R-Sparse layer {name} needs a rank in [0, "
                                 f"{min(module.in_features, module.out_features)}], got {rank!r}")
        info = {k: entry[k] for k in INFO_KEYS if k in entry}
        plan.append((name, kind, module, t, info, compute_dtype))
    for name, kind, module, t, info, compute_dtype in plan:
        if kind == "rsparse":  # the low-rank factors come from the SVD of the stored weight
            linear = as_linear(module) if isinstance(module, SparseInputLinear) else module
            module = RSparseLinear.from_linear(linear, threshold=t, rank=layers[name]["rank"],
                                               dtype=module.weight_t.dtype if isinstance(module, SparseInputLinear) else None)
            set_module(model, name, module)
        elif isinstance(module, (SparseInputLinear, CATSMLP)):
            module.set_threshold(t if kind == "linear" else float(t))
        elif kind == "cats":
            module = CATSMLP(module, float(t))
            set_module(model, name, module)
        elif isinstance(module, SparseLinear):  # pruned and activation-sparse: the column layout, built here
            module = ColumnSparseLinear.from_module(module, threshold=t)
            set_module(model, name, module)
        else:
            module = SparseInputLinear.from_linear(module, threshold=t)
            set_module(model, name, module)
        if isinstance(module, ColumnSparseLinear):
            module.set_compute_dtype(compute_dtype)
        module.activation_info = info
