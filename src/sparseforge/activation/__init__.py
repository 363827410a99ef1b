"""Activation sparsity: skip the small input channels of linear layers at inference.

* :class:`SparseInputLinear`: the layer (input-channel-major weight + threshold; native sparse-input
  GEMV for decode, GEMM over the same weights for prefill).
* :class:`ColumnSparseLinear`: a layer both pruned and activation-sparse (column bitmap weight:
  per input channel a bitmap + packed kept values; :func:`column_sparse_` converts a model's layers).
* :func:`sparsify_activations_` with :class:`ActivationSparsityConfig`: calibrate TEAL thresholds
  (Liu et al. 2024, arXiv:2408.14690) on a model's projections and swap its ``nn.Linear`` layers
  for :class:`SparseInputLinear`, so ``model.generate`` runs sparse.
* R-Sparse (``method="rsparse"``, :mod:`sparseforge.activation.rsparse`): scaled thresholds plus a
  low-rank SVD term for the skipped channels; CATS (``method="cats"``) on GLU gate outputs.
* ReLU-fication (:mod:`sparseforge.activation.relufy`): :func:`relufy_`, :class:`ActivationL1`
  (ProSparse's progressive L1 during recovery fine-tuning, staged by :class:`L1Schedule`;
  ``FinetuneConfig(l1_schedule=...)``), :func:`shift_activation_threshold_` (ProSparse's FATReLU
  threshold shift), :func:`relu_sparse_` (lossless skipping).
* :func:`save_activation_sparsity` / :func:`load_activation_sparsity_`: the thresholds in a small JSON
  file beside the (dense) checkpoint; ``sparseforge.save_pretrained`` / ``sparseforge.load`` keep them
  inside the checkpoint (``sparsity_config.activation``).

See ``docs/activation.md``.

Example:
    >>> from sparseforge.activation import ActivationSparsityConfig
    >>> ActivationSparsityConfig(sparsity=0.4).allocation
    'uniform'
"""

from __future__ import annotations

from sparseforge.activation.column_linear import ColumnSparseLinear, column_sparse_
from sparseforge.activation.config import ActivationSparsityConfig
from sparseforge.activation.linear import SparseInputLinear
from sparseforge.activation.l1_schedule import L1Schedule
from sparseforge.activation.relufy import ActivationL1, FATReLU, relu_sparse_, relufy_, shift_activation_threshold_
from sparseforge.activation.rsparse import RSparseLinear
from sparseforge.activation.storage import load_activation_sparsity_, save_activation_sparsity
from sparseforge.activation.teal import ActivationSparsityReport, set_token_fraction, sparse_input_layers, sparsify_activations_

__all__ = [
    "ActivationSparsityConfig", "ActivationSparsityReport", "SparseInputLinear", "sparsify_activations_",
    "set_token_fraction", "sparse_input_layers", "save_activation_sparsity", "load_activation_sparsity_",
    "RSparseLinear", "relufy_", "relu_sparse_", "ActivationL1", "ColumnSparseLinear", "column_sparse_",
    "L1Schedule", "FATReLU", "shift_activation_threshold_",
]
