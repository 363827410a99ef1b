"""CLI user errors end in one line and exit status 2, before any long work starts (issue 12, item 5)."""

import os
import subprocess

import pytest

import sparseforge.io.models
from sparseforge.cli import main


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nobody can create entries in, root included (root ignores mode bits: chattr +i)."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(d)], check=True)
    else:
        d.chmod(0o555)
    try:
        with pytest.raises(OSError):
            (d / "probe").write_text("x")
        yield d
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(d)], check=True)
        else:
            d.chmod(0o755)


@pytest.fixture
def no_work(monkeypatch):
    """Loading a model counts as work: the checks under test must fail before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("work started before the bad argument was reported")

    monkeypatch.setattr(sparseforge.io.models, "load_model", refuse)


def _error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    ours = [line for line in err.splitlines() if line.startswith("sparseforge ")]  # not transformers' bars
    assert len(ours) == 1 and err.endswith(ours[0]), err
    return ours[0]


@pytest.mark.parametrize("command", [["prune", "builtin", "--out", "o"], ["train"]])
@pytest.mark.parametrize("content", [bytes(range(256)) * 4, b"version: 1\n\xff\xfe stages"])
def test_a_binary_recipe_is_refused(command, content, tmp_path, capsys, monkeypatch, no_work):
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(content)
    err = _error(capsys, [*command, "--recipe", str(recipe)])
    assert str(recipe) in err and ("binary" in err or "not UTF-8" in err)


def test_absurd_samples_fail_before_calibration(tmp_path, capsys, monkeypatch):
    import sparseforge.data.calibration

    def refuse(*args, **kwargs):
        raise AssertionError("calibration data was drawn")

    monkeypatch.setattr(sparseforge.data.calibration, "calibration_tokens", refuse)
    err = _error(capsys, ["prune", "builtin", "--samples", "100000000", "--out", str(tmp_path / "o"), "--no-progress"])
    assert "lower --samples" in err and "GiB" in err
    assert not (tmp_path / "o").exists()


def test_out_naming_a_file_is_refused(tmp_path, capsys, no_work):
    target = tmp_path / "file.txt"
    target.write_text("keep me")
    err = _error(capsys, ["prune", "builtin", "--out", str(target)])
    assert "is a file" in err and "--out" in err
    assert target.read_text() == "keep me"


def test_out_below_a_file_is_refused(tmp_path, capsys, no_work):
    (tmp_path / "file.txt").write_text("x")
    err = _error(capsys, ["prune", "builtin", "--out", str(tmp_path / "file.txt" / "sub")])
    assert "is a file" in err


@pytest.mark.parametrize("argv", [
    ["prune", "builtin", "--out", "{ro}/pruned"],
    ["prune", "builtin", "--out", "{ro}/deeper/pruned"],
    ["advise", "builtin", "--plot", "{ro}/advise.png"],
    ["advise", "builtin", "--no-sweep", "--json", "{ro}/advise.json"],
    ["bench", "builtin", "--json", "{ro}/bench.json"],
    ["train", "--output", "{ro}/trained"],
    ["demo", "--out", "{ro}/demo"],
])
def test_unwritable_outputs_fail_before_any_work(argv, read_only_dir, capsys, no_work):
    err = _error(capsys, [a.replace("{ro}", str(read_only_dir)) for a in argv])
    assert "cannot write" in err and str(read_only_dir) in err


@pytest.mark.parametrize("lr", ["-1", "0", "nan", "inf"])
def test_train_lr_must_be_finite_and_positive(lr, capsys, no_work):
    err = _error(capsys, ["train", "--lr", lr])
    assert "--lr" in err and (lr in err or str(float(lr)) in err)


def test_train_output_not_empty_names_the_cli_flag(tmp_path, capsys, no_work):
    out = tmp_path / "o"
    out.mkdir()
    (out / "config.json").write_text("{}")
    err = _error(capsys, ["train", "--output", str(out)])
    assert "--overwrite" in err and "overwrite=True" not in err


def test_overwrite_of_a_directory_that_is_not_a_model_fails_first(tmp_path, capsys, no_work):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "a.jpg").write_bytes(b"x")
    err = _error(capsys, ["prune", "builtin", "--out", str(out), "--overwrite"])
    assert "not a model directory" in err


@pytest.mark.parametrize("budget", ["-1", "nan", "inf"])
def test_advise_budget_must_be_non_negative(budget, capsys, no_work):
    err = _error(capsys, ["advise", "builtin", "--budget", budget])
    assert "--budget" in err


def test_advise_model_refuses_a_negative_budget_too():
    import torch

    from sparseforge.runtime.advise import measure_layer
    from sparseforge.errors import ConfigError

    with pytest.raises(ConfigError, match="budget"):
        measure_layer(torch.zeros(8, 8), budget_s=-1.0)


def test_eval_reference_that_does_not_exist(capsys, no_work):
    err = _error(capsys, ["eval", "builtin", "--reference", "/nonexistent"])
    assert "--reference" in err and "/nonexistent" in err and "does not exist" in err


def test_eval_reference_on_a_causal_lm_is_refused(capsys):
    err = _error(capsys, ["eval", "builtin", "--reference", "builtin", "--max-windows", "1", "--no-progress"])
    assert "drop --reference" in err
