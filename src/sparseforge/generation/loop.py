"""``native_generate``: the generate loop of the native decode engine, a documented equivalent of transformers' ``generate``.

For one sequence (batch 1), ``native_generate(model, ids, max_new_tokens=N, ...)`` returns what
``model.generate(ids, max_new_tokens=N, ...)`` returns, ``(1, T + new)`` token ids, for these options:

==========================  ================================================================
transformers ``generate``    ``native_generate``
==========================  ================================================================
``do_sample=False``          ``sampling=Sampling()`` (greedy, the default)
``do_sample=True,``          ``sampling=Sampling(temperature, top_k, top_p, seed)``; same filters
``temperature/top_k/top_p``  in the same order (:mod:`sparseforge.generation.sampling`), drawn
                             from a generator seeded with ``seed`` instead of the global one
``max_new_tokens``           ``max_new_tokens``
``eos_token_id``             ``eos_token_id`` (an id or a list; default the model's
                             ``generation_config``): the end token is appended, then it stops
``min_new_tokens``           ``min_new_tokens``: end tokens are masked out until that many
``streamer``                 ``streamer``: ``put(prompt ids)``, ``put(tensor([id]))`` per new
                             token, ``end()`` (any transformers streamer works)
==========================  ================================================================

Other ``generate`` options (beams, repetition penalties, batches, ``attention_mask`` padding) are
not part of it; use transformers' ``generate`` for them. Greedy tokens equal ``model.generate``'s
(``tests/generation/test_engine.py``) up to float rounding: the engine's fused RMSNorm, rotary and
attention round differently in the last bits, which can flip a near-tie between two logits.

Example:
    >>> import torch
    >>> from sparseforge.generation.loop import native_generate
    >>> out = native_generate(model, torch.tensor([[1, 5, 9]]), max_new_tokens=8)   # doctest: +SKIP
    >>> out.shape                                                                   # doctest: +SKIP
    torch.Size([1, 11])
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import torch
from torch import Tensor, nn

from sparseforge.errors import ConfigError
from sparseforge.generation.engine import DecodeEngine
from sparseforge.generation.sampling import Sampling, TokenPicker

__all__ = ["native_generate"]


def _eos_ids(model: nn.Module, eos_token_id: "int | Iterable[int] | None") -> tuple[int, ...]:
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos_token_id is None:
        return ()
    ids = (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ConfigError(f"eos_token_id must be an int or a list of ints, got {eos_token_id!r}")
    return ids


def native_generate(model: nn.Module, input_ids: Tensor, *, max_new_tokens: int, sampling: Sampling = Sampling(),
                    min_new_tokens: int = 0, eos_token_id: "int | Iterable[int] | None" = None, streamer: Any = None,
                    attention: str = "auto", fuse: bool = True, bf16_gemv: bool = True) -> Tensor:
    """Continue ``input_ids (1, T)`` by at most ``max_new_tokens`` tokens with :class:`DecodeEngine` (module doc).

    ``attention``, ``fuse`` and ``bf16_gemv`` go to :class:`DecodeEngine` (``fuse=True`` stacks the model's q/k/v and
    gate/up in place). Returns int64 ``(1, T + new)``.

    Raises:
        ModelError: a model the engine does not run (:func:`~sparseforge.generation.engine.unsupported_reason`).
        ConfigError: bad numbers, or a batch of several prompts.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if isinstance(min_new_tokens, bool) or not isinstance(min_new_tokens, int) or not 0 <= min_new_tokens <= max_new_tokens:
        raise ConfigError(f"min_new_tokens must be an integer in [0, max_new_tokens], got {min_new_tokens!r}")
    if not isinstance(sampling, Sampling):
        raise ConfigError(f"sampling must be a sparseforge.generation.sampling.Sampling, got {sampling!r}")
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1:
        shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise ConfigError(f"the native engine generates for one prompt: input_ids must be (1, T), got {shape}; "
                          "use engine='transformers' for batches")
    eos = _eos_ids(model, eos_token_id)
    engine = DecodeEngine(model, input_ids.shape[1] + max_new_tokens, attention=attention, fuse=fuse, bf16_gemv=bf16_gemv)
    pick = TokenPicker(sampling)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    new: list[int] = []
    with torch.inference_mode():
        logits = engine.prefill(input_ids)  # (vocab,) float32
        while True:
            if len(new) < min_new_tokens and eos:
                logits[list(eos)] = -math.inf
            token = pick(logits)
            new.append(token)
            if streamer is not None:
                streamer.put(torch.tensor([token]))
            if token in eos or len(new) == max_new_tokens:
                break
            logits = engine.step(token)
    if streamer is not None:
        streamer.end()
    return torch.cat([input_ids.to(torch.long), torch.tensor([new], dtype=torch.long)], dim=1)
