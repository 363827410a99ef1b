"""End-to-end command-line runs on the built-in model, as a user would type them."""

import json
import subprocess
import sys

import pytest

from sparseforge.cli import build_parser, config_from_args, main

import transformers  # noqa: F401  (test dependency: missing means failure)

FAST = ["--samples", "8", "--seqlen", "64", "--no-progress"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "sparseforge", *args], capture_output=True, text=True, timeout=600)


def test_parser_builds_the_same_config_as_the_api():
    from sparseforge.config import CalibrationConfig, SparsifyConfig

    args = build_parser().parse_args(["prune", "builtin", "--method", "wanda", "--pattern", "4:8", "--out", "x",
                                      "--ignore", "*.down_proj", "--samples", "16", "--blocksize", "64"])
    assert config_from_args(args) == [SparsifyConfig(method="wanda", pattern="4:8", ignore=["*.down_proj"],
                                                     method_options={"blocksize": 64},
                                                     calibration=CalibrationConfig(samples=16))]


@pytest.mark.slow
def test_prune_eval_inspect_builtin(tmp_path):
    out = tmp_path / "pruned"
    r = run_cli("prune", "builtin", "--method", "sparsegpt", "--pattern", "2:4", "--out", str(out), *FAST)
    assert r.returncode == 0, r.stderr
    assert "pattern: '2:4'" in r.stdout  # the resolved recipe is printed
    assert "perplexity: dense" in r.stdout and "saved to" in r.stdout
    block = json.loads((out / "config.json").read_text())["sparsity_config"]
    assert block["pattern"] == "2:4" and block["format"] == "nm"
    r = run_cli("inspect", str(out))
    assert r.returncode == 0, r.stderr
    assert "2:4" in r.stdout and "ok" in r.stdout
    r = run_cli("eval", str(out), "--max-windows", "4", "--no-progress")
    assert r.returncode == 0 and "perplexity" in r.stdout, r.stderr


@pytest.mark.slow
def test_recipe_file_repeats_a_run(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\nstages:\n  - {method: magnitude, sparsity: 0.6}\n")
    assert main(["prune", "builtin", "--recipe", str(recipe), "--out", str(tmp_path / "o"), "--no-eval",
                 "--no-compressed", "--no-progress"]) == 0
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "o")  # plain transformers loads it
    w = model.model.layers[0].mlp.up_proj.weight
    assert (w == 0).float().mean().item() == pytest.approx(0.6, abs=1e-3)


@pytest.mark.parametrize("argv, message", [
    (["prune", "/no/such/model", "--out", "o"], "does not exist"),
    (["prune", "builtin", "--pattern", "3:2", "--out", "o"], "0 < N < M"),
    (["prune", "builtin", "--sparsity", "1.5", "--out", "o"], "[0, 1)"),
    (["prune", "builtin", "--pattern", "block0x4", "--out", "o"], "positive integer"),
    (["inspect", "/no/such/dir"], "does not exist"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_existing_output_dir_refused(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert main(["prune", "builtin", "--method", "magnitude", "--out", str(out), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "config.json").read_text() == "{}"


def test_python_m_and_help():
    r = run_cli("--help")
    assert r.returncode == 0 and all(c in r.stdout for c in ("prune", "eval", "inspect", "demo"))


def test_import_is_cheap():
    code = ("import sys, sparseforge as sf; sf.parse('2:4'); sf.SparsifyConfig(); sf.mask_from_scores; "
            "bad = [m for m in ('transformers', 'safetensors', 'tokenizers', 'peft') if m in sys.modules]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    r = run_cli("demo", "--out", str(tmp_path / "demo"), "--patterns", "2:4", "--no-progress")
    assert r.returncode == 0, r.stderr
    table = [l for l in r.stdout.splitlines() if l.startswith("| ")]
    ppl = {l.split("|")[1].strip(): float(l.split("|")[4]) for l in table[1:]}
    assert set(ppl) == {"dense", "magnitude", "wanda", "sparsegpt"}
    assert ppl["sparsegpt"] <= ppl["magnitude"] and ppl["dense"] < ppl["sparsegpt"]
    assert "weights bit-exact: True" in r.stdout


def test_train_advise_bench_are_subcommands(capsys):
    from sparseforge.cli import main

    assert main(["train", "--steps", "0"]) == 2  # reaches sparseforge.train.cli, which refuses 0 steps
    assert "sparseforge train: error:" in capsys.readouterr().err
    assert main(["bench", "builtin", "--batch-sizes", "0"]) == 2
    assert "batch sizes must be positive" in capsys.readouterr().err
    assert main(["advise", "builtin", "--threads", "0", "--no-sweep"]) == 2
    assert "threads must be >= 1" in capsys.readouterr().err


def test_building_the_parser_imports_no_torch():
    import subprocess
    import sys

    code = "import sys; from sparseforge.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"  # `sparseforge --help` stays fast
