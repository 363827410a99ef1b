"""Weight sparsity inside experts: patterns hold per expert; Wanda uses each expert's own inputs."""

from __future__ import annotations

import importlib
import pytest
import torch

from sparseforge.errors import DataError
from sparseforge.masks import mask_from_scores, satisfies
from sparseforge.moe import MoE
from sparseforge.moe.expert_sparsity import SHARED, collect_expert_stats, sparsify_experts_
from sparseforge.moe.grouped import ACTIVATIONS


def _mats(moe, e):
    return {"w_gate": moe.w_gate[e].t(), "w_up": moe.w_up[e].t(), "w_down": moe.w_down[e].t()}  # (out, in)


@pytest.mark.parametrize("pattern,sparsity", [("2:4", None), ("unstructured", 0.75), ("block4x4", 0.5), ("fanin4", None)])
def test_pattern_holds_per_expert(pattern, sparsity):
    torch.manual_seed(0)
    moe = MoE(16, 32, 5, k=2, shared_hidden=8)
    with torch.no_grad():
        moe.w_up[2] *= 100.0  # one loud expert must not take other experts' budget
    report = sparsify_experts_(moe, pattern, sparsity)
    assert len(report) == 6 * 3
    for e in range(5):
        for name, w in _mats(moe, e).items():
            mask = w != 0
            assert satisfies(mask, pattern), (e, name)
            if sparsity is not None:
                assert abs(1 - mask.float().mean().item() - sparsity) < 1e-6, (e, name)
    shared = moe.shared.w_up.t() != 0
    assert satisfies(shared, pattern)


def test_magnitude_equals_mask_from_scores_per_expert():
    torch.manual_seed(1)
    moe = MoE(8, 16, 3, k=1)
    before = {e: {k: v.clone() for k, v in _mats(moe, e).items()} for e in range(3)}
    sparsify_experts_(moe, "unstructured", 0.5)
    for e in range(3):
        for name, w in _mats(moe, e).items():
            ref = before[e][name] * mask_from_scores(before[e][name].abs(), "unstructured", 0.5)
            torch.testing.assert_close(w, ref)


def test_wanda_uses_the_tokens_routed_to_each_expert():
    torch.manual_seed(2)
    moe = MoE(8, 16, 4, k=2).eval()
    batches = [torch.randn(40, 8) for _ in range(2)]
    stats = collect_expert_stats(moe, batches)
    x = torch.cat(batches)
    with torch.no_grad():
        experts = moe(x)[1].experts
    e = 1
    xe = x[(experts == e).any(1)]
    assert stats[("", e, "in")].num_tokens == xe.shape[0]
    hid = ACTIVATIONS["silu"][0](xe @ moe.w_gate[e]) * (xe @ moe.w_up[e])
    before = _mats(moe, e)
    before = {k: v.clone() for k, v in before.items()}
    sparsify_experts_(moe, "2:4", method="wanda", stats=stats)
    after = _mats(moe, e)
    for name, inp in (("w_up", xe), ("w_down", hid)):
        scores = before[name].abs() * inp.pow(2).sum(0).sqrt()  # |W_ij| * ||X_j||
        ref = before[name] * mask_from_scores(scores, "2:4", scope="row")
        torch.testing.assert_close(after[name], ref)


def test_sparsegpt_per_expert_reconstructs_better_than_magnitude():
    torch.manual_seed(3)
    moe = MoE(16, 32, 3, k=2).eval()
    x = torch.randn(300, 16) * torch.linspace(0.1, 3.0, 16)  # uneven input scales
    stats = collect_expert_stats(moe, [x], hessian=True)
    with torch.no_grad():
        ref = moe(x)[0]
    a, b = MoE(16, 32, 3, k=2).eval(), MoE(16, 32, 3, k=2).eval()
    a.load_state_dict(moe.state_dict())
    b.load_state_dict(moe.state_dict())
    sparsify_experts_(a, "unstructured", 0.5, method="sparsegpt", stats=stats)
    sparsify_experts_(b, "unstructured", 0.5, method="magnitude")
    with torch.no_grad():
        err_gpt, err_mag = (a(x)[0] - ref).pow(2).mean(), (b(x)[0] - ref).pow(2).mean()
    assert err_gpt < err_mag


def test_unused_expert_is_an_error_unless_magnitude_is_asked():
    torch.manual_seed(4)
    moe = MoE(8, 16, 4, k=1, shared_hidden=4).eval()
    with torch.no_grad():
        moe.gate.weight[3] = -10 * moe.gate.weight[3].abs()  # expert 3 never wins on positive inputs
        moe.gate.weight[:3] = moe.gate.weight[:3].abs()
    stats = collect_expert_stats(moe, [torch.rand(30, 8)])
    assert stats[("", 3, "in")].num_tokens == 0 and stats[("", SHARED, "in")].num_tokens == 30
    unused = [e for e in range(4) if stats[("", e, "in")].num_tokens == 0]
    before = moe.w_up.detach().clone()
    with pytest.raises(DataError, match=f"expert {unused[0]} of MoE layer '<root>'"):
        sparsify_experts_(moe, "2:4", method="wanda", stats=stats)
    assert torch.equal(moe.w_up, before)  # nothing was pruned
    report = sparsify_experts_(moe, "2:4", method="wanda", stats=stats, empty_experts="magnitude")
    assert report[("", 3, "w_up")] == 0.5 and report[("", SHARED, "w_down")] == 0.5
    with pytest.raises(DataError, match="collect_expert_stats"):
        sparsify_experts_(moe, "2:4", method="wanda")


def test_whole_swapped_model_wanda_2_4():
    transformers = importlib.import_module("transformers")
    from sparseforge.moe.swap import moe_

    torch.manual_seed(5)
    cfg = transformers.MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=50, num_local_experts=4, num_experts_per_tok=2)
    model = transformers.MixtralForCausalLM(cfg).eval()
    moe_(model)
    ids = [torch.randint(0, 50, (2, 32)) for _ in range(2)]
    stats = collect_expert_stats(model, ids)
    report = sparsify_experts_(model, "2:4", method="wanda", stats=stats, empty_experts="magnitude")
    assert len(report) == 2 * 4 * 3 and all(abs(v - 0.5) < 1e-9 for v in report.values())
    for layer in model.model.layers:
        for e in range(4):
            assert satisfies(layer.mlp.moe.w_down[e].t() != 0, "2:4")
    with torch.no_grad():
        assert torch.isfinite(model(ids[0]).logits).all()
