"""The native decode engine gives transformers' ``generate`` tokens: dense, bf16, sparse, int8, Qwen2, GQA, tied."""

from __future__ import annotations

import copy

import pytest
import torch

import sparseforge as sf
from sparseforge.errors import ConfigError, ModelError
from sparseforge.generation.engine import DecodeEngine, check_supported, unsupported_reason
from sparseforge.generation.fuse import FusedSlice
from sparseforge.generation.loop import native_generate
from sparseforge.generation.sampling import Sampling
from sparseforge.nn.sparse_linear import SparseLinear
from sparseforge.runtime.compress import compress_
from tiny_models import VOCAB, tiny_model, tokens

NEW = 20


def _hf_greedy(model, ids, new=NEW):
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, pad_token_id=0)


def _sparse(model, pattern="2:4", dtype=None):
    model = copy.deepcopy(model)
    sf.sparsify_(model, sf.SparsifyConfig(method="magnitude", pattern=pattern), progress=False)
    compress_(model, format="rule", dtype=dtype)
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert layers and (dtype is None or all(m.weight_format.dtype == dtype for m in layers))
    return model


def _tiny_llama(**overrides):
    import transformers as t

    torch.manual_seed(5)
    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=64, vocab_size=VOCAB)
    cfg.update(overrides)
    return t.LlamaForCausalLM(t.LlamaConfig(**cfg)).eval()


CASES = {
    "llama dense fp32 (GQA 4/2)": lambda: tiny_model("llama", seed=3),
    "llama multi-head (4/4)": lambda: _tiny_llama(num_key_value_heads=4),
    "llama tied embeddings": lambda: _tiny_llama(tie_word_embeddings=True),
    "llama3 rope scaling": lambda: _tiny_llama(rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
    "llama biases + swiglu bias": lambda: _tiny_llama(attention_bias=True, mlp_bias=True),
    "qwen2 (q/k/v biases)": lambda: tiny_model("qwen2", seed=3),
    "mistral": lambda: tiny_model("mistral", seed=3),
    "llama 2:4 SparseLinear": lambda: _sparse(tiny_model("llama", seed=3)),
    "llama 2:4 int8 SparseLinear": lambda: _sparse(tiny_model("llama", seed=3), dtype=torch.int8),
    "qwen2 unstructured int8": lambda: _sparse(tiny_model("qwen2", seed=3), pattern="unstructured", dtype=torch.int8),
    "llama bf16": lambda: tiny_model("llama", seed=3).to(torch.bfloat16),
    "qwen2 bf16": lambda: tiny_model("qwen2", seed=1).to(torch.bfloat16),
    "llama 2:4 SparseLinear, bf16 model": lambda: _sparse(tiny_model("llama", seed=3)).to(torch.bfloat16),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("attention", ["native", "sdpa"])
def test_greedy_tokens_equal_transformers_generate(case, attention):
    model = CASES[case]()
    ids = tokens(1, 7, seed=2)
    expected = _hf_greedy(model, ids)
    got = native_generate(model, ids, max_new_tokens=NEW, min_new_tokens=NEW, attention=attention)
    assert got.shape == (1, 7 + NEW) and got.dtype == torch.long
    assert torch.equal(got, expected), (got - expected).abs().sum()
    assert isinstance(model.model.layers[0].self_attn.q_proj, FusedSlice)  # fused in place by default


def test_unfused_projections_give_the_same_tokens():
    model = _sparse(tiny_model("llama", seed=3))
    ids = tokens(1, 5, seed=4)
    assert torch.equal(native_generate(model, ids, max_new_tokens=NEW, min_new_tokens=NEW, fuse=False), _hf_greedy(model, ids))
    assert isinstance(model.model.layers[0].self_attn.q_proj, SparseLinear)


def _teacher_forced_logits(model, engine, ids):
    """Engine logits at every position after the prompt's first 3 tokens, and the model's own forward logits."""
    with torch.inference_mode():
        full = model(ids).logits[0].float()  # (T, vocab)
    got = [engine.prefill(ids[:, :3])]
    for t in range(3, ids.shape[1]):
        got.append(engine.step(int(ids[0, t])))
    return torch.stack(got[:-1]), full[2:-1]


def test_fp32_step_logits_match_the_models_forward_closely():
    model = tiny_model("qwen2", seed=1)
    ids = tokens(1, 24, seed=6)
    got, expected = _teacher_forced_logits(model, DecodeEngine(copy.deepcopy(model), 32), ids)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["llama dense fp32 (GQA 4/2)", "llama biases + swiglu bias", "qwen2 (q/k/v biases)",
                                  "llama 2:4 int8 SparseLinear"])
def test_float32_steps_run_as_native_glue_calls_and_match_the_torch_op_step(case):
    """A float32 model with native attention and fused projections steps through the native glue (RMSNorm with the
    residual add, rotary + KV write, SwiGLU: csrc/decode_glue.h); its logits are those of the same step as torch ops
    to float32 rounding, and its greedy tokens are theirs."""
    model = CASES[case]()
    glued, plain = DecodeEngine(copy.deepcopy(model), 40), DecodeEngine(copy.deepcopy(model), 40)
    assert glued._glued is not None
    plain._glued = None  # the torch-op step of the same engine
    ids = tokens(1, 30, seed=8)
    a, _ = _teacher_forced_logits(model, glued, ids)
    b, _ = _teacher_forced_logits(model, plain, ids)
    torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-6)
    greedy = native_generate(copy.deepcopy(model), ids[:, :4], max_new_tokens=12, min_new_tokens=12)
    assert torch.equal(greedy, _hf_greedy(model, ids[:, :4], new=12))


