"""One registry of the sparse storage formats: name -> class -> pattern label -> builders.

Every format file ends with one :func:`register` call; everything that turns a name into a format
object or an object into a name (``SparseLinear.from_linear``, the checkpoint writer and reader,
``compress_``, the torch ops, the advisor) asks this registry. A new format is one file plus one
registration (and, for its own kernels, one ``sparseforge.ops`` module).

A :class:`FormatSpec` says:

* ``name`` / ``cls``: the format's name (``"bitmap"``) and class (:class:`~sparseforge.formats.BitmapWeight`);
* ``build(w, pattern, keep)``: the object from a dense ``(out, in)`` weight, an optional recorded
  pattern and the keep mask (``ConfigError`` if the weight does not fit the format);
* ``load(state, shape, pattern)``: the object from its buffers (``from_state_dict``);
* ``pattern_of(obj)``: the pattern the object records (N:M, block, fan-in k), or ``None``;
* ``general``: holds masks without a required structure (``False`` for fan-in and BSR, which need
  equal row counts or whole blocks and are chosen explicitly or from a recorded pattern);
* ``stored`` and ``since_version``: written to checkpoints, from which checkpoint ``format_version``;
  ``rank``: the order in which a checkpoint names its most structured format (lowest first);
* ``kernels``: the ``sparseforge.ops`` family that multiplies it (default: ``name``);
* ``int8_values``: it also stores int8 values with float32 row scales (``build(w, pattern, keep,
  values_dtype=torch.int8, scales=None)``, :mod:`sparseforge.formats.quantized`), from checkpoint
  ``format_version`` 4 on;
* ``pattern_in_label``: whether reports show the pattern (``"nm 2:4"``, ``"bsr block4x4"``);
* ``sparse_linear``: ``SparseLinear`` (and so ``compress_`` and the advisor) can run it through
  ``sparseforge.ops.linear`` (``False`` for ``colbitmap``, the weight of the activation-sparse
  :class:`~sparseforge.activation.ColumnSparseLinear`).

Example:
    >>> from sparseforge.formats import registry
    >>> registry.get("nm").cls.__name__, registry.names(general=True)
    ('NMWeight', ('bitmap', 'nm', 'csr'))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from sparseforge.errors import ConfigError, ModelError
from sparseforge.patterns import Pattern

__all__ = ["FormatSpec", "register", "unregister", "get", "spec_of", "names", "label", "generation", "int8_names"]


def _no_pattern(obj: Any) -> Optional[Pattern]:
    return None


@dataclass(frozen=True)
class FormatSpec:
    """One storage format's entry in the registry (see the module doc)."""

    name: str
    cls: type
    build: Callable[[torch.Tensor, Optional[Pattern], Optional[torch.Tensor]], Any]
    load: Callable[[dict, tuple[int, int], Optional[Pattern]], Any]
    pattern_of: Callable[[Any], Optional[Pattern]] = _no_pattern
    general: bool = True
    stored: bool = True
    since_version: int = 1
    rank: int = 100
    kernels: Optional[str] = None
    pattern_in_label: bool = False
    int8_values: bool = False
    sparse_linear: bool = True

    @property
    def kernel_family(self) -> str:
        return self.kernels or self.name


_REGISTRY: dict[str, FormatSpec] = {}
_BY_CLASS: dict[type, FormatSpec] = {}  # spec_of's answers by exact class (hot: every SparseLinear call)
_GENERATION = [0]  # bumped on every change, so callers may cache answers (sparseforge.ops does)


def register(spec: FormatSpec) -> FormatSpec:
    """Add ``spec`` (once per name and class); returns it."""
    old = _REGISTRY.get(spec.name)
    if old is not None and old.cls is not spec.cls:
        raise ConfigError(f"format {spec.name!r} is already registered for {old.cls.__name__}")
    taken = next((s.name for s in _REGISTRY.values() if s.cls is spec.cls and s.name != spec.name), None)
    if taken is not None:
        raise ConfigError(f"{spec.cls.__name__} is already registered as format {taken!r}")
    _REGISTRY[spec.name] = spec
    _BY_CLASS.clear()
    _GENERATION[0] += 1
    return spec


def unregister(name: str) -> None:
    """Remove a format (tests register toy formats and remove them again)."""
    _REGISTRY.pop(name, None)
    _BY_CLASS.clear()
    _GENERATION[0] += 1


def generation() -> int:
    """A number that changes whenever a format is registered or removed (for caches of lookups)."""
    return _GENERATION[0]


def names(*, general: Optional[bool] = None, stored: Optional[bool] = None,
          sparse_linear: Optional[bool] = None) -> tuple[str, ...]:
    """Registered format names, in registration order, optionally only the (non-)general / (non-)stored
    ones / those ``SparseLinear`` does (not) run."""
    return tuple(s.name for s in _REGISTRY.values()
                 if (general is None or s.general == general) and (stored is None or s.stored == stored)
                 and (sparse_linear is None or s.sparse_linear == sparse_linear))


def int8_names() -> tuple[str, ...]:
    """Registered formats that store int8 values with row scales (``FormatSpec.int8_values``)."""
    return tuple(s.name for s in _REGISTRY.values() if s.int8_values)


def get(name: str) -> FormatSpec:
    """The spec of format ``name``; a :class:`ConfigError` naming the registered formats otherwise."""
    spec = _REGISTRY.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ConfigError(f"unknown sparse format {name!r}; use one of {names()}")
    return spec


def spec_of(obj: Any) -> FormatSpec:
    """The spec of a format object (its exact class first, then the nearest registered base class)."""
    spec = _BY_CLASS.get(type(obj))
    if spec is not None:
        return spec
    for cls in type(obj).__mro__:
        spec = next((s for s in _REGISTRY.values() if s.cls is cls), None)
        if spec is not None:
            _BY_CLASS[type(obj)] = spec
            return spec
    raise ModelError(f"{type(obj).__name__} is not a registered sparse format; registered: "
                     f"{', '.join(s.cls.__name__ for s in _REGISTRY.values())}")


def label(obj: Any) -> str:
    """How reports name a format object: ``"bitmap"``, ``"nm 2:4"``, ``"bsr block4x4"``."""
    spec = spec_of(obj)
    pattern = spec.pattern_of(obj) if spec.pattern_in_label else None
    return f"{spec.name} {pattern}" if pattern is not None else spec.name
