"""Models on disk: writing and reading sparseforge checkpoints, loading models, inspection.

* :mod:`~sparseforge.io.checkpoint`: ``save_pretrained`` of dense or compressed checkpoints;
* :mod:`~sparseforge.io.layout`: the compressed layout read back (config block, packed tensors, sizes);
* :mod:`~sparseforge.io.loading`: ``load`` / ``load_sparse``, a model from a checkpoint;
* :mod:`~sparseforge.io.models`: resolve a model name or directory and load it with its tokenizer;
* :mod:`~sparseforge.io.builtin`: where the built-in model ships;
* :mod:`~sparseforge.io.inspection`: per-tensor sparsity, format and bytes of a model directory;
* :mod:`~sparseforge.io.hf`: the optional transformers dependency.

Example:
    >>> from sparseforge.io.models import load_model
    >>> loaded = load_model("builtin")                    # doctest: +SKIP
"""
