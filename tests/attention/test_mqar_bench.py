"""benchmarks/bench_kv_quality.py: a tiny run writes a consistent table and JSON (every policy whose
budget covers the context answers exactly as dense; perplexity and attention error likewise)."""

from __future__ import annotations

import json

import pytest

from benchmark_modules import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("kv_quality")


def test_budget_tokens_and_labels(bench):
    assert bench.budget_tokens(8192, 1 / 16) == 512
    assert bench.budget_tokens(1024, 1 / 64) == 32  # at least two pages
    assert bench.budget_tokens(1000, 1 / 4) % bench.PAGE == 0
    assert bench.fraction_label(1 / 16) == "1/16" and bench.fraction_label(2.0) == "2"


def _random_mqar_model(path):
    """An untrained MQAR-shaped model saved to ``path`` (the bench's consistency does not need recall)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparseforge.data.mqar import MQARVocab

    vocab = MQARVocab()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab.size, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024)
    config.mqar_vocab = {"filler": vocab.filler, "keys": vocab.keys, "values": vocab.values}
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_tiny_run_is_consistent(bench, tmp_path, capsys):
    out = tmp_path / "q.json"
    model = _random_mqar_model(tmp_path / "mqar")
    assert bench.main(["--mqar-model", str(model), "--contexts", "160", "--fractions", "0.25", "2", "--examples", "2", "--pairs", "16",
                       "--queries", "6", "--mustafar", "0.7", "--ppl-windows", "1", "--ppl-seqlen", "64",
                       "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = [r for r in data["recall"] if r["policy"] != "_prefill"]
    assert {r["policy"] for r in rows} == set(bench.POLICIES)
    dense = next(r for r in rows if r["policy"] == "dense")
    assert dense["answers"] == 12 and dense["read_fraction"] == 1.0
    full = [r for r in rows if r["budget"] == "2 context"]
    assert {r["policy"] for r in full} == set(bench.BUDGETED)
    assert all(r["accuracy"] == dense["accuracy"] and r["read_fraction"] == 1.0 for r in full)
    small = {r["policy"]: r for r in rows if r["budget"] == "1/4 context"}
    assert small["streaming"]["read_fraction"] < 0.5 and small["quest"]["read_fraction"] < 0.7
    assert "PASS every policy with a budget covering the context equals dense at 160" in data["verdicts"]
    ppl = data["perplexity"]
    pd = next(r for r in ppl if r["policy"] == "dense")
    assert pd["attn_rel_err"] == 0.0 and pd["tokens"] == 31
    for r in ppl:
        if r["budget"].endswith("(2)"):
            assert r["ppl"] == pytest.approx(pd["ppl"], rel=1e-5) and r["attn_rel_err"] < 1e-5, r
    streaming = next(r for r in ppl if r["policy"] == "streaming" and r["budget"].endswith("(1/4)"))
    assert streaming["attn_rel_err"] > 1e-3 and streaming["read_fraction"] < 1.0
    text = capsys.readouterr().out
    assert "| dense | full |" in text and data["meta"]["cpu"]
    assert data["meta"]["mqar_model"] == f"{model} (a model directory)"
    assert f"### MQAR recall, model {model} (a model directory)" in text


def test_the_table_names_the_shipped_circuit_as_an_upper_bound(bench):
    assert "hand-set induction circuit" in bench.model_label(None) and "upper bound" in bench.model_label(None)
