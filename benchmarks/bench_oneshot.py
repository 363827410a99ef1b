#!/usr/bin/env python
"""One-shot pruning benchmark: magnitude vs Wanda vs SparseGPT, and llm-compressor side by side.

For every model (``builtin``: perplexity on the held-out split; ``minilm``: mean cosine of
sentence embeddings to the dense encoder) and every pattern (default 50 % unstructured, 2:4, 4:8,
70 % unstructured), each method runs in its own subprocess (``bench_oneshot_cell.py``), so the peak RSS
is that run's own. The calibration token ids are drawn once per model
(:func:`sparseforge.data.calibration.calibration_tokens`, the train split) and saved to a file that every
method *and* llm-compressor read, so all of them see identical windows.

For causal LMs, llm-compressor's ``SparseGPTModifier`` runs on the same model, ids and pattern in
a separate venv (``oneshot_llmc.py``); the model it saves is measured by the same evaluation cell.

Writes ``OUT/oneshot.json`` and ``OUT/oneshot.md`` (``oneshot.quick.*`` with ``--quick``) after
every cell (temp file + rename), and prints the markdown at the end.

Usage::

    python benchmarks/bench_oneshot.py                                   # full run (tens of minutes on 2 cores)
    python benchmarks/bench_oneshot.py --quick --skip-llmcompressor      # smoke run
    python benchmarks/bench_oneshot.py --models builtin --patterns 50%,2:4 --llmcompressor-python /tmp/lcvenv/bin/python
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import bench_oneshot_llmc as oneshot_llmc  # noqa: E402
import bench_oneshot_report as oneshot_report  # noqa: E402

FULL = dict(repeat=3, patterns="50%,2:4,4:8,70%", samples=64, seqlen=256, encoder_seqlen=128, eval_windows=64, eval_sentences=256)
QUICK = dict(repeat=1, patterns="50%,2:4", samples=8, seqlen=64, encoder_seqlen=32, eval_windows=4, eval_sentences=32)


def parse_pattern(token: str) -> tuple[str, str, float]:
    """``"50%"`` -> (label, "unstructured", 0.5); ``"2:4"`` -> ("2:4", "2:4", 0.5); ``"block4x4@50%"``."""
    from sparseforge.patterns import parse  # torch-free: the parent never imports torch (see main)

    token = token.strip()
    if token.endswith("%") and "@" not in token:
        return token, "unstructured", float(token[:-1]) / 100
    name, _, pct = token.partition("@")
    pattern = parse(name)
    sparsity = float(pct.rstrip("%")) / 100 if pct else (pattern.sparsity or 0.5)  # N:M fixes its own
    return token, str(pattern), sparsity


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="builtin,minilm", help="comma list of aliases or model directories")
    ap.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    ap.add_argument("--patterns", help=f"comma list: N:M, X%% (unstructured), PATTERN@X%% (default {FULL['patterns'].replace('%', '%%')})")
    ap.add_argument("--samples", type=int, help="calibration samples (default 64)")
    ap.add_argument("--seqlen", type=int, help="calibration tokens per sample, causal LMs (default 256)")
    ap.add_argument("--encoder-seqlen", type=int, help="calibration tokens per sample, encoders (default 128)")
    ap.add_argument("--eval-windows", type=int, help="perplexity windows of 256 tokens (default 64 = the protocol)")
    ap.add_argument("--eval-sentences", type=int, help="held-out sentences for embedding fidelity (default 256)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward pass (both tools)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads in every run (default 1: on a shared machine, OpenMP barriers make 2+ threads erratic)")
    ap.add_argument("--quick", action="store_true", help="small smoke subset: " + json.dumps(QUICK).replace("%", "%%"))
    ap.add_argument("--skip-llmcompressor", action="store_true")
    ap.add_argument("--llmcompressor-python", help="Python of an existing venv with llmcompressor (skips venv set-up)")
    ap.add_argument("--llmcompressor-venv", default=str(REPO / ".bench" / "llmcompressor-venv"))
    ap.add_argument("--llmcompressor-patterns", help="patterns for llm-compressor (default: every unstructured/N:M one)")
    ap.add_argument("--repeat", type=int, help="runs per pruning cell, round-robin; min wall time is kept (default 3, quick 1)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per cell")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--keep-work", help="keep calibration ids, logs and llm-compressor outputs in this directory")
    return ap


def settings_from(args: argparse.Namespace) -> dict:
    base = QUICK if args.quick else FULL
    get = lambda name: base[name] if getattr(args, name) is None else getattr(args, name)  # noqa: E731
    patterns = [parse_pattern(t) for t in get("patterns").split(",") if t.strip()]
    llmc = [p for p in patterns if p[1] == "unstructured" or ":" in p[1]]
    if args.llmcompressor_patterns:
        llmc = [parse_pattern(t) for t in args.llmcompressor_patterns.split(",")]
    return dict(
        models=[m.strip() for m in args.models.split(",") if m.strip()],
        methods=[m.strip() for m in args.methods.split(",") if m.strip()],
        patterns=[p[0] for p in patterns], pattern_specs={p[0]: p[1:] for p in patterns + llmc},
        llmc_patterns=[] if args.skip_llmcompressor else [p[0] for p in llmc],
        samples=get("samples"), seqlen=get("seqlen"), encoder_seqlen=get("encoder_seqlen"),
        eval_windows=get("eval_windows"), eval_sentences=get("eval_sentences"), repeat=get("repeat"),
        seed=args.seed, batch_size=args.batch_size, threads=args.threads, quick=args.quick,
    )  # fmt: skip


def meta(argv: list[str]) -> dict:
    from importlib.metadata import version

    import sparseforge

    git = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "sparseforge": sparseforge.__version__, "git": git.stdout.strip() or "unknown",
        "torch": version("torch"), "python": platform.python_version(),
        "cpu": f"{platform.machine()}, {os.cpu_count()} cores", "command": shlex.join(["python", *argv]),
    }  # fmt: skip


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_cell(spec: dict, work: Path, name: str, timeout: float) -> dict:
    """Run ``bench_oneshot_cell.py`` on ``spec`` in a subprocess; its result dict, or ``{"error": ...}``."""
    spec_file, result_file, log_file = work / f"{name}.spec.json", work / f"{name}.result.json", work / f"{name}.log"
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "TOKENIZERS_PARALLELISM": "false"}
    with open(log_file, "w") as log:
        try:
            proc = subprocess.run([sys.executable, str(HERE / "bench_oneshot_cell.py"), str(spec_file), str(result_file)],
                                  stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout)  # fmt: skip
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0 or not result_file.exists():
        tail = [l for l in log_file.read_text(errors="replace").splitlines() if l.strip()][-3:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
    return json.loads(result_file.read_text())


def calibration_file(model: str, kind: str, s: dict, work: Path, timeout: float) -> tuple[Path, dict]:
    """Draw the model's calibration ids once (train split, its own tokenizer) in a cell and save them."""
    path = work / f"calib-{len(list(work.glob('calib-*.pt')))}.pt"
    seqlen = s["seqlen"] if kind == "causal-lm" else s["encoder_seqlen"]
    spec = {"task": "calibration", "model": model, "path": str(path), "samples": s["samples"], "seqlen": seqlen,
            "seed": s["seed"], "batch_size": s["batch_size"], "threads": s["threads"]}  # fmt: skip
    info = run_cell(spec, work, path.stem, timeout)
    if "error" in info:
        raise SystemExit(f"drawing calibration ids for {model} failed: {info['error']}")
    return path, info


