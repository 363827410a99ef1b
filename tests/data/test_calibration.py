import pytest
import torch
from hypothesis import given, settings, strategies as st

from sparseforge.config import CalibrationConfig
from sparseforge.data.calibration import calibration_tokens, corpus_token_ids, encode, iter_batches, source_text
from sparseforge.errors import DataError

import transformers


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models: extra threads only add sync overhead on a shared CPU (restored afterwards)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

# deterministic ASCII text with no repeated 8-byte substrings near the start, so windows identify their offset
TEXT = "".join(f"{i:05d} " for i in range(600))  # 3600 bytes


@pytest.fixture(scope="module")
def tokenizer():
    """Byte-level BPE without merges: token id sequence == byte sequence mapped through the vocab."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=257, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(["a"], trainer)
    # adds "<eos>" in front when special tokens are requested: calibration text must not get it
    tok.post_processor = processors.TemplateProcessing(single="<eos> $A", special_tokens=[("<eos>", tok.token_to_id("<eos>"))])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def cfg(source, **kw):
    return CalibrationConfig(source=str(source), **kw)


def test_shape_dtype_and_windows_are_contiguous_slices(tokenizer, text_file):
    ids = encode(tokenizer, TEXT)
    assert ids.numel() == len(TEXT)  # one token per byte, no special tokens added
    assert tokenizer(TEXT)["input_ids"][1:] == ids.tolist()  # (the tokenizer itself would add one)
    x = calibration_tokens(tokenizer, cfg(text_file, samples=16, seqlen=50, seed=3))
    assert x.shape == (16, 50) and x.dtype == torch.long
    for row in x:
        starts = [s for s in range(ids.numel() - 50 + 1) if torch.equal(ids[s : s + 50], row)]
        assert len(starts) == 1 and 0 <= starts[0] <= ids.numel() - 51


def test_same_seed_same_tensor_different_seed_differs(tokenizer, text_file):
    a = calibration_tokens(tokenizer, cfg(text_file, samples=8, seqlen=32, seed=0))
    b = calibration_tokens(tokenizer, cfg(text_file, samples=8, seqlen=32, seed=0))
    c = calibration_tokens(tokenizer, cfg(text_file, samples=8, seqlen=32, seed=1))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_seed_does_not_depend_on_global_rng(tokenizer, text_file):
    a = calibration_tokens(tokenizer, cfg(text_file, samples=4, seqlen=32))
    torch.manual_seed(1234)
    torch.rand(10)
    assert torch.equal(a, calibration_tokens(tokenizer, cfg(text_file, samples=4, seqlen=32)))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 80), seqlen=st.integers(1, 60), seed=st.integers(0, 2**31), samples=st.integers(1, 20))
def test_window_bounds(tokenizer, tmp_path_factory, n, seqlen, seed, samples):
    # text of n distinct-ish bytes; windows must lie inside [0, n - 1) (the last token is never a window end)
    text = "".join(chr(33 + (i % 90)) for i in range(n))
    path = tmp_path_factory.mktemp("w") / "t.txt"
    path.write_text(text)
    c = cfg(path, samples=samples, seqlen=seqlen, seed=seed)
    if n < seqlen + 1:
        with pytest.raises(DataError, match=f"has {n} tokens"):
            calibration_tokens(tokenizer, c)
        return
    x = calibration_tokens(tokenizer, c)
    ids = encode(tokenizer, text)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - seqlen, (samples,), generator=gen)
    assert starts.max() + seqlen <= n - 1
    expected = torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
    assert torch.equal(x, expected)


def test_directory_source_joins_txt_files_in_name_order(tokenizer, tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "skip.md").write_text("ignored")
    from sparseforge.data.corpus import DOC_SEPARATOR

    assert source_text(tmp_path) == "first" + DOC_SEPARATOR + "second"


def test_builtin_source_is_train_split():
    from sparseforge.data import corpus

    assert source_text("builtin") == corpus.load_text("train")


def test_builtin_tokenisation_is_cached_by_content(monkeypatch, tokenizer):
    from sparseforge.data import corpus

    # small stand-in corpus so the test is fast; different split names keep the real cache clean
    monkeypatch.setattr(corpus, "load_text", lambda split="train": f"{split} " + TEXT)
    calls = []
    real_encode = encode

    def counting_encode(tok, text):
        calls.append(text[:5])
        return real_encode(tok, text)

    import sparseforge.data.calibration as data

    monkeypatch.setattr(data, "encode", counting_encode)
    data._cached_corpus_ids.cache_clear()
    first = corpus_token_ids(tokenizer, "heldout")
    first[0] = -1  # callers get a copy
    second = corpus_token_ids(tokenizer, "heldout")
    import copy

    corpus_token_ids(copy.deepcopy(tokenizer), "heldout")  # equal content, other object: still cached
    tokenizer(["ab", "abc"], padding=True, truncation=True, max_length=2)  # leaves call-time state behind
    corpus_token_ids(tokenizer, "heldout")  # call-time padding/truncation state is not content
    assert calls == ["heldo"]
    assert torch.equal(second, real_encode(tokenizer, "heldout " + TEXT))
    data._cached_corpus_ids.cache_clear()


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda p: p / "missing.txt", "does not exist"),
        (lambda p: (p / "empty.txt").write_text("  \n") and p / "empty.txt", "is empty"),
        (lambda p: (p / "d").mkdir() or p / "d", r"no \*\.txt files"),
        (lambda p: (p / "bin.txt").write_bytes(b"\xff\xfe\x00abc") and p / "bin.txt", "UTF-8"),
    ],
)
def test_source_errors(tokenizer, tmp_path, make, match):
    with pytest.raises(DataError, match=match):
        calibration_tokens(tokenizer, cfg(make(tmp_path)))


def test_too_short_says_token_count_and_what_to_lower(tokenizer, tmp_path):
    (tmp_path / "short.txt").write_text("x" * 100)
    with pytest.raises(DataError, match=r"has 100 tokens.*lower calibration.seqlen \(at most 99\)"):
        calibration_tokens(tokenizer, cfg(tmp_path / "short.txt", seqlen=100))
    assert calibration_tokens(tokenizer, cfg(tmp_path / "short.txt", seqlen=99)).shape == (64, 99)


def test_tokenizer_none(text_file):
    with pytest.raises(DataError, match="tokenizer"):
        calibration_tokens(None, cfg(text_file))
    with pytest.raises(DataError, match="tokenizer"):
        corpus_token_ids(None, "train")


def test_iter_batches():
    x = torch.arange(21).view(7, 3)
    batches = list(iter_batches(x, 3))
    assert [b.shape[0] for b in batches] == [3, 3, 1]
    assert torch.equal(torch.cat(batches), x)
    with pytest.raises(DataError):
        list(iter_batches(x, 0))
