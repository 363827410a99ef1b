"""One cell of the one-shot benchmark, run in its own process so ``ru_maxrss`` is that cell's peak.

``benchmarks/bench_oneshot.py`` starts ``python benchmarks/bench_oneshot_cell.py SPEC.json RESULT.json`` once
per (model, method, pattern) and once per llm-compressor output to evaluate. The spec's ``task``:

* ``"calibration"``: draw the model's calibration ids with
  :func:`sparseforge.data.calibration.calibration_tokens` (train split, the model's own tokenizer) and
  ``torch.save`` them for every other cell and llm-compressor;
* ``"prune"``: load the model (float32), load the calibration token ids the parent saved (so
  every method and llm-compressor see identical windows), ``sparsify_`` it, check the achieved
  sparsity and pattern on the target layers, then evaluate. ``method="dense"`` skips pruning.
* ``"evaluate"``: load a pruned model directory written by another tool (llm-compressor), check
  its sparsity the same way, and evaluate it with the same protocol.

Metric: causal LMs, perplexity by :func:`sparseforge.evaluation.quality.perplexity` (the fixed protocol;
``max_windows`` from the spec); encoders, :func:`sparseforge.evaluation.quality.embedding_fidelity` against
the dense model (loaded *after* pruning, so it does not count in the pruning peak).

Timings: ``prune_s`` is the ``sparsify_`` call alone; ``total_s`` runs from interpreter start
(imports included) to the pruned model in memory. ``peak_rss_mb`` is ``ru_maxrss`` right after
pruning; ``peak_rss_end_mb`` after evaluation. ``ru_maxrss`` survives ``fork``/``exec`` (Linux
carries the parent's peak into the child), which is why the parent benchmark process never
imports torch; ``vm_hwm_mb`` (``VmHWM`` of ``/proc/self/status``, this process image's own peak)
is recorded next to it as a cross-check.
"""

from __future__ import annotations

import time

T_START = time.perf_counter()  # before the heavy imports: they are part of the total

import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402


