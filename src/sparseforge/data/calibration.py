"""Calibration data: random token windows from the built-in corpus or your own text.

One-shot pruners (SparseGPT, Frantar & Alistarh 2023; Wanda, Sun et al. 2023) calibrate on a
few dozen sequences cut at random offsets from a text stream. :func:`calibration_tokens` does
exactly that, reproducibly:

1. text from ``cfg.source``: ``"builtin"`` (the train split of :mod:`sparseforge.data.corpus`), a
   UTF-8 text file, or a directory of ``*.txt`` files (name order, joined by
   :data:`sparseforge.data.corpus.DOC_SEPARATOR`);
2. the whole text tokenised once with the model's tokenizer, no special tokens added;
3. ``cfg.samples`` start offsets drawn uniformly from ``[0, n_tokens - seqlen - 1]`` by a
   ``torch.Generator`` seeded with ``cfg.seed``; each window is ``seqlen`` consecutive tokens.

Example:
    >>> from sparseforge.config import CalibrationConfig
    >>> from sparseforge.data.calibration import calibration_tokens
    >>> x = calibration_tokens(tokenizer, CalibrationConfig(samples=8, seqlen=128))  # doctest: +SKIP
    >>> x.shape, x.dtype                                                              # doctest: +SKIP
    (torch.Size([8, 128]), torch.int64)
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Iterator

import torch

from sparseforge.config import CalibrationConfig
from sparseforge.errors import DataError

__all__ = ["source_text", "encode", "corpus_token_ids", "calibration_tokens", "iter_batches"]


def source_text(source: "str | Path") -> str:
    """Text of a calibration source: ``"builtin"``, a UTF-8 file or a directory of ``*.txt`` files."""
    from sparseforge.data import corpus

    if str(source) == "builtin":
        return corpus.load_text("train")
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"calibration source {path} does not exist; give 'builtin', a UTF-8 text file or a directory of *.txt files")
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise DataError(f"calibration directory {path} has no *.txt files")
    try:
        texts = [f.read_text(encoding="utf-8") for f in files]
    except UnicodeDecodeError as exc:
        raise DataError(f"calibration text is not valid UTF-8: {exc}") from exc
    text = corpus.DOC_SEPARATOR.join(t for t in texts if t.strip())
    if not text.strip():
        raise DataError(f"calibration source {path} is empty")
    return text


def encode(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids of ``text`` tokenised whole, without special tokens: ``(n_tokens,)`` int64."""
    if tokenizer is None:
        raise DataError("a tokenizer is needed to tokenise text; load the model with sparseforge.io.models.load_model")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _tokenizer_fingerprint(tokenizer: Any) -> str | None:
    """Content hash of a fast tokenizer (its JSON serialisation), or None for a tokenizer without one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        return None
    state = json.loads(backend.to_str())
    for key in ("truncation", "padding"):  # call-time settings that transformers resets per call
        state.pop(key, None)
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode("utf-8")).hexdigest()


@functools.lru_cache(maxsize=8)
def _cached_corpus_ids(split: str, fingerprint: str, tokenizer_ref: Any) -> torch.Tensor:
    # keyed on the tokenizer's content hash; tokenizer_ref is the wrapped tokenizer (see below)
    from sparseforge.data import corpus

    return encode(tokenizer_ref.tokenizer, corpus.load_text(split))


class _ByFingerprint:
    """Hashes/compares as its fingerprint so the cache key ignores the tokenizer object identity."""

    def __init__(self, tokenizer: Any, fingerprint: str) -> None:
        self.tokenizer, self.fingerprint = tokenizer, fingerprint

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ByFingerprint) and other.fingerprint == self.fingerprint


def corpus_token_ids(tokenizer: Any, split: str) -> torch.Tensor:
    """Token ids of the built-in corpus ``split`` (tokenised whole, :func:`encode`), ``(n_tokens,)``.

    Fast tokenizers' results are memoised per tokenizer *content* (the hash of its JSON), so an
    equal tokenizer always gets identical ids; a copy is returned, so callers may modify it.
    """
    if tokenizer is None:
        raise DataError("tokenising the built-in corpus needs a tokenizer, got None")
    fingerprint = _tokenizer_fingerprint(tokenizer)
    if fingerprint is None:
        from sparseforge.data import corpus

        return encode(tokenizer, corpus.load_text(split))
    return _cached_corpus_ids(split, fingerprint, _ByFingerprint(tokenizer, fingerprint)).clone()


def calibration_tokens(tokenizer: Any, cfg: CalibrationConfig) -> torch.Tensor:
    """``cfg.samples`` random windows of ``cfg.seqlen`` tokens: ``(samples, seqlen)`` int64.

    The same tokenizer, source and seed always give the same tensor (see module doc).

    Raises:
        DataError: no tokenizer, missing or empty source, or fewer than ``seqlen + 1`` tokens.
    """
    if tokenizer is None:
        raise DataError("calibration needs the model's tokenizer, got None")
    if str(cfg.source) == "builtin":
        ids = corpus_token_ids(tokenizer, "train")
    else:
        ids = encode(tokenizer, source_text(cfg.source))  # (n_tokens,)
    n = ids.numel()
    if n < cfg.seqlen + 1:
        raise DataError(
            f"calibration text from {cfg.source!r} has {n} tokens, fewer than seqlen + 1 = {cfg.seqlen + 1}; "
            f"lower calibration.seqlen (at most {max(n - 1, 0)}) or give more text"
        )
    gen = torch.Generator().manual_seed(cfg.seed)
    starts = torch.randint(0, n - cfg.seqlen, (cfg.samples,), generator=gen)  # (samples,)
    index = starts[:, None] + torch.arange(cfg.seqlen)  # (samples, seqlen)
    return ids[index]


def iter_batches(tokens: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Consecutive row slices of ``tokens`` ``(samples, seqlen)``, ``batch_size`` rows each (last may be shorter)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
    for i in range(0, tokens.shape[0], batch_size):
        yield tokens[i : i + batch_size]