@pytest.mark.parametrize("case", ["llama bf16", "qwen2 bf16", "llama 2:4 SparseLinear, bf16 model"])
def test_bf16_steps_with_native_attention_run_as_native_glue_calls_and_round_like_the_torch_op_step(case):
    """A bfloat16 model with native attention steps through the bf16 glue, which rounds where the torch-op step (and the
    model) rounds: logits within a few bf16 steps of the torch-op step's, and the same greedy tokens."""
    model = CASES[case]()
    glued = DecodeEngine(copy.deepcopy(model), 40, attention="native")
    plain = DecodeEngine(copy.deepcopy(model), 40, attention="native")
    assert glued._glued is not None
    plain._glued = None
    ids = tokens(1, 30, seed=8)
    a, expected = _teacher_forced_logits(model, glued, ids)
    b, _ = _teacher_forced_logits(model, plain, ids)
    assert (a - b).abs().max() <= 0.02 * b.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.95
    greedy = native_generate(copy.deepcopy(model), ids[:, :4], max_new_tokens=12, min_new_tokens=12, attention="native")
    assert torch.equal(greedy, _hf_greedy(model, ids[:, :4], new=12))


@pytest.mark.parametrize("why,build,kwargs", [
    ("bf16 model with SDPA (auto)", lambda: tiny_model("llama", seed=3).to(torch.bfloat16), {}),
    ("sdpa attention", lambda: tiny_model("llama", seed=3), {"attention": "sdpa"}),
    ("unfused projections", lambda: tiny_model("llama", seed=3), {"fuse": False}),
    ("gelu activation", lambda: _tiny_llama(hidden_act="gelu"), {}),
])
def test_other_steps_keep_their_torch_ops(why, build, kwargs):
    model = build()
    engine = DecodeEngine(copy.deepcopy(model), 40, **kwargs)
    assert engine._glued is None, why
    ids = tokens(1, 6, seed=2)
    assert torch.equal(native_generate(model, ids, max_new_tokens=8, min_new_tokens=8, **kwargs), _hf_greedy(model, ids, new=8))


def test_bf16_model_step_logits_match_within_bf16_rounding():
    model = tiny_model("llama", seed=1).to(torch.bfloat16)
    ids = tokens(1, 24, seed=6)
    engine = DecodeEngine(copy.deepcopy(model), 32)
    assert engine.dtype == torch.bfloat16 and engine._layers[0].keys.dtype == torch.bfloat16
    got, expected = _teacher_forced_logits(model, engine, ids)
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= 0.05 * scale
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9


