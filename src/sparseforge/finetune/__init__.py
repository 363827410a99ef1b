"""Recovery fine-tuning of pruned models that keeps their mask exactly (SquareHead, KD, CE).

``finetune_(student, FinetuneConfig(...), teacher=..., data=...)`` trains a pruned model with
cross-entropy, logit distillation, SquareHead (Kurtic et al. 2023, "Sparse Fine-tuning for
Inference Acceleration of Large Language Models") or a weighted mix, while every pruned weight
and its optimizer state stay exactly zero; resumable, evaluated on held-out data, saved as a
compressed checkpoint. See ``docs/finetune.md``.

Example:
    >>> from sparseforge.finetune import FinetuneConfig
    >>> FinetuneConfig(loss="ce+squarehead", steps=10).weights
    {'ce': 1.0, 'squarehead': 1.0}
"""

from sparseforge.finetune.config import LOSSES, FinetuneConfig
from sparseforge.finetune.keep_mask import KeepMask, pruned_layers
from sparseforge.finetune.losses import causal_ce_loss, kd_loss, squarehead_loss
from sparseforge.finetune.loop import FinetuneResult, StepInfo, finetune_

__all__ = [
    "FinetuneConfig", "LOSSES", "finetune_", "FinetuneResult", "StepInfo",
    "KeepMask", "pruned_layers", "squarehead_loss", "kd_loss", "causal_ce_loss",
]
