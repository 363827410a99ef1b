"""`sparseforge bench` (generation tokens/s, dense vs compressed) and `sparseforge advise` end to end."""

from __future__ import annotations

import importlib
import json

import pytest

from sparseforge.cli import main
from sparseforge.errors import ConfigError
from sparseforge.evaluation.speed import bench_generation

pytestmark = pytest.mark.slow


def test_bench_builtin_pruned_2of4():
    report = bench_generation("builtin", batch_sizes=(1, 2), new_tokens=3, prompt_len=4, repeats=1, threads=1,
                              format="nm", pattern="2:4", progress=False)
    assert [(r["variant"], r["batch"]) for r in report.rows] == [("dense", 1), ("sparse", 1), ("dense", 2), ("sparse", 2)]
    for r in report.rows:
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * 3 / r["median_s"])
        dense = next(d for d in report.rows if d["variant"] == "dense" and d["batch"] == r["batch"])
        assert r["speedup"] == pytest.approx(dense["median_s"] / r["median_s"])
    assert report.max_abs_logit_diff < 1e-3  # same model: the 2:4-packed layers compute the same logits
    assert "42 layer(s)" in report.compress_summary  # 6 blocks x 7 linears, lm_head tied to embeddings
    assert report.weight_mib["sparse"] < report.weight_mib["dense"]
    assert set(report.peak_rss_mib) == {"dense", "sparse"} and all(v > 50 for v in report.peak_rss_mib.values())
    assert "| 2 | sparse |" in report.table()


def test_bench_bad_arguments():
    with pytest.raises(ConfigError, match="batch sizes"):
        bench_generation("builtin", batch_sizes=(0,))
    with pytest.raises(ConfigError, match="new_tokens"):
        bench_generation("builtin", new_tokens=0)


def test_advise_cli_on_a_pruned_checkpoint(tmp_path, capsys):
    importlib.import_module("matplotlib")
    out = tmp_path / "pruned"
    assert main(["prune", "builtin", "--method", "magnitude", "--pattern", "2:4", "--out", str(out),
                 "--no-eval", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["advise", str(out), "--batch-sizes", "1", "4", "--sparsities", "0.9", "--budget", "0.001",
                 "--threads", "1", "--plot", str(tmp_path / "a.png"), "--json", str(tmp_path / "a.json"),
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "per-layer choice" in text and "| 2:4 |" in text
    data = json.loads((tmp_path / "a.json").read_text())
    covered = sorted(n for a in data["layers"] for n in a["layers"])
    assert len(covered) == 42 and all("nm" in a["timings"] for a in data["layers"])
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
    assert {r["label"] for r in data["sweep"]} == {"90%", "2:4"}


def test_own_peak_rss_is_this_process_image_not_the_parents():
    import subprocess
    import sys

    import torch

    from sparseforge.evaluation.speed import own_peak_rss_mib

    big = torch.ones(64 * 2**20)  # 256 MiB in this (parent) process
    assert own_peak_rss_mib() > 256
    code = "from sparseforge.evaluation.speed import own_peak_rss_mib; print(own_peak_rss_mib())"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert child < own_peak_rss_mib() - 200  # ru_maxrss would have inherited the parent's peak
    del big
