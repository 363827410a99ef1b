"""S²FT through finetune_: the budget, the selection, only selected slices train, masks kept, resume, errors."""

import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st

from sparseforge.errors import ConfigError, ModelError
from sparseforge.finetune import FinetuneConfig, S2FTConfig, finetune_, pruned_layers
from sparseforge.finetune.loop import STATE_FILE
from sparseforge.finetune.s2ft import S2FTRun
from sparseforge.finetune.s2ft_blocks import find_blocks
from sparseforge.finetune.s2ft_select import allocate, groups, unit_cost
from sparseforge.layers import linear_layers, weight_2d
from sparseforge.masks import mask_from_scores, satisfies
from tiny_models import VOCAB, tiny_model

DATA = torch.randint(0, VOCAB, (2000,), generator=torch.Generator().manual_seed(0))
ALL = "q,k,v,o,up,gate,down"


def pruned_llama(pattern="unstructured"):
    model = tiny_model("llama")
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in linear_layers(model):
            if ".layers." in name:
                w = weight_2d(modules[name])
                w.masked_fill_(~mask_from_scores(w.abs(), pattern, None if ":" in pattern else 0.5), 0.0)
    return model


def run(student, budget=0.05, parts="o,down", select="random", **kw):
    cfg_kw = {k: kw.pop(k) for k in list(kw) if k in FinetuneConfig.__dataclass_fields__}
    cfg = FinetuneConfig(**{"loss": "ce", "steps": 3, "batch_size": 2, "seqlen": 16, "lr": 1e-2, "adapter": "s2ft",
                            "s2ft": S2FTConfig(budget=budget, parts=parts, select=select), **cfg_kw})
    return finetune_(student, cfg, data=kw.pop("data", DATA), tokenizer=None, evaluate=False, progress=False, **kw)


def changed_units(before, after, selection, parts):
    """Per (layer, axis): the rows (axis 0) / columns (axis 1) that differ, and the expected ones from the selection."""
    mods_b, mods_a = dict(before.named_modules()), dict(after.named_modules())
    blocks = {b.name: b for b in find_blocks(before, tuple(ALL.split(",")))}
    out = []
    for pick in selection:
        block = blocks[pick["block"]]
        for part in ALL.split(","):
            name = block.linear_name(part)
            diff = weight_2d(mods_a[name]) != weight_2d(mods_b[name])  # (out, in)
            axis = 0 if part in ("q", "k", "v", "up", "gate") else 1
            got = set(torch.nonzero(diff.any(1 - axis)).flatten().tolist())
            width = {"q": block.group * block.head_dim, "o": block.group * block.head_dim,
                     "k": block.head_dim, "v": block.head_dim}.get(part, 1)
            units = pick["heads"] if part in ("q", "k", "v", "o") else pick["channels"]
            allowed = {u * width + i for u in units for i in range(width)} if part in parts else set()
            out.append((name, got, allowed))
    return out


