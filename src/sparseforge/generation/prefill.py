"""The prompt's forward pass (prefill) of the native engine, with bfloat16 linears widened to float32 where that is faster.

On a CPU without native bf16 arithmetic (no AVX512_BF16, no AMX: e.g. AMD Zen 3) torch's bfloat16
``F.linear`` at prefill sizes runs several times slower than its float32 product (512 x 2048 @ 2048 x 11264,
2 threads, Zen 3 class: 1.32 s in bf16, 0.27 s in float32, 0.32 s widening both operands and rounding the
output). Both sum the bf16 products in float32 and round once, in different orders, so the widened product
is the bf16 product up to float32 summation order. :func:`prompt_forward` runs the model's own forward on
the prompt and, for a bfloat16 model, widens its plain ``nn.Linear`` layers for that call when
:func:`widening_pays` measured it faster on this machine (:func:`sparseforge.measure.choose.choose_by_timing`,
cached per CPU; the default when the machine is too noisy to tell is torch's bf16 product).

Example:
    >>> import torch
    >>> from sparseforge.generation.prefill import widened_bf16_linears
    >>> lin = torch.nn.Linear(4, 2).to(torch.bfloat16)
    >>> with widened_bf16_linears(torch.nn.Sequential(lin)) as n:
    ...     y = lin(torch.ones(3, 4, dtype=torch.bfloat16))
    >>> n, y.dtype, y.shape
    (1, torch.bfloat16, torch.Size([3, 2]))
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["prompt_forward", "widened_bf16_linears", "widening_pays"]

_PROBE_ROWS = 128  # prompt tokens of the measured product


def _widened(layer: nn.Linear, x: Tensor) -> Tensor:
    """``layer(x)`` for a bfloat16 layer, multiplied in float32 and rounded once to bfloat16."""
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), bias).to(x.dtype)


@contextmanager
def widened_bf16_linears(model: nn.Module) -> Iterator[int]:
    """Within the block, every plain bfloat16 ``nn.Linear`` of ``model`` computes through :func:`_widened` (its hooks
    still run); yields how many layers. The layers' own ``forward`` is back on exit, also after an error."""
    layers = [m for m in model.modules() if type(m) is nn.Linear and m.weight.dtype == torch.bfloat16]
    for m in layers:
        m.forward = _widened.__get__(m)  # an instance attribute over the class's forward
    try:
        yield len(layers)
    finally:
        for m in layers:
            del m.forward


@lru_cache(maxsize=None)
def widening_pays(hidden: int, threads: int) -> bool:
    """Whether a bf16 ``(128, hidden) @ (hidden, hidden)`` product runs faster widened to float32 than in torch's
    bf16 on this machine at ``threads`` torch threads: measured once per CPU and shape, cached on disk, and the answer
    kept for the process (a prefill neither rebuilds the probe nor reads the cache file again)."""
    from sparseforge.measure.choose import choose_by_timing

    g = torch.Generator().manual_seed(0)
    x = torch.randn(_PROBE_ROWS, hidden, generator=g).to(torch.bfloat16)
    layer = nn.Linear(hidden, hidden, bias=False).to(torch.bfloat16)
    with torch.inference_mode():
        candidates = {"bf16": lambda: layer(x), "widened": lambda: _widened(layer, x)}
        choice = choose_by_timing("bf16_prefill_linear", {"hidden": hidden, "rows": _PROBE_ROWS}, candidates,
                                  default="bf16", budget_s=0.3, threads=threads)
    return choice.name == "widened"


def prompt_forward(model: nn.Module, input_ids: Tensor, **kwargs):
    """``model(input_ids, **kwargs)``, with a bfloat16 model's linears widened where :func:`widening_pays`."""
    embed = model.get_input_embeddings().weight
    if embed.dtype == torch.bfloat16 and input_ids.shape[-1] > 1 and widening_pays(embed.shape[1], torch.get_num_threads()):
        with widened_bf16_linears(model):
            return model(input_ids, **kwargs)
    return model(input_ids, **kwargs)
