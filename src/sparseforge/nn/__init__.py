"""Modules over the sparse formats and native kernels: :class:`SparseLinear`.

Example:
    >>> from sparseforge.nn import SparseLinear
    >>> SparseLinear.__name__
    'SparseLinear'
"""

from sparseforge.nn.sparse_linear import FORMATS, SparseLinear

__all__ = ["SparseLinear", "FORMATS"]
