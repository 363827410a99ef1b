"""``sparseforge generate`` and ``sparseforge.generation.generate``: text, streaming, timings, errors."""

from __future__ import annotations

import io

import pytest
import torch

import sparseforge as sf
import sparseforge.generation.text as text_module
from sparseforge.cli import main
from sparseforge.errors import ConfigError, ModelError
from sparseforge.generation import GenerationSettings, generate, load_causal_lm
from sparseforge.nn.sparse_linear import SparseLinear

PROMPT = "To be, or not to be"


@pytest.fixture(scope="module")
def builtin():
    model, tokenizer, sparse = load_causal_lm("builtin")
    assert not sparse
    return model, tokenizer


@pytest.fixture(scope="module")
def compressed_dir(tmp_path_factory, builtin):
    model, _, _ = load_causal_lm("builtin")  # a fresh copy: generate() fuses the shared one in place
    sf.sparsify_(model, sf.SparsifyConfig(method="magnitude", pattern="2:4"), progress=False)
    return sf.save_pretrained(model, tmp_path_factory.mktemp("gen") / "pruned", tokenizer=builtin[1])


def _plain_greedy(model, tokenizer, new):
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def test_streamed_text_is_the_result_and_the_tokens_are_plain_generates(builtin):
    model, tokenizer = builtin
    expected = _plain_greedy(model, tokenizer, 12)
    sink = io.StringIO()
    result = generate(model, PROMPT, tokenizer=tokenizer, max_new_tokens=12, ignore_eos=True, stream=sink, threads=1)
    assert result.token_ids == expected
    assert result.new_tokens == 12 and result.prompt_tokens == len(tokenizer(PROMPT).input_ids)
    assert result.text == tokenizer.decode(expected, skip_special_tokens=True)
    assert sink.getvalue() == result.text + "\n"
    assert result.prefill_s > 0 and result.decode_s > 0
    assert result.decode_tokens_per_s == pytest.approx(11 / result.decode_s)
    assert result.engine == "native" and not result.notes  # auto: the builtin Llama runs on the native engine
    assert "decode" in result.summary() and "native engine" in result.summary()


def test_plain_and_lean_paths_agree_on_a_fresh_model():
    lean = generate("builtin", PROMPT, max_new_tokens=10, ignore_eos=True, lean=True, engine="transformers")
    plain = generate("builtin", PROMPT, max_new_tokens=10, ignore_eos=True, lean=False, engine="transformers")
    native = generate("builtin", PROMPT, max_new_tokens=10, ignore_eos=True, engine="native")
    assert lean.token_ids == plain.token_ids == native.token_ids and lean.lean and not plain.lean
    assert (lean.engine, plain.engine, native.engine) == ("transformers", "transformers", "native")
    assert "transformers generate (lean path)" in lean.summary() and "native engine" in native.summary()


def test_native_sampling_follows_top_p_and_the_seed(builtin):
    model, tokenizer = builtin
    runs = [generate(model, PROMPT, tokenizer=tokenizer, max_new_tokens=12, temperature=1.2, top_p=0.9, seed=s,
                     ignore_eos=True, engine="native").token_ids for s in (3, 3, 4)]
    assert runs[0] == runs[1] != runs[2]
    greedy = generate(model, PROMPT, tokenizer=tokenizer, max_new_tokens=12, ignore_eos=True).token_ids
    assert generate(model, PROMPT, tokenizer=tokenizer, max_new_tokens=12, temperature=1.2, top_p=1e-6,
                    ignore_eos=True).token_ids == greedy


def test_auto_engine_names_why_it_falls_back_and_native_refuses_what_it_cannot_run():
    from sparseforge.attention import Quest
    from sparseforge.generation.text import choose_engine
    from tiny_models import tiny_model

    gpt2, llama = tiny_model("gpt2"), tiny_model("llama")
    engine, why = choose_engine(gpt2, "auto")
    assert engine == "transformers" and "model type 'gpt2'" in why
    assert choose_engine(llama, "auto") == ("native", None)
    assert choose_engine(llama, "auto", kv_policy=Quest(budget=64))[0] == "transformers"
    assert choose_engine(llama, "transformers") == ("transformers", None)
    with pytest.raises(ModelError, match="does not support model type 'gpt2'"):
        choose_engine(gpt2, "native")
    with pytest.raises(ConfigError, match="paged cache"):
        choose_engine(llama, "native", kv_policy=Quest(budget=64))
    with pytest.raises(ConfigError, match="engine must be one of"):
        choose_engine(llama, "vllm")


