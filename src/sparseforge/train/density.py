"""Layer-wise sparsity for sparse training: uniform, Erdos-Renyi (ER) and Erdos-Renyi-Kernel (ERK).

* **uniform**: every layer at the target sparsity ``s``.
* **ER** (Mocanu et al. 2018, SET): layer ``l`` with ``n_in`` inputs and ``n_out`` outputs keeps a
  fraction ``eps * (n_in + n_out) / (n_in * n_out)`` of its weights.
* **ERK** (Evci et al. 2020, RigL): the same with every dimension of the weight, kernel
  included: ``eps * sum(shape) / prod(shape)``. For 2-D (linear) weights ER and ERK coincide;
  they differ for convolution kernels ``(out, in, kh, kw)``.

``eps`` is chosen so the kept weights add up to ``(1 - s) * sum_l N_l`` (``N_l`` = weights of
layer ``l``), the budget of the uniform distribution. When ``eps`` would give some layer a density
above 1, the layer(s) with the largest raw ratio become dense and ``eps`` is solved again over
the rest with what is left of the budget, until every density is at most 1 (the loop of
google-research/rigl ``sparse_utils.get_sparsities_erdos_renyi``). Layers kept dense by the user
(``dense_first`` / ``dense_last``) are excluded before allocation, as the reference code's
``custom_sparsity_map`` does: ``s`` is the sparsity of the layers that are sparsified.

Example:
    >>> from sparseforge.train.density import layer_sparsities
    >>> sp = layer_sparsities({"a": (100, 100), "b": (10, 100)}, 0.9, "erk")
    >>> round(sp["a"], 4), round(sp["b"], 4)  # the smaller layer is kept denser
    (0.929, 0.6097)
    >>> round((1 - sp["a"]) * 10000 + (1 - sp["b"]) * 1000)  # budget: 10% of 11000 weights
    1100
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from sparseforge.errors import ConfigError

__all__ = ["DISTRIBUTIONS", "raw_density", "layer_sparsities"]

DISTRIBUTIONS = ("uniform", "er", "erk")


def raw_density(shape: Sequence[int], distribution: str) -> float:
    """Un-normalised density of one layer: ER ``(out + in) / (out * in)``, ERK ``sum / prod`` of all dims."""
    if len(shape) < 2 or any(d < 1 for d in shape):
        raise ConfigError(f"ER/ERK needs a weight with at least 2 positive dimensions, got shape {tuple(shape)}")
    if distribution == "er":
        n_out, n_in = shape[0], shape[1]
        return (n_in + n_out) / (n_in * n_out)
    if distribution == "erk":
        return sum(shape) / math.prod(shape)
    raise ConfigError(f"unknown distribution {distribution!r}; choose one of {', '.join(DISTRIBUTIONS)}")


def layer_sparsities(
    shapes: Mapping[str, Sequence[int]], sparsity: float, distribution: str = "uniform"
) -> dict[str, float]:
    """Sparsity of every layer (``name -> weight shape``) so that the average over weights is ``sparsity``."""
    if distribution not in DISTRIBUTIONS:
        raise ConfigError(f"unknown distribution {distribution!r}; choose one of {', '.join(DISTRIBUTIONS)}")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if distribution == "uniform" or not shapes:
        return {name: float(sparsity) for name in shapes}

    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    raw = {name: raw_density(shape, distribution) for name, shape in shapes.items()}
    total_kept = (1.0 - sparsity) * sum(sizes.values())
    dense: set[str] = set()
    while True:
        free = [n for n in shapes if n not in dense]
        if not free:
            break
        budget = total_kept - sum(sizes[n] for n in dense)
        eps = budget / sum(raw[n] * sizes[n] for n in free)
        top = max(raw[n] for n in free)
        if eps * top <= 1.0:
            break
        dense.update(n for n in free if raw[n] == top)  # over-full: make dense, re-solve the rest

    return {n: 0.0 if n in dense else 1.0 - eps * raw[n] for n in shapes}
