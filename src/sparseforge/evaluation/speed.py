"""Generation speed and memory of a model, dense vs compressed: ``sparseforge bench MODEL``.

The question a user asks is "how many tokens per second do I gain?". :func:`bench_generation`
answers it for a causal LM on this machine:

* **dense**: the model as :func:`sparseforge.io.models.load_model` loads it (pruned zeros included);
* **sparse**: the same weights after :func:`sparseforge.runtime.compress.compress_` (``format="auto"``
  measures each layer shape at the benchmarked batch sizes and keeps a layer dense where dense is
  faster; the report lists every layer kept dense and why).

The sparse variant generates inside :func:`sparseforge.kernels.sparse_threads` (torch
single-threaded, the kernels on all threads), since torch's spinning OpenMP workers otherwise take
the cores the kernels need; dense keeps torch's threads. Both variants generate ``new_tokens`` tokens greedily (``min_new_tokens`` forces the full length)
after a ``prompt_len``-token prompt, for each batch size, ``repeats`` times, variants interleaved
in every round so drifting load from other processes hits both alike; tokens/s is
``batch * new_tokens / median seconds`` and the speedup is a ratio within the same run.

Peak memory: each variant is also loaded in a fresh subprocess that generates a few tokens and
reports its peak resident set size (:func:`own_peak_rss_mib`: ``VmHWM``, the peak of that process
image; not ``ru_maxrss``, which Linux carries from the parent across fork and exec), so one
variant's allocations never inflate the other's. For a compressed sparseforge checkpoint the sparse subprocess uses
:func:`sparseforge.io.loading.load_sparse`, which never builds the dense pruned weights.

``pattern=`` / ``sparsity=`` prune the model by magnitude first (no calibration, for speed
measurement only; use ``sparseforge prune`` for quality).

Example (command line)::

    sparseforge bench builtin --pattern 2:4 --batch-sizes 1 8
    sparseforge bench sparseforge-demo          # the checkpoint `sparseforge demo` writes
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from sparseforge.errors import ConfigError, ModelError

__all__ = ["bench_generation", "BenchReport", "generate_seconds", "own_peak_rss_mib"]


def own_peak_rss_mib() -> float:
    """Peak RSS of this process image in MiB: ``VmHWM`` from ``/proc/self/status`` (Linux), which
    starts afresh at ``exec``; elsewhere ``ru_maxrss`` (which may include a parent's peak)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) / 1024.0
    except (OSError, StopIteration, ValueError):
        scale = 1024.0 if sys.platform.startswith("linux") else 1024.0 ** 2  # KiB on Linux, bytes on macOS
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


@dataclass
class BenchReport:
    model: str
    machine: dict[str, Any]
    new_tokens: int
    prompt_len: int
    rows: list[dict[str, Any]] = field(default_factory=list)  # variant, batch, tokens_per_s, median_s, speedup, runs_s
    peak_rss_mib: dict[str, float] = field(default_factory=dict)
    weight_mib: dict[str, float] = field(default_factory=dict)
    compress_summary: str = ""
    max_abs_logit_diff: float = 0.0  # sparse vs dense next-token logits on the first prompt

    def table(self) -> str:
        m = self.machine
        lines = [f"outputs: max |logit difference| sparse vs dense on the prompts: {self.max_abs_logit_diff:.2e}",
                 f"generation on {m['cpu']} ({m['isa']} kernels, {m['threads']} thread(s)): {self.model}, "
                 f"{self.prompt_len}-token prompt, {self.new_tokens} new tokens, greedy; medians",
                 "| batch | variant | tokens/s | median s | speedup vs dense |", "|---:|---|---:|---:|---:|"]
        for r in self.rows:
            lines.append(f"| {r['batch']} | {r['variant']} | {r['tokens_per_s']:.1f} | {r['median_s']:.3f} | {r['speedup']:.2f}x |")
        if self.weight_mib:
            lines.append("\n| variant | weights + buffers MiB | peak RSS MiB (fresh process) |\n|---|---:|---:|")
            for v, mib in self.weight_mib.items():
                rss = self.peak_rss_mib.get(v)
                lines.append(f"| {v} | {mib:.1f} | {rss:.0f} |" if rss is not None else f"| {v} | {mib:.1f} | - |")
        return "\n".join(lines + (["", self.compress_summary] if self.compress_summary else []))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def generate_seconds(model, prompt: torch.Tensor, new: int) -> float:
    """Seconds to greedily generate exactly ``new`` tokens after ``prompt`` (B, T)."""
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                             min_new_tokens=new, do_sample=False, pad_token_id=0)
        took = time.perf_counter() - start
    if out.shape[1] != prompt.shape[1] + new:
        raise ModelError(f"generate returned {out.shape[1] - prompt.shape[1]} new tokens instead of {new}")
    return took


