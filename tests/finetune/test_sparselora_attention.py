"""SparseLoRA's attention part: the estimator's channels, the sparse q/k/v/o equal the dense ones restricted
to them, and the schedule (output tokens, first steps, eval mode, first and last blocks) stays dense."""

import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from sparseforge.errors import ConfigError, ModelError
from sparseforge.finetune import FinetuneConfig
from sparseforge.finetune.lora import attach_lora, lora_layers
from sparseforge.finetune.sparselora import SparseLoRA
from sparseforge.finetune.sparselora_attention import ChannelSkipLinear, attention_blocks
from sparseforge.finetune.svd_estimator import (
    attention_channel_scores,
    attention_channels,
    kept_count,
    low_rank_factors,
    query_channels,
)
from tiny_models import VOCAB, tiny_model

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")


def tiny_llama(layers=4, heads=4, kv_heads=2, hidden=32, seed=0):
    import transformers as t

    torch.manual_seed(seed)
    cfg = t.LlamaConfig(hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=heads,
                        num_key_value_heads=kv_heads, max_position_embeddings=64, vocab_size=VOCAB)
    return t.LlamaForCausalLM(cfg).eval()


def with_lora(model, seed=0):
    attach_lora(model, rank=4)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for p in layer.lora_B.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))  # peft starts B at 0: every adapter effect hidden
    return model


def exact_scores(x, wq, wk, wv, groups, head_dim):
    """The estimator's target written out per key channel: mean over the group's query heads of ||q||, times ||k||."""
    rows = x.reshape(-1, x.shape[-1])
    q, k, v = rows @ wq.t(), rows @ wk.t(), rows @ wv.t()  # (n, q_out), (n, kv_out), (n, kv_out)
    kv_out = wk.shape[0]
    qk = torch.empty(kv_out)
    for c in range(kv_out):
        head, d = divmod(c, head_dim)
        q_norms = [q[:, (head * groups + g) * head_dim + d].norm() for g in range(groups)]
        qk[c] = torch.stack(q_norms).mean() * k[:, c].norm()
    return qk, v.norm(dim=0)


@settings(max_examples=20, deadline=None)
@given(kv_heads=st.integers(1, 3), groups=st.sampled_from([1, 2, 4]), head_dim=st.sampled_from([4, 8]),
       sparsity=st.floats(0.0, 0.9), seed=st.integers(0, 2**16))
