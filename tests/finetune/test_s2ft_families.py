"""S²FT on GPT-2 (fused Conv1D q/k/v) and BERT / MiniLM blocks: co-permutation keeps the function,
slices compute the same, fusion restores the modules, and fine-tuning moves only the selected units."""

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from torch import nn

from sparseforge.finetune import FinetuneConfig, S2FTConfig, finetune_, pruned_layers
from sparseforge.finetune.loop import STATE_FILE
from sparseforge.finetune.s2ft import S2FTRun, SliceLinear
from sparseforge.finetune.s2ft_blocks import ROW_PARTS, find_blocks, unit_width
from sparseforge.finetune.s2ft_permute import inverse, permute_block_
from sparseforge.layers import linear_layers, weight_2d
from sparseforge.masks import mask_from_scores, satisfies
from tiny_models import VOCAB, tiny_model

PARTS = {"gpt2": ("q", "k", "v", "o", "up", "down"), "bert": ("q", "k", "v", "o", "up", "down")}
DATA = torch.randint(0, VOCAB, (2000,), generator=torch.Generator().manual_seed(0))


def model_of(family, seed=0):
    model = tiny_model(family, seed=seed)
    with torch.no_grad():  # visible biases, norm scales and attention scores, so that a wrong permutation shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln" in name or "LayerNorm" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.5)
            elif p.dim() == 2 and ("attn" in name or "attention" in name):
                p.normal_(0.0, 0.3)
    return model.eval()


