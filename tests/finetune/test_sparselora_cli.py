"""``sparseforge finetune --adapter lora|sparselora`` end to end on the built-in model, and its one-line errors."""

import pytest
import torch

import sparseforge
from sparseforge.cli import main
from sparseforge.layers import weight_2d


@pytest.mark.parametrize("adapter", ["sparselora", "lora"])
def test_finetune_adapter_builtin_end_to_end(pruned_dir, tmp_path, capsys, adapter):
    out = tmp_path / adapter
    argv = ["finetune", str(pruned_dir), "--loss", "ce", "--adapter", adapter, "--lora-rank", "4", "--steps", "3",
            "--batch-size", "2", "--seqlen", "32", "--eval-windows", "1", "--lr", "1e-2", "--threads", "1",
            "--sparselora-start", "0", "--sparselora-attn-sparsity", "0.5", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"adapter {adapter} (rank 4) merged into the weights (masked deltas)" in printed
    assert "held-out ppl:" in printed
    before, after = sparseforge.load(pruned_dir), sparseforge.load(out)
    assert after.config.sparsity_config["format"] == "nm"  # 2:4 stays 2:4, stored compressed
    assert after.config.sparsity_config["finetune"]["adapter"] == adapter
    assert after.config.sparsity_config["finetune"]["sparselora_attn_sparsity"] == 0.5
    assert set(before.state_dict()) == set(after.state_dict())  # adapters merged: plain layers
    mods_b, mods_a = dict(before.named_modules()), dict(after.named_modules())
    targets = after.config.sparsity_config["targets"]
    assert targets
    changed = 0
    for name in targets:
        layer = name.removesuffix(".weight")
        wb, wa = weight_2d(mods_b[layer]), weight_2d(mods_a[layer])
        assert torch.equal(wb == 0, wa == 0)
        changed += not torch.equal(wb, wa)
    assert changed == len(targets)


@pytest.mark.parametrize("extra, message", [
    (["--adapter", "sparselora", "--lora-rank", "0"], "lora_rank must be a positive integer"),
    (["--adapter", "lora", "--compute", "csr"], "trains on a frozen base"),
    (["--adapter", "sparselora", "--sparselora-sparsity", "1.5"], "sparselora_sparsity must be a number in [0, 1)"),
    (["--adapter", "sparselora", "--sparselora-layers", "9"], "outside the model's 6 blocks"),
    (["--adapter", "sparselora", "--sparselora-attn-sparsity", "1"], "sparselora_attn_sparsity must be a number in [0, 1)"),
])
def test_finetune_adapter_bad_input_one_line_errors(pruned_dir, tmp_path, capsys, extra, message):
    argv = ["finetune", str(pruned_dir), "--loss", "ce", "--steps", "1", "--batch-size", "1", "--seqlen", "16",
            "--no-eval", "--no-progress", "--out", str(tmp_path / "o"), *extra]
    assert main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (model loading may print a progress bar first)
    assert last.startswith("sparseforge finetune: error:") and message in last
    assert not (tmp_path / "o").exists()
