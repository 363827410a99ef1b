"""Run llm-compressor's SparseGPTModifier once; executed by the *llm-compressor* venv's Python.

Called by ``benchmarks/bench_oneshot_llmc.py`` (never imported by sparseforge, never run in the main
venv: it imports only torch, transformers, datasets, safetensors and llmcompressor). It:

1. loads the model directory with ``AutoModelForCausalLM`` (``--kind encoder``: ``AutoModel``) in
   float32;
2. builds a ``datasets.Dataset`` with an ``input_ids`` column from the calibration token ids
   saved by the benchmark (a ``(samples, seqlen)`` int64 tensor in a ``torch.save`` file), so
   llm-compressor sees exactly sparseforge's calibration windows (already tokenised: it skips
   its own tokenisation; ``shuffle_calibration_samples=False``);
3. runs ``oneshot(model, dataset, recipe=SparseGPTModifier(...))`` with the sequential pipeline
   (one decoder layer at a time, pruned outputs propagated, as sparseforge does);
4. writes the pruned weights as ``model.safetensors`` next to a copy of the original
   ``config.json`` and tokenizer files (a plain dense HF directory, so the main venv can load it
   and measure it with sparseforge's own perplexity protocol), then a JSON result.

Timings: ``prune_s`` is the ``oneshot`` call alone; ``total_s`` runs from interpreter start
(imports included) to the pruned model in memory; ``save_s`` is writing it. ``peak_rss_mb`` is
``ru_maxrss`` right after pruning (before saving), ``peak_rss_end_mb`` at exit.

Usage (what the benchmark runs)::

    .bench/llmcompressor-venv/bin/python benchmarks/bench_llmcompressor_runner.py \\
        --model DIR --block-prefix model.layers --calibration calib.pt --pattern 2:4 --sparsity 0.5 \\
        --out OUT --result r.json
"""

from __future__ import annotations

import time

T_START = time.perf_counter()  # before the heavy imports: they are part of the total

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

COPY_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "vocab.txt")  # fmt: skip


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def vm_hwm_mb() -> float | None:
    """Peak RSS of this process image (``VmHWM``, Linux), in MiB: a cross-check of ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            return int(next(l for l in f if l.startswith("VmHWM:")).split()[1]) / 1024.0
    except (OSError, StopIteration):
        return None


def mask_structure(pattern: str) -> str:
    """sparseforge pattern string -> llm-compressor ``mask_structure``.

    llm-compressor's ``"N:M"`` prunes the N smallest of every M (``topk(largest=False)``), while
    sparseforge's ``N:M`` keeps N of every M; both name the same mask for 2:4 and 4:8, and in
    general sparseforge ``N:M`` == llm-compressor ``(M-N):M``. ``"0:0"`` is unstructured.
    """
    if pattern == "unstructured":
        return "0:0"
    n, m = (int(v) for v in pattern.split(":"))
    return f"{m - n}:{m}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--calibration", required=True, help="torch.save file of a (samples, seqlen) int64 tensor")
    ap.add_argument("--pattern", required=True, help="'unstructured' or 'N:M' (sparseforge convention: keep N of M)")
    ap.add_argument("--sparsity", type=float, required=True)
    ap.add_argument("--kind", choices=("causal-lm", "encoder"), default="causal-lm", help="AutoModelForCausalLM or AutoModel")
    ap.add_argument("--block-prefix", required=True,
                    help="module path of the repeated blocks (e.g. model.layers): only linears inside them are pruned")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--dampening", type=float, default=0.01)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True, help="directory for the pruned model")
    ap.add_argument("--result", required=True, help="JSON file for timings and settings")
    args = ap.parse_args()

    import torch
    import transformers
    from datasets import Dataset
    from safetensors.torch import save_model

    import llmcompressor
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

    torch.set_num_threads(args.threads)
    ids = torch.load(args.calibration)  # (samples, seqlen) int64
    samples, seqlen = ids.shape
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    auto = transformers.AutoModelForCausalLM if args.kind == "causal-lm" else transformers.AutoModel
    model = auto.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    settings = dict(
        sparsity=args.sparsity,
        mask_structure=mask_structure(args.pattern),
        block_size=args.block_size,
        dampening_frac=args.dampening,
        targets=["Linear"],
        # sparseforge's default targets are the linears inside the repeated blocks: ignore every
        # other one (lm_head, a pooler). llm-compressor re.match-es "re:" patterns on module names.
        ignore=[f"re:(?!{re.escape(args.block_prefix)}\\.\\d+\\.)"],
    )
    modifier = SparseGPTModifier(**settings)
    t0 = time.perf_counter()
    oneshot(
        model=model,
        tokenizer=tokenizer,
        dataset=dataset,
        recipe=modifier,
        num_calibration_samples=samples,
        max_seq_length=seqlen,
        batch_size=args.batch_size,
        shuffle_calibration_samples=False,
        pipeline="sequential",
    )
    prune_s = time.perf_counter() - t0
    total_s = time.perf_counter() - T_START
    rss, hwm = peak_rss_mb(), vm_hwm_mb()

    t1 = time.perf_counter()
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in COPY_FILES:
        if (Path(args.model) / name).is_file():
            shutil.copy(Path(args.model) / name, tmp / name)
    save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})  # dedups tied weights
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    save_s = time.perf_counter() - t1

    result = {
        "prune_s": prune_s,
        "total_s": total_s,
        "save_s": save_s,
        "peak_rss_mb": rss,
        "vm_hwm_mb": hwm,
        "peak_rss_end_mb": peak_rss_mb(),
        "samples": samples,
        "seqlen": seqlen,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "pipeline": "sequential",
        "modifier": {"SparseGPTModifier": settings},
        "versions": {"llmcompressor": llmcompressor.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},  # fmt: skip
    }
    tmp_result = Path(args.result).with_suffix(".tmp")
    tmp_result.write_text(json.dumps(result, indent=2))
    os.replace(tmp_result, args.result)


if __name__ == "__main__":
    main()
