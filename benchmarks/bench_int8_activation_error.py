"""Error of the int8-activation mode on a model's real activations, per layer, and its perplexity change.

Input: a compressed sparseforge checkpoint with int8 values (``sparseforge prune builtin --method sparsegpt
--pattern 2:4 --quantize int8 --out m/``), loaded on the sparse kernels
(:func:`sparseforge.io.loading.load_sparse`). Two measurements on the built-in held-out text:

* per layer that has the mode (int8 values, bitmap / N:M): during a float-mode perplexity pass, each
  layer's input ``x`` is also run with ``activations="int8"``; reported are the relative L2 error
  ``||y_int8 - y_float|| / ||y_float||`` over all tokens, its worst token, and the mean outlier ratio of
  ``x`` (``max|x| / rms(x)`` per token: the per-token scale's step is ``max|x| / 127``, so a large ratio
  means coarse steps for the other channels). Inputs are the float model's, so each layer's figure is its
  own error, not accumulated;
* the perplexity of the whole model in float mode and with every such layer in the int8 mode.

Usage:
    python benchmarks/bench_int8_activation_error.py m/                      # 16 windows of 256 tokens
    python benchmarks/bench_int8_activation_error.py m/ --windows 4 --seqlen 64   # quick
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_host import host_line  # noqa: E402
from bench_output import write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path, help="compressed sparseforge checkpoint with int8 values")
    ap.add_argument("--windows", type=int, default=16, help="held-out windows scored")
    ap.add_argument("--seqlen", type=int, default=256, help="tokens per window")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "int8_activation_error.json")
    return ap.parse_args(argv)


class LayerError:
    """Running sums of one layer's int8-mode error against its float mode."""

    def __init__(self, shape: tuple[int, int]) -> None:
        self.shape = shape
        self.diff2 = self.ref2 = 0.0
        self.worst = 0.0
        self.outlier_sum = 0.0
        self.tokens = 0

    def add(self, x: torch.Tensor, y_float: torch.Tensor, y_int8: torch.Tensor) -> None:
        """x (T, in), y_* (T, out) float32."""
        d2 = (y_int8 - y_float).double().pow(2).sum(dim=1)  # (T,)
        r2 = y_float.double().pow(2).sum(dim=1)  # (T,)
        self.diff2 += float(d2.sum())
        self.ref2 += float(r2.sum())
        self.worst = max(self.worst, float((d2 / r2.clamp_min(1e-30)).sqrt().max()))
        rms = x.double().pow(2).mean(dim=1).sqrt().clamp_min(1e-30)  # (T,)
        self.outlier_sum += float((x.double().abs().amax(dim=1) / rms).sum())
        self.tokens += x.shape[0]

    def row(self, name: str) -> dict:
        return {"layer": name, "shape": list(self.shape), "tokens": self.tokens,
                "rel_l2": math.sqrt(self.diff2 / max(self.ref2, 1e-30)), "worst_token_rel_l2": self.worst,
                "mean_outlier_ratio": self.outlier_sum / max(self.tokens, 1)}


def measure(model, tokenizer, windows: int, seqlen: int) -> dict:
    """Per-layer errors during a float-mode pass, then both perplexities."""
    from sparseforge import ops
    from sparseforge.evaluation.quality import perplexity
    from sparseforge.runtime.compress import set_activation_precision_

    names = set_activation_precision_(model, "int8")
    set_activation_precision_(model, "float")
    errors: dict[str, LayerError] = {}
    hooks = []
    for name in names:
        layer = model.get_submodule(name)
        errors[name] = LayerError((layer.out_features, layer.in_features))

        def hook(mod, inputs, output, err=errors[name]):
            x = inputs[0].detach().reshape(-1, mod.in_features).float().contiguous()  # (T, in)
            y_int8 = ops.linear(x, mod.weight_format, mod.bias, activations="int8")  # (T, out)
            err.add(x, output.detach().reshape(-1, mod.out_features).float(), y_int8)

        hooks.append(layer.register_forward_hook(hook))
    try:
        float_ppl = perplexity(model, tokenizer, seqlen=seqlen, max_windows=windows, progress=False)
    finally:
        for h in hooks:
            h.remove()
    set_activation_precision_(model, "int8")
    int8_ppl = perplexity(model, tokenizer, seqlen=seqlen, max_windows=windows, progress=False)
    set_activation_precision_(model, "float")
    return {"layers": [errors[n].row(n) for n in names], "ppl_float": float_ppl.ppl, "ppl_int8": int8_ppl.ppl,
            "tokens": float_ppl.tokens}


def table(result: dict) -> str:
    rows = result["layers"]
    lines = ["| layer | out x in | rel L2 | worst token | mean max/rms of x |", "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['shape'][0]}x{r['shape'][1]} | {100 * r['rel_l2']:.2f}% | "
                     f"{100 * r['worst_token_rel_l2']:.2f}% | {r['mean_outlier_ratio']:.1f} |")
    rel = sorted(r["rel_l2"] for r in rows)
    change = 100 * (result["ppl_int8"] / result["ppl_float"] - 1)
    lines.append(f"\n{len(rows)} layers: rel L2 median {100 * rel[len(rel) // 2]:.2f}%, max {100 * rel[-1]:.2f}%; "
                 f"perplexity float {result['ppl_float']:.4f} -> int8 activations {result['ppl_int8']:.4f} "
                 f"({change:+.2f}%) over {result['tokens']} tokens")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from sparseforge import kernels
    from sparseforge.io.loading import load_sparse
    from sparseforge.io.models import load_tokenizer

    torch.set_num_threads(args.threads)
    kernels.set_num_threads(args.threads)
    model = load_sparse(args.checkpoint).eval()
    tokenizer = load_tokenizer(args.checkpoint)
    start = time.perf_counter()
    with torch.no_grad():
        result = measure(model, tokenizer, args.windows, args.seqlen)
    result.update(host=host_line(), checkpoint=str(args.checkpoint), windows=args.windows, seqlen=args.seqlen,
                  int8_act_path=kernels.int8_act_path(), seconds=time.perf_counter() - start)
    print(f"# {result['host']}\n# int8-activation path: {result['int8_act_path']}")
    print(table(result))
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