def vm_hwm_mb() -> float | None:
    """Peak RSS of this process image (``VmHWM``, Linux), in MiB; None where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            line = next(l for l in f if l.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) / 1024.0  # kB


def draw_calibration(spec: dict) -> dict:
    import hashlib

    from sparseforge.config import CalibrationConfig
    from sparseforge.data.calibration import calibration_tokens
    from sparseforge.io.models import load_model

    cfg = CalibrationConfig(samples=spec["samples"], seqlen=spec["seqlen"], seed=spec["seed"], batch_size=spec["batch_size"])
    from sparseforge.layers import find_blocks

    loaded = load_model(spec["model"])
    ids = calibration_tokens(loaded.tokenizer, cfg)  # (samples, seqlen)
    torch.save(ids, spec["path"])
    return {"samples": cfg.samples, "seqlen": cfg.seqlen, "sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest(),
            "block_prefix": find_blocks(loaded.model)[0]}  # fmt: skip


def check_sparsity(model, pattern: str, sparsity: float | None) -> dict:
    """Achieved sparsity over sparseforge's default targets, pattern validity, and untouched rest.

    ``targets`` are the linear layers inside the repeated blocks (what ``sparsify_`` prunes by
    default); every other linear layer (e.g. ``lm_head``, a pooler) must have stayed dense.
    """
    from sparseforge.layers import find_blocks, linear_layers, select_targets, weight_2d
    from sparseforge.masks import satisfies

    prefix, _ = find_blocks(model)
    targets = select_targets(model, None, [], prefix)
    modules = dict(model.named_modules())
    zeros = total = 0
    per_layer = {}
    pattern_ok = True
    for name in targets:
        w = weight_2d(modules[name])  # (out, in)
        z = int((w == 0).sum())
        zeros, total = zeros + z, total + w.numel()
        per_layer[name] = z / w.numel()
        pattern_ok &= satisfies(w != 0, pattern)
    others = [n for n in linear_layers(model) if n not in set(targets)]
    other_zero = {n: float((weight_2d(modules[n]) == 0).float().mean()) for n in others}
    achieved = zeros / total
    lo, hi = min(per_layer.values()), max(per_layer.values())
    ok = pattern_ok and all(v < 0.01 for v in other_zero.values())
    if sparsity is not None:  # every target layer at the asked sparsity (rounding: 0.5 % slack)
        ok &= abs(lo - sparsity) < 5e-3 and abs(hi - sparsity) < 5e-3
    return {
        "achieved_sparsity": achieved,
        "layer_sparsity_min": lo,
        "layer_sparsity_max": hi,
        "pattern_ok": bool(pattern_ok),
        "target_layers": len(targets),
        "untouched_layers_max_zero_fraction": max(other_zero.values(), default=0.0),
        "sparsity_ok": bool(ok),
    }


def evaluate(loaded, spec: dict) -> dict:
    from sparseforge.evaluation.quality import embedding_fidelity, perplexity

    if loaded.kind == "causal-lm":
        r = perplexity(loaded.model, loaded.tokenizer, max_windows=spec["eval_windows"], progress=False)
        return {"metric": "ppl", "value": r.ppl, "nll": r.nll, "eval_tokens": r.tokens}
    from sparseforge.data import corpus
    from sparseforge.io.models import load_model

    dense = load_model(spec["reference"]).model  # after pruning: not part of the pruning peak
    r = embedding_fidelity(dense, loaded.model, loaded.tokenizer, corpus.heldout_sentences(spec["eval_sentences"]))
    return {"metric": "mean_cosine", "value": r.mean_cosine, "min_cosine": r.min_cosine, "eval_sentences": r.n}


def run(spec: dict) -> dict:
    import sparseforge
    from sparseforge.io.models import load_model
    from sparseforge.prune.sparsify import peak_rss_mb

    torch.set_num_threads(spec["threads"])
    if spec["task"] == "calibration":
        return draw_calibration(spec)
    loaded = load_model(spec["model"])
    out: dict = {"params": sum(p.numel() for p in loaded.model.parameters())}
    if spec["task"] == "prune" and spec["method"] != "dense":
        calibration = torch.load(spec["calibration"]) if spec["method"] != "magnitude" else None
        config = sparseforge.SparsifyConfig(
            method=spec["method"], pattern=spec["pattern"], sparsity=spec["sparsity"],
            method_options=spec.get("method_options", {}),
            calibration=sparseforge.CalibrationConfig(samples=spec["samples"], seqlen=spec["seqlen"],
                                                      seed=spec["seed"], batch_size=spec["batch_size"]),
        )  # fmt: skip
        report = sparseforge.sparsify_(loaded.model, config, calibration=calibration, progress=False)
        out["prune_s"] = report.seconds
        out["total_s"] = time.perf_counter() - T_START
        out["peak_rss_mb"], out["vm_hwm_mb"] = peak_rss_mb(), vm_hwm_mb()
        out["config"] = config.to_dict()
        dampening = {l.info.get("dampening") for l in report.layers} - {None}
        if dampening:
            out["dampening_used"] = sorted(dampening)
    else:
        out["prune_s"] = 0.0
        out["total_s"] = time.perf_counter() - T_START
        out["peak_rss_mb"], out["vm_hwm_mb"] = peak_rss_mb(), vm_hwm_mb()
    if spec["method"] != "dense":
        out.update(check_sparsity(loaded.model, spec["pattern"], spec["sparsity"]))
    if spec.get("evaluate", True):  # repeated timing runs skip it
        out.update(evaluate(loaded, spec))
        if not math.isfinite(out["value"]):
            out["warning"] = "non-finite metric"
    out["peak_rss_end_mb"] = peak_rss_mb()
    return out


def main() -> None:
    spec_path, result_path = sys.argv[1:3]
    spec = json.loads(Path(spec_path).read_text())
    result = run(spec)
    tmp = Path(result_path).with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, result_path)


if __name__ == "__main__":
    main()