def outputs(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(family=st.sampled_from(["gpt2", "bert"]), data=st.data())
def test_co_permutation_keeps_the_function_and_the_inverse_restores_every_bit(family, data):
    model = model_of(family)
    original = copy.deepcopy(model)
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    reference = outputs(model, ids)
    blocks = find_blocks(model, PARTS[family])
    assert [b.family for b in blocks] == [family, family] and blocks[0].kv_heads == 4 and blocks[0].channels > 32
    orders = []
    for block in blocks:
        kv = list(data.draw(st.permutations(range(block.kv_heads))))
        ch = list(data.draw(st.permutations(range(block.channels))))
        permute_block_(block, kv, ch)
        orders.append((kv, ch))
    torch.testing.assert_close(outputs(model, ids), reference, rtol=1e-5, atol=1e-5)
    for block, (kv, ch) in zip(blocks, orders):
        permute_block_(block, inverse(kv), inverse(ch))
    for (name, a), b in zip(model.named_parameters(), original.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_a_partial_permutation_changes_the_function(family):
    # the property above can fail: heads moved in the queries but not in the keys break attention
    model = model_of(family)
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    reference = outputs(model, ids)
    block = find_blocks(model, PARTS[family])[0]
    q = block.linear("q")
    with torch.no_grad():
        q.weight.copy_(q.weight.reshape(4, block.head_dim, -1).flip(0).reshape(q.weight.shape))
    assert not torch.allclose(outputs(model, ids), reference, atol=1e-4)


def test_gpt2_fused_qkv_parts_are_the_rows_gpt2_splits():
    model = tiny_model("gpt2")
    block = find_blocks(model, ("q", "k", "v"))[0]
    c_attn = model.transformer.h[0].attn.c_attn
    x = torch.randn(3, 32)
    q, k, v = c_attn(x).split(32, dim=-1)  # what GPT2Attention does
    for part, want in zip("qkv", (q, k, v)):
        proj = block.linear(part)
        assert proj.module is c_attn
        torch.testing.assert_close(x @ proj.weight.t() + proj.bias, want, rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(out=st.integers(3, 10), inp=st.integers(3, 10), axis=st.sampled_from([0, 1]), conv=st.booleans(),
       data=st.data(), seed=st.integers(0, 99))
def test_multi_range_slices_match_the_dense_forward_and_weight_gradient(out, inp, axis, conv, data, seed):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(seed)
    dense = nn.Linear(inp, out)
    layer = Conv1D(out, inp) if conv else copy.deepcopy(dense)
    if conv:
        with torch.no_grad():
            layer.weight.copy_(dense.weight.t())
            layer.bias.copy_(dense.bias)
    n = out if axis == 0 else inp
    cuts = sorted(data.draw(st.sets(st.integers(0, n), min_size=2, max_size=6)))
    spans = [(a, b - a) for a, b in zip(cuts[::2], cuts[1::2]) if b > a]
    if not spans:
        spans = [(0, 1)]
    sliced = SliceLinear(layer, axis, spans)
    x = torch.randn(2, 3, inp)
    y_dense, y_sliced = dense(x), sliced(x)
    torch.testing.assert_close(y_sliced, y_dense, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y_dense)
    y_dense.backward(g)
    y_sliced.backward(g)
    for param, (first, size) in zip(sliced.trainable, spans):
        torch.testing.assert_close(param.grad, dense.weight.grad.narrow(axis, first, size), rtol=1e-5, atol=1e-5)
    fused = sliced.fuse()
    assert fused is layer
    torch.testing.assert_close(weight_2d(fused), dense.weight, rtol=0, atol=0)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(family=st.sampled_from(["gpt2", "bert"]), parts=st.lists(st.sampled_from(["q", "k", "v", "o", "up", "down"]),
       min_size=1, max_size=6, unique=True), fraction=st.floats(0.2, 1.0), seed=st.integers(0, 5))
def test_sliced_model_is_the_same_function_and_fusion_restores_the_modules(family, parts, fraction, seed):
    model = model_of(family, seed)
    original = copy.deepcopy(model)
    classes = {n: type(m) for n, m in model.named_modules()}
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(seed))
    reference = outputs(model, ids)
    blocks = find_blocks(model, tuple(parts))
    capacity = sum(b.linear(p).weight.numel() for b in blocks for p in parts)
    run = S2FTRun(model, S2FTConfig(budget=max(1, int(fraction * capacity)), parts=parts, select="random"), seed=seed)
    assert run.slices and all(isinstance(m, SliceLinear) for m in run.slices.values())
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".trainable." not in n)
    assert sum(p.numel() for p in run.parameters()) == run.trainable_count() > 0
    torch.testing.assert_close(outputs(model, ids), reference, rtol=1e-5, atol=1e-5)
    run.remove()
    assert {n: type(m) for n, m in model.named_modules()} == classes  # Conv1D stays Conv1D
    for (name, a), b in zip(model.named_parameters(), original.parameters()):
        assert torch.equal(a, b), name


def prune_24(model):
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in linear_layers(model):
            if ".h." in name or ".layer." in name:
                w = weight_2d(modules[name])  # (out, in) view, also of GPT-2's transposed Conv1D
                w.masked_fill_(~mask_from_scores(w.abs(), "2:4", None), 0.0)
    return model


def moved_outside_selection(before, after, selection, parts):
    """Rows / columns that changed but were not selected, per layer; and how many selected ones moved."""
    blocks = {b.name: b for b in find_blocks(before, tuple(parts))}
    mods_b, mods_a = dict(before.named_modules()), dict(after.named_modules())
    changed = {n: weight_2d(mods_a[n]) != weight_2d(mods_b[n]) for n in linear_layers(before)
               if ".h." in n or ".layer." in n}  # (out, in) per block projection
    allowed = {n: torch.zeros_like(c) for n, c in changed.items()}
    for pick in selection:
        block = blocks[pick["block"]]
        for part in parts:
            proj, width = block.linear(part), unit_width(block, part)
            units = pick["heads"] if part in ("q", "k", "v", "o") else pick["channels"]
            for u in units:
                if part in ROW_PARTS:
                    allowed[proj.name][proj.start + u * width: proj.start + (u + 1) * width] = True
                else:
                    allowed[proj.name][:, u * width:(u + 1) * width] = True
    outside = {n: int((c & ~allowed[n]).sum()) for n, c in changed.items()}
    return outside, sum(int((c & allowed[n]).sum()) for n, c in changed.items())


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_finetune_trains_only_the_selection_and_keeps_2_4(family, tmp_path):
    student = prune_24(tiny_model(family))
    teacher = tiny_model(family)
    original = copy.deepcopy(student)
    names = pruned_layers(student)
    parts = PARTS[family]
    kw = {"loss": "ce"} if family == "gpt2" else {"loss": "squarehead"}
    cfg = FinetuneConfig(steps=2, batch_size=2, seqlen=16, lr=1e-2, adapter="s2ft", save_every=2,
                         s2ft=S2FTConfig(budget=0.2, parts=",".join(parts)), **kw)
    result = finetune_(student, cfg, data=DATA, teacher=None if family == "gpt2" else teacher, evaluate=False,
                       progress=False, resume_dir=tmp_path)
    assert result.trainable > 0
    selection = torch.load(tmp_path / STATE_FILE, weights_only=False)["mask"]["selection"]
    assert any(p["heads"] for p in selection) and any(p["channels"] for p in selection)
    outside, moved = moved_outside_selection(original, student, selection, parts)
    assert moved > 0 and not any(outside.values()), outside
    assert {n: type(m) for n, m in student.named_modules()} == {n: type(m) for n, m in original.named_modules()}
    for name in names:
        w0, w1 = weight_2d(original.get_submodule(name)), weight_2d(student.get_submodule(name))
        assert torch.equal(w0 == 0, w1 == 0), name
        assert satisfies(w1 != 0, "2:4"), name


@settings(max_examples=40, deadline=None)
@given(units=st.integers(1, 12), data=st.data())
def test_independent_layout_puts_each_sides_units_in_one_contiguous_span(units, data):
    from sparseforge.finetune.s2ft import unit_layout
    from sparseforge.finetune.s2ft_permute import front_order

    rows = sorted(data.draw(st.sets(st.integers(0, units - 1))))
    columns = sorted(data.draw(st.sets(st.integers(0, units - 1))))
    front, spans = unit_layout({"channels:rows": rows, "channels:columns": columns}, "channels", ("up", "gate", "down"))
    order = front_order(front, units)  # new position -> original unit
    for part, want in (("up", rows), ("gate", rows), ("down", columns)):
        first, size = spans[part]
        assert sorted(order[first:first + size]) == want, part


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(family=st.sampled_from(["gpt2", "bert", "llama"]), fraction=st.floats(0.2, 0.9), seed=st.integers(0, 5))
def test_independent_selection_keeps_the_function_and_fusion_restores_it(family, fraction, seed):
    model = model_of(family, seed) if family != "llama" else tiny_model("llama", seed=seed).eval()
    original = copy.deepcopy(model)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(seed))
    reference = outputs(model, ids)
    parts = ("v", "o", "up", "down")
    capacity = sum(b.linear(p).weight.numel() for b in find_blocks(model, parts) for p in parts)
    run = S2FTRun(model, S2FTConfig(budget=int(fraction * capacity), parts=parts, independent=True), seed=seed)
    assert all(set(p) == {"heads:rows", "heads:columns", "channels:rows", "channels:columns"} for p in run.picks)
    torch.testing.assert_close(outputs(model, ids), reference, rtol=1e-5, atol=1e-5)
    run.remove()
    for (name, a), b in zip(model.named_parameters(), original.parameters()):
        assert torch.equal(a, b), name