# ---- sampling ------------------------------------------------------------------------------------------------


def test_sampling_is_reproducible_by_seed_and_differs_between_seeds():
    model = tiny_model("llama", seed=3)
    ids = tokens(1, 4, seed=1)
    runs = [native_generate(model, ids, max_new_tokens=16, min_new_tokens=16,
                            sampling=Sampling(temperature=1.5, seed=s)) for s in (11, 11, 12)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])  # 16 draws over 96 tokens at temperature 1.5


def test_sampling_draws_the_tokens_transformers_draws_with_the_same_seed():
    model = tiny_model("llama", seed=3)
    ids = tokens(1, 4, seed=1)
    torch.manual_seed(21)
    with torch.inference_mode():
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12,
                                  do_sample=True, temperature=0.7, top_k=20, top_p=0.9, pad_token_id=0)
    got = native_generate(model, ids, max_new_tokens=12, min_new_tokens=12, fuse=False,
                          sampling=Sampling(temperature=0.7, top_k=20, top_p=0.9, seed=21))
    assert torch.equal(got, expected)


def test_top_k_one_and_a_tiny_top_p_are_greedy():
    model = tiny_model("mistral", seed=2)
    ids = tokens(1, 5, seed=3)
    greedy = native_generate(model, ids, max_new_tokens=10, min_new_tokens=10)
    for sampling in (Sampling(temperature=2.0, top_k=1, seed=1), Sampling(temperature=2.0, top_p=1e-6, seed=1)):
        assert torch.equal(native_generate(model, ids, max_new_tokens=10, min_new_tokens=10, sampling=sampling), greedy)


# ---- the loop: eos, min_new_tokens, streamer -----------------------------------------------------------------


class _Recorder:
    def __init__(self):
        self.calls = []

    def put(self, value):
        self.calls.append(("put", value.tolist()))

    def end(self):
        self.calls.append(("end", None))


def test_streamer_sees_the_prompt_then_each_token_then_end_like_transformers():
    model = tiny_model("llama", seed=3)
    ids = tokens(1, 4, seed=1)
    ours, theirs = _Recorder(), _Recorder()
    native_generate(model, ids, max_new_tokens=5, min_new_tokens=5, streamer=ours)
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5, do_sample=False,
                       pad_token_id=0, streamer=theirs)
    assert ours.calls == theirs.calls and len(ours.calls) == 7


def test_generation_stops_after_the_end_token_and_min_new_tokens_masks_it():
    model = tiny_model("llama", seed=3)
    ids = tokens(1, 4, seed=1)
    free = native_generate(model, ids, max_new_tokens=12, min_new_tokens=12)[0, 4:].tolist()
    eos = free[3]
    stopped = native_generate(model, ids, max_new_tokens=12, eos_token_id=eos)[0, 4:].tolist()
    assert stopped == free[:free.index(eos) + 1]
    other = next(i for i in range(VOCAB) if i not in free)
    held = native_generate(model, ids, max_new_tokens=12, min_new_tokens=12, eos_token_id=[eos, other])[0, 4:].tolist()
    assert eos not in held and other not in held and len(held) == 12
    with torch.inference_mode():
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                  eos_token_id=eos, pad_token_id=0)[0, 4:].tolist()
    assert stopped == expected


# ---- what the engine refuses ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "opt", "gpt_neox"])
def test_other_families_get_a_one_line_model_error(family):
    model = tiny_model(family)
    assert family in unsupported_reason(model)
    with pytest.raises(ModelError, match=f"does not support model type '{family}'.*engine='transformers'") as info:
        native_generate(model, tokens(1, 3), max_new_tokens=2)
    assert "\n" not in str(info.value)


