"""`sparseforge prune ... --quantize int8|int4` end to end on the built-in model, and its errors."""

import json
import subprocess
import sys

import pytest
import torch

from sparseforge.cli import build_parser, config_from_args, main
from sparseforge.config import CalibrationConfig, SparsifyConfig
from sparseforge.quant import SCALE_BUFFER, QuantConfig

import transformers  # noqa: F401  (test dependency: missing means failure)

FAST = ["--samples", "8", "--seqlen", "64", "--no-progress"]


def test_quantize_flags_build_the_api_config():
    args = build_parser().parse_args(["prune", "builtin", "--pattern", "2:4", "--quantize", "int8", "--out", "x"])
    assert config_from_args(args) == [SparsifyConfig(pattern="2:4", quantize=QuantConfig(bits=8, method="joint"))]
    args = build_parser().parse_args(["prune", "builtin", "--method", "wanda", "--quantize", "int4",
                                      "--quant-group-size", "32", "--samples", "4", "--out", "x"])
    assert config_from_args(args) == [SparsifyConfig(method="wanda", quantize=QuantConfig(bits=4, group_size=32),
                                                     calibration=CalibrationConfig(samples=4))]


def check_checkpoint(out, bits):
    from sparseforge.io.loading import load
    from sparseforge.layers import weight_2d
    from sparseforge.masks import satisfies
    from sparseforge.quant.grid import codes_of

    block = json.loads((out / "config.json").read_text())["sparsity_config"]
    quant = block["quantization"]
    assert (quant["bits"], quant["method"], quant["group_size"]) == (bits, "joint", None)
    model = load(out)
    assert len(quant["layers"]) == len(block["targets"]) > 0
    for name in quant["layers"]:
        module = model.get_submodule(name)
        w = weight_2d(module)
        codes = codes_of(w, getattr(module, SCALE_BUFFER), bits)  # weights are exactly codes * scale
        assert int(codes.abs().max()) <= 2 ** (bits - 1) - 1
        assert satisfies(w != 0, "2:4"), name


@pytest.mark.slow
def test_prune_quantize_int8_then_inspect_and_eval(tmp_path):
    out = tmp_path / "m"
    run = lambda *a: subprocess.run([sys.executable, "-m", "sparseforge", *a], capture_output=True, text=True, timeout=900)
    r = run("prune", "builtin", "--method", "sparsegpt", "--pattern", "2:4", "--quantize", "int8", "--out", str(out), *FAST)
    assert r.returncode == 0, r.stderr
    assert "quantize:" in r.stdout and "perplexity: dense" in r.stdout  # the resolved recipe carries it
    check_checkpoint(out, 8)
    r = run("eval", str(out), "--max-windows", "4", "--no-progress")
    assert r.returncode == 0 and "perplexity" in r.stdout, r.stderr
    r = run("inspect", str(out))
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_prune_quantize_int4_in_process(tmp_path):
    out = tmp_path / "m4"
    assert main(["prune", "builtin", "--pattern", "2:4", "--quantize", "int4", "--out", str(out), "--no-eval", *FAST]) == 0
    check_checkpoint(out, 4)


@pytest.mark.parametrize("argv, message", [
    (["--quantize", "int4", "--quant-group-size", "7"], "does not divide"),
    (["--method", "wanda", "--quantize", "int8", "--quant-method", "joint"], "method 'sparsegpt'"),
    (["--quant-method", "rtn"], "need --quantize"),
    (["--quantize", "int4", "--quant-group-size", "0"], "group_size must be a positive integer"),
])
def test_bad_quantize_flags_are_one_line_errors(argv, message, tmp_path, capsys):
    code = main(["prune", "builtin", "--pattern", "2:4", "--out", str(tmp_path / "o"), "--no-eval", *FAST, *argv])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]  # not transformers' bars
    assert code == 2 and len(errors) == 1 and message in errors[0], errors
    assert not (tmp_path / "o").exists()  # nothing written
