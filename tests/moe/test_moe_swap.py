"""moe_: swapping the MoE blocks of whole transformers models (tiny random configs) keeps the logits."""

from __future__ import annotations

import pytest
import torch

import transformers

from sparseforge.errors import ModelError  # noqa: E402
from sparseforge.moe import MoE  # noqa: E402
from sparseforge.moe.swap import MoEBlock, collect_aux, moe_  # noqa: E402

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
            max_position_embeddings=64)


def _mixtral(**kw):
    cfg = transformers.MixtralConfig(**TINY, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, **kw)
    return transformers.MixtralForCausalLM(cfg)


def _phimoe(**kw):
    cfg = transformers.PhimoeConfig(**TINY, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, **kw)
    return transformers.PhimoeForCausalLM(cfg)


def _qwen2_moe(norm_topk_prob=False, **kw):
    cfg = transformers.Qwen2MoeConfig(
        **TINY, intermediate_size=40, moe_intermediate_size=24, shared_expert_intermediate_size=36, num_experts=6,
        num_experts_per_tok=2, norm_topk_prob=norm_topk_prob, **kw,
    )
    return transformers.Qwen2MoeForCausalLM(cfg)


def _spread_routers(model, seed=0):
    """Router weights of std 1: clear top-k margins, so float rounding cannot flip a choice."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "mlp.router.weight")):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif name.endswith("shared_expert_gate.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


FAMILIES = {
    "mixtral": _mixtral,
    "phimoe": _phimoe,
    "qwen2_moe": _qwen2_moe,
    "qwen2_moe_norm": lambda: _qwen2_moe(norm_topk_prob=True),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_whole_model_logits_equal(family):
    torch.manual_seed(0)
    model = _spread_routers(FAMILIES[family]()).eval()
    ids = torch.randint(0, TINY["vocab_size"], (2, 11))
    with torch.no_grad():
        ref = model(ids).logits
    report = moe_(model)
    assert [name for name, _ in report.swapped] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all(isinstance(model.model.layers[i].mlp, MoEBlock) for i in range(2))
    with torch.no_grad():
        with collect_aux(model) as auxes:
            out = model(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert [name for name, _ in auxes] == ["model.layers.0.mlp.moe", "model.layers.1.mlp.moe"]
    k = 2
    assert all(int(a.tokens_per_expert.sum()) == 22 * k for _, a in auxes)
    # hooks are gone after the block
    with torch.no_grad():
        model(ids)
    assert len(auxes) == 2


def test_mixtral_generation_equal():
    torch.manual_seed(1)
    model = _spread_routers(_mixtral(), 1).eval()
    ids = torch.randint(0, TINY["vocab_size"], (1, 5))
    ref = model.generate(ids, max_new_tokens=6, do_sample=False)
    moe_(model)
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.tolist() == ref.tolist()


def test_qwen2_moe_dense_layers_kept_and_training_step():
    torch.manual_seed(2)
    model = _spread_routers(_qwen2_moe(mlp_only_layers=[0]))
    report = moe_(model)
    assert [name for name, _ in report.swapped] == ["model.layers.1.mlp"]
    assert type(model.model.layers[0].mlp).__name__ == "Qwen2MoeMLP"
    moe = model.model.layers[1].mlp.moe
    assert moe.shared is not None and moe.shared_gate is not None and not moe.router.renormalize
    ids = torch.randint(0, TINY["vocab_size"], (2, 7))
    with collect_aux(model) as auxes:
        out = model(ids, labels=ids)
    (out.loss + sum(a.loss for _, a in auxes)).backward()
    assert moe.gate.weight.grad is not None and moe.shared_gate.weight.grad.abs().sum() > 0


def test_no_moe_block_is_an_error():
    cfg = transformers.LlamaConfig(**TINY, intermediate_size=48)
    with pytest.raises(ModelError, match="upcycle_"):
        moe_(transformers.LlamaForCausalLM(cfg))


def test_unsupported_block_is_an_error_and_nothing_is_swapped():
    model = _mixtral()

    class FancySparseMoeBlock(torch.nn.Module):
        pass

    model.model.layers[1].extra = FancySparseMoeBlock()
    with pytest.raises(ModelError, match="FancySparseMoeBlock"):
        moe_(model)
    assert type(model.model.layers[0].mlp).__name__ == "MixtralSparseMoeBlock"


def test_collect_aux_on_a_bare_layer():
    moe = MoE(8, 16, 4, k=1)
    with collect_aux(moe) as auxes:
        moe(torch.randn(5, 8))
    assert [name for name, _ in auxes] == [""] and int(auxes[0][1].tokens_per_expert.sum()) == 5
