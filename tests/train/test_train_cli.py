import argparse

import pytest

from sparseforge.cli import add_train_parser
from sparseforge.errors import ConfigError
from sparseforge.train import dump_train_recipe, parse_train_recipe
from sparseforge.train.cli import default_config, run
from sparseforge.train.config import TRAIN_CONFIGS


def parse(*argv):
    ap = argparse.ArgumentParser()
    add_train_parser(ap.add_subparsers(dest="command"))
    return ap.parse_args(["train", *argv])


@pytest.mark.parametrize("method", sorted(TRAIN_CONFIGS))
def test_default_config_for_every_method(method):
    cfg = default_config(method, 60)
    assert cfg.method == method and cfg.targets == ["model.layers.*"]
    assert parse_train_recipe(dump_train_recipe(cfg)) == cfg
    if method == "gmp":
        assert cfg.schedule.end_step == 36 and cfg.schedule.update_interval == 6
    elif method in ("set", "rigl", "srigl", "sparse_momentum"):
        assert cfg.schedule.end_step == 45 and cfg.sparsity == 0.5


@pytest.mark.parametrize("pattern, sparsity", [("2:4", None), (" 1:4 ", None), ("fanin8", None), ("fanin", 0.5),
                                               ("block4x4", 0.5), ("unstructured", 0.5)])
def test_a_pattern_that_fixes_the_sparsity_leaves_it_unset(pattern, sparsity):
    """N:M and fan-in-k fix the sparsity themselves; the others get the default 0.5 (parsed, not string-matched)."""
    assert default_config("static", 60, pattern=pattern).sparsity == sparsity


def test_a_bad_pattern_names_the_valid_forms():
    with pytest.raises(ConfigError, match="valid patterns"):
        default_config("static", 60, pattern="2-4")


def test_bad_input(tmp_path):
    with pytest.raises(ConfigError, match="unknown training method"):
        default_config("lottery", 60)
    with pytest.raises(ConfigError, match="steps"):
        run(parse("--steps", "0"))
    with pytest.raises(ConfigError, match="does not exist"):
        run(parse("--recipe", str(tmp_path / "missing.yaml")))
    with pytest.raises(ConfigError, match="fixes the sparsity"):
        default_config("static", 60, sparsity=0.3, pattern="2:4")


@pytest.mark.slow
def test_train_builtin_and_save(tmp_path, capsys):
    from sparseforge.io.models import load_model

    recipe = tmp_path / "rigl.yaml"
    recipe.write_text(dump_train_recipe(default_config("srigl", 4, sparsity=0.75)), encoding="utf-8")
    out = tmp_path / "trained"
    assert run(parse("--recipe", str(recipe), "--steps", "4", "--seqlen", "32", "--batch-size", "2",
                     "--eval-windows", "2", "--no-progress", "--output", str(out))) == 0
    text = capsys.readouterr().out
    assert "held-out perplexity before" in text and "held-out perplexity after 4 steps (2 mask updates)" in text
    assert "model.layers.0.mlp.up_proj: 0.75" in text
    model = load_model(out).model
    w = model.model.layers[0].mlp.up_proj.weight
    per_row = (w != 0).sum(1)
    assert float((w == 0).float().mean()) >= 0.75 and bool((per_row[per_row > 0] == per_row.max()).all())
