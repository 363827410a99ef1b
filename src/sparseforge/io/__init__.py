"""Models on disk: writing and reading sparseforge checkpoints, loading models, inspection.

* :mod:`~sparseforge.io.checkpoint`: ``save_pretrained`` of dense or compressed checkpoints;
* :mod:`~sparseforge.io.layout`: the compressed layout read back (config block, packed tensors, sizes);
* :mod:`~sparseforge.io.validation`: the checks every reader runs first (fields, tensors, checksums);
* :mod:`~sparseforge.io.safetensors_header`: a safetensors header read and checked, no data touched;
* :mod:`~sparseforge.io.atomic_dir`: crash-safe replacement of a directory, recovery after a crash;
* :mod:`~sparseforge.io.writable`: output paths checked before any work;
* :mod:`~sparseforge.io.loading`: ``load`` / ``load_sparse``, a model from a checkpoint;
* :mod:`~sparseforge.io.models`: resolve a model name or directory and load it with its tokenizer;
* :mod:`~sparseforge.io.builtin`: where the built-in model ships;
* :mod:`~sparseforge.io.inspection`: per-tensor sparsity, format and bytes of a model directory;
* :mod:`~sparseforge.io.hf`: the optional transformers dependency.

Example:
    >>> from sparseforge.io.models import load_model
    >>> loaded = load_model("builtin")                    # doctest: +SKIP
"""
