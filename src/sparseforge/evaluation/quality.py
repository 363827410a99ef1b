"""Evaluation: perplexity of causal LMs, embedding fidelity of pruned encoders.

Perplexity protocol (fixed; see ``docs/evaluation.md``):

1. text = the built-in corpus held-out split (``corpus.load_text("heldout")``) unless given,
   tokenised whole without special tokens (:func:`sparseforge.data.calibration.encode`; the held-out
   split's ids are :func:`sparseforge.data.calibration.corpus_token_ids`), or ready-made ``token_ids``;
2. non-overlapping windows of ``seqlen`` tokens (stride ``seqlen``; default
   :data:`DEFAULT_SEQLEN`) from the first token; a trailing partial window is dropped; the
   first ``max_windows`` windows are kept (default :data:`DEFAULT_MAX_WINDOWS`, ``None`` = all);
3. each window is scored on its own (no context carried over); every token after the first of
   a window is predicted, so ``tokens = windows * (seqlen - 1)``;
4. ``nll`` = mean next-token negative log-likelihood (natural log, loss in float32),
   ``ppl = exp(nll)``.

Embedding fidelity: sentence embeddings as in sentence-transformers all-MiniLM-L6-v2 (mean of
the last hidden states over non-padding tokens, then L2 normalisation) from the dense and the
pruned encoder; report the mean and minimum cosine similarity over the sentences (default:
``corpus.heldout_sentences(256)``).

Example:
    >>> from sparseforge.io.models import load_model
    >>> from sparseforge.evaluation.quality import perplexity
    >>> lm = load_model("builtin")                            # doctest: +SKIP
    >>> perplexity(lm.model, lm.tokenizer, progress=False)    # doctest: +SKIP
    PerplexityResult(ppl=..., nll=..., tokens=16320, windows=64)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from sparseforge.errors import DataError, ModelError, NumericalError

__all__ = [
    "DEFAULT_SEQLEN",
    "DEFAULT_MAX_WINDOWS",
    "PerplexityResult",
    "FidelityResult",
    "perplexity",
    "sentence_embeddings",
    "embedding_fidelity",
    "evaluate",
]

#: Perplexity protocol defaults (the one home of these numbers; ``docs/evaluation.md``):
#: non-overlapping windows of this many tokens ...
DEFAULT_SEQLEN = 256
#: ... and at most this many windows from the start of the token stream.
DEFAULT_MAX_WINDOWS = 64


@dataclass(frozen=True)
class PerplexityResult:
    """``ppl = exp(nll)``; ``nll`` is the mean over ``tokens`` predicted tokens in ``windows`` windows."""

    ppl: float
    nll: float
    tokens: int
    windows: int

    def as_dict(self) -> dict:
        return {"kind": "causal-lm", **asdict(self)}


@dataclass(frozen=True)
class FidelityResult:
    """Cosine similarity of dense vs. pruned sentence embeddings over ``n`` sentences."""

    mean_cosine: float
    min_cosine: float
    n: int

    def as_dict(self) -> dict:
        return {"kind": "encoder", **asdict(self)}


def _device(model: Any) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _logits(output: Any) -> torch.Tensor:
    # Hugging Face models return an output object with .logits; plain modules may return the tensor
    return output.logits if hasattr(output, "logits") else output


def _as_token_ids(token_ids: Any) -> torch.Tensor:
    """``token_ids`` (1-D integer tensor or list of ints) as a contiguous ``(n_tokens,)`` int64 tensor."""
    if isinstance(token_ids, torch.Tensor):
        ids = token_ids
    else:
        try:
            ids = torch.as_tensor(token_ids)  # no dtype: floats must be rejected, not truncated
        except (TypeError, ValueError, RuntimeError) as exc:
            raise DataError(f"token_ids must be a 1-D LongTensor or a list of ints: {exc}") from exc
        if ids.numel() == 0:
            ids = ids.long()  # an empty list is float by default; it fails later as "no full window"
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise DataError(f"token_ids must hold integer token ids, got dtype {ids.dtype}")
    if ids.dim() != 1:
        raise DataError(f"token_ids must be 1-D (one token stream), got shape {tuple(ids.shape)}; flatten it or pass one stream")
    return ids.to(torch.long).contiguous()  # (n_tokens,)


def perplexity(
    model: Any,
    tokenizer: Any,
    text: str | None = None,
    *,
    token_ids: "torch.Tensor | list[int] | None" = None,
    seqlen: int = DEFAULT_SEQLEN,
    max_windows: int | None = DEFAULT_MAX_WINDOWS,
    batch_size: int = 8,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of a causal LM by the fixed protocol of the module doc.

    Args:
        model: a causal LM whose forward takes ``input_ids`` ``(B, T)`` and returns logits
            ``(B, T, vocab)`` (or an object with ``.logits``). It runs in eval mode and its own
            dtype; its training flag is restored afterwards.
        tokenizer: the model's tokenizer (unused, may be ``None``, when ``token_ids`` is given).
        text: text to score; ``None`` (and no ``token_ids``) = the built-in held-out split.
        token_ids: an already tokenised stream ``(n_tokens,)`` (1-D LongTensor or list of ints)
            scored instead of text, e.g. ``data.corpus_token_ids(tokenizer, "heldout")`` computed
            once and reused; exclusive with ``text``.
        seqlen: tokens per window (= stride). max_windows: windows kept (``None`` = all).
        batch_size: windows per forward pass (does not change the result beyond float rounding).
        progress: show a tqdm progress bar.

    Raises:
        DataError: the text has fewer than ``seqlen`` tokens (no full window), bad sizes, both
            ``text`` and ``token_ids`` given, or ``token_ids`` not a 1-D integer stream.
        NumericalError: the model produced NaN logits.
    """
    from tqdm.auto import tqdm

    from sparseforge.data import calibration as data

    for name, value in (("seqlen", seqlen), ("batch_size", batch_size), ("max_windows", max_windows)):
        if value is None and name == "max_windows":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DataError(f"{name} must be a positive integer, got {value!r}")
    if seqlen < 2:
        raise DataError(f"seqlen must be at least 2 (a window predicts seqlen - 1 tokens), got {seqlen}")
    if text is not None and token_ids is not None:
        raise DataError("give either text= or token_ids= to score, not both")
    if token_ids is not None:
        ids = _as_token_ids(token_ids)  # (n_tokens,)
    elif text is not None:
        ids = data.encode(tokenizer, text)  # (n_tokens,)
    else:
        ids = data.corpus_token_ids(tokenizer, "heldout")  # (n_tokens,)
    n_windows = ids.numel() // seqlen
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise DataError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}; lower seqlen or give more text")
    windows = ids[: n_windows * seqlen].view(n_windows, seqlen)  # (windows, seqlen)
    device = _device(model)
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        with torch.inference_mode(), tqdm(total=n_windows, desc="perplexity", unit="window", disable=not progress) as bar:
            for batch in windows.split(batch_size):
                x = batch.to(device)  # (B, T)
                logits = _logits(model(input_ids=x))[:, :-1].float()  # (B, T-1, V) predicts x[:, 1:]
                nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none")
                total_nll += nll.double().sum().item()  # (B * (T-1),) summed in float64
                total_tokens += x[:, 1:].numel()
                bar.update(x.shape[0])
    finally:
        model.train(was_training)
    if math.isnan(total_nll):
        raise NumericalError("the model produced NaN logits while computing perplexity; check its weights for NaN/inf")
    mean_nll = total_nll / total_tokens
    ppl = math.exp(mean_nll) if mean_nll < 700 else math.inf  # exp overflows past ~709
    return PerplexityResult(ppl=ppl, nll=mean_nll, tokens=total_tokens, windows=n_windows)


