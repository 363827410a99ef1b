"""The configuration of a recovery fine-tuning run.

Example:
    >>> from sparseforge.finetune import FinetuneConfig
    >>> cfg = FinetuneConfig(loss="squarehead", steps=100)
    >>> cfg.weights
    {'squarehead': 1.0}
    >>> FinetuneConfig(loss={"ce": 1.0, "squarehead": 1.0}).weights   # the paper's recipe
    {'ce': 1.0, 'squarehead': 1.0}
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from sparseforge.errors import ConfigError
from sparseforge.finetune.s2ft_options import check_s2ft_options
from sparseforge.finetune.adapter_options import check_adapter_options

__all__ = ["FinetuneConfig", "LOSSES", "TEACHER_LOSSES"]

LOSSES = ("ce", "kd", "squarehead")
TEACHER_LOSSES = ("kd", "squarehead")
_DTYPES = ("float32", "bfloat16")
COMPUTES = ("dense", "csr", "bitmap")


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _parse_loss(loss: Any) -> dict[str, float]:
    """``"squarehead"``, ``"ce+squarehead"``, ``"ce=1,squarehead=0.5"`` or a dict -> ``{name: weight}``."""
    if isinstance(loss, str):
        weights = {}
        for part in loss.replace("+", ",").split(","):
            name, _, weight = part.strip().partition("=")
            try:
                weights[name.strip()] = float(weight) if weight else 1.0
            except ValueError:
                raise ConfigError(f"loss weight {weight!r} of {name!r} is not a number; write e.g. 'ce=1,squarehead=0.5'") from None
        loss = weights
    if not isinstance(loss, dict) or not loss:
        raise ConfigError(f"loss must be one of {', '.join(LOSSES)}, a mix like 'ce+squarehead', or a dict of weights; got {loss!r}")
    out = {}
    for name, weight in loss.items():
        if name not in LOSSES:
            raise ConfigError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise ConfigError(f"loss weight of {name!r} must be a number >= 0, got {weight!r}")
        out[name] = float(weight)
    if not any(out.values()):
        raise ConfigError("every loss weight is 0; give at least one positive weight")
    return out


@dataclass
class FinetuneConfig:
    """What :func:`sparseforge.finetune.finetune_` does.

    Attributes:
        loss: ``"ce"``, ``"kd"``, ``"squarehead"``, a mix (``"ce+squarehead"``,
            ``"ce=1,kd=0.5"``) or a dict ``{name: weight}``; parsed into :attr:`weights`.
        steps: optimizer steps. lr: peak AdamW learning rate (> 0). warmup_steps: linear warm-up
            (``None``: 10 % of ``steps``, at least 1), then linear decay to 0 at ``steps`` (the reference
            code's ``linear_decay_with_warmup``). weight_decay: AdamW weight decay (pruned weights
            stay 0; the reference uses 0). The defaults (steps, lr, loss) were tuned on held-out text
            of the built-in model (docs/finetune.md, "Choosing the recipe").
        batch_size, seqlen: sequences per step and tokens per sequence.
        temperature: of the logit distillation.
        teacher_dtype: ``"float32"`` or ``"bfloat16"`` (the teacher runs in ``no_grad``).
        grad_clip: max gradient norm (``None``: no clipping).
        min_sparsity: a linear layer whose weight has at least this fraction of exact zeros is a
            pruned layer whose zeros are kept (the reference code's threshold, 0.1).
        seed: data order and any dropout.
        save_every: write the resumable state every this many steps (with ``resume_dir``).
        eval_windows: held-out windows of ``seqlen`` tokens for perplexity (causal LMs);
            eval_sentences: held-out sentences for embedding cosine (encoders).
        compute: ``"dense"`` (masked dense weights) or ``"csr"`` / ``"bitmap"``: the pruned layers
            train as packed :class:`~sparseforge.nn.SparseLinear` on the native sparse kernels
            (:class:`sparseforge.train.SparseCompute`; float32 ``nn.Linear`` layers only).
        dropout: keep the student's dropout while it trains (False, the default: every dropout
            probability is 0 during the run and restored after; :mod:`sparseforge.finetune.dropout`).
        allow_dense: fine-tune a student with no pruned layer (e.g. after ReLU-fication,
            :mod:`sparseforge.activation.relufy`) instead of refusing it; nothing is masked then.
        s2ft: the S²FT options, an :class:`~sparseforge.finetune.s2ft_options.S2FTConfig` or a dict
            of its fields (``None``: the defaults).
        adapter: ``"none"`` (train every weight), ``"lora"`` (LoRA adapters through ``peft`` on the
            frozen base) or ``"sparselora"`` (LoRA + SparseLoRA's SVD channel skipping in the base
            MLPs) or ``"s2ft"`` (S²FT: dense slices of selected heads and channels, fused back;
            :mod:`sparseforge.finetune.s2ft`); see :mod:`sparseforge.finetune.adapter_options`. lora_rank, lora_alpha (default
            ``2 * rank``), lora_dropout: the adapters. merge_keep_mask: the merged delta is masked so
            pruned weights stay zero (False: dense delta, a dense model).
        sparselora_sparsity, sparselora_rank, sparselora_start, sparselora_dense_tokens,
            sparselora_layers: channels skipped, estimator rank, dense fraction of the first steps,
            dense fraction of each window (output tokens), blocks (:mod:`sparseforge.finetune.sparselora`).
        sparselora_attn_sparsity: key/value channels the base q/k/v/o skip (0: attention dense;
            :mod:`sparseforge.finetune.sparselora_attention`).
        l1_schedule: ProSparse's progressive L1 on the MLP gate activations (a ReLU-fied student,
            :mod:`sparseforge.activation.relufy`): stages ``[[factor, end step], ...]`` of
            :class:`~sparseforge.activation.l1_schedule.L1Schedule` (a warm-up constant, then a
            sine-shaped rise per stage); ``None``: no penalty. The term's value per step is in
            ``parts["l1"]`` of the callback's :class:`StepInfo`.
    """

    loss: Any = "squarehead"
    steps: int = 100
    lr: float = 1e-4
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    batch_size: int = 4
    seqlen: int = 128
    temperature: float = 1.0
    teacher_dtype: str = "float32"
    grad_clip: float | None = 1.0
    min_sparsity: float = 0.1
    seed: int = 0
    save_every: int = 50
    eval_windows: int = 16
    eval_sentences: int = 256
    compute: str = "dense"
    dropout: bool = False
    allow_dense: bool = False
    adapter: str = "none"
    s2ft: Any = None
    lora_rank: int = 8
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    merge_keep_mask: bool = True
    sparselora_sparsity: float = 0.9
    sparselora_rank: int = 8
    sparselora_start: float = 0.05
    sparselora_dense_tokens: float = 0.25
    sparselora_layers: str = "auto"
    sparselora_attn_sparsity: float = 0.0
    l1_schedule: Any = None

    def __post_init__(self) -> None:
        self.weights = _parse_loss(self.loss)
        self.loss = ",".join(f"{k}={v:g}" for k, v in self.weights.items())
        for name in ("steps", "batch_size", "save_every", "eval_windows", "eval_sentences"):
            _positive_int(name, getattr(self, name))
        self.seqlen = _positive_int("seqlen", self.seqlen, 2)
        if self.warmup_steps is None:
            self.warmup_steps = max(1, self.steps // 10)
        self.warmup_steps = _positive_int("warmup_steps", self.warmup_steps, 0)
        _positive_int("seed", self.seed, 0)
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise ConfigError(f"lr must be a positive number, got {self.lr!r}; a learning rate of 0 would not train")
        self.lr = float(self.lr)
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            raise ConfigError(f"temperature must be a positive number, got {self.temperature!r}")
        if not isinstance(self.weight_decay, (int, float)) or not self.weight_decay >= 0:
            raise ConfigError(f"weight_decay must be a number >= 0, got {self.weight_decay!r}")
        if self.grad_clip is not None and not (isinstance(self.grad_clip, (int, float)) and self.grad_clip > 0):
            raise ConfigError(f"grad_clip must be a positive number or None, got {self.grad_clip!r}")
        if not isinstance(self.min_sparsity, (int, float)) or not 0 < self.min_sparsity < 1:
            raise ConfigError(f"min_sparsity must be in (0, 1), got {self.min_sparsity!r}")
        if not isinstance(self.dropout, bool):
            raise ConfigError(f"dropout must be true or false, got {self.dropout!r}")
        if not isinstance(self.allow_dense, bool):
            raise ConfigError(f"allow_dense must be true or false, got {self.allow_dense!r}")
        if self.compute not in COMPUTES:
            raise ConfigError(f"compute must be one of {', '.join(COMPUTES)}, got {self.compute!r}")
        if self.teacher_dtype not in _DTYPES:
            raise ConfigError(f"teacher_dtype must be one of {', '.join(_DTYPES)}, got {self.teacher_dtype!r}")
        check_adapter_options(self)
        check_s2ft_options(self)
        if self.l1_schedule is not None:
            from sparseforge.activation.l1_schedule import L1Schedule

            self.l1_schedule = L1Schedule(self.l1_schedule).to_list()  # validated; JSON-able for the resume state
            if self.adapter != "none":
                raise ConfigError(f"l1_schedule trains the MLP gates of the full model; it does not combine with "
                                  f"adapter={self.adapter!r}")

    @property
    def needs_teacher(self) -> bool:
        return any(self.weights.get(name, 0.0) > 0 for name in TEACHER_LOSSES)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FinetuneConfig":
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ConfigError(f"unknown finetune options {unknown}; valid options: {', '.join(sorted(valid))}")
        return cls(**data)
