"""docs/training.md must not drift from the code: run its Python and YAML examples."""

import re
from pathlib import Path

import pytest

from sparseforge.train import RigLConfig, parse_train_recipe
from sparseforge.train.config import GMPConfig, SETConfig, SparseTrainConfig, SRSTEConfig, STEConfig

DOC = Path(__file__).resolve().parents[2] / "docs" / "training.md"


def blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


def test_python_example_runs(capsys):
    code, _ = blocks("python")
    namespace = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.step_count == 200
    for layer in trainer.layers:  # the ERK target, up to rounding to whole weights
        assert abs(trainer.sparsities()[layer.name] - layer.sparsity) <= 1 / layer.mask.numel()
    assert namespace["update"] is None  # step 200 is past end_step
    assert "0.93" in capsys.readouterr().out


def test_nm_example_runs(capsys):
    _, code = blocks("python")
    namespace = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    from sparseforge.masks import satisfies

    net = namespace["net"]
    assert len(namespace["nm"].flip_rate) == 50 and namespace["nm"].layers == []
    assert satisfies(net[0].weight != 0, "2:4") and float((net[0].weight == 0).float().mean()) == 0.5
    assert "'0'" in capsys.readouterr().out


def test_yaml_example_parses():
    (text,) = blocks("yaml")
    cfg = parse_train_recipe(text)
    assert cfg == RigLConfig(sparsity=0.9, distribution="erk", drop_fraction=0.3,
                             schedule={"start_step": 0, "end_step": 750, "update_interval": 100})


def test_field_table_matches_the_dataclass():
    text = DOC.read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `(\w+)`(?:, `(\w+)`)? \|", text, flags=re.M))
    names = {n for pair in documented for n in pair if n}
    import dataclasses

    shared = {f.name for f in dataclasses.fields(SparseTrainConfig)}
    assert shared <= names, shared - names
    for extra in ("initial_sparsity", "drop_fraction", "drop_fraction_decay", "decay"):
        assert f"`{extra}`" in text
    assert {f.name for f in dataclasses.fields(GMPConfig)} - shared == {"initial_sparsity"}
    assert {f.name for f in dataclasses.fields(SETConfig)} - shared == {"drop_fraction", "drop_fraction_decay"}
    nm_options = {"flow_decay", "flow_decay_coef", "flow_decay_start", "transposable", "structure_decay",
                  "structure_decay_start", "structure_decay_end", "structure_decay_levels"}
    for extra in nm_options:
        assert f"`{extra}`" in text
    assert {f.name for f in dataclasses.fields(STEConfig)} - shared == nm_options
    assert {f.name for f in dataclasses.fields(SRSTEConfig)} - shared == nm_options | {"decay"}
