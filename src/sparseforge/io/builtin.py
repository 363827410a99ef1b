"""The built-in default model: a small Llama-style causal LM trained on the built-in corpus.

The model and its byte-level BPE tokenizer ship in
``sparseforge/assets/builtin-llama/`` as a Hugging Face ``save_pretrained``
directory (``config.json``, ``model.safetensors``, ``tokenizer.json``, ...), so
``transformers.AutoModelForCausalLM.from_pretrained(builtin_model_path())``
works offline. It is reproduced by ``scripts/train_builtin_model.py``; see the
README in the model directory for its card. Its held-out perplexity is measured by
:func:`sparseforge.evaluation.quality.perplexity` (the project's one perplexity protocol).

Example:
    >>> from sparseforge.io.builtin import builtin_model_path
    >>> builtin_model_path().name
    'builtin-llama'

Importing this module is cheap (no torch / transformers at import time).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = [
    "BUILTIN_MODEL_NAME",
    "BUILTIN_MODEL_DIRNAME",
    "builtin_model_path",
]

#: Name under which the built-in model is selected (e.g. ``--model builtin``).
BUILTIN_MODEL_NAME = "builtin"

#: Directory name of the model inside ``sparseforge/assets/``.
BUILTIN_MODEL_DIRNAME = "builtin-llama"

_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def builtin_model_path() -> Path:
    """Path of the built-in model directory inside the installed package.

    Raises:
        FileNotFoundError: if the directory or one of its essential files is missing.
    """
    root = Path(str(resources.files("sparseforge").joinpath("assets", BUILTIN_MODEL_DIRNAME)))
    missing = [f for f in _REQUIRED_FILES if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"built-in model not found: {root} is missing {', '.join(missing)}. "
            "The sparseforge installation is incomplete (package data not installed?); "
            "reinstall sparseforge, or regenerate the model with "
            "`python scripts/train_builtin_model.py` from a source checkout."
        )
    return root
