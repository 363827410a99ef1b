"""``finetune_``: recovery fine-tuning of a pruned model that keeps its mask exactly.

One-shot pruning (SparseGPT, Wanda, ...) loses accuracy that a short fine-tune recovers. This loop
trains every weight of the student with AdamW while :class:`~sparseforge.finetune.keep_mask.KeepMask`
holds the pruned weights (and their optimizer state) at exactly zero, with cross-entropy, logit
distillation and SquareHead (Kurtic et al. 2023; :mod:`sparseforge.finetune.losses`) or a weighted
mix; the teacher (the dense model) runs under ``no_grad``, in bfloat16 if asked.

* ``compute="csr"`` / ``"bitmap"``: the pruned layers train as packed SparseLinear layers on the
  native sparse kernels (:class:`sparseforge.train.SparseCompute`); ``"dense"`` (default) masks dense weights.
* Learning rate: linear warm-up over ``warmup_steps``, then linear decay to 0 at ``steps`` (the
  reference code's ``linear_decay_with_warmup``); AdamW without weight decay by default.
* The student's dropout is off while it trains (``dropout=False``, the default): distillation
  matches a deterministic teacher (:mod:`sparseforge.finetune.dropout`).
* Resumable: with ``resume_dir`` the model, optimizer, schedule, mask, data-generator and torch RNG
  states are written there every ``save_every`` steps (temp file + rename); calling ``finetune_``
  again with the same arguments continues bit-exactly from the last saved step.
* At the end: held-out evaluation (perplexity for causal LMs, mean embedding cosine to the teacher
  for encoders) before and after, and with ``out`` a compressed sparseforge checkpoint written
  atomically (:func:`sparseforge.save_pretrained`) whose ``sparsity_config`` records the run.

Example:
    >>> import sparseforge as sf
    >>> from sparseforge.finetune import FinetuneConfig, finetune_
    >>> from sparseforge.io.models import load_model
    >>> student, teacher = load_model("builtin"), load_model("builtin")          # doctest: +SKIP
    >>> sf.sparsify_(student.model, sf.SparsifyConfig(method="sparsegpt", sparsity=0.7),
    ...              tokenizer=student.tokenizer)                                 # doctest: +SKIP
    >>> result = finetune_(student, FinetuneConfig(loss="squarehead", steps=50), teacher=teacher,
    ...                    out="recovered/")                                      # doctest: +SKIP
    >>> result.after["ppl"] < result.before["ppl"]                                # doctest: +SKIP
    True
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from sparseforge.errors import ConfigError, DataError, ModelError
from sparseforge.finetune.config import FinetuneConfig
from sparseforge.finetune.data import TokenBatches, make_batches
from sparseforge.finetune.dropout import switch_off_dropout
from sparseforge.finetune.keep_mask import KeepMask, check_recorded_mask, pruned_layers
from sparseforge.finetune.losses import causal_ce_loss, kd_loss, shift_labels, squarehead_loss
from sparseforge.layers import set_module

__all__ = ["finetune_", "FinetuneResult", "StepInfo", "STATE_FILE", "lr_schedule"]

STATE_FILE = "finetune_state.pt"


class _NoMask:
    """The keeper of a student with no pruned layer (``FinetuneConfig(allow_dense=True)``): keeps nothing."""

    def __init__(self) -> None:
        self.step_count, self.generator = 0, torch.Generator()

    def step(self) -> None:
        self.step_count += 1

    def remove(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step_count, "rng": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step"])


@dataclass
class StepInfo:
    """What the ``callback`` of :func:`finetune_` sees after each optimizer step."""

    step: int
    loss: float
    parts: dict[str, float]
    tokens: int


@dataclass
class FinetuneResult:
    """Outcome of :func:`finetune_`: per-step losses, evaluations before and after, the saved path."""

    config: FinetuneConfig
    pruned: list[str]
    losses: list[float] = field(default_factory=list)
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    teacher_eval: dict[str, float] = field(default_factory=dict)
    tokens_per_s: float = 0.0
    resumed_from: int = 0
    out: Path | None = None
    trainable: int = 0  # parameters the optimizer updated

    def format(self) -> str:
        lines = [f"fine-tuned {len(self.pruned)} pruned layers for {self.config.steps} steps "
                 f"(loss {self.config.loss}; resumed from step {self.resumed_from}); {self.tokens_per_s:.0f} tokens/s"]
        if self.config.adapter == "s2ft":
            lines.append(f"S²FT ({self.config.s2ft.select} selection of {','.join(self.config.s2ft.parts)}): "
                         f"{self.trainable} trainable parameters, fused back into the weights")
        if self.config.adapter in ("lora", "sparselora"):
            mask = "masked" if self.config.merge_keep_mask else "dense, the model is no longer sparse"
            lines.append(f"adapter {self.config.adapter} (rank {self.config.lora_rank}) merged into the weights ({mask} deltas)")
        for key in sorted(self.after):
            ref = f", teacher {self.teacher_eval[key]:.4f}" if key in self.teacher_eval else ""
            lines.append(f"held-out {key}: {self.before.get(key, math.nan):.4f} -> {self.after[key]:.4f}{ref}")
        if self.out is not None:
            lines.append(f"saved {self.out}")
        return "\n".join(lines)


# -- inputs ------------------------------------------------------------------------------------
def _unpack(model: Any, tokenizer: Any, kind: str | None, role: str):
    """``(model, tokenizer, kind)`` from a LoadedModel, a name/path, or a module."""
    if isinstance(model, (str, os.PathLike)):
        from sparseforge.io.models import load_model

        model = load_model(model)
    if hasattr(model, "model") and hasattr(model, "kind") and not isinstance(model, nn.Module):
        return model.model, tokenizer or model.tokenizer, kind or model.kind
    if not isinstance(model, nn.Module):
        raise ModelError(f"the {role} must be a torch module, a LoadedModel or a model name/path, got {type(model).__name__}")
    if kind is None:
        kind = "causal-lm" if hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None else "encoder"
    return model, tokenizer, kind


def _config_value(model: nn.Module, *names: str):
    config = getattr(model, "config", None)
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def _check_teacher(student: nn.Module, teacher: nn.Module, cfg: FinetuneConfig) -> None:
    """Same vocabulary always (the teacher reads the student's tokens); same depth and width for SquareHead."""
    s_vocab, t_vocab = _config_value(student, "vocab_size"), _config_value(teacher, "vocab_size")
    if s_vocab is not None and t_vocab is not None and s_vocab != t_vocab:
        raise ModelError(f"teacher and student have different vocabularies ({t_vocab} vs {s_vocab} tokens); "
                         "distil from the dense model the student was pruned from")
    if cfg.weights.get("squarehead", 0.0) > 0:
        for what, key in (("layer counts", "num_hidden_layers"), ("hidden sizes", "hidden_size")):
            s, t = _config_value(student, key), _config_value(teacher, key)
            if s is not None and t is not None and s != t:
                raise ModelError(f"SquareHead matches every block output, but teacher and student have different "
                                 f"{what} ({t} vs {s}); use a teacher of the same architecture or --loss kd")


def _check_out(out: Path | None, overwrite: bool) -> None:
    if out is None:
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"output {out} already exists; pass overwrite=True (CLI: --overwrite) or choose another --out")


