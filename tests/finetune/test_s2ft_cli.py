"""``sparseforge finetune --adapter s2ft`` end to end on the built-in model, and its one-line errors."""

import pytest
import torch

import sparseforge
from sparseforge.cli import main
from sparseforge.layers import weight_2d


@pytest.fixture(scope="module")  # a 2:4 pruned built-in model
def pruned_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("s2ft") / "pruned"
    assert main(["prune", "builtin", "--method", "magnitude", "--pattern", "2:4", "--out", str(out),
                 "--no-eval", "--no-progress"]) == 0
    return out


@pytest.mark.slow
def test_s2ft_builtin_end_to_end(pruned_dir, tmp_path, capsys):
    out = tmp_path / "tuned"
    argv = ["finetune", str(pruned_dir), "--loss", "ce", "--adapter", "s2ft", "--s2ft-budget", "0.02",
            "--s2ft-parts", "o,down", "--s2ft-select", "activation", "--s2ft-independent", "--steps", "3", "--batch-size", "2",
            "--seqlen", "32", "--eval-windows", "2", "--lr", "1e-3", "--threads", "1", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "S²FT (activation selection of o,down)" in printed and "held-out ppl:" in printed
    before, after = sparseforge.load(pruned_dir), sparseforge.load(out)
    block = after.config.sparsity_config
    assert block["format"] == "nm" and block["finetune"]["adapter"] == "s2ft"
    assert block["finetune"]["s2ft"]["independent"] is True  # the flag reaches the recorded config
    mods_b, mods_a = dict(before.named_modules()), dict(after.named_modules())
    changed = set()
    for name in block["targets"]:
        layer = name.removesuffix(".weight")
        wb, wa = weight_2d(mods_b[layer]), weight_2d(mods_a[layer])
        assert torch.equal(wb == 0, wa == 0)  # 2:4 stays 2:4
        if not torch.equal(wb, wa):
            changed.add(layer.rsplit(".", 1)[-1])
    assert changed and changed <= {"o_proj", "down_proj"}  # only the trained parts moved


def test_s2ft_flags_without_the_adapter_are_refused(tmp_path, capsys):
    argv = ["finetune", "builtin", "--loss", "ce", "--s2ft-budget", "0.1", "--out", str(tmp_path / "x")]
    assert main(argv) == 2
    assert "--s2ft-budget only apply to S²FT" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--s2ft-budget", "1.5"], "out of range"),
    (["--s2ft-budget", "half"], "is not a number"),
    (["--s2ft-parts", "o,ffn"], "choose distinct names"),
    pytest.param(["--s2ft-budget", "10"], "smaller than one unit", marks=pytest.mark.slow),  # loads the model
    (["--compute", "csr"], "compute='dense'"),
])
def test_s2ft_bad_flags_are_one_line_errors(tmp_path, capsys, flags, message):
    argv = ["finetune", "builtin", "--loss", "ce", "--adapter", "s2ft", "--steps", "1", "--no-eval",
            "--no-progress", "--threads", "1", "--out", str(tmp_path / "x"), *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err.strip().splitlines()[-1] and "Traceback" not in err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_s2ft_minilm_squarehead_end_to_end(tmp_path, capsys):
    pruned = tmp_path / "minilm-pruned"
    assert main(["prune", "minilm", "--method", "magnitude", "--sparsity", "0.5", "--out", str(pruned),
                 "--no-eval", "--no-progress"]) == 0
    out = tmp_path / "minilm-s2ft"
    assert main(["finetune", str(pruned), "--teacher", "minilm", "--adapter", "s2ft", "--s2ft-budget", "0.01",
                 "--s2ft-parts", "q,v,o,up,down", "--steps", "2", "--batch-size", "2", "--seqlen", "32", "--lr", "1e-3",
                 "--eval-sentences", "8", "--threads", "1", "--no-progress", "--out", str(out)]) == 0
    assert "held-out cosine:" in capsys.readouterr().out
    before, after = sparseforge.load(pruned), sparseforge.load(out)
    targets = after.config.sparsity_config["targets"]
    mods_b, mods_a = dict(before.named_modules()), dict(after.named_modules())
    changed = set()
    for name in targets:
        layer = name.removesuffix(".weight")
        wb, wa = weight_2d(mods_b[layer]), weight_2d(mods_a[layer])
        assert torch.equal(wb == 0, wa == 0)  # the 50 % mask is kept
        if not torch.equal(wb, wa):
            changed.add(".".join(layer.split(".")[-2:]))
    assert changed and changed <= {"self.query", "self.value", "output.dense", "intermediate.dense"}
    assert "self.key" not in changed
