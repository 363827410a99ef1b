"""scripts/train_mqar.py: the alternating-filler transform keeps the MQAR example intact and labels
exactly the filler tokens its pattern fixes; the curriculum parser refuses malformed stages; a
two-step run writes a loadable model directory with its card."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseforge.data.mqar import IGNORE, MQARVocab, make_batch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_mqar.py"


@pytest.fixture(scope="module")
def train_mqar():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        spec = importlib.util.spec_from_file_location("train_mqar_script", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return module


@settings(max_examples=40, deadline=None)
@given(context=st.integers(16, 96), pair_share=st.floats(0.05, 1.0), seed=st.integers(0, 10_000))
def test_alternating_filler_keeps_the_example_and_labels_the_pattern(train_mqar, context, pair_share, seed):
    vocab = MQARVocab(filler=16, keys=64, values=64)
    pairs = max(1, min(vocab.keys, int(pair_share * (context - 1) // 2)))
    b = make_batch(3, context, pairs, min(pairs, 4), vocab, generator=torch.Generator().manual_seed(seed))
    ids, labels = train_mqar.alternate_filler(b.ids, b.labels, context, vocab, random.Random(seed))
    is_filler = (b.ids >= 1) & (b.ids < vocab.first_key)
    is_filler[:, context:] = False
    assert torch.equal(ids[~is_filler], b.ids[~is_filler])  # start, keys, values and queries untouched
    assert bool(((ids[is_filler] >= 1) & (ids[is_filler] < vocab.first_key)).all())  # filler stays filler
    assert torch.equal(labels[:, context:], b.labels[:, context:])
    for row in range(ids.shape[0]):
        for t in range(context):
            inside = 0 < t < context - 1 and bool(is_filler[row, t - 1] and is_filler[row, t] and is_filler[row, t + 1])
            if inside:  # within a run: a b a b ..., each label the next token, which equals the one before
                assert labels[row, t] == ids[row, t + 1] == ids[row, t - 1]
            else:
                assert labels[row, t] == IGNORE


def test_curriculum_parser(train_mqar):
    assert train_mqar.parse_curriculum("64:128:1,256:1024:8") == ((64, 128, 1.0), (256, 1024, 8.0))
    for bad in ("64:32:1", "4:16:1", "64:128:0.5", "64-128"):
        with pytest.raises(SystemExit):
            train_mqar.parse_curriculum(bad)


def test_two_steps_write_a_loadable_model(train_mqar, tmp_path):
    from sparseforge.evaluation.mqar import load_mqar_model, mqar_vocab

    out = tmp_path / "mqar"
    assert train_mqar.main(["--steps", "2", "--tokens-per-step", "256", "--eval-every", "0", "--curriculum",
                            "16:32:1,32:64:4", "--final-contexts", "64", "--out", str(out)]) == 0
    model = load_mqar_model(out)
    assert model.config.num_key_value_heads == 2 < model.config.num_attention_heads == 4
    assert mqar_vocab(model) == MQARVocab(filler=16, keys=64, values=64)
    card = (out / "README.md").read_text()
    assert card.startswith("# MQAR recall model") and "2 steps" in card