@pytest.mark.parametrize("parts", ["o,down", "v,o,up,gate,down", "q,k"])
def test_only_the_selected_rows_and_columns_train_and_optimizer_state_matches_the_budget(parts, tmp_path):
    student = tiny_model("llama")
    original = copy.deepcopy(student)
    budget = 3000
    result = run(student, budget=budget, parts=parts, steps=2, save_every=2, resume_dir=tmp_path, allow_dense=True)
    state = torch.load(tmp_path / STATE_FILE, weights_only=False)
    moments = sum(s[k].numel() for s in state["optimizer"]["state"].values() for k in ("exp_avg", "exp_avg_sq"))
    assert moments == 2 * result.trainable  # AdamW state exists only for the slices
    blocks = find_blocks(original, tuple(parts.split(",")))
    cheapest = min(c for c in (unit_cost(blocks[0], tuple(parts.split(",")), s) for s in ("heads", "channels")) if c)
    assert budget - cheapest < result.trainable <= budget
    trained = 0
    for name, got, allowed in changed_units(original, student, state["mask"]["selection"], parts.split(",")):
        assert got <= allowed, name  # nothing outside the selected slices moved
        trained += len(got)
    assert trained > 0
    untouched = [n for n, _ in original.named_parameters() if ".layers." not in n]  # embeddings, norms
    params = dict(student.named_parameters())
    assert all(torch.equal(p, params[n]) for n, p in original.named_parameters() if n in untouched)
    assert all(type(m) is torch.nn.Linear for n, m in student.named_modules() if n.endswith("_proj"))


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_other_llama_style_families_train_only_their_selection(family, tmp_path):
    student = tiny_model(family)
    original = copy.deepcopy(student)
    run(student, budget=0.2, parts=ALL, steps=2, save_every=2, resume_dir=tmp_path, allow_dense=True)
    selection = torch.load(tmp_path / STATE_FILE, weights_only=False)["mask"]["selection"]
    assert any(p["heads"] for p in selection) and any(p["channels"] for p in selection)
    moved = 0
    for name, got, allowed in changed_units(original, student, selection, ALL.split(",")):
        assert got <= allowed, name
        moved += len(got)
    assert moved > 0


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_pruned_weights_stay_zero_and_nm_stays_nm(pattern):
    student = pruned_llama(pattern)
    names = pruned_layers(student)
    zeros = {n: weight_2d(dict(student.named_modules())[n]) == 0 for n in names}
    before = copy.deepcopy(student)
    run(student, budget=0.3, parts=ALL, steps=3, lr=5e-2)
    modules = dict(student.named_modules())
    moved = 0
    for n in names:
        w = weight_2d(modules[n])
        assert torch.equal(w == 0, zeros[n]), n
        if pattern == "2:4":
            assert satisfies(w != 0, "2:4")
        moved += not torch.equal(w, weight_2d(dict(before.named_modules())[n]))
    assert moved > 0


@settings(max_examples=25, deadline=None)
@given(budget=st.integers(1, 40000), parts=st.lists(st.sampled_from(ALL.split(",")), min_size=1, unique=True),
       independent=st.booleans())
def test_allocation_spends_the_budget_to_within_one_unit(budget, parts, independent):
    blocks = find_blocks(tiny_model("llama"), tuple(parts))
    parts = tuple(parts)
    found = groups(parts, independent)
    cost = {g: unit_cost(blocks[0], members, s) for g, (s, members) in found.items()}
    total = {g: sum(b.units(s) for b in blocks) for g, (s, _) in found.items()}
    capacity = sum(cost[s] * total[s] for s in cost)
    cheapest = min(c for c in cost.values() if c)
    if budget > capacity or budget < cheapest:
        with pytest.raises(ConfigError, match="exceeds|smaller than one unit"):
            allocate(blocks, parts, budget, independent)
        return
    count = allocate(blocks, parts, budget, independent)
    assert set(count) == set(found)
    spent = sum(cost[s] * count[s] for s in count)
    assert spent <= budget
    for s in count:  # what is left would not buy one more unit of any structure with room
        assert count[s] == total[s] or budget - spent < cost[s]


def test_weight_and_activation_selection_find_the_loud_channel():
    model = tiny_model("llama")
    with torch.no_grad():  # channel 5 of block 0: large down column (weight) and large up/gate rows (activation)
        mlp = model.model.layers[0].mlp
        mlp.down_proj.weight[:, 5] *= 50
        mlp.up_proj.weight[5] *= 20
        mlp.gate_proj.weight[5] *= 20
    batches = [{"input_ids": DATA[:32].reshape(2, 16), "attention_mask": torch.ones(2, 16, dtype=torch.long)}]
    for select in ("weight", "activation"):
        m = copy.deepcopy(model)
        run_ = S2FTRun(m, S2FTConfig(budget=32, parts="down", select=select), calibration=lambda: batches)
        assert run_.picks[0]["channels"] == [5] and run_.picks[1]["channels"] == [], select
        run_.remove()
    picks = [S2FTRun(copy.deepcopy(model), S2FTConfig(budget=32 * 8, parts="down"), seed=s).picks for s in (0, 0, 1)]
    assert picks[0] == picks[1] != picks[2]  # random: the seed decides


def test_activation_selection_does_not_change_the_training_data():
    a, b = tiny_model("llama"), tiny_model("llama")
    ra = run(a, select="activation", steps=2)
    rb = run(b, select="random", steps=2)
    assert ra.losses[0] == rb.losses[0]  # the same first batch, before any update


