"""``sparseforge finetune`` end to end on the built-in model, and its one-line errors."""

import pytest
import torch

import sparseforge
from sparseforge.cli import main
from sparseforge.finetune.cli import default_resume_dir
from sparseforge.finetune.loop import STATE_FILE
from sparseforge.layers import weight_2d


def test_finetune_builtin_end_to_end(pruned_dir, tmp_path, capsys):
    out = tmp_path / "recovered"
    argv = ["finetune", str(pruned_dir), "--teacher", "builtin", "--loss", "ce+squarehead", "--steps", "3",
            "--batch-size", "2", "--seqlen", "32", "--eval-windows", "2", "--lr", "1e-3", "--threads", "1",
            "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "held-out ppl:" in printed and "teacher" in printed
    assert not default_resume_dir(out).exists()  # the resumable state is removed once the output is written
    before, after = sparseforge.load(pruned_dir), sparseforge.load(out)
    assert after.config.sparsity_config["format"] == "nm"  # 2:4 stays 2:4 and is stored as such
    mods_b, mods_a = dict(before.named_modules()), dict(after.named_modules())
    changed = 0
    for name in after.config.sparsity_config["targets"]:
        layer = name.removesuffix(".weight")
        wb, wa = weight_2d(mods_b[layer]), weight_2d(mods_a[layer])
        assert torch.equal(wb == 0, wa == 0)
        changed += not torch.equal(wb, wa)
    assert changed > 0
    assert main(argv) == 2  # existing --out without --overwrite
    assert "already exists" in capsys.readouterr().err


def test_finetune_resumes_after_interruption(pruned_dir, tmp_path, capsys):
    out = tmp_path / "r"
    state = default_resume_dir(out) / STATE_FILE
    state.parent.mkdir(parents=True)
    base = ["finetune", str(pruned_dir), "--teacher", "builtin", "--steps", "2", "--batch-size", "1", "--seqlen", "16",
            "--compute", "csr",
            "--save-every", "1", "--no-eval", "--no-progress", "--threads", "1", "--out", str(out)]
    # a finished state in the resume directory: the run continues from it, trains nothing more, saves
    from sparseforge.finetune import FinetuneConfig, finetune_
    from sparseforge.io.models import load_model

    cfg = FinetuneConfig(steps=2, batch_size=1, seqlen=16, save_every=1, compute="csr")
    finetune_(load_model(pruned_dir), cfg, teacher=load_model("builtin"), resume_dir=state.parent, evaluate=False,
              progress=False)
    assert state.is_file()
    assert main(base) == 0
    assert "resumed from step 2" in capsys.readouterr().out
    assert not state.exists()


@pytest.mark.parametrize("extra, message", [
    (["--lr", "0"], "lr must be a positive number"),
    (["--loss", "squarehead", "--teacher", None], "distils from a teacher"),
    (["--data", "MISSING"], "does not exist"),
    (["--data", "SHORT"], "fewer than one sequence"),
])
def test_bad_input_one_line(pruned_dir, tmp_path, capsys, extra, message):
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    extra = [str(tmp_path / "missing.txt") if e == "MISSING" else str(short) if e == "SHORT" else e for e in extra]
    argv = ["finetune", str(pruned_dir), "--teacher", "builtin", "--steps", "1", "--no-eval", "--no-progress",
            "--out", str(tmp_path / "o")]
    if None in extra:
        argv.remove("--teacher"), argv.remove("builtin")
        extra = [e for e in extra if e not in ("--teacher", None)]
    assert main(argv + extra) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (after any model-loading bar of transformers)
    assert last.startswith("sparseforge finetune: error: ") and message in last


def test_dense_student_is_refused(tmp_path, capsys):
    assert main(["finetune", "builtin", "--teacher", "builtin", "--steps", "1", "--no-eval", "--no-progress",
                 "--out", str(tmp_path / "o")]) == 2
    assert "no pruned layer" in capsys.readouterr().err


@pytest.mark.slow
def test_finetune_minilm_squarehead(tmp_path, capsys):
    pruned = tmp_path / "minilm-pruned"
    assert main(["prune", "minilm", "--method", "magnitude", "--sparsity", "0.5", "--out", str(pruned),
                 "--no-eval", "--no-progress"]) == 0
    out = tmp_path / "minilm-ft"
    assert main(["finetune", str(pruned), "--teacher", "minilm", "--steps", "3", "--batch-size", "4", "--seqlen", "32",
                 "--lr", "5e-4", "--eval-sentences", "16", "--threads", "1", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    line = next(l for l in printed.splitlines() if l.startswith("held-out cosine:"))
    before, after = (float(v) for v in line.split(":")[1].split("->"))
    assert after > before  # SquareHead pulls the pruned encoder towards the dense one
    assert main(["finetune", str(pruned), "--teacher", "minilm", "--loss", "ce", "--steps", "1", "--no-progress",
                 "--out", str(tmp_path / "x")]) == 2
    assert "encoder" in capsys.readouterr().err
