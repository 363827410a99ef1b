"""Measuring on the machine that runs: the layer every ``"auto"`` choice stands on.

* :mod:`~sparseforge.measure.timing`: candidates timed interleaved until their medians are stable
  (or a budget runs out, then the measurement says it was too noisy);
* :mod:`~sparseforge.measure.tuning_cache`: measured answers kept on disk per CPU model, flags,
  threads and library versions (``sparseforge cache clear`` forgets them);
* :mod:`~sparseforge.measure.choose`: the fastest of interchangeable implementations, measured once
  and cached, the default kept when the machine was too noisy to tell;
* :mod:`~sparseforge.measure.lanes_tile`: the sparse kernels' tile sizes chosen that way.
* :mod:`~sparseforge.measure.bf16_method`: the bf16 product's method (dense panels or the
  zero-skipping walk) per weight and batch, chosen that way.

It sits below :mod:`sparseforge.nn` and :mod:`sparseforge.moe` (whose layers measure on first use)
and :mod:`sparseforge.runtime` (the format advisor), and imports none of them.

Example:
    >>> from sparseforge.measure.choose import choose_by_timing
    >>> choose_by_timing.__name__
    'choose_by_timing'
"""