def test_estimator_keeps_the_top_qk_and_v_channels_on_low_rank_weights(kv_heads, groups, head_dim, sparsity, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = 24
    q_out, kv_out = kv_heads * groups * head_dim, kv_heads * head_dim

    def rank6(out):  # exactly rank <= 6: the rank-8 SVD is exact, so the estimate equals the truth
        return torch.randn(out, 6, generator=g) @ torch.randn(6, hidden, generator=g)

    wq, wk, wv = rank6(q_out), rank6(kv_out), rank6(kv_out)
    x = torch.randn(2, 10, hidden, generator=g)
    qk, v = attention_channel_scores(x, low_rank_factors(wq, 8), low_rank_factors(wk, 8), low_rank_factors(wv, 8), head_dim)
    want_qk, want_v = exact_scores(x, wq, wk, wv, groups, head_dim)
    torch.testing.assert_close(qk, want_qk, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(v, want_v, rtol=1e-3, atol=1e-3)
    kept = attention_channels(qk, v, sparsity, groups, head_dim)
    n = kept_count(kv_out, sparsity)
    assert kept.k.numel() == n and kept.v.numel() == n
    assert set(kept.k.tolist()) == set(want_qk.topk(n).indices.tolist())
    assert set(kept.v.tolist()) == set(want_v.topk(n).indices.tolist())
    assert kept.q.numel() == n * groups and kept.o.numel() == n * groups


@settings(max_examples=30, deadline=None)
@given(kv_heads=st.integers(1, 4), groups=st.integers(1, 4), head_dim=st.integers(1, 6), data=st.data())
def test_query_channels_are_those_that_meet_the_kept_key_channels(kv_heads, groups, head_dim, data):
    kv_out = kv_heads * head_dim
    kept = sorted(data.draw(st.sets(st.integers(0, kv_out - 1), min_size=1)))
    got = query_channels(torch.tensor(kept), groups, head_dim).tolist()
    # HF GQA: repeat_kv repeats key head j for query heads j * groups .. j * groups + groups - 1
    key_of_query = torch.arange(kv_out).view(kv_heads, 1, head_dim).expand(kv_heads, groups, head_dim).reshape(-1)
    want = [c for c in range(kv_out * groups) if int(key_of_query[c]) in kept]
    assert got == want


def zero_skipped(model, kept_per_block):
    """A copy of ``model`` whose base q/k/v rows and o columns outside each block's kept channels are 0."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, kept in kept_per_block.items():
            block = twin.get_submodule(name)
            for proj, keep in zip(PROJ, kept):
                w = block.get_submodule(proj).get_base_layer().weight
                skipped = torch.ones(w.shape[1 if proj == "o_proj" else 0], dtype=torch.bool)
                skipped[keep] = False
                if proj == "o_proj":
                    w[:, skipped] = 0
                else:
                    w[skipped] = 0
                    bias = block.get_submodule(proj).get_base_layer().bias
                    if bias is not None:
                        bias[skipped] = 0  # a skipped row computes nothing, its bias included
    return twin


def qwen2_with_biases():
    model = tiny_model("qwen2")  # GQA 4 / 2 heads with q/k/v biases
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)  # visible biases: a kept bias entry on a skipped row would show
    return model.eval()


@pytest.mark.parametrize("make", [tiny_llama, qwen2_with_biases], ids=["llama", "qwen2-bias"])
def test_sparse_attention_equals_the_dense_one_restricted_to_the_kept_channels_values_and_gradients(make):
    model = with_lora(make())
    controller = SparseLoRA.attach(model, sparsity=0.0, attn_sparsity=0.5, start=0.0, dense_tokens=0.0, layers="all")
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    model.train()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    kept = {name: block.last_kept for name, block in controller.attention.items()}
    assert len(kept) == len(attention_blocks(model)) and all(k is not None for k in kept.values())
    controller.remove()  # the twin has plain base layers: the same weights, no channel skipping
    twin = zero_skipped(model, kept)
    for p in twin.parameters():
        p.grad = None
    twin.train()
    want = twin(input_ids=ids, labels=ids)
    want.loss.backward()
    torch.testing.assert_close(out.logits, want.logits, rtol=1e-5, atol=1e-5)
    grads = {n: p.grad for n, p in twin.named_parameters() if p.requires_grad}
    assert grads
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)
    model.train()
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, out.logits, atol=1e-3)  # it did skip something


@pytest.mark.parametrize("proj, role", list(zip(PROJ, "qkvo")))
def test_context_tokens_sparse_and_output_tokens_dense_per_projection(proj, role):
    model = with_lora(tiny_llama())
    controller = SparseLoRA.attach(model, attn_sparsity=0.75, start=0.0, dense_tokens=0.25, layers="all")
    name = "model.layers.1.self_attn"
    block = controller.attention[name]
    layer = model.get_submodule(f"{name}.{proj}")
    base = layer.get_base_layer()
    assert isinstance(base, ChannelSkipLinear) and base.role == role
    x = torch.randn(2, 16, base.in_features, generator=torch.Generator().manual_seed(3))
    block.current = block.keep(torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(4)))
    block.n_ctx = controller.context_tokens(16)
    assert block.n_ctx == 12
    y = layer(x)
    keep = getattr(block.current, role)
    block.current = None
    dense = layer(x)
    torch.testing.assert_close(y[:, 12:], dense[:, 12:], rtol=0, atol=0)  # output tokens dense
    restricted = layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]  # the dense LoRA branch
    w = base.weight
    if role == "o":
        restricted = restricted + x[..., keep] @ w[:, keep].t()
    else:
        restricted = restricted.index_add(-1, keep, x @ w[keep].t())
    torch.testing.assert_close(y[:, :12], restricted[:, :12], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y[:, :12], dense[:, :12], atol=1e-3)


def test_dense_in_the_first_steps_in_eval_mode_and_in_the_first_and_last_blocks():
    model = with_lora(tiny_llama())
    reference = with_lora(tiny_llama())
    controller = SparseLoRA.attach(model, sparsity=0.9, attn_sparsity=0.75, start=0.1)
    assert list(controller.attention) == ["model.layers.1.self_attn", "model.layers.2.self_attn"]  # auto: 0 and 3 dense
    for i in (0, 3):
        assert all(type(model.get_submodule(f"model.layers.{i}.self_attn.{p}").get_base_layer()) is nn.Linear for p in PROJ)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(5))
    model.train(), reference.train()
    with torch.no_grad():
        dense = reference(input_ids=ids).logits
        for step in range(10):
            controller.begin_step(step, 100)
            assert torch.equal(model(input_ids=ids).logits, dense)
        assert all(block.last_kept is None for block in controller.attention.values())
        controller.begin_step(10, 100)
        model(input_ids=ids)
        assert all(block.last_kept is not None and block.current is None for block in controller.attention.values())
        model.eval()
        assert torch.equal(model(input_ids=ids).logits, reference.eval()(input_ids=ids).logits)


def test_attention_sparsity_zero_leaves_attention_alone_and_remove_restores_everything():
    model = with_lora(tiny_llama(2))
    keys = set(model.state_dict())
    originals = {n: m for n, m in model.named_modules() if n.endswith("base_layer")}
    controller = SparseLoRA.attach(model, attn_sparsity=0.0, layers="all")
    assert not controller.attention and not any(isinstance(m, ChannelSkipLinear) for m in model.modules())
    controller.remove()
    controller = SparseLoRA.attach(model, attn_sparsity=0.5, layers="all")
    assert set(model.state_dict()) == keys  # ChannelSkipLinear shares the weight under the same name
    assert sum(isinstance(m, ChannelSkipLinear) for m in model.modules()) == 8
    controller.remove()
    assert set(model.state_dict()) == keys
    assert {n: m for n, m in model.named_modules() if n.endswith("base_layer")} == originals
    assert not model.model.layers[0].self_attn._forward_pre_hooks and not model.model.layers[0].self_attn._forward_hooks


def test_attention_without_lora_swaps_the_projection_itself():
    model = tiny_llama(2)
    controller = SparseLoRA.attach(model, attn_sparsity=0.5, layers="all")
    assert isinstance(model.model.layers[0].self_attn.q_proj, ChannelSkipLinear)
    controller.remove()
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear


class MLPOnly(nn.Module):
    """Blocks with a gated MLP and no attention projections."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(2):
            block = nn.Module()
            block.gate_proj, block.up_proj, block.down_proj = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)
            block.act_fn = nn.SiLU()
            self.layers.append(block)


def test_bad_attention_options_get_one_line_errors():
    with pytest.raises(ConfigError, match="attention sparsity must be in"):
        SparseLoRA.attach(tiny_llama(2), attn_sparsity=1.0)
    with pytest.raises(ConfigError, match="sparselora_attn_sparsity"):
        FinetuneConfig(sparselora_attn_sparsity=-0.1)
    with pytest.raises(ModelError, match="pass attention sparsity 0"):
        SparseLoRA.attach(MLPOnly(), attn_sparsity=0.5, layers="all")
    assert len(SparseLoRA.attach(MLPOnly(), attn_sparsity=0.0, layers="all").modules) == 2
    assert len(attention_blocks(tiny_llama(3))) == 3
