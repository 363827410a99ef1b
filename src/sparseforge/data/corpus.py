"""Built-in public-domain text corpus: Shakespeare's works (Project Gutenberg).

The texts ship compressed in ``sparseforge/assets/shakespeare/<work>.txt.gz``
(one file per work; see the README there for provenance). The corpus is split
by *whole works* into a fixed training split and a fixed held-out split
(:data:`HELDOUT_WORKS`), so no held-out passage is ever seen in training.

This module is deliberately light: it imports only the standard library.
"""

from __future__ import annotations

import functools
import gzip
import random
import re
from importlib import resources

__all__ = [
    "HELDOUT_WORKS",
    "SPLITS",
    "DOC_SEPARATOR",
    "list_works",
    "load_work",
    "load_text",
    "heldout_sentences",
]

#: Works held out from training (model/tokenizer training never sees them).
#: Two tragedies/comedies in verse+prose, one late romance, and the sonnets.
HELDOUT_WORKS: tuple[str, ...] = ("hamlet", "sonnets", "tempest", "twelfth_night")

#: Valid split names.
SPLITS: tuple[str, ...] = ("train", "heldout")

#: Separator placed between works when a split is joined into one string.
DOC_SEPARATOR = "\n\n\n"

_ASSET_PACKAGE = "sparseforge"
_ASSET_DIR = ("assets", "shakespeare")
_SUFFIX = ".txt.gz"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid values are {', '.join(repr(s) for s in SPLITS)}")


def _asset_dir():
    d = resources.files(_ASSET_PACKAGE)
    for part in _ASSET_DIR:
        d = d.joinpath(part)
    return d


@functools.lru_cache(maxsize=1)
def _all_works() -> tuple[str, ...]:
    d = _asset_dir()
    try:
        names = sorted(p.name[: -len(_SUFFIX)] for p in d.iterdir() if p.name.endswith(_SUFFIX))
    except (FileNotFoundError, NotADirectoryError):
        names = []
    if not names:
        raise FileNotFoundError(
            f"built-in corpus not found in package data ({'/'.join((_ASSET_PACKAGE, *_ASSET_DIR))}/*{_SUFFIX}); "
            "the sparseforge installation is incomplete"
        )
    missing = [w for w in HELDOUT_WORKS if w not in names]
    if missing:
        raise FileNotFoundError(f"built-in corpus is missing held-out works: {missing}")
    return tuple(names)


def list_works(split: str | None = None) -> list[str]:
    """Names of the works in ``split`` (``"train"``, ``"heldout"``, or ``None`` for all), sorted."""
    works = _all_works()
    if split is None:
        return list(works)
    _check_split(split)
    held = set(HELDOUT_WORKS)
    if split == "heldout":
        return [w for w in works if w in held]
    return [w for w in works if w not in held]


@functools.lru_cache(maxsize=None)
def load_work(name: str) -> str:
    """Full text of one work (e.g. ``"hamlet"``)."""
    if name not in _all_works():
        raise ValueError(f"unknown work {name!r}; see sparseforge.data.corpus.list_works()")
    data = _asset_dir().joinpath(name + _SUFFIX).read_bytes()
    return gzip.decompress(data).decode("utf-8")


def load_text(split: str = "train") -> str:
    """All works of ``split`` (``"train"`` or ``"heldout"``) joined by :data:`DOC_SEPARATOR`, in name order.

    The result is cached: repeated calls return the same string object.
    """
    _check_split(split)
    return _load_split(split)


@functools.lru_cache(maxsize=None)
def _load_split(split: str) -> str:
    return DOC_SEPARATOR.join(load_work(w) for w in list_works(split))


# --------------------------------------------------------------------------- sentences

# "Ham.", "SIR TOBY.", "First Clown.", "LADY MACBETH." -- a speaker tag on its own line.
_SPEAKER = re.compile(r"^[A-Z][A-Za-z'\- ]{0,30}\.$")
_HEADING = re.compile(r"^(ACT|SCENE|EPILOGUE|PROLOGUE|CHORUS|THE END|DRAMATIS|PERSONS)\b", re.I)
_ROMAN = re.compile(r"^[IVXLC]+\.?$")
_STAGE = re.compile(r"\[[^\]]*\]?")
_SENT_SPLIT = re.compile(r"(?<=[.!?])[\"')]*\s+(?=[\"'(]?[A-Z])")
_SPACE = re.compile(r"\s+")
_FIRST_ACT = re.compile(r"^ACT\s+(I|1)\b.*$", re.M)


def _passages(text: str):
    """Yield speech/verse passages of a work with speaker tags and stage directions removed."""
    m = _FIRST_ACT.search(text)
    if m:  # skip a play's title page and list of persons
        text = text[m.end():]
    for block in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in block.strip().split("\n") if ln.strip()]
        if not lines:
            continue
        if len(lines) > 1 and _SPEAKER.match(lines[0]) and len(lines[0].split()) <= 4:
            lines = lines[1:]
        if len(lines) == 1 and (_HEADING.match(lines[0]) or _ROMAN.match(lines[0])):
            continue
        if lines[0].startswith("["):
            # A stage direction block ("[Enter Horatio.]"), possibly spanning lines.
            joined = " ".join(lines)
            if _STAGE.sub("", joined).strip() == "":
                continue
        passage = _SPACE.sub(" ", _STAGE.sub(" ", " ".join(lines))).strip()
        # Titles, headings, character lists in capitals, and the byline are not prose.
        if passage and passage.upper() != passage and passage != "by William Shakespeare":
            yield passage


def _sentences(text: str) -> list[str]:
    out = []
    for passage in _passages(text):
        for s in _SENT_SPLIT.split(passage):
            s = s.strip().lstrip("-").strip()
            if s and not any(c in s for c in "[]{}"):
                out.append(s)
    return out


@functools.lru_cache(maxsize=32)
def _heldout_candidates(min_words: int, max_words: int) -> tuple[str, ...]:
    seen: set[str] = set()
    cands: list[str] = []
    for work in list_works("heldout"):
        for s in _sentences(load_work(work)):
            nw = len(s.split())
            if min_words <= nw <= max_words and s not in seen:
                seen.add(s)
                cands.append(s)
    return tuple(cands)


def heldout_sentences(n: int = 256, min_words: int = 6, max_words: int = 40, seed: int = 0) -> list[str]:
    """A deterministic sample of ``n`` distinct held-out sentences of ``min_words..max_words`` words.

    Sentences come only from :data:`HELDOUT_WORKS` (speaker tags and stage
    directions removed, verse lines joined). The same arguments always return the
    same list, independent of ``PYTHONHASHSEED`` and platform. If fewer than ``n``
    sentences qualify, all of them are returned (in the same seeded order).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if min_words < 1 or max_words < min_words:
        raise ValueError(f"need 1 <= min_words <= max_words, got {min_words}, {max_words}")
    cands = list(_heldout_candidates(min_words, max_words))
    random.Random(seed).shuffle(cands)
    return cands[:n]
