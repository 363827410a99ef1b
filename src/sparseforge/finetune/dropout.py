"""Switch a model's dropout off while it stays in training mode, and back on afterwards.

Recovery fine-tuning distils a pruned student towards its dense teacher, which runs in eval mode;
a student that drops activations at random cannot match the teacher's hidden states, and the
short runs of recovery gain nothing from the regularisation. The reference SquareHead models
(MPT, Llama) have no dropout at all; encoders such as BERT / MiniLM (0.1) and GPT-2 do.

The model cannot simply run in eval mode: other code keys on ``module.training`` (SparseLoRA
skips channels only while training). So the dropout probabilities themselves are set to 0:

* every ``nn.Dropout`` family module (``p``; GPT-2 and BERT attention read ``self.dropout.p``);
* every float attribute of a module whose name contains ``dropout`` (Llama-style attention
  keeps ``self.attention_dropout`` as a float and passes it to the attention kernel).

:meth:`DropoutOff.restore` puts every value back.

Example:
    >>> import torch.nn as nn
    >>> net = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).train()
    >>> off = switch_off_dropout(net)
    >>> net[1].p, net.training
    (0.0, True)
    >>> off.restore(); net[1].p
    0.5
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

__all__ = ["DropoutOff", "switch_off_dropout", "DROPOUT_MODULES"]

DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


@dataclass
class DropoutOff:
    """The dropout probabilities :func:`switch_off_dropout` set to 0: ``(module, attribute, old value)``."""

    changed: list[tuple[nn.Module, str, float]] = field(default_factory=list)

    def restore(self) -> None:
        """Put every probability back (idempotent)."""
        for module, name, value in self.changed:
            setattr(module, name, value)
        self.changed = []


def switch_off_dropout(model: nn.Module) -> DropoutOff:
    """Set every dropout probability of ``model`` to 0 (module doc); returns what to restore."""
    off = DropoutOff()
    for module in model.modules():
        if isinstance(module, DROPOUT_MODULES):
            if module.p > 0:
                off.changed.append((module, "p", module.p))
                module.p = 0.0
            continue
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float) and not isinstance(value, bool) and value > 0:
                off.changed.append((module, name, value))
                setattr(module, name, 0.0)
    return off
