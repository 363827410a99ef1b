"""Training batches for recovery fine-tuning: random token windows (causal LMs) or sentences (encoders).

The source is ``"builtin"`` (the train split of the built-in corpus), a UTF-8 ``.txt`` file or a
directory of them (:func:`sparseforge.data.calibration.source_text`). Batches are drawn by a seeded
``torch.Generator`` whose state is part of the resumable state, so an interrupted run continues
with exactly the batches it would have seen.

* causal LM: ``batch_size`` windows of ``seqlen`` consecutive tokens at uniform random offsets of
  the whole text tokenised once; ``attention_mask`` is all ones.
* encoder: ``batch_size`` sentences drawn uniformly (with replacement), tokenised with the
  tokenizer's special tokens, padded to the longest and truncated to ``seqlen``.

Example:
    >>> batches = TokenBatches(torch.arange(1000), batch_size=2, seqlen=8, seed=0)  # doctest: +SKIP
    >>> batches.next()["input_ids"].shape                                          # doctest: +SKIP
    torch.Size([2, 8])
"""

from __future__ import annotations

import re
from typing import Any

import torch

from sparseforge.errors import DataError

__all__ = ["TokenBatches", "SentenceBatches", "split_sentences", "make_batches"]

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


class TokenBatches:
    """Random windows of a token stream ``(n_tokens,)``: each batch is ``{"input_ids", "attention_mask"}`` ``(B, seqlen)``."""

    def __init__(self, ids: torch.Tensor, batch_size: int, seqlen: int, seed: int) -> None:
        if ids.numel() < seqlen + 1:
            raise DataError(f"the training text has {ids.numel()} tokens, fewer than one sequence of seqlen={seqlen} "
                            "(+1); give more text or lower --seqlen")
        self.ids, self.batch_size, self.seqlen = ids, batch_size, seqlen
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> dict[str, torch.Tensor]:
        starts = torch.randint(0, self.ids.numel() - self.seqlen, (self.batch_size,), generator=self.generator)
        x = self.ids[starts[:, None] + torch.arange(self.seqlen)]  # (B, seqlen)
        return {"input_ids": x, "attention_mask": torch.ones_like(x)}


class SentenceBatches:
    """Random sentences, padded: each batch is the tokenizer's ``input_ids`` / ``attention_mask`` ``(B, <= seqlen)``."""

    def __init__(self, sentences: list[str], tokenizer: Any, batch_size: int, seqlen: int, seed: int) -> None:
        if not sentences:
            raise DataError("the training text has no sentence of at least 4 words; give more text")
        self.sentences, self.tokenizer = sentences, tokenizer
        self.batch_size, self.seqlen = batch_size, seqlen
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> dict[str, torch.Tensor]:
        picks = torch.randint(0, len(self.sentences), (self.batch_size,), generator=self.generator)
        enc = self.tokenizer([self.sentences[i] for i in picks.tolist()], padding=True, truncation=True,
                             max_length=self.seqlen, return_tensors="pt")
        out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if "token_type_ids" in enc:
            out["token_type_ids"] = enc["token_type_ids"]
        return out


def split_sentences(text: str, min_words: int = 4) -> list[str]:
    """Sentences of ``text`` (split after ``.``, ``!``, ``?``), whitespace-normalised, at least ``min_words`` words."""
    out = []
    for piece in _SENTENCE_END.split(text):
        sentence = " ".join(piece.split())
        if len(sentence.split()) >= min_words:
            out.append(sentence)
    return out


def make_batches(kind: str, tokenizer: Any, source: Any, batch_size: int, seqlen: int, seed: int):
    """The batch source for a model of ``kind`` (``"causal-lm"`` or ``"encoder"``) from ``source``."""
    from sparseforge.data import calibration as data

    if tokenizer is None:
        raise DataError("fine-tuning on text needs the model's tokenizer; load the model with sparseforge.io.models.load_model")
    if kind == "causal-lm":
        ids = data.corpus_token_ids(tokenizer, "train") if str(source) == "builtin" else data.encode(tokenizer, data.source_text(source))
        return TokenBatches(ids, batch_size, seqlen, seed)
    return SentenceBatches(split_sentences(data.source_text(source)), tokenizer, batch_size, seqlen, seed)
