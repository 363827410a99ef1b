"""Models on disk: compressed checkpoints, model loading, the built-in model, inspection.

* :mod:`~sparseforge.io.checkpoint`: ``save_pretrained`` / ``load`` of dense or compressed checkpoints;
* :mod:`~sparseforge.io.models`: resolve a model name or directory and load it (``load_model``);
* :mod:`~sparseforge.io.builtin`: where the built-in model ships;
* :mod:`~sparseforge.io.inspection`: per-tensor sparsity, format and bytes of a model directory.

Example:
    >>> from sparseforge.io.models import load_model
    >>> loaded = load_model("builtin")                    # doctest: +SKIP
"""
