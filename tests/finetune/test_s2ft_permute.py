"""S²FT co-permutation and slices: the permuted / sliced model computes the same function, fusion is exact."""

import copy

import pytest
import torch
import transformers as t
from hypothesis import HealthCheck, given, settings, strategies as st

from sparseforge.finetune.s2ft import S2FTRun, SliceLinear
from sparseforge.finetune.s2ft_blocks import find_blocks
from sparseforge.finetune.s2ft_options import S2FTConfig
from sparseforge.finetune.s2ft_permute import front_order, inverse, permute_block_

VOCAB = 64


def llama(hidden_per_head, heads, kv_heads, channels, layers=2, bias=False, family="llama", seed=0):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=hidden_per_head * heads, intermediate_size=channels,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  max_position_embeddings=32)
    if family == "llama":
        model = t.LlamaForCausalLM(t.LlamaConfig(attention_bias=bias, mlp_bias=bias, **common))
    elif family == "qwen2":
        model = t.Qwen2ForCausalLM(t.Qwen2Config(**common))
    else:
        model = t.Qwen3ForCausalLM(t.Qwen3Config(head_dim=hidden_per_head, **common))
    with torch.no_grad():  # visible biases and norm scales, so that a wrong permutation of them shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(1.0 if "norm" in name else 0.0, 0.5)
    return model.eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


shapes = st.tuples(st.sampled_from([2, 4, 8]), st.sampled_from([(2, 1), (2, 2), (4, 1), (4, 2), (6, 3), (4, 4)]),
                   st.integers(3, 24), st.booleans())


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=shapes, data=st.data())
def test_co_permutation_keeps_the_function_with_gqa(shape, data):
    head_dim, (heads, kv_heads), channels, bias = shape
    model = llama(head_dim, heads, kv_heads, channels, bias=bias)
    original = copy.deepcopy(model)
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    reference = logits(model, ids)
    blocks = find_blocks(model, ("q", "k", "v", "o", "up", "gate", "down"))
    orders = []
    for block in blocks:
        kv = data.draw(st.permutations(range(kv_heads)))
        ch = data.draw(st.permutations(range(channels)))
        permute_block_(block, list(kv), list(ch))
        orders.append((list(kv), list(ch)))
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), original.parameters())) or \
        all(kv == sorted(kv) and ch == sorted(ch) for kv, ch in orders)
    torch.testing.assert_close(logits(model, ids), reference, rtol=1e-5, atol=1e-5)
    for block, (kv, ch) in zip(blocks, orders):  # the inverse restores every weight bit for bit
        permute_block_(block, inverse(kv), inverse(ch))
    for (name, a), b in zip(model.named_parameters(), original.parameters()):
        assert torch.equal(a, b), name


def test_a_wrong_query_group_permutation_changes_the_function():
    # the test above can fail: permuting kv heads without their query groups breaks grouped-query attention
    model = llama(4, 4, 2, 8)
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    reference = logits(model, ids)
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        attn.v_proj.weight.copy_(attn.v_proj.weight.reshape(2, 4, -1).flip(0).reshape(8, -1))
    assert not torch.allclose(logits(model, ids), reference, atol=1e-4)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_co_permutation_with_qkv_bias_and_head_norms(family):
    model = llama(8, 4, 2, 16, family=family)
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    reference = logits(model, ids)
    for block in find_blocks(model, ("q", "k", "v", "o", "up", "gate", "down")):
        permute_block_(block, [1, 0], front_order([3, 11, 7], 16))
    torch.testing.assert_close(logits(model, ids), reference, rtol=1e-5, atol=1e-5)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parts=st.lists(st.sampled_from(["q", "k", "v", "o", "up", "gate", "down"]), min_size=1, max_size=7, unique=True),
       fraction=st.floats(0.3, 1.0), select=st.sampled_from(["random", "weight"]), seed=st.integers(0, 5),
       bias=st.booleans())
def test_sliced_model_is_the_same_function_and_removal_restores_it(parts, fraction, select, seed, bias):
    model = llama(4, 4, 2, 12, bias=bias, seed=seed)
    original = copy.deepcopy(model)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(seed))
    reference = logits(model, ids)
    blocks = find_blocks(model, tuple(parts))
    capacity = sum(b.linear(p).weight.numel() for b in blocks for p in parts)
    run = S2FTRun(model, S2FTConfig(budget=int(fraction * capacity), parts=parts, select=select), seed=seed)
    assert run.slices and all(isinstance(m, SliceLinear) for m in run.slices.values())
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".trainable." not in n)
    torch.testing.assert_close(logits(model, ids), reference, rtol=1e-5, atol=1e-5)
    run.remove()
    for (name, a), b in zip(model.named_parameters(), original.parameters()):
        assert torch.equal(a, b), name
        assert a.requires_grad == b.requires_grad


@settings(max_examples=30, deadline=None)
@given(out=st.integers(2, 9), inp=st.integers(2, 9), axis=st.sampled_from([0, 1]), bias=st.booleans(),
       frac=st.floats(0.1, 1.0), seed=st.integers(0, 99))
def test_slice_linear_matches_dense_forward_and_weight_gradient(out, inp, axis, bias, frac, seed):
    torch.manual_seed(seed)
    dense = torch.nn.Linear(inp, out, bias=bias)
    size = max(1, int(frac * (out if axis == 0 else inp)))
    sliced = SliceLinear(copy.deepcopy(dense), axis, size)
    x = torch.randn(3, 4, inp)
    y_dense, y_sliced = dense(x), sliced(x)
    torch.testing.assert_close(y_sliced, y_dense, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y_dense)
    y_dense.backward(g)
    y_sliced.backward(g)
    expected = dense.weight.grad[:size] if axis == 0 else dense.weight.grad[:, :size]
    torch.testing.assert_close(sliced.trainable[0].grad, expected, rtol=1e-5, atol=1e-5)
    assert all(b.grad is None for b in sliced.buffers())
    fused = sliced.fuse()
    assert type(fused) is torch.nn.Linear
    torch.testing.assert_close(fused.weight, dense.weight, rtol=0, atol=0)
