"""Running sparse models fast on this CPU: choosing formats and swapping layers in.

* :mod:`~sparseforge.runtime.advise`: times dense and every sparse format per layer shape on this machine;
* :mod:`~sparseforge.runtime.compress`: ``compress_(model)`` swaps pruned linears for ``SparseLinear``;
* :mod:`~sparseforge.runtime.machine`: the CPU, thread counts and last-level cache every timing carries.

The kernels themselves and their thread settings are :mod:`sparseforge.kernels` and
:mod:`sparseforge.ops`.

Example:
    >>> from sparseforge.runtime.compress import compress_
    >>> compress_.__name__
    'compress_'
"""
