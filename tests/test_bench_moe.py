"""benchmarks/bench_moe.py: a tiny decode run times every decode variant and leaves the layer as it was."""

from __future__ import annotations

import json

import sparseforge.moe.layer as layer_mod
from benchmark_modules import load_benchmark
from sparseforge.ops.expert_ffn import expert_ffn


def test_decode_rounds_time_ours_polling_and_torch_and_restore_the_kernel(tmp_path, monkeypatch, capsys):
    bench = load_benchmark("moe")
    monkeypatch.setenv("SPARSEFORGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(bench, "CONFIGS", [{"name": "tiny", "experts": 4, "k": 2, "d": 64, "h": 96}])
    out = tmp_path / "moe.json"
    assert bench.main(["--quick", "--metrics", "decode", "--threads", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())["runs"][0]["results"][0]
    decode = result["samples_s"]["decode"]
    assert set(decode) == {"sparseforge", "hf-eager", "hf-grouped_mm", "sparseforge-torch-decode", "sparseforge-pool-polls"}
    assert all(len(v) == 2 and min(v) > 0 for v in decode.values())  # --quick: 2 rounds
    assert "forward" not in result["samples_s"]
    assert result["decode_choice"]["1"]["path"] in ("native", "native-parallel", "torch")
    printed = capsys.readouterr().out
    assert "ours with the pool polling after the kernel" in printed and "decode_backend='auto' at 1 token(s) chose" in printed
    assert layer_mod.native_expert_ffn is expert_ffn