# -- the step ------------------------------------------------------------------------------------
def _forward(model: nn.Module, batch: dict[str, torch.Tensor], kind: str, hidden: bool):
    kwargs = dict(batch)
    if hidden:
        kwargs["output_hidden_states"] = True
    if kind == "causal-lm":
        kwargs["use_cache"] = False
    return model(**kwargs)


def _loss(cfg: FinetuneConfig, kind: str, batch, s_out, t_out) -> tuple[torch.Tensor, dict[str, float]]:
    w = cfg.weights
    parts: dict[str, torch.Tensor] = {}
    if kind == "causal-lm" and (w.get("ce") or w.get("kd")):
        labels = shift_labels(batch["input_ids"], batch["attention_mask"])  # (B, T)
        if w.get("ce"):
            parts["ce"] = causal_ce_loss(s_out.logits, labels)
        if w.get("kd"):
            keep = labels != -100  # (B, T) the label tokens
            parts["kd"] = kd_loss(s_out.logits[keep], t_out.logits[keep], cfg.temperature)
    if w.get("squarehead"):
        parts["squarehead"] = squarehead_loss(s_out.hidden_states[1:], t_out.hidden_states[1:], batch["attention_mask"])
    total = sum(w[name] * value for name, value in parts.items())
    return total, {name: float(value.detach()) for name, value in parts.items()}


def lr_schedule(cfg: FinetuneConfig) -> Callable[[int], float]:
    """The learning-rate factor after ``step`` optimizer steps: linear warm-up, then linear decay to 0.

    Example:
        >>> f = lr_schedule(FinetuneConfig(steps=10, warmup_steps=2))
        >>> [round(f(s), 3) for s in (0, 1, 2, 9, 10)]
        [0.5, 1.0, 1.0, 0.125, 0.0]
    """

    def factor(step: int) -> float:  # step = optimizer steps taken so far
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        return max(0.0, (cfg.steps - step) / max(1, cfg.steps - cfg.warmup_steps))

    return factor