def sentence_embeddings(
    model: Any, tokenizer: Any, sentences: list[str], batch_size: int = 32, max_length: int = 128
) -> torch.Tensor:
    """L2-normalised mean-pooled sentence embeddings ``(N, d)`` float32 on the CPU.

    Mean over the last hidden state of the non-padding tokens (attention mask), then L2
    normalisation: the sentence-transformers all-MiniLM-L6-v2 recipe. Sentences longer than
    ``max_length`` tokens are truncated (sentence-transformers uses 256 for this model).
    """
    if tokenizer is None:
        raise DataError("sentence embeddings need the encoder's tokenizer, got None")
    if isinstance(sentences, str) or not sentences:
        raise DataError("sentence_embeddings needs a non-empty list of sentences")
    device = _device(model)
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.inference_mode():
            for i in range(0, len(sentences), batch_size):
                enc = tokenizer(list(sentences[i : i + batch_size]), padding=True, truncation=True,
                                max_length=max_length, return_tensors="pt")  # fmt: skip
                enc = {k: v.to(device) for k, v in enc.items()}
                output = model(**enc)
                hidden = (output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]).float()  # (B, T, d)
                mask = enc["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, d)
                out.append(F.normalize(pooled, p=2, dim=1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)  # (N, d)


def embedding_fidelity(
    dense_model: Any, pruned_model: Any, tokenizer: Any, sentences: list[str] | None = None, *,
    batch_size: int = 32, max_length: int = 128,
) -> FidelityResult:  # fmt: skip
    """Cosine similarity between dense and pruned sentence embeddings (default: 256 held-out sentences)."""
    if sentences is None:
        from sparseforge.data import corpus

        sentences = corpus.heldout_sentences(256)
    dense = sentence_embeddings(dense_model, tokenizer, sentences, batch_size, max_length)  # (N, d)
    pruned = sentence_embeddings(pruned_model, tokenizer, sentences, batch_size, max_length)  # (N, d)
    if dense.shape != pruned.shape:
        raise ModelError(f"dense and pruned encoders give embeddings of shapes {tuple(dense.shape)} and {tuple(pruned.shape)}")
    cos = (dense * pruned).sum(1)  # (N,) both rows have unit norm
    if torch.isnan(cos).any():
        raise NumericalError("NaN sentence embeddings; check the pruned encoder's weights for NaN/inf")
    return FidelityResult(mean_cosine=cos.mean().item(), min_cosine=cos.min().item(), n=cos.numel())


def evaluate(loaded: Any, *, reference: Any = None, text: str | None = None, sentences: list[str] | None = None,
             **kwargs: Any) -> "PerplexityResult | FidelityResult":  # fmt: skip
    """Evaluate a :class:`~sparseforge.io.models.LoadedModel` by its kind.

    * ``"causal-lm"``: :func:`perplexity` on ``text`` (default held-out split); ``kwargs`` go to it.
    * ``"encoder"``: :func:`embedding_fidelity` against ``reference`` (the dense encoder: a
      LoadedModel, a model, or a name/path for :func:`~sparseforge.io.models.load_model`); an
      encoder has no standalone quality number here, so ``reference`` is required.
    """
    if loaded.kind == "causal-lm":
        if reference is not None or sentences is not None:
            raise ModelError("reference= and sentences= apply to encoders; a causal LM is evaluated by perplexity")
        return perplexity(loaded.model, loaded.tokenizer, text, **kwargs)
    if loaded.kind != "encoder":
        raise ModelError(f"cannot evaluate a model of kind {loaded.kind!r}; expected 'causal-lm' or 'encoder'")
    if reference is None:
        raise ModelError(
            f"{loaded.path} is an encoder: its quality is measured as embedding fidelity to the dense model; "
            "pass reference= the dense encoder (e.g. reference='minilm', CLI: --reference minilm)"
        )
    if text is not None:
        raise ModelError("text= applies to causal LMs; pass sentences= for an encoder")
    if isinstance(reference, (str, bytes)) or hasattr(reference, "__fspath__"):
        from sparseforge.io.models import load_model

        reference = load_model(reference)
    ref_model = getattr(reference, "model", reference)
    return embedding_fidelity(ref_model, loaded.model, loaded.tokenizer, sentences, **kwargs)