class Bench:
    def __init__(self, s: dict, out: Path, work: Path, argv: list[str], timeout: float) -> None:
        self.s, self.work, self.timeout = s, work, timeout
        stem = "oneshot.quick" if s["quick"] else "oneshot"
        self.json_path, self.md_path = out / f"{stem}.json", out / f"{stem}.md"
        self.results = {"meta": meta(argv), "settings": s, "models": {}, "runs": [], "checks": []}
        self.t0 = time.perf_counter()
        self.llmc_python: Path | None = None
        self.counter = 0

    def save(self) -> None:
        self.results["checks"] = oneshot_report.checks(self.results)
        write_atomic(self.json_path, json.dumps(self.results, indent=2) + "\n")
        write_atomic(self.md_path, oneshot_report.markdown(self.results))

    def record(self, run: dict) -> None:
        self.results["runs"].append(run)
        head = f"{run['model']:>8} {run['tool']:>14} {run['method']:>9} {run['pattern']:>6}"
        if "error" in run:
            print(f"  => {head}  FAILED {run['error']}", flush=True)
        else:
            print(f"  => {head}  {run['metric']}={run['value']:.4f}  prune {run['prune_s']:.1f}s  total {run['total_s']:.1f}s"
                  f"  peak {run['peak_rss_mb']:.0f}MiB  sparsity {run.get('achieved_sparsity', 0):.3f}", flush=True)  # fmt: skip
        self.save()

    def once(self, job: dict, rep: int) -> dict:
        """One run of ``job`` (a subprocess); evaluation only in the first repetition."""
        pattern, sparsity = self.s["pattern_specs"].get(job["pattern"], ("dense", 0.0))
        base, name = job["base"], f"{self.counter:03d}-{job['tool']}-{job['method']}-r{rep}"
        self.counter += 1
        if job["tool"] == "sparseforge":
            spec = {**base, "task": "prune", "method": job["method"], "pattern": pattern, "sparsity": sparsity,
                    "evaluate": rep == 0}  # fmt: skip
            out = run_cell(spec, self.work, name, self.timeout)
        else:
            try:
                lc = oneshot_llmc.run_llmcompressor(
                    self.llmc_python, base["model_dir"], Path(base["calibration"]), pattern, sparsity, self.work,
                    kind=base["kind"], block_prefix=base["block_prefix"], threads=self.s["threads"],
                    batch_size=self.s["batch_size"], timeout=self.timeout)  # fmt: skip
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                return {"error": str(exc).splitlines()[-1]}
            self.results["llmcompressor"] = {"versions": lc["versions"], "pipeline": lc["pipeline"]}
            keys = ("prune_s", "total_s", "save_s", "peak_rss_mb", "vm_hwm_mb", "peak_rss_end_mb", "process_s")
            out = {k: lc[k] for k in keys} | {"llmc_settings": lc["modifier"]["SparseGPTModifier"]}
            if rep == 0:
                spec = {**base, "task": "evaluate", "method": "sparsegpt", "model": lc["out_dir"], "pattern": pattern,
                        "sparsity": sparsity}  # fmt: skip
                ev = run_cell(spec, self.work, name + "-eval", self.timeout)
                ev.pop("prune_s", None), ev.pop("total_s", None)
                out |= {f"eval_{k}" if k.startswith("peak") or k == "vm_hwm_mb" else k: v for k, v in ev.items()}
        elapsed = time.perf_counter() - self.t0
        status = out.get("error") or f"prune {out['prune_s']:.1f}s total {out['total_s']:.1f}s peak {out['peak_rss_mb']:.0f}MiB"
        print(f"[{elapsed:6.0f}s] {job['model']} {job['tool']} {job['method']} {job['pattern']} (run {rep + 1}): {status}", flush=True)
        return {"model": job["model"], "tool": job["tool"], "method": job["method"], "pattern": job["pattern"],
                "sparsity": sparsity, **out}  # fmt: skip

    def group(self, jobs: list[dict], repeats: int) -> None:
        """Run ``jobs`` round-robin ``repeats`` times (so load drift hits every tool alike), then record."""
        runs: list[list[dict]] = [[] for _ in jobs]
        for rep in range(repeats):
            for job, done in zip(jobs, runs):
                if not done or "error" not in done[-1]:
                    done.append(self.once(job, rep))
        for done in runs:
            self.record(aggregate(done))

    def run(self, llmc_python: "Path | None") -> None:
        from sparseforge.io.models import model_kind, resolve_model_path

        s, self.llmc_python, self.counter = self.s, llmc_python, 0
        for model in s["models"]:
            path = resolve_model_path(model)
            kind = model_kind(json.loads((path / "config.json").read_text()))
            print(f"== {model} ({kind}, {path}): drawing calibration ids", flush=True)
            calib, cinfo = calibration_file(model, kind, s, self.work, self.timeout)
            self.results["models"][model] = {"kind": kind, "path": str(path), "samples": cinfo["samples"],
                                             "seqlen": cinfo["seqlen"], "calibration_sha256": cinfo["sha256"]}  # fmt: skip
            base = {"model": model, "model_dir": str(path), "kind": kind, "block_prefix": cinfo["block_prefix"], "reference": model, "calibration": str(calib),
                    "samples": cinfo["samples"], "seqlen": cinfo["seqlen"], "seed": s["seed"],
                    "batch_size": s["batch_size"], "threads": s["threads"],
                    "eval_windows": s["eval_windows"], "eval_sentences": s["eval_sentences"]}  # fmt: skip
            job = lambda tool, method, label: {"model": model, "tool": tool, "method": method, "pattern": label, "base": base}  # noqa: E731
            self.group([job("sparseforge", "dense", "dense")], 1)
            self.results["models"][model]["params"] = self.results["runs"][-1].get("params", 0)
            llmc = llmc_python is not None
            for label in dict.fromkeys(s["patterns"] + (s["llmc_patterns"] if llmc else [])):
                jobs = [job("sparseforge", m, label) for m in s["methods"]] if label in s["patterns"] else []
                if llmc and label in s["llmc_patterns"]:
                    jobs.append(job(oneshot_report.LLMC, "sparsegpt", label))
                self.group(jobs, s["repeat"])


