#!/usr/bin/env python
"""What verifying checkpoint checksums costs at load time (format_version 3, CRC-32 per tensor).

Saves a random Llama (``--hidden``, ``--layers``) pruned to 50 % unstructured (bitmap) and to 2:4,
then times, interleaved ``--repeats`` times with the file in the page cache: the whole
``sparseforge.load`` and ``load(sparse=True)``, and the checksum pass alone
(:func:`sparseforge.io.validation.verify_checksums`). The checksum share of a load is
``verify / load``. Prints a markdown table and writes ``OUT/checkpoint_checksums.json``.

Usage::

    python benchmarks/bench_checkpoint_checksums.py                 # ~100 MB checkpoints
    python benchmarks/bench_checkpoint_checksums.py --quick         # small, seconds
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def build(hidden: int, layers: int, pattern: str):
    import torch
    import transformers

    from sparseforge.layers import linear_layers, weight_2d
    from sparseforge.masks import mask_from_scores

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                                   num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                                   vocab_size=1024, max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(cfg).eval()
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in linear_layers(model):
            if name != "lm_head":
                w = weight_2d(modules[name])  # (out, in)
                sparsity = 0.5 if pattern == "unstructured" else None
                w.mul_(mask_from_scores(w.abs(), pattern, sparsity))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="hidden 256, 2 layers, 3 repeats")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.layers, args.repeats = 256, 2, 3

    from sparseforge.io.checkpoint import save_pretrained
    from sparseforge.io.loading import load
    from sparseforge.io.validation import validate_checkpoint, verify_checksums

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for pattern in ("unstructured", "2:4"):
            out = save_pretrained(build(args.hidden, args.layers, pattern), Path(tmp) / pattern.replace(":", "of"),
                                  sparsity_config={"method": "magnitude", "pattern": pattern})
            size = (out / "model.safetensors").stat().st_size
            checked = validate_checkpoint(out, verify=False)
            fns = {"load": lambda: load(out), "load_sparse": lambda: load(out, sparse=True),
                   "verify": lambda: verify_checksums(checked)}
            times = {k: [] for k in fns}
            for fn in fns.values():
                fn()  # page cache, imports
            for _ in range(args.repeats):
                for k, fn in fns.items():
                    t0 = time.perf_counter()
                    fn()
                    times[k].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append({"pattern": pattern, "file_mb": size / 1e6, **{f"{k}_s": v for k, v in med.items()},
                         "verify_gb_s": size / med["verify"] / 1e9,
                         "share_load": med["verify"] / med["load"], "share_load_sparse": med["verify"] / med["load_sparse"]})
    print(f"CPU: {cpu_name()}; hidden {args.hidden}, {args.layers} layers; medians of {args.repeats}, file in page cache")
    print("| pattern | file MB | load s | load(sparse) s | verify s | verify GB/s | share of load | share of load(sparse) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['pattern']} | {r['file_mb']:.1f} | {r['load_s']:.3f} | {r['load_sparse_s']:.3f} | {r['verify_s']:.3f} "
              f"| {r['verify_gb_s']:.2f} | {r['share_load']:.1%} | {r['share_load_sparse']:.1%} |")
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / ("checkpoint_checksums.quick.json" if args.quick else "checkpoint_checksums.json")
    tmp_target = target.with_name(target.name + ".tmp")
    tmp_target.write_text(json.dumps({"cpu": cpu_name(), "python": sys.version.split()[0], "args": vars(args) | {"out": str(args.out)},
                                      "rows": rows}, indent=2) + "\n")
    tmp_target.replace(target)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