def test_unsupported_parts_are_named():
    dynamic = _tiny_llama(rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    assert "rope type 'dynamic'" in unsupported_reason(dynamic)
    hooked = tiny_model("llama")
    hooked.model.layers[1].mlp.register_forward_hook(lambda *a: None)
    assert unsupported_reason(hooked) == "model.layers.1.mlp has forward hooks the engine would not run"
    replaced = tiny_model("llama")
    replaced.model.layers[0].mlp = torch.nn.Identity()
    assert "model.layers.0.mlp is a Identity" in unsupported_reason(replaced)
    for model in (dynamic, hooked, replaced):
        with pytest.raises(ModelError):
            check_supported(model)
    assert unsupported_reason(tiny_model("qwen2")) is None


def test_bad_calls_are_refused():
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="one prompt"):
        native_generate(model, tokens(2, 3), max_new_tokens=2)
    with pytest.raises(ModelError, match="exceed the model's context of 64"):
        native_generate(model, tokens(1, 60), max_new_tokens=8)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        native_generate(model, tokens(1, 3), max_new_tokens=0)
    with pytest.raises(ConfigError, match="min_new_tokens"):
        native_generate(model, tokens(1, 3), max_new_tokens=2, min_new_tokens=3)
    with pytest.raises(ConfigError, match="attention"):
        DecodeEngine(model, 8, attention="flash")
    engine = DecodeEngine(model, 4)
    engine.prefill(tokens(1, 3))
    engine.step(5)
    with pytest.raises(ConfigError, match="KV cache is full"):
        engine.step(5)


def test_a_sliding_window_shorter_than_the_generation_is_refused():
    import transformers as t

    torch.manual_seed(0)
    cfg = t.MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=64, vocab_size=VOCAB, sliding_window=8)
    model = t.MistralForCausalLM(cfg).eval()
    with pytest.raises(ModelError, match="sliding attention window of 8"):
        native_generate(model, tokens(1, 5), max_new_tokens=6)
    assert native_generate(model, tokens(1, 5), max_new_tokens=3).shape == (1, 8)


# ---- how projections are called ------------------------------------------------------------------------------


def test_plain_layers_take_the_bound_entry_points():
    for model in (tiny_model("llama", seed=3), _sparse(tiny_model("llama", seed=3), dtype=torch.int8)):
        engine = DecodeEngine(model, 16)
        assert engine.call_paths == {"bound": 2 * 4 + 1}  # fused q/k/v, o, fused gate/up, down per layer; lm_head


def test_int8_activation_layers_are_bound_in_their_mode_and_decode_like_generate():
    from sparseforge.runtime.compress import set_activation_precision_

    model = _sparse(tiny_model("llama", seed=3), dtype=torch.int8)
    set_activation_precision_(model, "int8")
    ids = tokens(1, 6, seed=2)
    expected = _hf_greedy(model, ids, 8)
    engine = DecodeEngine(model, 16)
    assert engine.call_paths == {"bound": 2 * 4 + 1}  # int8 activations through BoundLinear, not module calls
    assert torch.equal(native_generate(model, ids, max_new_tokens=8, min_new_tokens=8), expected)


class _Rounding(SparseLinear):
    """A SparseLinear whose forward computes differently (stands for another compute mode)."""

    def forward(self, x):
        return super().forward(x).round()


def test_a_layer_that_computes_differently_or_has_hooks_is_called_as_a_module():
    model = _sparse(tiny_model("llama", seed=3))
    ids = tokens(1, 6, seed=2)
    down = model.model.layers[0].mlp.down_proj
    down.__class__ = _Rounding
    calls = []
    model.model.layers[1].self_attn.o_proj.register_forward_hook(lambda *a: calls.append(1))
    expected = _hf_greedy(model, ids, 8)
    calls.clear()
    engine = DecodeEngine(model, 14)
    assert engine.call_paths == {"bound": 7, "module": 2}
    got = native_generate(model, ids, max_new_tokens=8, min_new_tokens=8)
    assert torch.equal(got, expected)
    assert len(calls) == 1 + 7  # the hook runs: in the prefill forward, then at each of the 7 decode steps


