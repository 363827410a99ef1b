"""Recall of the shipped MQAR model when its KV cache runs a sparse-attention policy.

The model (``sparseforge/assets/mqar-llama/``: a 2-layer induction circuit whose weights
``scripts/build_mqar_model.py`` sets; task: :mod:`sparseforge.data.mqar`) answers multi-query
associative recall: the context holds key-value pairs, each query repeats a key and the model must
name its value. :func:`recall` feeds the context as one dense prefill into a
:class:`~sparseforge.attention.PagedKVCache` with the given policy, then every query token as a
**decode step** (one token at a time, the values teacher-forced), so the policy decides which
cached tokens each answer can see.

Example:
    >>> import torch
    >>> from sparseforge.attention import Dense
    >>> from sparseforge.data.mqar import make_batch
    >>> from sparseforge.evaluation.mqar import load_mqar_model, mqar_vocab, recall
    >>> model = load_mqar_model()
    >>> b = make_batch(2, 256, 32, 8, mqar_vocab(model), generator=torch.Generator().manual_seed(0))
    >>> float(recall(model, b, Dense()).float().mean()) > 0.9
    True
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Union

import torch
from torch import Tensor

from sparseforge.data.mqar import MQARBatch, MQARVocab
from sparseforge.errors import ConfigError, ModelError

__all__ = ["MQAR_MODEL_DIRNAME", "mqar_model_path", "load_mqar_model", "mqar_vocab", "prefill", "answer", "recall"]

#: Directory name of the MQAR model inside ``sparseforge/assets/``.
MQAR_MODEL_DIRNAME = "mqar-llama"

_REQUIRED_FILES = ("config.json", "model.safetensors")


def mqar_model_path() -> Path:
    """Path of the shipped MQAR model directory; raises ``FileNotFoundError`` if it is incomplete."""
    root = Path(str(resources.files("sparseforge").joinpath("assets", MQAR_MODEL_DIRNAME)))
    missing = [f for f in _REQUIRED_FILES if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"MQAR model not found: {root} is missing {', '.join(missing)}. The sparseforge installation is "
            "incomplete (package data not installed?); reinstall sparseforge, or rebuild it with "
            "`python scripts/build_mqar_model.py` from a source checkout."
        )
    return root


def load_mqar_model(path: Union[str, os.PathLike, None] = None, attn_implementation: str = "sparseforge"):
    """The MQAR ``LlamaForCausalLM`` (float32, eval mode): the shipped one, or the directory ``path``
    written by ``scripts/build_mqar_model.py --out`` (or ``scripts/train_mqar.py --out``);
    ``"sparseforge"`` registers and selects the sparse decode attention
    (:func:`sparseforge.attention.enable`)."""
    from transformers import AutoModelForCausalLM

    if attn_implementation == "sparseforge":
        from sparseforge.attention import enable

        enable()
    root = mqar_model_path() if path is None else Path(path)
    if not (root / "config.json").is_file():
        raise ModelError(f"{root} holds no model (config.json); write one with "
                         f"scripts/build_mqar_model.py --out {root}")
    model = AutoModelForCausalLM.from_pretrained(root, dtype=torch.float32, attn_implementation=attn_implementation)
    mqar_vocab(model)  # an MQAR model, or a clear error
    return model.eval()


def mqar_vocab(model) -> MQARVocab:
    """The :class:`MQARVocab` a model was trained with (``config.mqar_vocab``)."""
    spec = getattr(model.config, "mqar_vocab", None)
    if not isinstance(spec, dict):
        raise ModelError(f"{type(model).__name__} has no config.mqar_vocab: it is not an MQAR model (load_mqar_model)")
    vocab = MQARVocab(**spec)
    if vocab.size != model.config.vocab_size:
        raise ModelError(f"config.mqar_vocab needs {vocab.size} token ids, the model has {model.config.vocab_size}")
    return vocab


def _check_model(model) -> None:
    from sparseforge.attention import NAME

    if getattr(model.config, "_attn_implementation", None) != NAME:
        raise ConfigError(f"MQAR recall: the model must use attn_implementation='{NAME}' (load_mqar_model() does) so "
                          "the policy runs at decode")


def _check_batch(batch: MQARBatch) -> None:
    expected = torch.arange(batch.ids.shape[1]).expand_as(batch.positions)
    if not torch.equal(batch.positions, expected):
        raise ConfigError("MQAR recall: the batch has spread position ids (stretch > 1); make it with stretch=1")


@torch.no_grad()
def prefill(model, batch: MQARBatch, policy=None, page_size: int = 16):
    """A ``PagedKVCache(policy)`` holding the batch's context (one dense prefill); ``None`` = Dense.

    The cache can be copied (``copy.deepcopy``) and switched (``set_policy``) to answer the same
    context under several decode-time policies; SnapKV chooses its tokens during this prefill, so
    it needs its own.
    """
    from sparseforge.attention import Dense, PagedKVCache

    _check_model(model)
    _check_batch(batch)
    cache = PagedKVCache(model.config, policy=Dense() if policy is None else policy, page_size=page_size)
    model(input_ids=batch.ids[:, : batch.context], cache=cache, use_cache=True)
    return cache


@torch.no_grad()
def answer(model, batch: MQARBatch, cache) -> Tensor:
    """bool ``(B, queries)``: each query key is one decode step on ``cache`` (which holds the
    context, :func:`prefill`), its greedy answer compared with the value; the value is then fed."""
    _check_model(model)
    _check_batch(batch)
    if cache.get_seq_length() != batch.context:
        raise ConfigError(f"MQAR recall: the cache holds {cache.get_seq_length()} tokens, the context is {batch.context}; "
                          "use a fresh prefill(model, batch, policy)")
    C, Q = batch.context, batch.queries
    correct = torch.empty(batch.ids.shape[0], Q, dtype=torch.bool)
    for j in range(Q):
        k = C + 2 * j
        logits = model(input_ids=batch.ids[:, k: k + 1], cache=cache, use_cache=True).logits  # (B, 1, V)
        correct[:, j] = logits[:, -1].argmax(-1) == batch.labels[:, k]
        if j + 1 < Q:
            model(input_ids=batch.ids[:, k + 1: k + 2], cache=cache, use_cache=True)  # the value, forced
    return correct


def recall(model, batch: MQARBatch, policy=None, page_size: int = 16) -> Tensor:
    """bool ``(B, queries)``: whether the greedy answer to each query is its value.

    The context (``batch.ids[:, :context]``) is prefilled into a fresh ``PagedKVCache(policy)``,
    then each query key is one decode step (its logits give the answer) and its value the next.
    ``policy=None`` means :class:`~sparseforge.attention.Dense`. The batch's positions must be
    consecutive (``stretch=1``): the cache numbers tokens in order.
    """
    return answer(model, batch, prefill(model, batch, policy, page_size))
