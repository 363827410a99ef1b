"""The student's dropout is off while it trains (the default) and restored afterwards."""

import copy

import pytest
import torch
from torch import nn

from sparseforge.finetune import FinetuneConfig, finetune_
from sparseforge.finetune.dropout import switch_off_dropout
from tiny_models import VOCAB, tiny_model

DATA = torch.randint(0, VOCAB, (2000,), generator=torch.Generator().manual_seed(0))


def dropout_values(model: nn.Module) -> dict[str, float]:
    out = {}
    for name, module in model.named_modules():
        for attr, value in vars(module).items():
            if attr == "p" and isinstance(module, nn.Dropout) or "dropout" in attr and isinstance(value, float):
                out[f"{name}.{attr}"] = value
    return out


def first_step_loss(family: str, loss: str, dropout: bool, **model_kw) -> tuple[float, nn.Module]:
    """The loss of the first step of an unpruned copy of ``family`` distilled from itself."""
    teacher = tiny_model(family)
    for key, value in model_kw.items():  # e.g. Llama's attention_dropout, read by the attention at run time
        for module in teacher.modules():
            if hasattr(module, key):
                setattr(module, key, value)
    student = copy.deepcopy(teacher)
    kind = "encoder" if family == "bert" else "causal-lm"
    cfg = FinetuneConfig(loss=loss, steps=1, batch_size=4, seqlen=16, lr=1e-3, allow_dense=True, dropout=dropout)
    seen = []
    finetune_(student, cfg, teacher=teacher, data=DATA if kind == "causal-lm" else None, tokenizer=None, kind=kind,
              evaluate=False, progress=False, callback=lambda info: seen.append(info.parts[loss]))
    return seen[0], student


@pytest.mark.parametrize("family, loss, model_kw", [
    ("gpt2", "squarehead", {}),                          # nn.Dropout modules, attention reads attn_dropout.p
    ("gpt2", "kd", {}),
    ("llama", "squarehead", {"attention_dropout": 0.5}),  # a float attribute passed to the attention kernel
])
def test_student_matches_its_own_teacher_exactly_without_dropout(family, loss, model_kw):
    value, _ = first_step_loss(family, loss, dropout=False, **model_kw)
    assert value < 1e-8
    value_on, _ = first_step_loss(family, loss, dropout=True, **model_kw)
    assert value_on > 1e-5  # with dropout the student differs from the eval-mode teacher


def test_encoder_student_without_dropout(monkeypatch):
    """BERT (dropout 0.1 everywhere), trained on sentences: an unpruned student starts at SquareHead 0."""
    from sparseforge.finetune import loop

    class Batches:
        generator = torch.Generator()

        def next(self):
            ids = torch.randint(2, VOCAB, (4, 12), generator=self.generator)
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    monkeypatch.setattr(loop, "make_batches", lambda *a, **k: Batches())
    teacher = tiny_model("bert")
    for dropout, check in ((False, lambda v: v < 1e-8), (True, lambda v: v > 1e-5)):
        student, seen = copy.deepcopy(teacher), []
        cfg = FinetuneConfig(loss="squarehead", steps=1, batch_size=4, seqlen=16, allow_dense=True, dropout=dropout)
        finetune_(student, cfg, teacher=teacher, data="builtin", tokenizer=object(), kind="encoder", evaluate=False,
                  progress=False, callback=lambda info: seen.append(info.parts["squarehead"]))
        assert check(seen[0]), (dropout, seen)


def test_dropout_restored_after_the_run():
    teacher = tiny_model("gpt2")
    student = copy.deepcopy(teacher)
    before = dropout_values(student)
    assert before and all(v > 0 for v in before.values())
    cfg = FinetuneConfig(loss="ce", steps=2, batch_size=2, seqlen=16, allow_dense=True)
    finetune_(student, cfg, data=DATA, tokenizer=None, evaluate=False, progress=False)
    assert dropout_values(student) == before


def test_switch_off_dropout_sets_every_probability_to_zero_and_back():
    model = tiny_model("llama")
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.25
    model.add_module("extra", nn.Sequential(nn.Dropout(0.5), nn.Dropout2d(0.1), nn.AlphaDropout(0.2)))
    before = dropout_values(model)
    assert any(k.endswith("attention_dropout") for k in before)
    off = switch_off_dropout(model)
    assert all(v == 0.0 for v in dropout_values(model).values())
    assert [m.p for m in model.extra] == [0.0, 0.0, 0.0]
    off.restore()
    assert dropout_values(model) == before
    assert [m.p for m in model.extra] == [0.5, 0.1, 0.2]