def test_a_compressed_checkpoint_runs_sparse_and_gives_the_dense_tokens(compressed_dir):
    model, tokenizer, sparse = load_causal_lm(compressed_dir)
    assert sparse and any(isinstance(m, SparseLinear) for m in model.modules())
    dense_model, _, dense_flag = load_causal_lm(compressed_dir, sparse=False)
    assert not dense_flag and not any(isinstance(m, SparseLinear) for m in dense_model.modules())
    got = generate(model, PROMPT, tokenizer=tokenizer, max_new_tokens=12, ignore_eos=True)
    assert got.token_ids == _plain_greedy(dense_model, tokenizer, 12)


def test_sampling_is_reproducible_by_seed(builtin):
    model, tokenizer = builtin
    runs = [generate(model, PROMPT, tokenizer=tokenizer, max_new_tokens=16, temperature=1.5, top_k=0, seed=s,
                     ignore_eos=True).token_ids for s in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]  # 16 tokens drawn at temperature 1.5 over 4096: a repeat is vanishingly unlikely


def test_generation_stops_at_the_end_of_text_token_unless_told_otherwise(builtin, monkeypatch):
    model, tokenizer = builtin
    first = generate(model, PROMPT, tokenizer=tokenizer, max_new_tokens=1).token_ids[0]
    monkeypatch.setattr(model.generation_config, "eos_token_id", first)
    assert generate(model, PROMPT, tokenizer=tokenizer, max_new_tokens=8).token_ids == [first]
    assert len(generate(model, PROMPT, tokenizer=tokenizer, max_new_tokens=8, ignore_eos=True).token_ids) == 8


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(temperature=-1.0), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-3), "top_k"), (dict(seed="x"), "seed"), (dict(top_p=0.0), "top_p"), (dict(top_p=2.0), "top_p"),
])
def test_bad_numbers_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        GenerationSettings(**kwargs)


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_an_empty_prompt_is_refused_before_loading(prompt, monkeypatch):
    monkeypatch.setattr(text_module, "load_causal_lm", pytest.fail)
    with pytest.raises(ConfigError, match="prompt is empty"):
        generate("builtin", prompt)


def test_a_prompt_longer_than_the_context_is_refused(builtin):
    model, tokenizer = builtin
    with pytest.raises(ConfigError, match="context of 512 tokens"):
        generate(model, PROMPT, tokenizer=tokenizer, max_new_tokens=510)


def test_an_encoder_and_a_missing_path_are_refused(tmp_path):
    with pytest.raises(ModelError, match="not a causal language model"):
        load_causal_lm("minilm")
    with pytest.raises(ModelError, match="does not exist"):
        generate(tmp_path / "nothing", PROMPT)


def test_a_loaded_model_needs_its_tokenizer(builtin):
    with pytest.raises(ConfigError, match="tokenizer"):
        generate(builtin[0], PROMPT)
    with pytest.raises(ConfigError, match="threads"):
        generate(builtin[0], PROMPT, tokenizer=builtin[1], threads=0)


