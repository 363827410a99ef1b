"""Exception types. Every user-facing error says what was wrong and how to fix it."""

from __future__ import annotations

__all__ = ["SparseforgeError", "ConfigError", "ModelError", "DataError", "NumericalError"]


class SparseforgeError(Exception):
    """Base class of the errors sparseforge raises on bad input (the CLI prints them as one line)."""


class ConfigError(SparseforgeError, ValueError):
    """A configuration, recipe or pattern is invalid, or does not fit a layer."""


class ModelError(SparseforgeError, ValueError):
    """A model path or model object cannot be used (missing, not a model, unsupported layout)."""


class DataError(SparseforgeError, ValueError):
    """Calibration or evaluation data is missing, empty or too short."""


class NumericalError(SparseforgeError, ArithmeticError):
    """Non-finite weights or activations, or a Hessian that stays singular after dampening."""