def _prepare_teacher(teacher: Any, student: nn.Module, kind: str, cfg: FinetuneConfig) -> nn.Module | None:
    """The teacher module in ``cfg.teacher_dtype`` (a copy if it must be cast), or None if no loss needs one."""
    if not cfg.needs_teacher:
        return None
    if teacher is None:
        raise ConfigError(f"loss {cfg.loss} distils from a teacher; pass teacher= the dense model (CLI: --teacher)")
    t_model, _, _ = _unpack(teacher, None, kind, "teacher")
    _check_teacher(student, t_model, cfg)
    t_dtype = torch.bfloat16 if cfg.teacher_dtype == "bfloat16" else torch.float32
    if any(p.dtype != t_dtype for p in t_model.parameters()):
        t_model = copy.deepcopy(t_model).to(t_dtype)  # the caller's teacher stays as it is
    return t_model


def _check_state(state: dict[str, Any], cfg: FinetuneConfig, names: list[str], resume_dir: Path) -> None:
    if state["config"] != cfg.to_dict():
        diff = sorted(k for k in state["config"] if state["config"][k] != cfg.to_dict().get(k))
        raise ConfigError(f"{resume_dir} holds a run with other settings ({', '.join(diff)}); use the same "
                          "settings to resume, or another resume directory")
    if state["pruned"] != names:
        raise ConfigError(f"{resume_dir} holds a run of a model with other pruned layers; use another resume directory")


# -- evaluation ------------------------------------------------------------------------------------
def _evaluate(model, tokenizer, kind: str, cfg: FinetuneConfig, teacher) -> dict[str, float]:
    from sparseforge.data import calibration as text_data
    from sparseforge.evaluation import quality as evaluate

    if kind == "causal-lm":
        ids = text_data.corpus_token_ids(tokenizer, "heldout")  # (n_tokens,)
        result = evaluate.perplexity(model, tokenizer, token_ids=ids, seqlen=cfg.seqlen,
                                     max_windows=cfg.eval_windows, progress=False)
        return {"ppl": result.ppl}
    if teacher is None:
        return {}
    from sparseforge.data import corpus

    fid = evaluate.embedding_fidelity(teacher, model, tokenizer, corpus.heldout_sentences(cfg.eval_sentences))
    return {"cosine": fid.mean_cosine, "min_cosine": fid.min_cosine}


# -- resumable state ------------------------------------------------------------------------------
def _save_state(path: Path, state: dict[str, Any]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path / STATE_FILE)


def _load_state(path: Path | None) -> dict[str, Any] | None:
    if path is None or not (path / STATE_FILE).is_file():
        return None
    try:
        return torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign file
        raise ConfigError(f"cannot read the resumable state {path / STATE_FILE}: {exc}; delete it to start over") from exc


def _output_block(model: nn.Module, names: list[str], cfg: FinetuneConfig) -> dict[str, Any]:
    block = copy.deepcopy(getattr(getattr(model, "config", None), "sparsity_config", None) or {})
    for key in ("format_version", "format", "layers", "tied"):
        block.pop(key, None)
    if cfg.adapter != "none" and not cfg.merge_keep_mask:  # dense deltas merged: nothing is pruned any more
        names = []
        block.pop("pattern", None)
    block["targets"] = [f"{n}.weight" for n in names]
    block["finetune"] = cfg.to_dict()
    return block


