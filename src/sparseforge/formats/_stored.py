"""Shared tail of the formats whose buffers all go to disk under ``{prefix}{KEY}{field}`` names.

A format class lists its on-disk buffers in ``FIELDS`` (dataclass field names, in constructor
order after ``shape``) and their name prefix in ``KEY``; this mixin gives it ``dtype``, ``nnz``,
``nbytes``, ``state_dict`` and ``from_state_dict``. Used by CSR, constant fan-in and BSR.

Example:
    >>> import torch
    >>> from sparseforge.formats import FanInWeight
    >>> fw = FanInWeight.from_dense(torch.tensor([[0., 2.], [3., 0.]]))
    >>> sorted(fw.state_dict("l.")), fw.nbytes
    (['l.fanin_indices', 'l.fanin_values'], 12)
"""

from __future__ import annotations

from typing import ClassVar

import torch

from sparseforge.errors import ModelError


class StoredBuffers:
    """Mixin: ``values`` plus the buffers named in ``FIELDS``, stored as ``{prefix}{KEY}{field}``."""

    KEY: ClassVar[str]
    FIELDS: ClassVar[tuple[str, ...]]
    values: torch.Tensor

    @property
    def stored_fields(self) -> tuple[str, ...]:
        """``FIELDS``, plus ``scales`` when the values are int8 (:mod:`sparseforge.formats.quantized`)."""
        return self.FIELDS + (("scales",) if getattr(self, "scales", None) is not None else ())

    def __getstate__(self) -> dict:
        # copies and pickles drop cached kernel arguments (numpy views that share memory with the
        # original buffers, see sparseforge.ops._define.FormatOps.kernel_args): rebuilt on use
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def nnz(self) -> int:
        """Number of stored entries, explicit zeros included."""
        return self.values.numel()

    @property
    def nbytes(self) -> int:
        """Bytes of the stored buffers."""
        return sum(t.numel() * t.element_size() for t in (getattr(self, f) for f in self.stored_fields))

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """On-disk tensors ``{prefix}{KEY}{field}`` for each field of :attr:`stored_fields`."""
        return {f"{prefix}{self.KEY}{f}": getattr(self, f) for f in self.stored_fields}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], shape: tuple[int, int], prefix: str = ""):
        """Rebuild from :meth:`state_dict` output plus the ``shape`` kept in the config."""
        keys = [f"{prefix}{cls.KEY}{f}" for f in cls.FIELDS]
        missing = [k for k in keys if k not in state]
        if missing:
            raise ModelError(f"{cls.__name__} {prefix!r} is missing tensor(s) {missing}")
        scales = state.get(f"{prefix}{cls.KEY}scales")
        return cls(tuple(shape), *(state[k] for k in keys), **({} if scales is None else {"scales": scales}))
