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


def test_model_argument_and_data(tmp_path, capsys):
    """A Hugging Face directory of another family (GPT-2 layout) trained on a .txt file."""
    import transformers as t

    from sparseforge.cli import main
    from sparseforge.io.models import load_model

    tok = load_model("builtin").tokenizer
    cfg = t.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=128,
                       bos_token_id=0, eos_token_id=0)
    model_dir = tmp_path / "gpt2"
    t.GPT2LMHeadModel(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    text = tmp_path / "notes.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    assert main(["train", str(model_dir), "--data", str(text), "--method", "static", "--sparsity", "0.5", "--steps", "2",
                 "--seqlen", "16", "--batch-size", "1", "--eval-windows", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "transformer.h.*" in out and "transformer.h.0.mlp.c_fc: 0.5000" in out
    assert main(["train", "minilm", "--steps", "2", "--no-progress"]) == 2
    assert "trains causal LMs" in capsys.readouterr().err
    assert main(["train", str(model_dir), "--data", str(tmp_path / "missing.txt"), "--steps", "2", "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
    text.write_text("Too short.", encoding="utf-8")
    assert main(["train", str(model_dir), "--data", str(text), "--steps", "2", "--seqlen", "16", "--no-progress"]) == 2
    assert "longer than the training text" in capsys.readouterr().err
