"""Weight quantization: symmetric int8 / int4 per channel (or per group), round-to-nearest or joint
with SparseGPT's pruning pass (Frantar & Alistarh 2023, section 3.4).

* :mod:`~sparseforge.quant.config`: :class:`QuantConfig` and :data:`SCALE_BUFFER` (torch-free);
* :mod:`~sparseforge.quant.grid`: scales, quantize / dequantize (pure tensor functions);
* :mod:`~sparseforge.quant.transform`: ``quantize_(model, QuantConfig())``, the whole-model transform;
* :mod:`sparseforge.io.scales`: the scale buffers across save / load.

Joint mode runs inside :func:`sparseforge.sparsify_`:
``SparsifyConfig(method="sparsegpt", pattern="2:4", quantize=QuantConfig(bits=8, method="joint"))``.

Example:
    >>> import torch
    >>> from sparseforge.quant import SCALE_BUFFER, QuantConfig, quantize_
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    >>> report = quantize_(model, QuantConfig(bits=8), targets=["0"])
    >>> getattr(model[0], SCALE_BUFFER).shape
    torch.Size([4])
"""

from __future__ import annotations

from sparseforge.quant.config import QUANT_METHODS, SCALE_BUFFER, QuantConfig, parse_quantize
from sparseforge.quant.grid import codes_of, compute_scale, dequantize, fake_quantize, quantize
from sparseforge.quant.transform import QuantizeReport, quantize_

__all__ = ["QuantConfig", "SCALE_BUFFER", "QUANT_METHODS", "parse_quantize", "quantize_", "QuantizeReport",
           "compute_scale", "quantize", "dequantize", "fake_quantize", "codes_of"]