def test_a_bf16_model_binds_its_sparse_layers_and_decodes_like_generate():
    from sparseforge.generation.engine import CastBound

    model = _sparse(tiny_model("llama", seed=3)).to(torch.bfloat16)
    ids = tokens(1, 6, seed=2)
    expected = _hf_greedy(model, ids, 8)
    engine = DecodeEngine(model, 16, bf16_gemv=False)
    assert engine.call_paths == {"bound": 2 * 4 + 1}  # every sparse projection through CastBound; the dense lm_head
    assert all(isinstance(p.down, CastBound) and isinstance(p.gate_up, CastBound) for p in engine._layers)
    x = torch.randn(1, model.config.intermediate_size).bfloat16()
    down = model.model.layers[0].mlp.down_proj
    with torch.inference_mode():
        assert torch.equal(engine._layers[0].down(x), down(x))  # bitwise the layer's own forward
    assert torch.equal(native_generate(model, ids, max_new_tokens=8, min_new_tokens=8, bf16_gemv=False), expected)


def test_hooks_on_fused_members_run():
    from sparseforge.generation.fuse import fuse_projections_

    model = tiny_model("llama", seed=3)
    ids = tokens(1, 5, seed=2)
    expected = _hf_greedy(model, ids, 6)
    fuse_projections_(model)
    seen = []
    model.model.layers[0].self_attn.k_proj.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    got = native_generate(model, ids, max_new_tokens=6, min_new_tokens=6)
    assert torch.equal(got, expected)
    assert seen == [(1, 5, 16)] + [(1, 16)] * 5  # prefill, then each decode step: k_proj's own (kv_heads * head_dim) slice


def test_auto_attention_is_native_for_float32_and_sdpa_for_bf16():
    assert DecodeEngine(tiny_model("llama"), 8).attention == "native"
    assert DecodeEngine(tiny_model("llama").to(torch.bfloat16), 8).attention == "sdpa"
    assert DecodeEngine(tiny_model("llama").to(torch.bfloat16), 8, attention="native").attention == "native"


def test_activation_sparse_layers_are_bound_and_decode_as_generate():
    from sparseforge.activation import ActivationSparsityConfig, column_sparse_, sparsify_activations_
    from sparseforge.config import CalibrationConfig

    model = tiny_model("llama", seed=3)
    ids = tokens(1, 6, seed=2)
    calib = tokens(4, 16, seed=5)
    sparsify_activations_(model, ActivationSparsityConfig(sparsity=0.5, calibration=CalibrationConfig(batch_size=2)),
                          calibration=calib, progress=False)
    for variant in ("teal", "column"):
        if variant == "column":
            column_sparse_(model)  # the same thresholds over column bitmap weights
        expected = _hf_greedy(model, ids, 8)
        engine = DecodeEngine(model, 14, fuse=False)
        assert engine.call_paths == {"bound": 7 * 2 + 1}, variant  # every projection bound; the dense lm_head
        assert torch.equal(native_generate(model, ids, max_new_tokens=8, min_new_tokens=8, fuse=False), expected), variant
    first = model.model.layers[0].self_attn.q_proj
    first.track_sparsity = True  # the forward counts skipped channels: the layer is called as a module
    assert DecodeEngine(model, 14, fuse=False).call_paths == {"bound": 7 * 2, "module": 1}


def test_a_torch_lm_head_runs_on_the_kernels_threads_inside_sparse_threads():
    """kernels.sparse_threads(2) leaves torch one thread: the engine's dense lm_head gets the kernels' two, the
    other projections keep one; the tokens stay those of generate."""
    from sparseforge import kernels

    model = tiny_model("llama", seed=3)
    ids = tokens(1, 6)
    expected = _hf_greedy(model, ids, new=4)
    head_threads, proj_threads = [], []
    model.lm_head.register_forward_pre_hook(lambda m, args: head_threads.append(torch.get_num_threads()))
    model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda m, args: proj_threads.append(torch.get_num_threads()))
    with kernels.sparse_threads(2):
        out = native_generate(model, ids, max_new_tokens=4, min_new_tokens=4)
        assert torch.get_num_threads() == 1
    assert torch.equal(out, expected)
    assert head_threads[0] == 1 and set(head_threads[1:]) == {2}  # the prompt's call is the model's own forward
    assert proj_threads and set(proj_threads) == {1}