def _model_mib(model) -> float:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total / 2**20


def _load(model: str, variant: str, pattern, sparsity, fmt: str, batch_sizes, sparse_load: bool, advice=None):
    """(model, compress report or None) for one variant; ``sparse_load`` uses load_sparse; ``advice``
    (an AdviceReport) replays earlier measurements instead of measuring again."""
    from sparseforge.io.models import load_model, resolve_model_path

    if variant == "sparse" and sparse_load:
        from sparseforge.io.loading import load_sparse

        return load_sparse(resolve_model_path(model)), None
    loaded = load_model(model)
    net = loaded.model
    if not hasattr(net, "generate") or not net.can_generate():
        raise ModelError(f"{model} is not a causal language model; `sparseforge bench` measures generation")
    if pattern is not None or sparsity is not None:
        import sparseforge as sf

        sf.sparsify_(net, sf.SparsifyConfig(method="magnitude", pattern=pattern or "unstructured", sparsity=sparsity),
                     progress=False)
    if variant == "dense":
        return net, None
    from sparseforge.runtime.compress import compress_

    return net, compress_(net, fmt, batch_sizes=tuple(batch_sizes), advice=advice)


def _is_compressed_checkpoint(model: str) -> bool:
    from sparseforge.io.layout import is_compressed, read_sparsity_config
    from sparseforge.io.models import resolve_model_path

    try:
        return is_compressed(read_sparsity_config(resolve_model_path(model)))
    except (ModelError, OSError):
        return False


