"""Recovery fine-tuning of pruned models that keeps their mask exactly (SquareHead, KD, CE).

``finetune_(student, FinetuneConfig(...), teacher=..., data=...)`` trains a pruned model with
cross-entropy, logit distillation, SquareHead (Kurtic et al. 2023, "Sparse Fine-tuning for
Inference Acceleration of Large Language Models") or a weighted mix, while every pruned weight
and its optimizer state stay exactly zero; resumable, evaluated on held-out data, saved as a
compressed checkpoint. ``FinetuneConfig(adapter="lora" | "sparselora")`` trains LoRA adapters
(``peft``) on the frozen base instead, SparseLoRA skipping idle base MLP channels
(:mod:`sparseforge.finetune.sparselora`), and merges them masked. See ``docs/finetune.md``.

Example:
    >>> from sparseforge.finetune import FinetuneConfig
    >>> FinetuneConfig(loss="ce+squarehead", steps=10).weights
    {'ce': 1.0, 'squarehead': 1.0}
"""

from __future__ import annotations

import importlib

# public name -> submodule; resolved on first access (PEP 562) so that the torch-free CLI parser
# (sparseforge.finetune.cli) can be imported without torch
_LAZY = {
    "FinetuneConfig": "config", "LOSSES": "config",
    "finetune_": "loop", "FinetuneResult": "loop", "StepInfo": "loop",
    "KeepMask": "keep_mask", "pruned_layers": "keep_mask",
    "squarehead_loss": "losses", "kd_loss": "losses", "causal_ce_loss": "losses",
    "S2FTConfig": "s2ft_options",
    "attach_lora": "lora", "merge_lora_": "lora", "SparseLoRA": "sparselora",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sparseforge.finetune' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"sparseforge.finetune.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