# -- the loop ----------------------------------------------------------------------------------------
def finetune_(
    student: Any,
    config: FinetuneConfig | None = None,
    *,
    teacher: Any = None,
    data: Any = "builtin",
    tokenizer: Any = None,
    kind: str | None = None,
    resume_dir: "str | Path | None" = None,
    out: "str | Path | None" = None,
    overwrite: bool = False,
    evaluate: bool = True,
    progress: bool = True,
    callback: Callable[[StepInfo], None] | None = None,
) -> FinetuneResult:
    """Fine-tune the pruned ``student`` in place, keeping its zeros; see the module doc.

    Args:
        student: the pruned model: a :class:`~sparseforge.io.models.LoadedModel`, a name/path for
            :func:`~sparseforge.io.models.load_model`, or a module (then give ``tokenizer``).
        config: :class:`FinetuneConfig` (default: SquareHead, 100 steps).
        teacher: the dense model (same forms as ``student``); required by ``kd`` and ``squarehead``.
        data: ``"builtin"``, a ``.txt`` file or a directory of them, or a 1-D token-id tensor.
        resume_dir: where the resumable state lives; an existing state there is continued.
        out: write the fine-tuned model there as a compressed checkpoint (atomically).
        callback: called after every optimizer step (and after any state save) with a :class:`StepInfo`.

    Raises:
        ConfigError, ModelError, DataError: bad config, no pruned layer, a teacher that does not
            match, too little data, an existing ``out`` without ``overwrite``.
    """
    from tqdm.auto import tqdm

    cfg = config if config is not None else FinetuneConfig()
    if not isinstance(cfg, FinetuneConfig):
        raise ConfigError(f"config must be a FinetuneConfig, got {type(cfg).__name__}")
    out = Path(out) if out is not None else None
    _check_out(out, overwrite)
    model, tokenizer, kind = _unpack(student, tokenizer, kind, "student")
    if kind == "encoder" and set(cfg.weights) - {"squarehead"}:
        raise ConfigError("an encoder has no language-model head: fine-tune it with loss 'squarehead' (distillation)")
    names = check_recorded_mask(model, pruned_layers(model, cfg.min_sparsity))
    if not names and not cfg.allow_dense and cfg.adapter == "none":  # adapters: a dense base is fine
        raise ModelError(f"the student has no pruned layer (no linear layer with >= {cfg.min_sparsity:.0%} zeros); "
                         "prune it first (sparseforge prune / sparseforge.sparsify_) or pass the pruned model")
    if cfg.adapter == "s2ft":  # an unsupported model or budget is refused before any evaluation
        from sparseforge.finetune.s2ft import check_model

        check_model(model, cfg.s2ft)
    t_model = _prepare_teacher(teacher, model, kind, cfg)
    teacher_was_training = t_model is not None and t_model.training
    if t_model is not None:
        t_model.eval()
    if isinstance(data, torch.Tensor):
        if data.dim() != 1 or data.is_floating_point():
            raise DataError(f"data as a tensor must be a 1-D stream of token ids, got shape {tuple(data.shape)}")
        batches = TokenBatches(data.long(), cfg.batch_size, cfg.seqlen, cfg.seed)
    else:
        batches = make_batches(kind, tokenizer, data, cfg.batch_size, cfg.seqlen, cfg.seed)

    resume_dir = Path(resume_dir) if resume_dir is not None else None
    state = _load_state(resume_dir)
    if state is not None:
        _check_state(state, cfg, names, resume_dir)
    result = FinetuneResult(cfg, names)
    if evaluate:
        result.before = _evaluate(model, tokenizer, kind, cfg, t_model) if state is None else dict(state["before"])
        if t_model is not None and kind == "causal-lm":
            result.teacher_eval = _evaluate(t_model, tokenizer, kind, cfg, None)

    model.float().train()
    dropout_off = None if cfg.dropout else switch_off_dropout(model)  # before adapters: their own dropout stays
    torch.manual_seed(cfg.seed)
    s2ft = adapters = keeper = sparse = l1 = None
    backup: dict[str, torch.Tensor] | None = None  # the weights before a resume loads, until it succeeded

    def teardown(finished: bool) -> None:
        """Adapters, slices, mask hooks and packed layers off; after a failed resume, the weights as they came."""
        if backup is not None:
            model.load_state_dict(backup)
        if l1 is not None:
            l1.remove()
        if adapters is not None:  # merged (masked) after a full run; dropped, base untouched, otherwise
            adapters.finish(merge=finished)
        if sparse is not None:
            sparse.remove()
            for name, layer in sparse.modules.items():
                set_module(model, name, layer.to_linear())  # dense nn.Linear again, zeros where pruned
        elif keeper is not None or s2ft is not None:
            (keeper if keeper is not None else s2ft).remove()  # mask hooks off / S²FT slices fused back
        if dropout_off is not None:
            dropout_off.restore()
        model.eval()
        if t_model is not None:
            t_model.train(teacher_was_training)

    try:
        if cfg.adapter == "s2ft":  # dense slices of selected heads/channels train; fused back in keeper.remove()
            from sparseforge.finetune.s2ft import S2FTRun, peek_batches

            s2ft = S2FTRun(model, cfg.s2ft, names, seed=cfg.seed,
                           calibration=lambda: peek_batches(batches, cfg.s2ft.calibration_batches))
        if cfg.adapter in ("lora", "sparselora"):  # LoRA / SparseLoRA on the frozen base; merged (masked) at the end
            from sparseforge.finetune.adapters import AdapterRun

            adapters = AdapterRun(model, cfg, names)
        if cfg.l1_schedule is not None:  # ProSparse: L1 on the gate activations, factor set per step
            from sparseforge.activation.relufy import ActivationL1

            l1 = ActivationL1(model, schedule=cfg.l1_schedule)
        trainer = s2ft if s2ft is not None else adapters
        params = trainer.parameters() if trainer is not None else [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("every parameter of the student is frozen (requires_grad=False); unfreeze it: "
                              "student.requires_grad_(True)")
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg))
        if s2ft is not None:  # the slices keep their own masks
            keeper = s2ft
        else:  # allow_dense: nothing to keep; adapters: the base is frozen, the merge keeps the mask
            keeper = KeepMask.attach(model, optimizer, names) if names and adapters is None else _NoMask()
        if cfg.compute != "dense" and not names:
            raise ConfigError(f"compute={cfg.compute!r} trains pruned layers packed, but the student has none: use compute='dense'")
        if cfg.compute != "dense":
            from sparseforge.train import SparseCompute

            sparse = SparseCompute(keeper, format=cfg.compute)  # pruned layers become trainable SparseLinear
        start = 0
        if state is not None:
            backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
            try:
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
            except (RuntimeError, ValueError, KeyError) as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ConfigError(f"the resumable state in {resume_dir} does not fit this model ({first}); "
                                  "use another resume directory") from exc
            scheduler.load_state_dict(state["scheduler"])
            if sparse is None:
                keeper.load_state_dict(state["mask"])
            else:  # the packed layers hold the mask (the same zeros: checked through the pruned names and shapes)
                keeper.step_count = int(state["mask"]["step"])
                keeper.generator.set_state(state["mask"]["rng"])
            batches.generator.set_state(state["data_rng"])
            torch.set_rng_state(state["torch_rng"])
            start = int(state["step"])
            result.losses = list(state["losses"])
            result.resumed_from = start
            backup = None  # resumed: from here on an interruption keeps the progress (and the saved state)
    except BaseException:
        teardown(finished=False)
        raise

    def snapshot(step: int) -> dict[str, Any]:
        return {"config": cfg.to_dict(), "pruned": names, "step": step, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "mask": keeper.state_dict() if sparse is None else {"step": keeper.step_count, "rng": keeper.generator.get_state()},
                "data_rng": batches.generator.get_state(), "torch_rng": torch.get_rng_state(),
                "losses": list(result.losses), "before": dict(result.before)}

    tokens, elapsed = 0, 0.0
    hidden = "squarehead" in cfg.weights and cfg.weights["squarehead"] > 0
    finished = False
    try:
        with tqdm(range(start, cfg.steps), desc=f"finetune {cfg.loss}", unit="step", disable=not progress,
                  initial=start, total=cfg.steps) as bar:
            for step in bar:
                t0 = time.perf_counter()
                if adapters is not None:
                    adapters.begin_step(step)
                if l1 is not None:
                    l1.set_step(step + 1)
                batch = batches.next()
                t_out = None
                if t_model is not None:
                    with torch.no_grad():
                        t_out = _forward(t_model, batch, kind, hidden)
                s_out = _forward(model, batch, kind, hidden)
                loss, parts = _loss(cfg, kind, batch, s_out, t_out)
                if l1 is not None:
                    parts["l1"] = l1.penalty
                if not torch.isfinite(loss):
                    from sparseforge.errors import NumericalError

                    raise NumericalError(f"the loss is {loss.item()} at step {step + 1}; lower the learning rate (lr={cfg.lr:g})")
                loss.backward()
                if cfg.grad_clip is not None:  # the optimizer's current parameters (SparseCompute swaps some)
                    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                (keeper if sparse is None else sparse).step()
                n_tok = int(batch["attention_mask"].sum())
                tokens += n_tok
                elapsed += time.perf_counter() - t0
                result.losses.append(float(loss.detach()))
                bar.set_postfix(loss=f"{result.losses[-1]:.4f}", tok_s=f"{tokens / max(elapsed, 1e-9):.0f}")
                if resume_dir is not None and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps):
                    _save_state(resume_dir, snapshot(step + 1))
                if callback is not None:
                    callback(StepInfo(step + 1, result.losses[-1], parts, n_tok))
        finished = True
    finally:
        teardown(finished)
    result.tokens_per_s = tokens / elapsed if elapsed else 0.0
    result.trainable = sum(p.numel() for p in params)
    if evaluate:
        result.after = _evaluate(model, tokenizer, kind, cfg, t_model)
    if out is not None:
        from sparseforge import save_pretrained

        result.out = save_pretrained(model, out, tokenizer=tokenizer, overwrite=overwrite,
                                     sparsity_config=_output_block(model, names, cfg))
    return result
