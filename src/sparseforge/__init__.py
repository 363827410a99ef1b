"""sparseforge: make neural networks sparse and measurably faster.

Importing the package is cheap: it pulls in torch-free pattern and config code lazily, and never
imports transformers (that lives behind the ``sparseforge[hf]`` extra).

Example:
    >>> import sparseforge as sf
    >>> sf.parse("2:4")
    NM(n=2, m=4)
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it; resolved on first attribute access (PEP 562)
_LAZY = {
    "Unstructured": "patterns",
    "NM": "patterns",
    "Block": "patterns",
    "FanIn": "patterns",
    "Channel": "patterns",
    "parse": "patterns",
    "mask_from_scores": "masks",
    "SparsifyConfig": "config",
    "CalibrationConfig": "config",
    "QuantConfig": "config",
    "quantize_": "quant.transform",
    "load_recipe": "config",
    "sparsify_": "prune.sparsify",
    "save_pretrained": "io.checkpoint",
    "load": "io.loading",
    "compress_": "runtime.compress",
    "load_sparse": "io.loading",
    "SparseLinear": "nn.sparse_linear",
    "SparseforgeError": "errors",
    "ConfigError": "errors",
}

# subpackages loaded on first access: ``sparseforge.train.RigL(...)``
_SUBPACKAGES = ("train", "moe", "nn")

__all__ = sorted(_LAZY) + list(_SUBPACKAGES) + ["__version__"]


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"sparseforge.{name}")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sparseforge' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"sparseforge.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
