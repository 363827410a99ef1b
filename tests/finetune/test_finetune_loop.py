"""finetune_ on tiny random HF models: the mask is kept exactly, resume is bit-exact, bad input is refused."""

import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st

from sparseforge.errors import ConfigError, DataError, ModelError
from sparseforge.finetune import FinetuneConfig, KeepMask, finetune_, pruned_layers
from sparseforge.finetune.loop import STATE_FILE
from sparseforge.layers import linear_layers, weight_2d
from sparseforge.masks import mask_from_scores
from tiny_models import VOCAB, tiny_model

DATA = torch.randint(0, VOCAB, (2000,), generator=torch.Generator().manual_seed(0))


def pruned(family="llama", pattern="unstructured", sparsity=0.5, seed=0):
    """(student, teacher): a tiny model pruned by magnitude in its blocks, and the dense original."""
    teacher = tiny_model(family, seed=seed)
    student = copy.deepcopy(teacher)
    modules = dict(student.named_modules())
    with torch.no_grad():
        for name in linear_layers(student):
            if ".layers." in name or ".h." in name or ".layer." in name:
                w = weight_2d(modules[name])
                w.masked_fill_(~mask_from_scores(w.abs(), pattern, None if ":" in pattern else sparsity), 0.0)
    return student, teacher


def zeros(model, names):
    modules = dict(model.named_modules())
    return {n: weight_2d(modules[n]) == 0 for n in names}


def run(student, teacher=None, **kw):
    cfg_kw = {k: kw.pop(k) for k in list(kw) if k in FinetuneConfig.__dataclass_fields__}
    cfg = FinetuneConfig(**{"steps": 4, "batch_size": 2, "seqlen": 16, "lr": 1e-2, **cfg_kw})
    return finetune_(student, cfg, teacher=teacher, data=kw.pop("data", DATA), tokenizer=None,
                     evaluate=False, progress=False, **kw)


@pytest.mark.parametrize("family, pattern", [("llama", "unstructured"), ("llama", "2:4"), ("gpt2", "unstructured")])
@pytest.mark.parametrize("loss", ["ce", "kd", "squarehead", "ce=1,kd=0.5,squarehead=2"])
def test_mask_kept_exactly_and_weights_trained(family, pattern, loss):
    student, teacher = pruned(family, pattern)
    names = pruned_layers(student)
    assert names
    before_zeros = zeros(student, names)
    before = {n: t.clone() for n, t in student.state_dict().items()}
    result = run(student, teacher, loss=loss)
    after_zeros = zeros(student, names)
    for n in names:
        assert torch.equal(before_zeros[n], after_zeros[n]), n  # pruned stay zero, kept stay non-zero
        if pattern == "2:4":
            w = weight_2d(dict(student.named_modules())[n])
            assert int((w.reshape(w.shape[0], -1, 4) != 0).sum(-1).max()) <= 2
    changed = [n for n, t in student.state_dict().items() if not torch.equal(t, before[n])]
    assert any(n.replace(".weight", "") in names for n in changed)  # the kept weights did train
    assert len(result.losses) == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    assert not any(hasattr(m, "weight_mask") for m in student.modules())  # mask buffers removed


def test_squarehead_distillation_lowers_the_loss():
    student, teacher = pruned("llama", sparsity=0.7)
    result = run(student, teacher, loss="squarehead", steps=30, lr=3e-3, batch_size=4, warmup_steps=0)
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < 0.8 * first


def test_teacher_in_bf16_is_left_unchanged_and_matches_float32_closely():
    student, teacher = pruned("llama")
    teacher.train()
    before = {n: t.clone() for n, t in teacher.state_dict().items()}
    s32, s16 = copy.deepcopy(student), copy.deepcopy(student)
    r32 = run(s32, teacher, loss="kd", teacher_dtype="float32")
    r16 = run(s16, teacher, loss="kd", teacher_dtype="bfloat16")
    assert all(torch.equal(t, before[n]) for n, t in teacher.state_dict().items())  # never trained, never cast
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())  # its mode is restored
    assert r16.losses != r32.losses and r16.losses == pytest.approx(r32.losses, rel=0.05)
    assert all(p.dtype == torch.float32 for p in s16.parameters())


def test_frozen_student_is_refused():
    student, teacher = pruned("llama")
    student.requires_grad_(False)
    with pytest.raises(ConfigError, match="frozen"):
        run(student, teacher, loss="ce")