def aggregate(runs: list[dict]) -> dict:
    """One record from repeated runs: metric of the first, minimum wall times, median peak RSS."""
    if "error" in runs[-1]:
        return runs[-1]
    out = dict(runs[0])
    for key in ("prune_s", "total_s"):
        out[key], out[f"{key}_runs"] = min(r[key] for r in runs), [r[key] for r in runs]
    rss = sorted(r["peak_rss_mb"] for r in runs)
    out["peak_rss_mb"], out["peak_rss_mb_runs"] = rss[len(rss) // 2], [r["peak_rss_mb"] for r in runs]
    out["repeats"] = len(runs)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    s = settings_from(args)
    llmc_python = None
    if s["llmc_patterns"]:
        llmc_python = Path(args.llmcompressor_python) if args.llmcompressor_python else oneshot_llmc.ensure_venv(Path(args.llmcompressor_venv))
        version = oneshot_llmc.llmcompressor_version(llmc_python)
        if not version:
            raise SystemExit(f"{llmc_python} cannot import llmcompressor; drop --llmcompressor-python or fix that venv")
        print(f"llm-compressor (and torch) in {llmc_python}: {version}", flush=True)
    work_ctx = tempfile.TemporaryDirectory(prefix="sparseforge-bench-") if not args.keep_work else None
    work = Path(args.keep_work or work_ctx.name)
    work.mkdir(parents=True, exist_ok=True)
    bench = Bench(s, Path(args.out), work, ["benchmarks/bench_oneshot.py", *argv], args.timeout)
    try:
        bench.run(llmc_python)
    finally:
        bench.save()
        if work_ctx:
            work_ctx.cleanup()
    print()
    print(bench.md_path.read_text())
    print(f"wrote {bench.json_path} and {bench.md_path}")
    return 1 if any("error" in r for r in bench.results["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
