"""Expert parallelism: 2 gloo processes give the outputs and gradients of the single-process layer."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparseforge.errors import ConfigError
from sparseforge.moe import MoE

WORLD = 2
CASES = {  # name -> MoE kwargs
    "softmax_top2_shared": dict(d_model=8, d_hidden=12, num_experts=4, k=2, shared_hidden=6, shared_gate=True),
    "switch_mlp": dict(d_model=8, d_hidden=12, num_experts=6, k=1, router="switch", expert="mlp", activation="gelu"),
    "all_to_rank0": dict(d_model=8, d_hidden=12, num_experts=4, k=2),
}


def _layer(name):
    torch.manual_seed(0)
    moe = MoE(**CASES[name], backend="loop")
    if name == "all_to_rank0":  # rank 1 owns experts 2, 3: on inputs >= 0 they never win, it receives nothing
        with torch.no_grad():
            moe.gate.weight[:2] = moe.gate.weight[:2].abs() + 0.1
            moe.gate.weight[2:] = -moe.gate.weight[2:].abs() - 0.1
    return moe


def _inputs(rank, d, name):
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(5 + 3 * rank, d, generator=gen)
    if name == "all_to_rank0":
        x = x.abs()
    return x, torch.randn(x.shape, generator=gen)


def _worker(rank, init_file, out_dir):
    from sparseforge.moe.parallel import ExpertParallelMoE

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for name in CASES:
            full = _layer(name)
            layer = ExpertParallelMoE.from_moe(full)
            x, g = _inputs(rank, full.d_model, name)
            x.requires_grad_()
            y, aux = layer(x)
            (y * g).sum().backward()
            layer.sync_replicated_grads()
            grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
            results[name] = {"y": y.detach(), "x_grad": x.grad, "grads": grads,
                             "counts": aux.tokens_per_expert, "first": layer.first_expert, "local": layer.local}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_outputs_and_gradients_equal_single_process(tmp_path):
    mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for name in CASES:
        full = _layer(name)
        xs, gs = zip(*[_inputs(r, full.d_model, name) for r in range(WORLD)])
        x = torch.cat(xs).requires_grad_()
        y, aux = full(x)
        (y * torch.cat(gs)).sum().backward()
        ys = torch.split(y.detach(), [t.shape[0] for t in xs])
        x_grads = torch.split(x.grad, [t.shape[0] for t in xs])
        for r, res in enumerate(ranks):
            res = res[name]
            torch.testing.assert_close(res["y"], ys[r], rtol=1e-5, atol=1e-6, msg=f"{name} rank {r} output")
            torch.testing.assert_close(res["x_grad"], x_grads[r], rtol=1e-5, atol=1e-6)
            lo, hi = res["first"], res["first"] + res["local"]
            for pname in ("w_up", "w_down", "w_gate"):
                p = getattr(full, pname)
                if p is not None:
                    torch.testing.assert_close(res["grads"][pname], p.grad[lo:hi], rtol=1e-5, atol=1e-6,
                                               msg=f"{name} rank {r} {pname}")
            torch.testing.assert_close(res["grads"]["gate.weight"], full.gate.weight.grad, rtol=1e-5, atol=1e-6)
            if full.shared is not None:
                torch.testing.assert_close(res["grads"]["shared.w_up"], full.shared.w_up.grad, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(res["grads"]["shared_gate.weight"], full.shared_gate.weight.grad,
                                           rtol=1e-5, atol=1e-6)
        counts = sum(res[name]["counts"] for res in ranks)
        assert counts.tolist() == aux.tokens_per_expert.tolist()
    # the all_to_rank0 case really left rank 1 without tokens
    assert ranks[0]["all_to_rank0"]["counts"][2:].sum() == 0 and ranks[1]["all_to_rank0"]["counts"][2:].sum() == 0


def test_needs_an_initialised_process_group():
    from sparseforge.moe.parallel import ExpertParallelMoE

    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    with pytest.raises(ConfigError, match="init_process_group"):
        ExpertParallelMoE.from_moe(MoE(4, 8, 2, k=1))