def _peak_rss_subprocess(spec: dict[str, Any]) -> float:
    """Peak RSS (MiB) of a fresh process that loads one variant and generates a few tokens."""
    env = dict(os.environ, SPARSEFORGE_NUM_THREADS=str(spec["threads"]))
    proc = subprocess.run([sys.executable, "-m", "sparseforge.evaluation.speed", json.dumps(spec)], capture_output=True,
                          text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise ModelError(f"the memory-measuring subprocess for {spec['variant']} failed: {proc.stderr.strip()[-500:]}")
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mib"])


def bench_generation(model: str, *, batch_sizes: Sequence[int] = (1, 8), new_tokens: int = 32, prompt_len: int = 16,
                     repeats: int = 3, threads: Optional[int] = None, format: str = "auto",
                     pattern: Optional[str] = None, sparsity: Optional[float] = None, measure_rss: bool = True,
                     progress: bool = True, sparse_threads: bool = True, activations: str = "float") -> BenchReport:
    """Tokens/s of greedy generation, dense vs compressed, for each batch size (module doc).

    ``sparse_threads``: generate with the sparse variant inside
    :func:`sparseforge.kernels.sparse_threads` (torch single-threaded, kernels on ``threads``).
    ``activations="int8"``: the sparse variant's int8-valued bitmap / N:M layers quantize their inputs per
    token (``compress_(..., activations="int8")``; a model quantized with ``--quantize int8``).
    """
    from contextlib import nullcontext

    from sparseforge import kernels
    from sparseforge.runtime.machine import machine_info, set_threads

    if new_tokens < 1 or prompt_len < 1 or repeats < 1:
        raise ConfigError(f"new_tokens, prompt_len and repeats must be >= 1, got {new_tokens}, {prompt_len}, {repeats}")
    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise ConfigError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    threads = set_threads(threads)
    batch_sizes = tuple(int(b) for b in batch_sizes)
    import copy

    from sparseforge.runtime.compress import compress_

    dense, _ = _load(model, "dense", pattern, sparsity, format, batch_sizes, False)
    sparse = copy.deepcopy(dense)  # loaded (and pruned) once; the compressed copy replaces its pruned layers
    models = {"dense": (dense, None),
              "sparse": (sparse, compress_(sparse, format, batch_sizes=batch_sizes, activations=activations))}
    del dense, sparse
    report = BenchReport(model, machine_info(threads), new_tokens, prompt_len)
    sparse_report = models["sparse"][1]
    report.compress_summary = sparse_report.summary() if sparse_report is not None else ""
    if sparse_report is not None and not sparse_report.converted:
        report.compress_summary += ("\nno layer was compressed: the model has no pruned layers, or dense is faster here. "
                                    "Prune it first (sparseforge prune ... or --pattern/--sparsity).")
    vocab = models["dense"][0].config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = {b: torch.randint(1, vocab, (b, prompt_len), generator=g) for b in batch_sizes}
    with torch.inference_mode():
        logits = [models[v][0](prompts[batch_sizes[-1]]).logits for v in ("dense", "sparse")]
    report.max_abs_logit_diff = float((logits[0].float() - logits[1].float()).abs().max())
    from tqdm.auto import tqdm

    times: dict[tuple[str, int], list[float]] = {(v, b): [] for v in models for b in batch_sizes}
    def threads_for(variant: str):
        return kernels.sparse_threads(threads) if variant == "sparse" and sparse_threads else nullcontext()

    for v, (net, _) in models.items():  # warm-up: thread pools, allocator, generate()'s caches
        with threads_for(v):
            generate_seconds(net, prompts[batch_sizes[0]], 2)
    with tqdm(total=repeats * len(times), desc="bench", unit="run", disable=not progress) as bar:
        for _ in range(repeats):
            for b in batch_sizes:
                for v, (net, _) in models.items():
                    with threads_for(v):
                        times[(v, b)].append(generate_seconds(net, prompts[b], new_tokens))
                    bar.update()
    for b in batch_sizes:
        base = statistics.median(times[("dense", b)])
        for v in models:
            med = statistics.median(times[(v, b)])
            report.rows.append({"variant": v, "batch": b, "tokens_per_s": b * new_tokens / med, "median_s": med,
                                "speedup": base / med, "runs_s": times[(v, b)]})
    report.weight_mib = {v: _model_mib(net) for v, (net, _) in models.items()}
    del models
    if measure_rss:
        sparse_load = format == "auto" and pattern is None and sparsity is None and _is_compressed_checkpoint(model)
        for v in ("dense", "sparse"):
            spec = {"model": model, "variant": v, "pattern": pattern, "sparsity": sparsity, "format": format,
                    "batch_sizes": list(batch_sizes), "threads": threads, "sparse_load": sparse_load and v == "sparse",
                    "advice": sparse_report.advice.to_dict() if sparse_report is not None and sparse_report.advice else None}
            label = "sparse (load_sparse)" if spec["sparse_load"] else v
            report.peak_rss_mib[label] = _peak_rss_subprocess(spec)
            if label != v:
                report.weight_mib[label] = report.weight_mib.pop(v)
    kernels.set_num_threads(threads)
    return report


def _rss_worker(spec: dict[str, Any]) -> None:
    torch.set_num_threads(spec["threads"])
    from sparseforge.runtime.advise import AdviceReport

    advice = AdviceReport.from_dict(spec["advice"]) if spec.get("advice") else None
    net, _ = _load(spec["model"], spec["variant"], spec["pattern"], spec["sparsity"], spec["format"],
                   spec["batch_sizes"], spec["sparse_load"], advice)
    generate_seconds(net, torch.ones(1, 4, dtype=torch.long), 2)
    print(json.dumps({"peak_rss_mib": own_peak_rss_mib()}))


if __name__ == "__main__":
    _rss_worker(json.loads(sys.argv[1]))
