"""One-shot pruning: score functions, calibration passes, layer-wise allocation, ``sparsify_``.

* :mod:`~sparseforge.prune.methods`: magnitude, Wanda, SparseGPT (a pure score/update function each);
* :mod:`~sparseforge.prune.sequential`: block-by-block calibration (SparseGPT, section 3);
* :mod:`~sparseforge.prune.allocation`: OWL layer-wise sparsities;
* :mod:`~sparseforge.prune.sparsify`: ``sparsify_(model, SparsifyConfig)``, the whole-model transform.

Training-time sparsity lives in :mod:`sparseforge.train`, MoE expert pruning in :mod:`sparseforge.moe`.

Example:
    >>> from sparseforge.prune.methods import get_method
    >>> get_method("magnitude").name
    'magnitude'
"""
