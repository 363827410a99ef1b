"""Recovery losses: cross-entropy, logit distillation and SquareHead, as pure tensor functions.

SquareHead is the per-layer normalised hidden-state distillation of Kurtic et al. 2023, "Sparse
Fine-tuning for Inference Acceleration of Large Language Models" (reference code:
IST-DASLab/SparseFinetuning, ``scripts/train/train_sparse.py``). With ``h_l`` the output of block
``l`` (Hugging Face ``hidden_states[1:]``, the last one after the final norm) and ``T`` the
positions where ``attention_mask == 1`` (every non-pad token, not only label tokens)::

    squarehead = sum_l  mean_{t in T, d} (s_l - t_l)^2  /  (mean_{t in T, d} t_l^2 + eps)

with ``eps = torch.finfo(torch.bfloat16).eps``; layers are summed, not averaged. Logit
distillation is ``T^2 * KL(teacher || student)`` of the temperature-``T`` softmaxes, summed over
the vocabulary and averaged over the label tokens. Cross-entropy is the usual next-token loss over
the label tokens (``labels != -100``).

Example:
    >>> import torch
    >>> from sparseforge.finetune.losses import squarehead_loss
    >>> t = [torch.ones(1, 3, 4), 2 * torch.ones(1, 3, 4)]
    >>> s = [torch.zeros(1, 3, 4), 2 * torch.ones(1, 3, 4)]
    >>> round(squarehead_loss(s, t, torch.ones(1, 3)).item(), 4)  # (1 / (1 + eps)) + 0
    0.9922
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from sparseforge.errors import ModelError

__all__ = ["SQUAREHEAD_EPS", "IGNORE_INDEX", "squarehead_loss", "kd_loss", "causal_ce_loss", "shift_labels"]

SQUAREHEAD_EPS = torch.finfo(torch.bfloat16).eps  # 2**-7, as in the reference code
IGNORE_INDEX = -100


def squarehead_loss(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor],
                    attention_mask: torch.Tensor) -> torch.Tensor:
    """SquareHead loss (module doc): sum over layers of the teacher-normalised MSE on non-pad tokens.

    Args:
        student_hidden, teacher_hidden: one ``(B, T, d)`` tensor per block output, same count.
        attention_mask: ``(B, T)``; positions with value 1 count.
    """
    if len(student_hidden) != len(teacher_hidden):
        raise ModelError(f"SquareHead needs as many student as teacher block outputs, got {len(student_hidden)} "
                         f"and {len(teacher_hidden)}; distil from a teacher with the same number of layers")
    if not student_hidden:
        raise ModelError("SquareHead needs at least one block output")
    useful = attention_mask == 1  # (B, T)
    total = student_hidden[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(student_hidden, teacher_hidden):
        if s.shape != t.shape:
            raise ModelError(f"student and teacher block outputs differ in shape: {tuple(s.shape)} vs {tuple(t.shape)}; "
                             "SquareHead needs the same hidden size")
        s_tok = s[useful].float()  # (n_tokens, d)
        t_tok = t[useful].float()  # (n_tokens, d)
        total = total + (s_tok - t_tok).pow(2).mean() / (t_tok.pow(2).mean() + SQUAREHEAD_EPS)
    return total


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))`` summed over the vocabulary, averaged over tokens.

    Args:
        student_logits, teacher_logits: ``(n_tokens, vocab)`` (the label tokens only).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ModelError(f"student and teacher logits differ in shape: {tuple(student_logits.shape)} vs "
                         f"{tuple(teacher_logits.shape)}; distil from a teacher with the same vocabulary")
    n_tokens = student_logits.numel() // max(student_logits.shape[-1], 1)
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="sum")
    return kl * temperature**2 / max(n_tokens, 1)


def shift_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Next-token labels ``(B, T)``: ``labels[:, t] = input_ids[:, t+1]``, ``IGNORE_INDEX`` at the end and on padding."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] != 1, IGNORE_INDEX)
    return labels


def causal_ce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; ``logits`` ``(B, T, V)``, ``labels`` ``(B, T)`` already shifted."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX)
