"""The optional transformers dependency, imported only when a Hugging Face model is loaded.

Example:
    >>> from sparseforge.io.hf import import_transformers
    >>> import_transformers().__name__                          # doctest: +SKIP
    'transformers'
"""

from __future__ import annotations

from types import ModuleType

from sparseforge.errors import ModelError

__all__ = ["import_transformers"]


def import_transformers() -> ModuleType:
    """The ``transformers`` module; a :class:`ModelError` naming the extra to install if it is missing."""
    try:
        import transformers
    except ImportError as exc:
        raise ModelError("loading Hugging Face models needs transformers: pip install 'sparseforge[hf]'") from exc
    return transformers
