"""benchmarks/bench_finetune.py: the recovery runs' shared recipe and the cost methods' configurations."""

from __future__ import annotations

import pytest

from benchmark_modules import load_benchmark

from sparseforge.finetune import FinetuneConfig


def _args(bench, *argv: str):
    return bench.build_parser().parse_args(list(argv))


def test_every_loss_of_a_seed_gets_the_same_steps_batches_warmup_and_clipping():
    bench = load_benchmark("finetune")
    cfg = dict(bench.FULL, steps=40, batch_size=16)
    args = _args(bench, "--warmup", "0.05")
    configs = [bench.recovery_config(cfg, args, loss, 1e-3, seed=2) for loss in bench.LOSSES]
    recipes = {(c.steps, c.batch_size, c.seqlen, c.warmup_steps, c.grad_clip, c.seed, c.lr) for c in configs}
    assert recipes == {(40, 16, cfg["seqlen"], 2, 1.0, 2, 1e-3)}  # 5 % of 40 steps; clipping at FinetuneConfig's 1.0
    assert [c.weights for c in configs][:3] == [{"ce": 1.0}, {"kd": 1.0}, {"squarehead": 1.0}]


@pytest.mark.parametrize("flag, expected", [("0", None), ("0.5", 0.5)])
def test_grad_clip_flag_reaches_the_run(flag, expected):
    bench = load_benchmark("finetune")
    config = bench.recovery_config(dict(bench.QUICK), _args(bench, "--grad-clip", flag), "squarehead", 1e-3, seed=0)
    assert config.grad_clip == expected  # 0: no clipping (the SquareHead reference recipe)


def test_cost_methods_are_valid_finetune_configs():
    bench = load_benchmark("finetune")
    for method, options in bench.COST_METHODS.items():
        config = FinetuneConfig(loss="ce", steps=10, **options)  # an invalid option raises ConfigError
        assert config.adapter == ("none" if method == "full" else method.split("-")[0])
    llama3 = FinetuneConfig(loss="ce", **bench.COST_METHODS["sparselora-llama3"])
    # the reference's configs/sparsity/llama3-8b-*.yaml: ffn=0.99, qkv=0.75, svd_8, start_step 0.05
    assert (llama3.sparselora_sparsity, llama3.sparselora_attn_sparsity) == (0.99, 0.75)
    assert (llama3.sparselora_rank, llama3.sparselora_start) == (8, 0.05)
