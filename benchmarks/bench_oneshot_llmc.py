"""llm-compressor side of the one-shot benchmark: its own venv, and one SparseGPTModifier run.

llm-compressor (https://github.com/vllm-project/llm-compressor) is installed into a *separate*
virtual environment so it can never change the main environment's packages:

1. ``python3.11 -m venv VENV`` (default ``.bench/llmcompressor-venv``, git-ignored);
2. ``VENV/bin/pip install torch==2.13.0`` first (the CPU build; an unpinned torch pulls a
   multi-GB CUDA build);
3. ``VENV/bin/pip install -c VENV/constraints.txt llmcompressor`` with ``torch==2.13.0`` in the
   constraints file, so no dependency can pull another torch.

A venv that already imports llmcompressor is reused as is; ``--llmcompressor-python`` points at
any other Python that has it.

Example::

    python = ensure_venv(Path(".bench/llmcompressor-venv"))
    result = run_llmcompressor(python, "builtin-dir", "calib.pt", "2:4", 0.5, work, kind="causal-lm",
                               block_prefix="model.layers", threads=2, batch_size=8)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

TORCH_PIN = "torch==2.13.0"
RUNNER = Path(__file__).with_name("bench_llmcompressor_runner.py")

__all__ = ["ensure_venv", "llmcompressor_version", "run_llmcompressor", "TORCH_PIN"]


def _run(cmd: list[str], **kwargs) -> None:
    print("  $ " + " ".join(str(c) for c in cmd), flush=True)
    subprocess.run(cmd, check=True, **kwargs)


def llmcompressor_version(python: Path) -> str | None:
    """``llmcompressor.__version__`` as seen by ``python``, or None if it cannot import it."""
    probe = subprocess.run(
        [str(python), "-c", "import llmcompressor, torch; print(llmcompressor.__version__, torch.__version__)"],
        capture_output=True, text=True,
    )  # fmt: skip
    lines = probe.stdout.strip().splitlines()  # llmcompressor may log to stdout on import
    return lines[-1] if probe.returncode == 0 and lines else None


def ensure_venv(venv: Path, base_python: str = "python3.11") -> Path:
    """Python of a venv with llmcompressor and torch 2.13.0, creating and installing it if missing."""
    python = venv / "bin" / "python"
    if python.exists() and llmcompressor_version(python):
        return python
    print(f"[llm-compressor] creating {venv} (one time; downloads torch 2.13.0 CPU and llmcompressor)", flush=True)
    if not python.exists():
        _run([base_python, "-m", "venv", str(venv)])
    constraints = venv / "constraints.txt"
    constraints.write_text(TORCH_PIN + "\n")
    _run([str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"])
    _run([str(python), "-m", "pip", "install", "-q", TORCH_PIN])
    _run([str(python), "-m", "pip", "install", "-q", "-c", str(constraints), "llmcompressor"])
    found = llmcompressor_version(python)
    if not found or not found.split()[1].startswith("2.13.0"):
        raise SystemExit(f"llm-compressor venv {venv} is not usable (got {found!r}); delete it and retry")
    return python


def run_llmcompressor(
    python: Path, model_dir: str, calibration: Path, pattern: str, sparsity: float, work: Path, *,
    kind: str, block_prefix: str, threads: int, batch_size: int, block_size: int = 128, dampening: float = 0.01, timeout: float = 3600,
) -> dict:  # fmt: skip
    """Prune ``model_dir`` with llm-compressor's SparseGPTModifier; returns timings and the output dir.

    The runner's own timings (``prune_s``, ``total_s``, ``peak_rss_mb``, see
    ``bench_llmcompressor_runner.py``) are returned with ``out_dir`` (the pruned model) and
    ``process_s`` (the runner's wall time seen from here, saving included). Its log goes to
    ``work/<name>.log``.
    """
    name = "llmc-" + pattern.replace(":", "of") + f"-{sparsity:g}"
    out_dir, result = work / name, work / f"{name}.json"
    cmd = [str(python), str(RUNNER), "--model", str(model_dir), "--kind", kind, "--block-prefix", block_prefix,
           "--calibration", str(calibration),
           "--pattern", pattern, "--sparsity", str(sparsity), "--block-size", str(block_size),
           "--dampening", str(dampening), "--batch-size", str(batch_size), "--threads", str(threads),
           "--out", str(out_dir), "--result", str(result)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)  # the runner must see only the llm-compressor venv's packages
    t0 = time.perf_counter()
    with open(work / f"{name}.log", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout)
    if proc.returncode != 0 or not result.exists():
        tail = (work / f"{name}.log").read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(f"llm-compressor run failed (exit {proc.returncode}):\n" + "\n".join(tail))
    data = json.loads(result.read_text())
    data.update(out_dir=str(out_dir), process_s=time.perf_counter() - t0)
    return data


if __name__ == "__main__":  # python benchmarks/bench_oneshot_llmc.py [VENV]: create the venv only
    print(ensure_venv(Path(sys.argv[1] if len(sys.argv) > 1 else ".bench/llmcompressor-venv")))
