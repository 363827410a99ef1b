#!/usr/bin/env python
"""One-shot pruning benchmark: magnitude vs Wanda vs SparseGPT, and llm-compressor side by side.

For every model (``builtin``: perplexity on the held-out split; ``minilm``: mean cosine of
sentence embeddings to the dense encoder) and every pattern (default 50 % unstructured, 2:4, 4:8,
70 % unstructured), each method runs in its own subprocess (``oneshot_cell.py``), so the peak RSS
is that run's own. The calibration token ids are drawn once per model
(:func:`sparseforge.data.calibration_tokens`, the train split) and saved to a file that every
method *and* llm-compressor read, so all of them see identical windows.

For causal LMs, llm-compressor's ``SparseGPTModifier`` runs on the same model, ids and pattern in
a separate venv (``oneshot_llmc.py``); the model it saves is measured by the same evaluation cell.

Writes ``OUT/oneshot.json`` and ``OUT/oneshot.md`` (``oneshot.quick.*`` with ``--quick``) after
every cell (temp file + rename), and prints the markdown at the end.

Usage::

    python benchmarks/oneshot.py                                   # full run (tens of minutes on 2 cores)
    python benchmarks/oneshot.py --quick --skip-llmcompressor      # smoke run
    python benchmarks/oneshot.py --models builtin --patterns 50%,2:4 --llmcompressor-python /tmp/lcvenv/bin/python
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

import oneshot_llmc  # noqa: E402
import oneshot_report  # noqa: E402

FULL = dict(patterns="50%,2:4,4:8,70%", samples=64, seqlen=256, encoder_seqlen=128, eval_windows=64, eval_sentences=256)
QUICK = dict(patterns="50%,2:4", samples=8, seqlen=64, encoder_seqlen=32, eval_windows=4, eval_sentences=32)


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
    ap.add_argument("--patterns", help=f"comma list: N:M, X%% (unstructured), PATTERN@X%% (default {FULL['patterns']})")
    ap.add_argument("--samples", type=int, help="calibration samples (default 64)")
    ap.add_argument("--seqlen", type=int, help="calibration tokens per sample, causal LMs (default 256)")
    ap.add_argument("--encoder-seqlen", type=int, help="calibration tokens per sample, encoders (default 128)")
    ap.add_argument("--eval-windows", type=int, help="perplexity windows of 256 tokens (default 64 = the protocol)")
    ap.add_argument("--eval-sentences", type=int, help="held-out sentences for embedding fidelity (default 256)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward pass (both tools)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in every run")
    ap.add_argument("--quick", action="store_true", help="small smoke subset: " + json.dumps(QUICK))
    ap.add_argument("--skip-llmcompressor", action="store_true")
    ap.add_argument("--llmcompressor-python", help="Python of an existing venv with llmcompressor (skips venv set-up)")
    ap.add_argument("--llmcompressor-venv", default=str(REPO / ".bench" / "llmcompressor-venv"))
    ap.add_argument("--llmcompressor-patterns", help="patterns for llm-compressor (default: every unstructured/N:M one)")
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
        eval_windows=get("eval_windows"), eval_sentences=get("eval_sentences"),
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
    """Run ``oneshot_cell.py`` on ``spec`` in a subprocess; its result dict, or ``{"error": ...}``."""
    spec_file, result_file, log_file = work / f"{name}.spec.json", work / f"{name}.result.json", work / f"{name}.log"
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "TOKENIZERS_PARALLELISM": "false"}
    with open(log_file, "w") as log:
        try:
            proc = subprocess.run([sys.executable, str(HERE / "oneshot_cell.py"), str(spec_file), str(result_file)],
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

    def save(self) -> None:
        self.results["checks"] = oneshot_report.checks(self.results)
        write_atomic(self.json_path, json.dumps(self.results, indent=2) + "\n")
        write_atomic(self.md_path, oneshot_report.markdown(self.results))

    def record(self, run: dict) -> None:
        self.results["runs"].append(run)
        elapsed = time.perf_counter() - self.t0
        head = f"[{elapsed:7.0f}s] {run['model']:>8} {run['tool']:>14} {run['method']:>9} {run['pattern']:>6}"
        if "error" in run:
            print(f"{head}  FAILED {run['error']}", flush=True)
        else:
            print(f"{head}  {run['metric']}={run['value']:.4f}  prune {run['prune_s']:.1f}s  total {run['total_s']:.1f}s"
                  f"  peak {run['peak_rss_mb']:.0f}MiB  sparsity {run.get('achieved_sparsity', 0):.3f}", flush=True)  # fmt: skip
        self.save()

    def cell(self, model: str, method: str, label: str, base: dict) -> None:
        pattern, sparsity = self.s["pattern_specs"].get(label, ("dense", 0.0))
        spec = {**base, "task": "prune", "method": method, "pattern": pattern, "sparsity": sparsity}
        name = f"{len(self.results['runs']):03d}-{method}"
        run = {"model": model, "tool": "sparseforge", "method": method, "pattern": label, "sparsity": sparsity}
        self.record({**run, **run_cell(spec, self.work, name, self.timeout)})

    def llmc_cell(self, python: Path, model: str, label: str, base: dict) -> None:
        pattern, sparsity = self.s["pattern_specs"][label]
        run = {"model": model, "tool": oneshot_report.LLMC, "method": "sparsegpt", "pattern": label, "sparsity": sparsity}
        try:
            lc = oneshot_llmc.run_llmcompressor(
                python, base["model_dir"], Path(base["calibration"]), pattern, sparsity, self.work,
                threads=self.s["threads"], batch_size=self.s["batch_size"], timeout=self.timeout)  # fmt: skip
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            return self.record({**run, "error": str(exc).splitlines()[-1]})
        self.results["llmcompressor"] = {"versions": lc["versions"], "pipeline": lc["pipeline"]}
        run["llmc_settings"] = lc["modifier"]["SparseGPTModifier"]
        spec = {**base, "task": "evaluate", "method": "sparsegpt", "model": lc["out_dir"], "pattern": pattern,
                "sparsity": sparsity}  # fmt: skip
        ev = run_cell(spec, self.work, f"{len(self.results['runs']):03d}-llmc-eval", self.timeout)
        timing = {k: lc[k] for k in ("prune_s", "total_s", "save_s", "peak_rss_mb", "vm_hwm_mb", "peak_rss_end_mb", "process_s")}
        self.record({**run, **ev, **timing, "eval_peak_rss_mb": ev.get("peak_rss_end_mb")} if "error" not in ev else {**run, **ev})

    def run(self, llmc_python: "Path | None") -> None:
        from sparseforge.models import model_kind, resolve_model_path

        s = self.s
        for model in s["models"]:
            path = resolve_model_path(model)
            kind = model_kind(json.loads((path / "config.json").read_text()))
            print(f"== {model} ({kind}, {path}): drawing calibration ids", flush=True)
            calib, cinfo = calibration_file(model, kind, s, self.work, self.timeout)
            self.results["models"][model] = {"kind": kind, "path": str(path), "samples": cinfo["samples"],
                                             "seqlen": cinfo["seqlen"], "calibration_sha256": cinfo["sha256"]}  # fmt: skip
            base = {"model": model, "model_dir": str(path), "reference": model, "calibration": str(calib),
                    "samples": cinfo["samples"], "seqlen": cinfo["seqlen"], "seed": s["seed"],
                    "batch_size": s["batch_size"], "threads": s["threads"],
                    "eval_windows": s["eval_windows"], "eval_sentences": s["eval_sentences"]}  # fmt: skip
            self.cell(model, "dense", "dense", base)
            self.results["models"][model]["params"] = self.results["runs"][-1].get("params", 0)
            for label in s["patterns"]:
                for method in s["methods"]:
                    self.cell(model, method, label, base)
                if kind == "causal-lm" and llmc_python and label in s["llmc_patterns"]:
                    self.llmc_cell(llmc_python, model, label, base)
            for label in s["llmc_patterns"]:  # llm-compressor-only patterns
                if kind == "causal-lm" and llmc_python and label not in s["patterns"]:
                    self.llmc_cell(llmc_python, model, label, base)


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
    bench = Bench(s, Path(args.out), work, ["benchmarks/oneshot.py", *argv], args.timeout)
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
