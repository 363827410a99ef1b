"""Names of the one-shot pruning methods and layer-wise allocations, defined once and torch-free.

The CLI lists them as choices without importing torch; :class:`~sparseforge.config.SparsifyConfig`
validates against them; :data:`sparseforge.prune.methods.METHODS` maps each to its class.

Example:
    >>> from sparseforge.prune.names import METHODS
    >>> METHODS
    ('magnitude', 'wanda', 'sparsegpt', 'dsnot')
"""

METHODS = ("magnitude", "wanda", "sparsegpt", "dsnot")
ALLOCATIONS = ("uniform", "owl")
