"""Tests for the built-in Shakespeare corpus (sparseforge.data.corpus)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from sparseforge.data import corpus


def test_works_and_split_are_fixed():
    works = corpus.list_works()
    assert len(works) == 42
    assert works == sorted(works)
    assert corpus.HELDOUT_WORKS == ("hamlet", "sonnets", "tempest", "twelfth_night")
    held = corpus.list_works("heldout")
    train = corpus.list_works("train")
    assert held == sorted(corpus.HELDOUT_WORKS)
    assert not set(held) & set(train)
    assert sorted(held + train) == works
    # Folio duplicates were not vendored, so no work appears twice under another name.
    assert not any(w.endswith("_f") for w in works)


@pytest.mark.parametrize("split", ["test", "validation", "", "Train", None])
def test_bad_split_raises_naming_valid_values(split):
    with pytest.raises(ValueError, match=r"'train'.*'heldout'"):
        corpus.load_text(split)


def test_list_works_bad_split():
    with pytest.raises(ValueError, match="heldout"):
        corpus.list_works("dev")


def test_load_text_basic_and_cached():
    train = corpus.load_text()
    held = corpus.load_text("heldout")
    assert train is corpus.load_text("train")  # cached
    assert 4_000_000 < len(train) < 5_000_000
    assert 400_000 < len(held) < 600_000
    assert "To be, or not to be,--that is the question" in held
    assert "Now is the winter of our discontent" in train  # Richard III
    for text in (train, held):
        assert "\r" not in text
        assert not re.search(r"gutenberg|\*\*\* ?START OF", text, re.I)


def test_split_disjointness_no_heldout_text_in_train():
    train = corpus.load_text("train")
    for work in corpus.HELDOUT_WORKS:
        text = corpus.load_work(work)
        # Long distinctive lines of each held-out work must not occur in the training text.
        lines = [ln.strip() for ln in text.splitlines() if len(ln.strip()) >= 45]
        assert len(lines) > 50
        sample = lines[:: max(1, len(lines) // 200)]
        leaked = [ln for ln in sample if ln in train]
        # A handful of stock lines may recur across plays, but not whole passages.
        assert len(leaked) <= 0.02 * len(sample), (work, leaked[:5])
    for s in corpus.heldout_sentences(64):
        assert s not in train or len(s) < 60


def test_load_work_unknown():
    with pytest.raises(ValueError):
        corpus.load_work("hamlet_gut_f")


def test_heldout_sentences_deterministic_and_well_formed():
    a = corpus.heldout_sentences()
    b = corpus.heldout_sentences(n=256, min_words=6, max_words=40, seed=0)
    assert a == b
    assert len(a) == 256
    assert len(set(a)) == 256
    for s in a:
        assert 6 <= len(s.split()) <= 40
        assert s == s.strip() and "\n" not in s and "  " not in s
        assert not any(c in s for c in "[]{}")
        assert s.upper() != s  # no headings / speaker tags
    held = corpus.load_text("heldout")
    words = held.split()
    # Every sentence's first word comes from the held-out text.
    assert all(s.split()[0].strip("'\"(") in held for s in a)
    assert len(words) > 0
    assert corpus.heldout_sentences(seed=1) != a
    assert corpus.heldout_sentences(10) == a[:10]
    assert corpus.heldout_sentences(0) == []


def test_heldout_sentences_fixed_snapshot():
    # Guards against silent changes to the extraction (which would change evaluation results).
    s = corpus.heldout_sentences(3)
    assert s == [
        "Cesario is your servant's name, fair princess.",
        "Not mine own fears, nor the prophetic soul Of the wide world dreaming on things to come, "
        "Can yet the lease of my true love control, Supposed as forfeit to a confin'd doom.",
        "Mine would, sir, were I human.",
    ]


def test_heldout_sentences_bad_args():
    with pytest.raises(ValueError):
        corpus.heldout_sentences(-1)
    with pytest.raises(ValueError):
        corpus.heldout_sentences(min_words=10, max_words=5)


def test_heldout_sentences_more_than_available():
    all_long = corpus.heldout_sentences(n=100_000, min_words=35, max_words=40)
    assert 0 < len(all_long) < 1000


def test_import_is_cheap():
    code = "import sys; import sparseforge.data.corpus; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # The package __init__ may import torch itself; corpus.py must not add it.
    if out.stdout.strip() == "True":
        code2 = "import sys; import sparseforge; print('torch' in sys.modules)"
        out2 = subprocess.run([sys.executable, "-c", code2], capture_output=True, text=True, check=True)
        assert out2.stdout.strip() == "True", "sparseforge.data.corpus imports torch"
