"""Targets and markdown tables of the one-shot benchmark (pure functions of the results JSON).

``checks(results)`` evaluates the targets of the issue on whatever cells are present:

* causal LMs: Wanda and SparseGPT below magnitude at every pattern; SparseGPT <= Wanda at 2:4;
  SparseGPT at 50 % unstructured within +15 % of dense perplexity;
* encoders: SparseGPT at 50 % with mean cosine >= 0.95;
* llm-compressor: sparseforge's SparseGPT perplexity within +2 % of llm-compressor's (or better),
  with lower pruning wall time and lower peak RSS.

``markdown(results)`` renders a summary table per model (method x pattern), a detail table
(time, memory, achieved sparsity) and the sparseforge vs llm-compressor comparison.
"""

from __future__ import annotations

import math

__all__ = ["checks", "markdown", "find"]

LLMC = "llm-compressor"


def find(results: dict, model: str, method: str, pattern: str, tool: str = "sparseforge") -> dict | None:
    """The finished run of (model, method, pattern label, tool), or None."""
    for r in results["runs"]:
        if (r["model"], r["method"], r["pattern"], r["tool"]) == (model, method, pattern, tool) and "value" in r:
            return r
    return None


def _check(name: str, passed: bool, detail: str) -> dict:
    return {"name": name, "passed": bool(passed), "detail": detail}


def _causal_checks(results: dict, model: str, dense: dict, patterns: list[str]) -> list[dict]:
    out = []
    for pattern in patterns:
        mag = find(results, model, "magnitude", pattern)
        for method in ("wanda", "sparsegpt"):
            r = find(results, model, method, pattern)
            if mag and r:
                out.append(_check(f"{model}: {method} < magnitude at {pattern}", r["value"] < mag["value"],
                                  f"{r['value']:.3f} vs {mag['value']:.3f} ({r['value'] / mag['value']:.2f}x)"))  # fmt: skip
    sg, wa = find(results, model, "sparsegpt", "2:4"), find(results, model, "wanda", "2:4")
    if sg and wa:
        out.append(_check(f"{model}: sparsegpt <= wanda at 2:4", sg["value"] <= wa["value"],
                          f"{sg['value']:.3f} vs {wa['value']:.3f}"))  # fmt: skip
    sg = find(results, model, "sparsegpt", "50%")
    if sg and dense:
        ratio = sg["value"] / dense["value"]
        out.append(_check(f"{model}: sparsegpt 50% within +15% of dense", ratio <= 1.15,
                          f"{sg['value']:.3f} vs dense {dense['value']:.3f} ({ratio - 1:+.1%})"))  # fmt: skip
    for pattern in patterns:
        sf, lc = find(results, model, "sparsegpt", pattern), find(results, model, "sparsegpt", pattern, LLMC)
        if not (sf and lc):
            continue
        ratio = sf["value"] / lc["value"]
        out.append(_check(f"{model}: sparseforge ppl within +2% of llm-compressor at {pattern}", ratio <= 1.02,
                          f"{sf['value']:.3f} vs {lc['value']:.3f} ({ratio - 1:+.2%})"))  # fmt: skip
        out.append(_check(f"{model}: sparseforge prune time < llm-compressor at {pattern}", sf["prune_s"] < lc["prune_s"],
                          f"{sf['prune_s']:.1f} s vs {lc['prune_s']:.1f} s (total {sf['total_s']:.1f} s vs {lc['total_s']:.1f} s)"))  # fmt: skip
        out.append(_check(f"{model}: sparseforge peak RSS < llm-compressor at {pattern}", sf["peak_rss_mb"] < lc["peak_rss_mb"],
                          f"{sf['peak_rss_mb']:.0f} MiB vs {lc['peak_rss_mb']:.0f} MiB"))  # fmt: skip
    return out


def checks(results: dict) -> list[dict]:
    out = []
    for model, info in results["models"].items():
        dense = find(results, model, "dense", "dense")
        if info["kind"] == "causal-lm":
            out += _causal_checks(results, model, dense, results["settings"]["patterns"])
        else:
            sg = find(results, model, "sparsegpt", "50%")
            if sg:
                out.append(_check(f"{model}: sparsegpt 50% mean cosine >= 0.95", sg["value"] >= 0.95, f"{sg['value']:.4f}"))
    return out


def _fmt(value: float | None, metric: str) -> str:
    if value is None:
        return "—"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4f}" if metric == "mean_cosine" else (f"{value:.2f}" if value < 1000 else f"{value:.3g}")


