"""Tests for the shipped built-in model (sparseforge.io.builtin, assets/builtin-llama)."""

from __future__ import annotations

import importlib
import json
import math

import pytest

from sparseforge.io import builtin
from sparseforge.io.builtin import BUILTIN_MODEL_NAME, builtin_model_path

# The held-out PPL bound is the value measured at training time (recorded in
# assets/builtin-llama/training_log.json and README.md) times this slack factor.
PPL_SLACK = 1.2


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def torch():
    t = importlib.import_module("torch")
    t.set_num_threads(min(2, t.get_num_threads()))
    return t


@pytest.fixture(scope="module")
def tokenizer():
    transformers = importlib.import_module("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(builtin_model_path()), local_files_only=True)


@pytest.fixture(scope="module")
def model(torch):
    transformers = importlib.import_module("transformers")
    m = transformers.AutoModelForCausalLM.from_pretrained(str(builtin_model_path()), local_files_only=True)
    m.eval()
    return m


def test_path_and_name():
    assert BUILTIN_MODEL_NAME == "builtin"
    p = builtin_model_path()
    assert p.is_dir() and p.name == "builtin-llama"
    assert p.parent.name == "assets"
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "README.md", "training_log.json"):
        assert (p / f).is_file(), f
    assert not any(n.name.endswith(".bin") for n in p.iterdir())


def test_missing_model_raises_clear_error(monkeypatch):
    monkeypatch.setattr(builtin, "BUILTIN_MODEL_DIRNAME", "no-such-model")
    with pytest.raises(FileNotFoundError, match="built-in model not found"):
        builtin.builtin_model_path()


def test_config_matches_spec():
    cfg = json.loads((builtin_model_path() / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    assert cfg["vocab_size"] == 4096
    assert cfg["hidden_size"] == 256
    assert cfg["num_hidden_layers"] == 6
    assert cfg["num_attention_heads"] == 4
    assert cfg["intermediate_size"] == 768
    assert cfg["tie_word_embeddings"] is True
    assert cfg["max_position_embeddings"] == 512


def test_tokenizer_loads_offline(tokenizer):
    assert len(tokenizer) == 4096
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.bos_token == "<|endoftext|>"
    assert tokenizer.pad_token == "<|pad|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    text = "To be, or not to be: that is the question."
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text  # byte-level BPE round-trips
    assert len(ids) < len(text) / 2
    assert tokenizer.decode(tokenizer("naïve — ünïcode ✓")["input_ids"]) == "naïve — ünïcode ✓"


@pytest.mark.slow
def test_model_loads_and_forward_is_finite(torch, model, tokenizer):
    n = sum(p.numel() for p in model.parameters())
    assert 5_000_000 < n < 8_000_000
    assert next(model.parameters()).dtype == torch.float32
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    batch = tokenizer(["Shall I compare thee to a summer's day?", "Now is the winter"],
                      return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        out = model(**batch, labels=labels)
    assert out.logits.shape == (2, batch["input_ids"].shape[1], 4096)
    assert torch.isfinite(out.logits).all()
    assert math.isfinite(out.loss.item())
    assert out.loss.item() < math.log(4096)  # better than uniform


def _training_log() -> dict:
    return json.loads((builtin_model_path() / "training_log.json").read_text())


@pytest.mark.slow
def test_heldout_perplexity_bound(model, tokenizer):
    from sparseforge.evaluation.quality import perplexity

    measured = float(_training_log()["heldout_ppl"])
    result = perplexity(model, tokenizer, progress=False)  # the project's protocol, its defaults
    assert (result.windows, result.tokens) == (64, 64 * 255)
    ppl = result.ppl
    # Same weights + same protocol => essentially the measured value; allow 20% for
    # kernel/library differences. It must also be far below vocab size (uniform = 4096).
    assert ppl < PPL_SLACK * measured
    assert ppl > measured / PPL_SLACK
    assert ppl < 4096 / 20


def test_log_and_card_describe_the_evaluation_stream(torch, tokenizer):
    """The card's numbers are over data.corpus_token_ids(heldout); its default windows are all Hamlet."""
    from sparseforge.data import corpus

    from sparseforge.data import calibration as data
    held = data.corpus_token_ids(tokenizer, "heldout")  # (n,)
    log = _training_log()
    assert log["n_heldout_tokens"] == held.numel()
    card = (builtin_model_path() / "README.md").read_text()
    assert f"Over all {held.numel() // 256} windows" in card
    assert f"**{log['heldout_ppl']:.2f}**" in card and f"**{log['heldout_ppl_all_windows']:.2f}**" in card
    assert "sparseforge.evaluation.quality.perplexity" in card
    # 64 windows of 256 tokens read exactly the first tokens of Hamlet, tokenised on its own
    hamlet = data.encode(tokenizer, corpus.load_work("hamlet"))
    assert corpus.list_works("heldout")[0] == "hamlet" and hamlet.numel() > 64 * 256
    assert torch.equal(held[: 64 * 256], hamlet[: 64 * 256])

