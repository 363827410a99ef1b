"""Peer engines on the issue-3 layer stack, for same-run comparisons: DeepSparse and onnxruntime.

Runs under a *peer* Python that has ``deepsparse`` / ``onnxruntime`` / ``onnx`` / ``numpy`` (no torch,
no sparseforge): ``ensure_venv`` builds one in ``.bench/peers-venv`` on first use (DeepSparse 1.8.0 pins
``onnx<1.15`` and ``numpy<2``, so it cannot share the project's environment). benchmarks/bench_kernels.py
calls it with ``--peer-python`` between its own cells, so peers and sparseforge are timed on the same
machine state: the host's speed drifts by up to 35% between rounds (``../shared/research/peer-speed.md``),
which makes the fixed reference numbers of the issue a weak bar in either direction.

The stack is the one of benchmarks/bench_kernels.py: ``--layers`` MatMul layers alternating (ffn, hidden)
and (hidden, ffn), no bias, no activation; Bernoulli(density) masks (2:4: two random kept positions
per group of 4), weights U(-b, b) with b = 1/sqrt(fan_in * density); masked weights are stored dense
(zeros included), which is how DeepSparse finds the sparsity. Every engine's output is checked against
a numpy float64 chain on the same weights (relative L2 error in the JSON).

Usage (prints one JSON object):
    .bench/peers-venv/bin/python benchmarks/bench_peers.py --tool deepsparse --batch 64 --sparsity 0.9
    .bench/peers-venv/bin/python benchmarks/bench_peers.py --tool onnxruntime --batch 64 --sparsity 0

From another script (any Python; the helpers below import neither torch nor the peers)::

    python = ensure_venv(Path(".bench/peers-venv"))       # created and installed on first use
    cell = run_peer(python, "deepsparse", batch=64, sparsity="0.9", layers=8, hidden=4096, ffn=11008)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_llamacpp_peer import PeerError  # noqa: E402
from bench_timing import time_fn  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tool", choices=["deepsparse", "onnxruntime"], required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--sparsity", required=True, help="fraction (0.9) or 2:4")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--ffn", type=int, default=11008)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget", type=float, default=3.0, help="seconds of timing (min 5, max 40 passes)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


PEER_PACKAGES = ["numpy<2", "deepsparse==1.8.0", "onnxruntime"]


def ensure_venv(venv: Path, base_python: str = "python3.11") -> Path:
    """Python of a venv that imports deepsparse and onnxruntime, created and installed if missing."""
    import subprocess

    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import deepsparse, onnxruntime, onnx"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"[peers] creating {venv} (one time: {' '.join(PEER_PACKAGES)})", flush=True)
    if not python.exists():
        subprocess.run([base_python, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)
    if subprocess.run(probe, capture_output=True).returncode != 0:
        raise SystemExit(f"peer venv {venv} cannot import deepsparse/onnxruntime; delete it and retry")
    return python


def run_peer(python: Path, tool: str, *, batch: int, sparsity: str, layers: int, hidden: int, ffn: int,
             threads: int = 2, budget: float = 3.0, timeout: float = 900) -> dict:  # fmt: skip
    """One peer cell in its own process (``python`` must have the tool); returns its JSON (PeerError if it fails)."""
    import subprocess

    cmd = [str(python), __file__, "--tool", tool, "--batch", str(batch), "--sparsity", sparsity, "--layers", str(layers),
           "--hidden", str(hidden), "--ffn", str(ffn), "--threads", str(threads), "--budget", str(budget)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise PeerError(f"peer {tool} B={batch} {sparsity} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}",
                        proc.returncode)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make_weights(args):
    """Masked weights W_k (out, in) as float32 numpy arrays, the chain of benchmarks/bench_kernels.py."""
    import numpy as np

    rng = np.random.default_rng(args.seed)
    out = []
    for k in range(args.layers):
        o, i = (args.ffn, args.hidden) if k % 2 == 0 else (args.hidden, args.ffn)
        if args.sparsity == "2:4":
            scores = rng.random((o, i // 4, 4), dtype=np.float32)
            keep = np.argsort(scores, axis=2)[:, :, 2:]
            mask = np.zeros_like(scores, dtype=bool)
            np.put_along_axis(mask, keep, True, axis=2)
            mask, density = mask.reshape(o, i), 0.5
        else:
            density = 1.0 - float(args.sparsity)
            mask = rng.random((o, i), dtype=np.float32) < density
        bound = 1.0 / math.sqrt(i * density)
        w = rng.uniform(-bound, bound, size=(o, i)).astype(np.float32)
        w *= mask
        out.append(w)
    return out


def onnx_chain(weights, path: str) -> None:
    """y = x @ W_0^T @ W_1^T ... as an ONNX MatMul chain (opset 13), batch axis symbolic."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []
    name = "x"
    for k, w in enumerate(weights):
        wt = f"w{k}"
        inits.append(numpy_helper.from_array(w.T.copy(), wt))  # (in, out)
        nxt = "y" if k == len(weights) - 1 else f"h{k}"
        nodes.append(helper.make_node("MatMul", [name, wt], [nxt]))
        name = nxt
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", weights[0].shape[1]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", weights[-1].shape[0]])
    graph = helper.make_graph(nodes, "stack", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    import numpy as np

    weights = make_weights(args)
    x = np.random.default_rng(args.seed + 1).standard_normal((args.batch, args.hidden), dtype=np.float32)
    ref = x.astype(np.float64)
    for w in weights:
        ref = ref @ w.T.astype(np.float64)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "stack.onnx")
        onnx_chain(weights, path)
        del weights
        t0 = time.perf_counter()
        if args.tool == "deepsparse":
            from deepsparse import compile_model, __version__ as version

            engine = compile_model(path, batch_size=args.batch, num_cores=args.threads)
            run = lambda: engine.run([x])[0]  # noqa: E731
        else:
            import onnxruntime as ort

            version = ort.__version__
            so = ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads = args.threads, 1
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
            run = lambda: sess.run(None, {"x": x})[0]  # noqa: E731
        compile_s = time.perf_counter() - t0
    y = run().astype(np.float64)
    rel = float(np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-30))
    cell = {"tool": args.tool, "version": version, "batch": args.batch, "sparsity": args.sparsity,
            "threads": args.threads, "compile_s": compile_s, "rel_l2_error": rel, **time_fn(run, args.budget)}
    json.dump(cell, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