def test_resume_is_bit_exact(tmp_path):
    full_model = pruned_llama()
    part_model = copy.deepcopy(full_model)
    full = run(full_model, steps=4, save_every=2)

    class Interrupt(Exception):
        pass

    def stop(info):
        if info.step == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        run(part_model, steps=4, save_every=2, resume_dir=tmp_path, callback=stop)
    assert all(type(m) is torch.nn.Linear for n, m in part_model.named_modules() if n.endswith("_proj"))  # fused back
    resumed_model = pruned_llama()
    resumed = run(resumed_model, steps=4, save_every=2, resume_dir=tmp_path)
    assert resumed.resumed_from == 2 and resumed.losses == full.losses
    for (n, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), n
    with pytest.raises(ConfigError, match="other settings"):
        run(pruned_llama(), steps=4, save_every=2, resume_dir=tmp_path, select="weight")


def test_output_checkpoint_records_the_run(tmp_path):
    import sparseforge

    student = pruned_llama("2:4")
    run(student, out=tmp_path / "out")
    loaded = sparseforge.load(tmp_path / "out")
    block = loaded.config.sparsity_config
    assert block["finetune"]["adapter"] == "s2ft" and block["finetune"]["s2ft"]["budget"] == 0.05
    for n in pruned_layers(student):
        assert torch.equal(weight_2d(dict(loaded.named_modules())[n]), weight_2d(dict(student.named_modules())[n]))


def test_config_errors():
    for bad in (0.0, 1.0, 1.5, -3, 0, True, "half"):
        with pytest.raises(ConfigError, match="budget"):
            S2FTConfig(budget=bad)
    with pytest.raises(ConfigError, match="choose distinct names"):
        S2FTConfig(parts="o,mlp")
    with pytest.raises(ConfigError, match="select must be one of"):
        S2FTConfig(select="gradient")
    with pytest.raises(ConfigError, match="adapter='s2ft'"):
        FinetuneConfig(s2ft=S2FTConfig())
    with pytest.raises(ConfigError, match="compute='dense'"):
        FinetuneConfig(adapter="s2ft", compute="csr")
    with pytest.raises(ConfigError, match="unknown s2ft options"):
        FinetuneConfig(adapter="s2ft", s2ft={"ratio": 0.1})
    cfg = FinetuneConfig.from_dict(FinetuneConfig(adapter="s2ft", s2ft={"budget": 100, "parts": "down,o"}).to_dict())
    assert cfg.s2ft == S2FTConfig(budget=100, parts=("o", "down"))


def test_model_errors_leave_the_model_untouched():
    for family in ("opt", "gpt_neox"):  # fused or differently named blocks: no supported layout
        model = tiny_model(family)
        original = copy.deepcopy(model)
        with pytest.raises(ModelError, match="S²FT found no transformer block"):
            S2FTRun(model, S2FTConfig())
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), original.parameters()))
    with pytest.raises(ModelError, match="S²FT"):  # refused before the (slow) evaluation of the student
        finetune_(tiny_model("opt"), FinetuneConfig(loss="ce", adapter="s2ft"), data=DATA, evaluate=True,
                  progress=False)
    with pytest.raises(ModelError, match="no gate projection"):
        S2FTRun(tiny_model("gpt2"), S2FTConfig(parts="gate"))
    model = tiny_model("llama")
    original = copy.deepcopy(model)
    with pytest.raises(ConfigError, match="smaller than one unit"):
        run(model, budget=10, parts="down", allow_dense=True)
    with pytest.raises(ConfigError, match="exceeds"):
        run(model, budget=10**6, parts="down", allow_dense=True)
    for (n, a), b in zip(model.named_parameters(), original.parameters()):
        assert torch.equal(a, b) and a.requires_grad, n


@pytest.mark.parametrize("name", ["s2ft_options", "s2ft_blocks", "s2ft_select", "s2ft_permute", "s2ft"])
def test_docstring_examples(name):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(f"sparseforge.finetune.{name}"))
    assert result.failed == 0 and result.attempted > 0