def test_independent_selection_trains_each_sides_own_units(tmp_path):
    student = prune_24(tiny_model("gpt2"))
    original = copy.deepcopy(student)
    cfg = FinetuneConfig(loss="ce", steps=2, batch_size=2, seqlen=16, lr=1e-2, adapter="s2ft", save_every=2,
                         s2ft=S2FTConfig(budget=0.1, parts="v,o,up,down", independent=True))
    result = finetune_(student, cfg, data=DATA, evaluate=False, progress=False, resume_dir=tmp_path)
    assert 0 < result.trainable <= int(0.1 * sum(p.numel() for p in original.parameters()))
    selection = torch.load(tmp_path / STATE_FILE, weights_only=False)["mask"]["selection"]
    assert any(p["heads:rows"] != p["heads:columns"] for p in selection)
    assert any(p["channels:rows"] != p["channels:columns"] for p in selection)
    blocks = {b.name: b for b in find_blocks(original, ("v", "o", "up", "down"))}
    modules_b, modules_a = dict(original.named_modules()), dict(student.named_modules())
    moved = 0
    for pick in selection:
        block = blocks[pick["block"]]
        for part, key in (("v", "heads:rows"), ("o", "heads:columns"), ("up", "channels:rows"), ("down", "channels:columns")):
            proj, width = block.linear(part), unit_width(block, part)
            w0 = weight_2d(modules_b[proj.name])[proj.start:proj.start + proj.out_features]
            w1 = weight_2d(modules_a[proj.name])[proj.start:proj.start + proj.out_features]
            diff = (w0 != w1).any(1 if part in ROW_PARTS else 0)  # per row / per column
            allowed = torch.zeros_like(diff)
            for u in pick[key]:
                allowed[u * width:(u + 1) * width] = True
            assert not (diff & ~allowed).any(), (proj.name, part)
            moved += int(diff.sum())
        for part in ("q", "k"):  # not trained
            proj = block.linear(part)
            assert torch.equal(weight_2d(modules_b[proj.name])[proj.start:proj.start + proj.out_features],
                               weight_2d(modules_a[proj.name])[proj.start:proj.start + proj.out_features])
    assert moved > 0


@pytest.mark.parametrize("independent", [False, True])
def test_gpt2_fused_slices_resume_bit_exactly(tmp_path, independent):
    cfg = FinetuneConfig(loss="ce", steps=4, batch_size=2, seqlen=16, lr=1e-2, adapter="s2ft", save_every=2,
                         s2ft=S2FTConfig(budget=0.1, parts="q,k,v,o,up,down", independent=independent))
    straight = prune_24(tiny_model("gpt2"))
    resumed = copy.deepcopy(straight)
    finetune_(straight, cfg, data=DATA, evaluate=False, progress=False)

    def stop(info):
        if info.step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune_(copy.deepcopy(resumed), cfg, data=DATA, evaluate=False, progress=False, resume_dir=tmp_path,
                  callback=stop)
    result = finetune_(resumed, cfg, data=DATA, evaluate=False, progress=False, resume_dir=tmp_path)
    assert result.resumed_from == 2
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
