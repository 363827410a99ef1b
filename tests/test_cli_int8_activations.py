"""``sparseforge eval / generate --int8-activations`` on a compressed 2:4 + int8 checkpoint of the built-in
model, the Python path under them (``load_sparse`` + ``set_activation_precision_`` + ``generate``), and
their errors."""

from __future__ import annotations

import re

import pytest
import torch

import sparseforge as sf
from sparseforge.cli import main
from sparseforge.errors import ConfigError
from sparseforge.generation import generate, load_causal_lm
from sparseforge.nn.sparse_linear import SparseLinear
from sparseforge.quant import QuantConfig
from sparseforge.runtime.compress import set_activation_precision_

PROMPT = "To be, or not to be"
EVAL = ["--max-windows", "2", "--seqlen", "64", "--no-progress"]


def _pruned(tmp_path_factory, quantize: bool):
    model, tokenizer, _ = load_causal_lm("builtin")
    config = sf.SparsifyConfig(method="magnitude", pattern="2:4", quantize=QuantConfig(bits=8) if quantize else None)
    report = sf.sparsify_(model, config, progress=False)
    out = sf.save_pretrained(model, tmp_path_factory.mktemp("int8act") / "m", tokenizer=tokenizer)
    return out, len(report.layers)


@pytest.fixture(scope="module")
def int8_dir(tmp_path_factory):
    return _pruned(tmp_path_factory, quantize=True)


def _ppl(text: str) -> float:
    return float(re.search(r"perplexity ([0-9.]+)", text).group(1))


def test_eval_with_int8_activations_runs_every_pruned_layer_in_the_mode(int8_dir, capsys):
    path, n_layers = int8_dir
    assert main(["eval", str(path), *EVAL]) == 0
    float_ppl = _ppl(capsys.readouterr().out)
    assert main(["eval", str(path), "--int8-activations", *EVAL]) == 0
    out = capsys.readouterr().out
    assert f"int8 activations in {n_layers} layer(s)" in out
    int8_ppl = _ppl(out)
    assert int8_ppl != float_ppl and abs(int8_ppl / float_ppl - 1) < 0.05  # changed, but by a quantization error


def test_generate_with_int8_activations_keeps_the_mode_through_the_lean_path(int8_dir, capsys):
    path, n_layers = int8_dir
    assert main(["generate", str(path), "--prompt", PROMPT, "--max-new-tokens", "4", "--ignore-eos",
                 "--int8-activations", "--threads", "1"]) == 0
    captured = capsys.readouterr()
    assert f"# int8 activations in {n_layers} layer(s)" in captured.err and captured.out.startswith(PROMPT)
    model, tokenizer, sparse = load_causal_lm(path)
    assert sparse and len(set_activation_precision_(model, "int8")) == n_layers
    result = generate(model, PROMPT, tokenizer=tokenizer, max_new_tokens=4, ignore_eos=True, threads=1)
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert layers and all(m.activations == "int8" and m.weight_format.dtype == torch.int8 for m in layers)
    assert len(result.token_ids) == 4


def test_int8_activations_errors(int8_dir, tmp_path_factory, capsys):
    path, _ = int8_dir
    assert main(["generate", str(path), "--prompt", PROMPT, "--int8-activations", "--dense"]) == 2
    assert "drop --dense" in capsys.readouterr().err
    assert main(["eval", "builtin", "--int8-activations", *EVAL]) == 2
    assert "not a compressed" in capsys.readouterr().err
    float_path, _ = _pruned(tmp_path_factory, quantize=False)
    assert main(["eval", str(float_path), "--int8-activations", *EVAL]) == 2
    assert "none qualifies" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="none qualifies"):
        set_activation_precision_(load_causal_lm(float_path)[0], "int8")


def test_bench_runs_the_sparse_variant_with_int8_activations(int8_dir, capsys):
    from sparseforge.evaluation.speed import bench_generation

    path, n_layers = int8_dir
    kw = dict(batch_sizes=(1,), new_tokens=2, prompt_len=4, repeats=1, threads=1, format="rule", measure_rss=False,
              progress=False)
    int8 = bench_generation(str(path), activations="int8", **kw)
    assert int8.compress_summary.count("int8 activations") == n_layers
    flt = bench_generation(str(path), **kw)
    assert "int8 activations" not in flt.compress_summary
    assert int8.max_abs_logit_diff > 10 * flt.max_abs_logit_diff  # the quantized inputs move the logits
    assert main(["bench", str(path), "--batch-sizes", "1", "--new-tokens", "2", "--prompt-len", "4", "--repeats", "1",
                 "--threads", "1", "--format", "rule", "--no-rss", "--no-progress", "--int8-activations"]) == 0
    assert "int8 activations" in capsys.readouterr().out


@pytest.mark.slow
def test_prune_reports_the_perplexity_with_int8_activations(tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["prune", "builtin", "--method", "magnitude", "--pattern", "2:4", "--quantize", "int8",
                 "--int8-activations", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    pruned = float(re.search(r"-> pruned ([0-9.]+)", text).group(1))
    found = re.search(r"perplexity with int8 activations \(sparse kernels, (\d+) layer\(s\)\): ([0-9.]+)", text)
    assert found and int(found.group(1)) > 0
    assert float(found.group(2)) != pruned and abs(float(found.group(2)) / pruned - 1) < 0.05
    assert (out / "config.json").exists()  # saved before the in-place compression


def test_prune_int8_activations_needs_int8_weights(tmp_path, capsys):
    assert main(["prune", "builtin", "--method", "magnitude", "--pattern", "2:4", "--int8-activations",
                 "--out", str(tmp_path / "m"), "--no-progress"]) == 2
    assert "--quantize int8" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
