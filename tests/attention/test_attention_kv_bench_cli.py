"""`sparseforge bench MODEL --kv-policy P --kv-budget N --context C`: decode tokens/s of the dense
policy and P on the built-in model, with the read fraction the policy's budget implies and the KV
bytes the cache holds; bad budgets are clear errors."""

from __future__ import annotations

import json

import pytest

from sparseforge.attention import Mustafar, Quest, StreamingLLM
from sparseforge.attention.speed import kv_policy
from sparseforge.cli import main
from sparseforge.errors import ConfigError


def test_bench_kv_policy_reports_tokens_per_s_read_fraction_and_kv_bytes(tmp_path, capsys):
    out = tmp_path / "kv.json"
    rc = main(["bench", "builtin", "--context", "256", "--kv-policy", "quest", "--kv-budget", "64", "--kv-steps", "1",
               "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["context"] == 256 and report["kv_policy"] == "quest" and set(report["results"]) == {"dense", "quest"}
    dense, quest = report["results"]["dense"], report["results"]["quest"]
    assert dense["read_fraction"] == 1.0
    # layers 0-1 dense (Quest's dense_layers); the others read 4 pages of the 257 cached tokens: 3 full
    # pages of 16 and the newest page, which holds 1 token
    import transformers

    from sparseforge.io.builtin import builtin_model_path

    L = transformers.AutoConfig.from_pretrained(str(builtin_model_path())).num_hidden_layers
    assert quest["read_fraction"] == pytest.approx((2 * 257 + (L - 2) * (3 * 16 + 1)) / (L * 257))
    assert dense["tokens_per_s"] > 0 and quest["tokens_per_s"] > 0 and quest["kv_bytes"] == dense["kv_bytes"] > 0
    text = capsys.readouterr().out
    assert "decode at 256 cached tokens" in text and "quest" in text


def test_kv_policy_names_and_bad_budgets(capsys):
    assert kv_policy("quest", 128) == Quest(budget=128)
    assert kv_policy("streaming", 100) == StreamingLLM(sinks=4, window=96)
    assert kv_policy("mustafar", 64) == Mustafar(recent=64)
    with pytest.raises(ConfigError, match="--kv-budget must be a positive integer"):
        kv_policy("quest", 0)
    with pytest.raises(ConfigError, match="no window"):
        kv_policy("streaming", 4)
    with pytest.raises(ConfigError, match="unknown KV policy"):
        kv_policy("h2o", 64)
    assert main(["bench", "builtin", "--context", "64", "--kv-policy", "quest", "--kv-budget", "20"]) == 2
    assert "not a multiple of the page size" in capsys.readouterr().err