def _model_tables(results: dict, model: str, info: dict) -> list[str]:
    patterns = results["settings"]["patterns"]
    metric = "ppl" if info["kind"] == "causal-lm" else "mean_cosine"
    label = "perplexity (lower is better)" if metric == "ppl" else "mean cosine to dense embeddings (higher is better)"
    dense = find(results, model, "dense", "dense")
    lines = [f"### {model}: {label}", "",
             f"{info['kind']}, {info.get('params', 0) / 1e6:.1f} M parameters, dense = "
             f"{_fmt(dense and dense['value'], metric)}; calibration {info['samples']} x {info['seqlen']} tokens.", "",
             "| method | " + " | ".join(patterns) + " |", "|---" * (len(patterns) + 1) + "|"]  # fmt: skip
    rows = [(m, "sparseforge") for m in results["settings"]["methods"]]
    if any(r["tool"] == LLMC and r["model"] == model for r in results["runs"]):
        rows.append(("sparsegpt", LLMC))
    for method, tool in rows:
        cells = [_fmt((find(results, model, method, p, tool) or {}).get("value"), metric) for p in patterns]
        name = method if tool == "sparseforge" else f"{method} ({LLMC})"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| tool | method | pattern | metric | vs dense | prune s | total s | peak RSS MiB | sparsity | pattern ok |",
              "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results["runs"]:
        if r["model"] != model:
            continue
        if "value" not in r:
            lines.append(f"| {r['tool']} | {r['method']} | {r['pattern']} | FAILED: {r.get('error', '?')[:80]} | | | | | | |")
            continue
        vs = "" if not dense or r["method"] == "dense" else (
            f"{r['value'] / dense['value'] - 1:+.1%}" if metric == "ppl" else f"{r['value'] - dense['value']:+.4f}")
        sp = f"{r['achieved_sparsity']:.2%}" if "achieved_sparsity" in r else "0"
        ok = "" if "pattern_ok" not in r else ("yes" if r["sparsity_ok"] else "NO")
        lines.append(f"| {r['tool']} | {r['method']} | {r['pattern']} | {_fmt(r['value'], metric)} | {vs} | "
                     f"{r['prune_s']:.2f} | {r['total_s']:.1f} | {r['peak_rss_mb']:.0f} | {sp} | {ok} |")  # fmt: skip
    return lines + [""]


def _llmc_table(results: dict) -> list[str]:
    lines = []
    for model, info in results["models"].items():
        pairs = [(p, find(results, model, "sparsegpt", p), find(results, model, "sparsegpt", p, LLMC))
                 for p in results["settings"]["patterns"]]  # fmt: skip
        pairs = [(p, a, b) for p, a, b in pairs if a and b]
        if not pairs:
            continue
        metric = "ppl" if info["kind"] == "causal-lm" else "cosine"
        lines += [f"### {model}: sparseforge vs {LLMC} SparseGPT (same calibration ids)", "",
                  f"| pattern | {metric} sparseforge | {metric} llm-compressor | Δ | prune s sf / llmc | total s sf / llmc | peak RSS MiB sf / llmc |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for p, a, b in pairs:
            delta = f"{a['value'] / b['value'] - 1:+.2%}" if metric == "ppl" else f"{a['value'] - b['value']:+.4f}"
            lines.append(f"| {p} | {a['value']:.4f} | {b['value']:.4f} | {delta} | "
                         f"{a['prune_s']:.1f} / {b['prune_s']:.1f} | {a['total_s']:.1f} / {b['total_s']:.1f} | "
                         f"{a['peak_rss_mb']:.0f} / {b['peak_rss_mb']:.0f} |")  # fmt: skip
        lines.append("")
    return lines


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = ["# One-shot pruning benchmark", "",
             f"{results['meta']['date']} · sparseforge {results['meta']['sparseforge']} ({results['meta']['git']}) · "
             f"torch {results['meta']['torch']} · {s['threads']} thread(s) · {results['meta']['cpu']}"
             + (" · **quick smoke run (not representative)**" if s["quick"] else ""), "",
             f"Command: `{results['meta']['command']}`", ""]  # fmt: skip
    for model, info in results["models"].items():
        lines += _model_tables(results, model, info)
    lines += _llmc_table(results)
    if results.get("llmcompressor"):
        lc = results["llmcompressor"]
        lines += [f"llm-compressor {lc['versions']['llmcompressor']} (torch {lc['versions']['torch']}, transformers "
                  f"{lc['versions']['transformers']}), `oneshot(pipeline=\"{lc['pipeline']}\")` with:", ""]  # fmt: skip
        for r in results["runs"]:
            if r["tool"] == LLMC and "llmc_settings" in r:
                args = ", ".join(f"{k}={v!r}" for k, v in r["llmc_settings"].items())
                lines.append(f"- {r['model']} {r['pattern']}: `SparseGPTModifier({args})`")
        lines.append("")
    lines += ["### Targets", ""]
    for c in results.get("checks", []):
        lines.append(f"- {'PASS' if c['passed'] else 'FAIL'}: {c['name']} ({c['detail']})")
    return "\n".join(lines) + "\n"
