"""The adapter side of a :func:`~sparseforge.finetune.finetune_` run (``FinetuneConfig(adapter=...)``).

:class:`AdapterRun` attaches LoRA (:mod:`sparseforge.finetune.lora`) and, for ``"sparselora"``, the
channel-skipping MLPs (:mod:`sparseforge.finetune.sparselora`) to the student; tells SparseLoRA
which step runs; and at the end merges the adapters into the weights (masked for pruned layers
unless ``merge_keep_mask=False``), or removes them untouched when the run failed.

Example:
    >>> from sparseforge.finetune import FinetuneConfig, finetune_
    >>> cfg = FinetuneConfig(loss="ce", adapter="sparselora", steps=100, lr=1e-3)
    >>> finetune_("pruned/", cfg, out="tuned/")           # doctest: +SKIP
"""

from __future__ import annotations

from torch import nn

from sparseforge.finetune.lora import attach_lora, lora_layers, merge_lora_, remove_lora_
from sparseforge.finetune.sparselora import SparseLoRA

__all__ = ["AdapterRun"]


class AdapterRun:
    """LoRA / SparseLoRA adapters on ``model`` for one run of ``cfg`` (a FinetuneConfig); ``pruned``: layers whose mask a merge keeps."""

    def __init__(self, model: nn.Module, cfg, pruned: list[str]) -> None:
        self.model, self.cfg, self.pruned = model, cfg, list(pruned)
        self.requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        self.layers = attach_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
        self.sparse = None
        if cfg.adapter == "sparselora":
            try:
                self.sparse = SparseLoRA.attach(model, sparsity=cfg.sparselora_sparsity, rank=cfg.sparselora_rank,
                                                start=cfg.sparselora_start, dense_tokens=cfg.sparselora_dense_tokens,
                                                layers=cfg.sparselora_layers,
                                                attn_sparsity=cfg.sparselora_attn_sparsity)
            except BaseException:
                remove_lora_(model)
                raise

    def parameters(self) -> list[nn.Parameter]:
        """The trainable adapter parameters, in a fixed order."""
        return [p for layer in lora_layers(self.model).values() for p in layer.parameters() if p.requires_grad]

    def begin_step(self, step: int) -> None:
        if self.sparse is not None:
            self.sparse.begin_step(step, self.cfg.steps)

    def finish(self, merge: bool) -> list[str]:
        """Take the adapters off: merged into the weights (``merge``) or dropped; returns the layer names."""
        if self.sparse is not None:
            self.sparse.remove()
        if merge:
            names = merge_lora_(self.model, keep_mask=self.cfg.merge_keep_mask, pruned=self.pruned)
        else:
            names = remove_lora_(self.model)
        for name, param in self.model.named_parameters():
            param.requires_grad_(self.requires_grad.get(name, True))
        return names
