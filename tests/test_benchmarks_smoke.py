"""benchmarks/bench_oneshot.py: a quick end-to-end run on tiny models, plus its pure helpers."""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmark_modules import load_benchmark

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"


def _byte_tokenizer():
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=257, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(["a"], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def _tiny_models(root: Path) -> tuple[Path, Path]:
    transformers = importlib.import_module("transformers")
    torch.manual_seed(0)
    llama = transformers.LlamaConfig(vocab_size=257, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=4, intermediate_size=64, max_position_embeddings=256)  # fmt: skip
    bert = transformers.BertConfig(vocab_size=257, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, max_position_embeddings=256)  # fmt: skip
    paths = root / "tiny-llama", root / "tiny-bert"
    transformers.LlamaForCausalLM(llama).save_pretrained(paths[0])
    transformers.BertModel(bert).save_pretrained(paths[1])
    for p in paths:
        _byte_tokenizer().save_pretrained(p)
    return paths


@pytest.mark.slow
def test_quick_run_writes_finite_results(tmp_path):
    llama, bert = _tiny_models(tmp_path)
    out = tmp_path / "results"
    cmd = [sys.executable, str(BENCH / "bench_oneshot.py"), "--quick", "--skip-llmcompressor", "--models", f"{llama},{bert}",
           "--patterns", "2:4", "--samples", "4", "--eval-windows", "2", "--eval-sentences", "8", "--threads", "1", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    results = json.loads((out / "oneshot.quick.json").read_text())
    assert set(results) >= {"meta", "settings", "models", "runs", "checks"}
    assert results["settings"]["patterns"] == ["2:4"] and results["settings"]["llmc_patterns"] == []
    assert {m["kind"] for m in results["models"].values()} == {"causal-lm", "encoder"}
    runs = results["runs"]
    assert len(runs) == 2 * (1 + 3)  # per model: dense + 3 methods
    for r in runs:
        assert "error" not in r, r
        assert r["tool"] == "sparseforge" and r["metric"] in ("ppl", "mean_cosine")
        for key in ("value", "prune_s", "total_s", "peak_rss_mb"):
            assert math.isfinite(r[key]), (key, r)
        assert 0 < r["peak_rss_mb"] < 4096  # a cell's own peak, not the parent's
        if r["method"] != "dense":
            assert r["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3) and r["sparsity_ok"], r
    dense_cos = [r["value"] for r in runs if r["metric"] == "mean_cosine" and r["method"] == "dense"]
    assert dense_cos == [pytest.approx(1.0, abs=1e-5)]
    assert all(isinstance(c["passed"], bool) for c in results["checks"])
    md = (out / "oneshot.quick.md").read_text()
    assert "| method | 2:4 |" in md and "sparsegpt" in md


def test_parse_pattern():
    oneshot = load_benchmark("oneshot")
    assert oneshot.parse_pattern("50%") == ("50%", "unstructured", 0.5)
    assert oneshot.parse_pattern("70%") == ("70%", "unstructured", 0.7)
    assert oneshot.parse_pattern("2:4") == ("2:4", "2:4", 0.5)
    assert oneshot.parse_pattern("1:4") == ("1:4", "1:4", 0.75)
    assert oneshot.parse_pattern("block4x4@60%") == ("block4x4@60%", "block4x4", 0.6)


def test_llmcompressor_mask_structure_prunes_m_minus_n():
    runner = load_benchmark("llmcompressor_runner")
    assert runner.mask_structure("unstructured") == "0:0"
    assert runner.mask_structure("2:4") == "2:4"
    assert runner.mask_structure("1:4") == "3:4"  # llm-compressor's N is the number pruned


def _run(method, pattern, value, tool="sparseforge", **kw):
    return {"model": "m", "tool": tool, "method": method, "pattern": pattern, "value": value,
            "prune_s": kw.get("t", 1.0), "total_s": 2.0, "peak_rss_mb": kw.get("rss", 100.0)}  # fmt: skip


def test_checks_flag_each_target():
    report = load_benchmark("oneshot_report")
    results = {"settings": {"patterns": ["50%", "2:4"], "methods": ["magnitude", "wanda", "sparsegpt"]},
               "models": {"m": {"kind": "causal-lm"}},
               "runs": [_run("dense", "dense", 10.0), _run("magnitude", "50%", 30.0), _run("wanda", "50%", 11.0),
                        _run("sparsegpt", "50%", 12.0), _run("magnitude", "2:4", 50.0), _run("wanda", "2:4", 14.0),
                        _run("sparsegpt", "2:4", 15.0),
                        _run("sparsegpt", "50%", 11.9, tool="llm-compressor", t=2.0, rss=50.0)]}  # fmt: skip
    got = {c["name"]: c["passed"] for c in report.checks(results)}
    assert got["m: wanda < magnitude at 50%"] and got["m: sparsegpt < magnitude at 2:4"]
    assert not got["m: sparsegpt <= wanda at 2:4"]  # 15 > 14
    assert not got["m: sparsegpt 50% within +15% of dense"]  # +20 %
    assert got["m: sparseforge ppl within +2% of llm-compressor at 50%"]  # +0.8 %
    assert got["m: sparseforge prune time < llm-compressor at 50%"]
    assert not got["m: sparseforge peak RSS < llm-compressor at 50%"]
    encoder = {**results, "models": {"m": {"kind": "encoder"}}, "runs": [_run("sparsegpt", "50%", 0.94)]}
    assert report.checks(encoder) == [{"name": "m: sparsegpt 50% mean cosine >= 0.95", "passed": False, "detail": "0.9400"}]
