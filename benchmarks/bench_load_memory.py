"""Peak memory of loading a compressed checkpoint: dense ``sparseforge.load`` vs ``load(path, sparse=True)``.

Issue 3: "``sparseforge.load(path)`` builds SparseLinear layers straight from a compressed checkpoint
without ever materialising dense weights (peak RSS close to the compressed size: measure it)."

A Llama-shaped model with random weights (hidden 2048, 8 layers, FFN 5632, vocab 8192 by default)
is pruned by magnitude (2:4 and 75% unstructured) and saved compressed. Each loader then runs in a
fresh process, which reports its peak resident set size (``VmHWM``, the process image's own peak:
``ru_maxrss`` would carry this parent's peak across fork/exec); a process that only imports
torch, transformers and sparseforge gives the baseline, subtracted to get what loading cost.

    python benchmarks/bench_load_memory.py --quick     # hidden 256, 2 layers (smoke)
    python benchmarks/bench_load_memory.py             # writes benchmarks/results/load_memory.{json,md}
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

WORKER = r"""
import json, sys
import torch, transformers, sparseforge
from sparseforge.evaluation.speed import _model_mib, own_peak_rss_mib
from sparseforge.io.loading import load
mode, path = sys.argv[1], sys.argv[2]
model_mib = 0.0
# the baseline imports everything a loader touches (model classes, safetensors, the kernels)
import safetensors.torch, sparseforge.runtime.compress, sparseforge.nn.sparse_linear, sparseforge.kernels
transformers.LlamaForCausalLM, transformers.AutoConfig
sparseforge.kernels.native()
if mode != "baseline":
    model = load(path, sparse=(mode == "sparse"))
    model_mib = _model_mib(model)
loaded = own_peak_rss_mib()
if mode != "baseline":  # safetensors maps the file: pages count once touched, so run every weight once
    with torch.inference_mode():
        model(torch.ones(1, 4, dtype=torch.long))
print(json.dumps({"peak_rss_mib": loaded, "after_forward_mib": own_peak_rss_mib(), "model_mib": model_mib}))
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.ffn, args.vocab = 256, 2, 704, 1024
    if args.out is None:
        args.out = RESULTS / ("load_memory.quick.json" if args.quick else "load_memory.json")
    return args


def save_pruned(args, pattern: str, sparsity, directory: Path) -> None:
    import torch
    import transformers as t

    import sparseforge as sf

    torch.manual_seed(0)
    heads = max(1, args.hidden // 64)
    cfg = t.LlamaConfig(hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
                        num_attention_heads=heads, num_key_value_heads=heads, vocab_size=args.vocab,
                        tie_word_embeddings=False)
    model = t.LlamaForCausalLM(cfg).float().eval()
    report = sf.sparsify_(model, sf.SparsifyConfig(method="magnitude", pattern=pattern, sparsity=sparsity), progress=False)
    sf.save_pretrained(model, directory, sparsity_config=report.sparsity_config(), overwrite=True)


def measure(mode: str, path: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", WORKER, mode, str(path)], capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"{mode} loader failed: {proc.stderr[-800:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    from sparseforge.io.layout import checkpoint_sizes

    args = parse_args(argv)
    rows = []
    work = Path(tempfile.mkdtemp(prefix="sf-load-memory-"))
    try:
        baseline = measure("baseline", work)["peak_rss_mib"]
        for label, pattern, sparsity in (("2:4", "2:4", None), ("75%", "unstructured", 0.75)):
            path = work / label.replace(":", "of").replace("%", "pct")
            save_pruned(args, pattern, sparsity, path)
            sizes = checkpoint_sizes(path)
            for mode in ("dense", "sparse"):
                m = measure(mode, path)
                rows.append({"pruning": label, "loader": "load(path)" if mode == "dense" else "load(path, sparse=True)",
                             "peak_rss_mib": m["peak_rss_mib"], "above_baseline_mib": m["peak_rss_mib"] - baseline,
                             "after_forward_mib": m["after_forward_mib"],
                             "after_forward_above_baseline_mib": m["after_forward_mib"] - baseline,
                             "model_mib": m["model_mib"], "file_mib": sizes["file_bytes"] / 2**20,
                             "dense_mib": sizes["dense_bytes"] / 2**20})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [f"Loading a compressed Llama-shaped checkpoint (hidden {args.hidden}, {args.layers} layers, FFN {args.ffn}, "
             f"vocab {args.vocab}); fresh process per loader; baseline (imports only) {baseline:.0f} MiB", "",
             "Peak RSS right after loading, and after one forward pass (safetensors maps the file, so weights",
             "count once touched); 'above baseline' subtracts the imports-only process.", "",
             "| pruning | loader | checkpoint MiB (dense MiB) | model in memory MiB | peak RSS after load (above baseline) "
             "| after a forward (above baseline) | after forward / checkpoint |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['pruning']} | {r['loader']} | {r['file_mib']:.0f} ({r['dense_mib']:.0f}) | {r['model_mib']:.0f} | "
                     f"{r['peak_rss_mib']:.0f} ({r['above_baseline_mib']:.0f}) | {r['after_forward_mib']:.0f} "
                     f"({r['after_forward_above_baseline_mib']:.0f}) | "
                     f"{r['after_forward_above_baseline_mib'] / r['file_mib']:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"shape": vars(args) | {"out": str(args.out)}, "baseline_mib": baseline, "rows": rows},
                                   indent=2, default=str) + "\n", encoding="utf-8")
    args.out.with_suffix(".md").write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