def test_cli_streams_the_text_on_stdout_and_the_timings_on_stderr(capsys):
    assert main(["generate", "builtin", "--prompt", PROMPT, "--max-new-tokens", "6", "--ignore-eos", "--threads", "1"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(PROMPT) and len(out) > len(PROMPT)
    assert "6 new tokens" in err and "tokens/s" in err and "native engine" in err


def test_cli_engine_flag_picks_the_engine(capsys):
    assert main(["generate", "builtin", "--prompt", PROMPT, "--max-new-tokens", "3", "--ignore-eos", "--threads", "1",
                 "--engine", "transformers", "--no-lean"]) == 0
    assert capsys.readouterr().err.strip().endswith("transformers generate")
    assert main(["generate", "builtin", "--prompt", PROMPT, "--max-new-tokens", "3", "--ignore-eos", "--threads", "1",
                 "--kv-policy", "quest", "--kv-budget", "64"]) == 0
    err = capsys.readouterr().err
    assert "transformers engine: a KV policy needs transformers' paged cache" in err


@pytest.mark.parametrize("argv, message", [
    (["--prompt", ""], "prompt is empty"),
    (["--prompt", "x", "--max-new-tokens", "0"], "max_new_tokens"),
    (["--prompt", "x", "--greedy", "--temperature", "0.7"], "contradict"),
    (["--prompt", "x", "--threads", "0"], "--threads"),
    (["--prompt", "x", "--compile", "--no-lean"], "--compile"),
    (["--prompt", "x", "--kv-policy", "quest", "--compile"], "--kv-policy"),
    (["--prompt", "x", "--engine", "native", "--kv-policy", "quest"], "--engine transformers"),
    (["--prompt", "x", "--engine", "native", "--compile"], "--engine transformers"),
    (["--prompt", "x", "--kv-policy", "quest", "--kv-budget", "0"], "--kv-budget"),
    (["--prompt", "x", "--kv-policy", "streaming", "--kv-budget", "4"], "StreamingLLM"),
    (["--prompt", "x", "--attention", "native", "--engine", "transformers"], "--attention native"),
    (["--prompt", "x", "--attention", "sdpa", "--kv-policy", "quest"], "does not apply to the transformers engine"),
])
def test_cli_errors_are_one_line_before_any_loading(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(text_module, "load_causal_lm", pytest.fail)
    assert main(["generate", "builtin", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err and err.startswith("sparseforge generate: error:")


def test_cli_refuses_an_encoder_in_one_line(capsys):
    assert main(["generate", "minilm", "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "not a causal language model" in err


def test_a_kv_policy_covering_the_context_gives_the_dense_tokens_and_a_small_one_changes_them():
    from sparseforge.attention import Quest, StreamingLLM

    prompt = PROMPT * 6
    plain = generate("builtin", prompt, max_new_tokens=8, ignore_eos=True, lean=False)
    model, tokenizer, _ = load_causal_lm("builtin")
    covering = generate(model, prompt, tokenizer=tokenizer, max_new_tokens=8, ignore_eos=True,
                        kv_policy=Quest(budget=256, dense_layers=0))
    assert model.config._attn_implementation == "sparseforge"
    assert covering.token_ids == plain.token_ids
    narrow = generate("builtin", prompt, max_new_tokens=8, ignore_eos=True, kv_policy=StreamingLLM(sinks=1, window=3))
    assert narrow.token_ids != plain.token_ids


def test_a_kv_policy_is_refused_with_the_static_cache_and_when_not_a_policy():
    from sparseforge.attention import Quest
    from sparseforge.generation.lean import LeanConfig

    with pytest.raises(ConfigError, match="static"):
        generate("builtin", PROMPT, max_new_tokens=2, kv_policy=Quest(budget=64), lean=LeanConfig(compile=True))
    with pytest.raises(ConfigError, match="kv_policy must be"):
        generate("builtin", PROMPT, max_new_tokens=2, kv_policy="quest")


def test_cli_generates_with_a_kv_policy(capsys):
    assert main(["generate", "builtin", "--prompt", PROMPT, "--max-new-tokens", "4", "--ignore-eos", "--threads", "1",
                 "--kv-policy", "quest", "--kv-budget", "64"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(PROMPT) and len(out) > len(PROMPT) and "4 new tokens" in err


def test_attention_picks_the_native_engines_kernel_and_is_refused_elsewhere():
    """attention="sdpa" on the float32 built-in model decodes the tokens of the default native kernel here (the
    two differ only in summation order); a bad value and a transformers engine are refused."""
    native = generate("builtin", PROMPT, max_new_tokens=8, ignore_eos=True, engine="native", threads=1)
    sdpa = generate("builtin", PROMPT, max_new_tokens=8, ignore_eos=True, engine="native", attention="sdpa", threads=1)
    assert sdpa.engine == "native" and sdpa.token_ids == native.token_ids
    with pytest.raises(ConfigError, match="attention must be 'auto', 'native' or 'sdpa', got 'flash'"):
        generate("builtin", PROMPT, max_new_tokens=2, attention="flash")
    with pytest.raises(ConfigError, match="attention='native' chooses the native engine's decode attention"):
        generate("builtin", PROMPT, max_new_tokens=2, engine="transformers", attention="native")


def test_attention_reaches_the_decode_engine(builtin, monkeypatch):
    import sparseforge.generation.loop as loop_module

    seen = []
    real = loop_module.DecodeEngine
    monkeypatch.setattr(loop_module, "DecodeEngine", lambda *a, **kw: (seen.append(kw.get("attention")), real(*a, **kw))[1])
    model, tokenizer = builtin
    generate(model, PROMPT, tokenizer=tokenizer, max_new_tokens=2, ignore_eos=True, engine="native", attention="sdpa")
    assert seen == ["sdpa"]
