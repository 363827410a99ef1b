"""The built-in default model: a small Llama-style causal LM trained on the built-in corpus.

The model and its byte-level BPE tokenizer ship in
``sparseforge/assets/builtin-llama/`` as a Hugging Face ``save_pretrained``
directory (``config.json``, ``model.safetensors``, ``tokenizer.json``, ...), so
``transformers.AutoModelForCausalLM.from_pretrained(builtin_model_path())``
works offline. It is reproduced by ``scripts/train_builtin_model.py``; see the
README in the model directory for its card.

Importing this module is cheap (no torch / transformers at import time).
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "BUILTIN_MODEL_NAME",
    "BUILTIN_MODEL_DIRNAME",
    "EVAL_SEQ_LEN",
    "EVAL_MAX_WINDOWS",
    "builtin_model_path",
    "heldout_token_ids",
    "heldout_perplexity",
]

#: Name under which the built-in model is selected (e.g. ``--model builtin``).
BUILTIN_MODEL_NAME = "builtin"

#: Directory name of the model inside ``sparseforge/assets/``.
BUILTIN_MODEL_DIRNAME = "builtin-llama"

#: Held-out perplexity protocol: non-overlapping windows of this many tokens ...
EVAL_SEQ_LEN = 256
#: ... and at most this many windows (from the start of the held-out token stream).
EVAL_MAX_WINDOWS = 64

_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def builtin_model_path() -> Path:
    """Path of the built-in model directory inside the installed package.

    Raises:
        FileNotFoundError: if the directory or one of its essential files is missing.
    """
    root = Path(str(resources.files("sparseforge").joinpath("assets", BUILTIN_MODEL_DIRNAME)))
    missing = [f for f in _REQUIRED_FILES if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"built-in model not found: {root} is missing {', '.join(missing)}. "
            "The sparseforge installation is incomplete (package data not installed?); "
            "reinstall sparseforge, or regenerate the model with "
            "`python scripts/train_builtin_model.py` from a source checkout."
        )
    return root


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a long text, without special tokens and without the max-length warning."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # fast tokenizer: same ids, no "sequence longer than max length" warning
        return list(backend.encode(text, add_special_tokens=False).ids)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def heldout_token_ids(tokenizer: Any) -> list[int]:
    """Token ids of the held-out split, as used by the perplexity protocol.

    Each held-out work (:func:`sparseforge.corpus.list_works` order) is tokenised
    without special tokens and followed by the tokenizer's EOS token; the results
    are concatenated.
    """
    from . import corpus

    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for work in corpus.list_works("heldout"):
        ids.extend(_encode(tokenizer, corpus.load_work(work)))
        if eos is not None:
            ids.append(eos)
    return ids


def heldout_perplexity(
    model: Any,
    tokenizer: Any,
    *,
    seq_len: int = EVAL_SEQ_LEN,
    max_windows: int | None = EVAL_MAX_WINDOWS,
    batch_size: int = 8,
    token_ids: "list[int] | torch.Tensor | None" = None,
) -> float:
    """Held-out perplexity of a causal LM on the built-in corpus.

    Protocol: held-out text tokenised with ``tokenizer`` (:func:`heldout_token_ids`),
    split into non-overlapping windows of ``seq_len`` tokens (a trailing partial
    window is dropped), the first ``max_windows`` windows kept (``None`` = all);
    each window is scored independently and PPL = exp(mean next-token NLL over all
    predicted tokens, i.e. ``seq_len - 1`` per window).
    """
    import torch
    import torch.nn.functional as F

    ids = token_ids if token_ids is not None else heldout_token_ids(tokenizer)
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    n_win = ids.numel() // seq_len
    if max_windows is not None:
        n_win = min(n_win, max_windows)
    if n_win == 0:
        raise ValueError(f"held-out text has fewer than seq_len={seq_len} tokens")
    windows = ids[: n_win * seq_len].view(n_win, seq_len)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, total_tok = 0.0, 0
    try:
        with torch.inference_mode():
            for i in range(0, n_win, batch_size):
                x = windows[i : i + batch_size].to(device)
                logits = model(input_ids=x).logits.float()
                nll = F.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum"
                )
                total_nll += float(nll)
                total_tok += x[:, 1:].numel()
    finally:
        model.train(was_training)
    return math.exp(total_nll / total_tok)