@settings(max_examples=6, deadline=None)
@given(st.sampled_from(["unstructured", "2:4"]), st.floats(0.2, 0.9), st.integers(0, 1000))
def test_keep_mask_property_optimizer_state_zero_at_pruned(pattern, sparsity, seed):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    with torch.no_grad():
        for layer in (net[0], net[2]):
            layer.weight.masked_fill_(~mask_from_scores(torch.rand(layer.weight.shape), pattern,
                                                        None if pattern == "2:4" else sparsity), 0.0)
    names = pruned_layers(net, 0.1)
    pruned_at = {n: dict(net.named_modules())[n].weight == 0 for n in names}
    opt = torch.optim.AdamW(net.parameters(), lr=0.05, weight_decay=0.1)
    keeper = KeepMask.attach(net, opt, names)
    for _ in range(5):
        net(torch.randn(8, 16)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        keeper.step()
        for n in names:
            p = dict(net.named_modules())[n].weight
            assert torch.equal(p == 0, pruned_at[n])
            for key in ("exp_avg", "exp_avg_sq"):
                assert not opt.state[p][key][pruned_at[n]].any()


def test_resume_is_bit_exact(tmp_path):
    cfg = dict(loss="ce+squarehead", steps=6, save_every=2)
    s_full, teacher = pruned("llama")
    s_part = copy.deepcopy(s_full)
    full = run(s_full, teacher, **cfg)

    class Interrupt(Exception):
        pass

    def stop_at_3(info):
        if info.step == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        run(s_part, copy.deepcopy(teacher), resume_dir=tmp_path, callback=stop_at_3, **cfg)
    state = torch.load(tmp_path / STATE_FILE, weights_only=False)
    assert state["step"] == 2
    param_names = [n for n, _ in s_full.named_parameters()]  # the optimizer's order
    for n, mask in state["mask"]["masks"].items():  # optimizer state at pruned positions is zero on disk
        idx = param_names.index(f"{n}.weight")
        for key in ("exp_avg", "exp_avg_sq"):
            assert not state["optimizer"]["state"][idx][key][~mask].any()
    s_resumed, _ = pruned("llama")  # a fresh process: the original pruned model again
    resumed = run(s_resumed, copy.deepcopy(teacher), resume_dir=tmp_path, **cfg)
    assert resumed.resumed_from == 2
    assert resumed.losses == full.losses
    for (n, a), (_, b) in zip(s_full.state_dict().items(), s_resumed.state_dict().items()):
        assert torch.equal(a, b), n


def test_resume_with_other_settings_is_refused(tmp_path):
    student, teacher = pruned("llama")
    run(copy.deepcopy(student), teacher, loss="ce", steps=2, save_every=1, resume_dir=tmp_path)
    with pytest.raises(ConfigError, match="other settings"):
        run(student, teacher, loss="ce", steps=2, lr=5e-3, save_every=1, resume_dir=tmp_path)


def test_output_is_a_compressed_checkpoint(tmp_path):
    import sparseforge

    student, teacher = pruned("llama", "2:4")
    names = pruned_layers(student)
    run(student, teacher, loss="squarehead", out=tmp_path / "out")
    loaded = sparseforge.load(tmp_path / "out")
    block = loaded.config.sparsity_config
    assert block["finetune"]["loss"] == "squarehead=1"
    assert sorted(block["targets"]) == sorted(f"{n}.weight" for n in names)
    for n in names:
        assert torch.equal(weight_2d(dict(loaded.named_modules())[n]), weight_2d(dict(student.named_modules())[n]))
    with pytest.raises(ConfigError, match="already exists"):
        run(pruned("llama")[0], teacher, out=tmp_path / "out")


def test_bad_input_errors():
    student, teacher = pruned("llama")
    other_vocab = tiny_model("llama")
    other_vocab.resize_token_embeddings(VOCAB + 8)
    with pytest.raises(ModelError, match="different vocabularies"):
        run(copy.deepcopy(student), other_vocab, loss="kd")
    import transformers as t

    deeper = t.LlamaForCausalLM(t.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    with pytest.raises(ModelError, match="different layer counts"):
        run(copy.deepcopy(student), deeper, loss="squarehead")
    with pytest.raises(ModelError, match="no pruned layer"):
        run(tiny_model("llama"), teacher, loss="squarehead")
    with pytest.raises(DataError, match="fewer than one sequence"):
        run(copy.deepcopy(student), teacher, data=DATA[:10])
    with pytest.raises(ConfigError, match="distils from a teacher"):
        run(copy.deepcopy(student), None, loss="squarehead")


def test_encoder_squarehead_keeps_mask_and_refuses_ce():
    student, teacher = pruned("bert")
    names = pruned_layers(student)
    before = zeros(student, names)
    with pytest.raises(ConfigError, match="encoder"):
        run(copy.deepcopy(student), teacher, loss="ce", kind="encoder")
    run(student, teacher, loss="squarehead", kind="encoder")
    assert all(torch.equal(before[n], zeros(student, names)[n]) for n in names)


@pytest.mark.parametrize("fmt", ["csr", "bitmap"])
def test_sparse_compute_matches_dense_masked_training(fmt, tmp_path):
    """On the native sparse kernels: the same mask, the same result as masked dense training (to float rounding)."""
    s_dense, teacher = pruned("llama")
    s_sparse = copy.deepcopy(s_dense)
    names = pruned_layers(s_dense)
    dense = run(s_dense, teacher, loss="ce+squarehead", grad_clip=None)
    sparse = run(s_sparse, copy.deepcopy(teacher), loss="ce+squarehead", grad_clip=None, compute=fmt)
    assert all(type(dict(s_sparse.named_modules())[n]) is torch.nn.Linear for n in names)  # dense Linear again
    for n in names:
        a, b = weight_2d(dict(s_dense.named_modules())[n]), weight_2d(dict(s_sparse.named_modules())[n])
        assert torch.equal(a == 0, b == 0)
        assert torch.allclose(a, b, atol=1e-4), n
    assert dense.losses == pytest.approx(sparse.losses, rel=1e-4)


def test_sparse_compute_resume_is_exact(tmp_path):
    cfg = dict(loss="ce", steps=4, save_every=2, compute="csr")
    s_full, teacher = pruned("llama")
    s_part = copy.deepcopy(s_full)
    full = run(s_full, teacher, **cfg)

    def stop(info):
        if info.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(s_part, teacher, resume_dir=tmp_path, callback=stop, **cfg)
    s_resumed, _ = pruned("llama")
    resumed = run(s_resumed, teacher, resume_dir=tmp_path, **cfg)
    assert resumed.resumed_from == 2 and resumed.losses == full.losses
    for (n, a), (_, b) in zip(s_full.state_dict().items(), s_resumed.state_dict().items()):
        assert torch.equal(a, b), n


def test_checkpoint_mask_must_match_the_weights():
    student, teacher = pruned("llama", "2:4")
    names = pruned_layers(student)
    student.config.sparsity_config = {"pattern": "2:4", "targets": [f"{n}.weight" for n in names]}
    with torch.no_grad():
        weight_2d(dict(student.named_modules())[names[0]])[0, :4] = 1.0  # 4 of 4 kept: not 2:4
    with pytest.raises(ModelError, match="does not obey the checkpoint's pattern 2:4"):
        run(copy.deepcopy(student), teacher)
    with torch.no_grad():
        weight_2d(dict(student.named_modules())[names[0]]).fill_(1.0)
    with pytest.raises(ModelError, match="listed as pruned .* but has no zeros"):
        run(student, teacher)


def test_recorded_layers_keep_their_zeros_below_min_sparsity():
    student, teacher = pruned("llama", sparsity=0.05)  # below the 10 % detection threshold
    assert not pruned_layers(student)
    names = [n for n in linear_layers(student) if ".layers." in n]
    student.config.sparsity_config = {"pattern": "unstructured", "targets": [f"{n}.weight" for n in names]}
    before = zeros(student, names)
    result = run(student, teacher)
    assert result.pruned == names and all(torch.equal(before[n], zeros(student, names)[n]) for n in names)


def test_refused_runs_leave_the_model_untouched(tmp_path):
    student, teacher = pruned("gpt2")
    run(copy.deepcopy(student), teacher, loss="ce", steps=1, save_every=1, resume_dir=tmp_path)
    with pytest.raises(ConfigError, match="other settings"):
        run(student, teacher, loss="ce", steps=2, save_every=1, resume_dir=tmp_path)
    with pytest.raises(ConfigError, match="nn.Linear"):  # GPT-2's Conv1D layers cannot run on the sparse kernels
        run(student, teacher, loss="ce", compute="csr")
    assert not any(hasattr(m, "weight_mask") for m in student.modules())
    student(input_ids=DATA[:16][None]).logits.sum().backward()  # no gradient-masking hook left behind
    names = pruned_layers(student)
    layer = dict(student.named_modules())[names[0]]
    assert bool((layer.weight.grad[layer.weight == 0] != 0).any())
