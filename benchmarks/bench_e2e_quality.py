"""Quality half of the llama.cpp comparison: held-out perplexity of every variant, by one protocol.

``bench_e2e_llamacpp.py`` times llama.cpp's GGUF variants and ours on one random-weight Llama; speed
says nothing about quality, so this script scores the same kinds of variant on the **trained built-in
model** (hidden 256, 6 layers, byte-level BPE tokenizer) over the built-in held-out text:

* llama.cpp: the dense model converted by its own ``convert_hf_to_gguf.py`` to F32, BF16 and Q8_0,
  and ``llama-quantize`` Q4_K_M; plus the SparseGPT 2:4 model as F32 and Q8_0 (what a user gets by
  quantizing our pruned model for llama.cpp). Scored by ``llama-perplexity``.
* sparseforge: dense fp32 and bf16, and SparseGPT 2:4 / 75% / 4:16 / 90% (fp32 values) and 2:4 / 75% / 4:16
  with joint int8 quantization (``sparsify_`` with ``quantize=int8``, what ``sparseforge prune
  --quantize int8`` runs), each compressed with ``compress_`` so the sparse kernels compute the logits;
  each int8 variant also with int8 activations (``w8a8``: ``set_activation_precision_(model, "int8")``, the
  speed table's w8a8 cells). 4:16 is 75% sparse as N:M with groups of 16.

Every row uses llama-perplexity's protocol, reimplemented for our models: the text tokenized whole
(a BOS first when the GGUF says ``add_bos``), cut into ``--ctx``-token chunks, the first token of a
chunk replaced by BOS when ``add_bos``, and only the second half of each chunk scored (positions
``ctx/2 .. ctx-2`` predicting the next token). Two rows check the protocol itself: llama.cpp's F32
against our dense fp32, and llama.cpp's F32 of the 2:4 model against ours; they must agree to
~0.1% (a tokenizer or protocol mismatch would move them by far more).

With ``--speed results/e2e_llamacpp.json`` the table gets each variant's decode tokens/s from that
run (same variant kind, the large model) and a speed-versus-perplexity plot is written.

    python benchmarks/bench_e2e_quality.py --quick          # 8 chunks, 2:4 only (smoke run)
    python benchmarks/bench_e2e_quality.py --speed benchmarks/results/e2e_llamacpp.json
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_llamacpp_peer as peer  # noqa: E402
from bench_e2e_llamacpp import convert_all, int8_lm_head_  # noqa: E402
from bench_host import host_info, host_line  # noqa: E402
from bench_output import write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SPARSITIES = {"2:4": ("2:4", None), "75%": ("unstructured", 0.75), "4:16": ("4:16", None), "90%": ("unstructured", 0.9)}
INT8_OF = ("2:4", "75%", "4:16")  # the sparsities that also get joint int8 rows (int8 values; and w8a8)
PROTOCOL_TOLERANCE = 0.002  # llama.cpp F32 vs our fp32 on the same weights: relative perplexity gap


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="8 chunks, 2:4 only (smoke run)")
    p.add_argument("--ctx", type=int, default=256, help="tokens per chunk (the built-in model was trained on 256)")
    p.add_argument("--chunks", type=int, default=128, help="chunks scored (each scores ctx/2 - 1 tokens)")
    p.add_argument("--sparsities", nargs="+", default=list(SPARSITIES), choices=list(SPARSITIES))
    p.add_argument("--calibration", type=int, default=64, help="SparseGPT calibration samples (of --ctx tokens)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--finetune-steps", type=int, default=0,
                   help="also score each pattern after this many SquareHead steps (sparseforge.finetune_ defaults), "
                        "then int8 (round to nearest, the same mask); 0: one-shot only")
    p.add_argument("--speed", type=Path, default=None, help="e2e_llamacpp.json to join decode speeds from")
    p.add_argument("--reuse", action="store_true", help="take the perplexities from --out's existing JSON (join --speed and plot only)")
    p.add_argument("--work", type=Path, default=peer.CACHE / "models")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.chunks, args.sparsities, args.calibration = 8, ["2:4"], 8
    if args.out is None:
        args.out = RESULTS / ("e2e_quality.quick.json" if args.quick else "e2e_quality.json")
    return args


# --------------------------------------------------------------------------- the protocol


def gguf_add_bos(tools: peer.LlamaCpp, gguf: Path) -> bool:
    """Whether llama.cpp prepends BOS for this GGUF: its ``tokenizer.ggml.add_bos_token`` key, else the
    byte-level BPE default (no BOS)."""
    sys.path.insert(0, str(tools.source / "gguf-py"))
    from gguf import GGUFReader

    field = GGUFReader(gguf).fields.get("tokenizer.ggml.add_bos_token")
    return bool(field.parts[field.data[0]][0]) if field is not None else False


def protocol_ids(tokenizer, text: str, add_bos: bool) -> torch.Tensor:
    """The token stream llama-perplexity scores: the whole text, BOS first when ``add_bos``."""
    from sparseforge.data.calibration import encode

    ids = encode(tokenizer, text)  # (n,)
    if add_bos:
        ids = torch.cat([torch.tensor([tokenizer.bos_token_id]), ids])
    return ids


def protocol_perplexity(model, ids: torch.Tensor, ctx: int, chunks: int, bos: int | None, batch: int = 8) -> float:
    """llama-perplexity's estimate for a transformers causal LM ``model`` over ``ids`` (module doc)."""
    n_chunk = min(ids.numel() // ctx, chunks)
    if n_chunk < 1:
        raise SystemExit(f"the text has {ids.numel()} tokens, fewer than one chunk of {ctx}")
    windows = ids[: n_chunk * ctx].view(n_chunk, ctx)  # (chunks, ctx)
    first = ctx // 2
    nll, count = 0.0, 0
    with torch.inference_mode():
        for block in windows.split(batch):
            inputs = block.clone()  # (B, ctx)
            if bos is not None:
                inputs[:, 0] = bos
            logits = model(input_ids=inputs).logits[:, first:ctx - 1].float()  # (B, ctx/2 - 1, V)
            targets = block[:, first + 1:]  # (B, ctx/2 - 1): the original tokens
            logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1))  # (B, ctx/2 - 1, 1)
            nll -= logp.double().sum().item()
            count += targets.numel()
    return math.exp(nll / count)


# --------------------------------------------------------------------------- the variants


def builtin_dir(work: Path) -> Path:
    """A copy of the built-in model's directory under ``work`` (the converter writes next to it)."""
    from sparseforge.io.builtin import builtin_model_path

    out = work / "builtin-llama"
    if not (out / "config.json").exists():
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(builtin_model_path(), tmp)
        tmp.rename(out)
    return out


def prune(model, label: str, bits: int | None, tokens: torch.Tensor, cache: Path):
    """A SparseGPT-pruned copy of ``model`` (joint ``bits``-bit quantization when given).

    The pruned state is cached in ``cache`` (keyed by variant and calibration size): pruning is the
    slow part of a rerun."""
    from sparseforge.config import SparsifyConfig
    from sparseforge.prune.sparsify import sparsify_
    from sparseforge.quant.config import QuantConfig
    from sparseforge.quant.transform import attach_scale

    pattern, sparsity = SPARSITIES[label]
    pruned = copy.deepcopy(model)
    path = cache / f"builtin-sparsegpt-{label.replace(':', 'of').replace('%', 'pct')}-{bits or 32}bit-{tokens.shape[0]}x{tokens.shape[1]}.pt"
    if path.exists():
        state = torch.load(path)
        for name, module in pruned.named_modules():  # quantized layers carry a weight_scale buffer
            if f"{name}.weight_scale" in state:
                attach_scale(module, state[f"{name}.weight_scale"])
        pruned.load_state_dict(state)
        return pruned
    quant = None if bits is None else QuantConfig(bits=bits, method="joint")
    sparsify_(pruned, SparsifyConfig(method="sparsegpt", pattern=pattern, sparsity=sparsity, quantize=quant),
              calibration=tokens, progress=False)  # fmt: skip
    tmp = path.with_suffix(".tmp")
    torch.save(pruned.state_dict(), tmp)
    tmp.replace(path)
    return pruned


def recovered(pruned, dense, tokenizer, label: str, steps: int, cache: Path, data="builtin"):
    """``pruned`` after ``steps`` steps of SquareHead distillation from ``dense`` on the built-in corpus
    (or ``data``; :func:`sparseforge.finetune.finetune_` with its defaults; its zeros stay zero). Cached in ``cache`` like
    :func:`prune`'s state."""
    from sparseforge.finetune import FinetuneConfig, finetune_

    model = copy.deepcopy(pruned)
    path = cache / f"builtin-sparsegpt-{label.replace(':', 'of').replace('%', 'pct')}-squarehead{steps}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path))
        return model
    finetune_(model, FinetuneConfig(loss="squarehead", steps=steps), teacher=dense, data=data, tokenizer=tokenizer,
              evaluate=False, progress=False)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    return model


def compressed(model, int8: bool, pattern: str | None = None):
    """``model`` with every pruned layer as SparseLinear (int8 values when quantized) in the format the
    rule picks (``"auto"`` would keep this small model's layers dense: they are faster dense); quantized models
    get the int8 lm_head of the speed table's int8 cells (:func:`int8_lm_head_`)."""
    from sparseforge.runtime.compress import compress_

    out = copy.deepcopy(model)
    kw = {"dtype": torch.int8} if int8 else {}
    report = compress_(out, format="rule", pattern=pattern, **kw)  # N:M: the pattern it was pruned to
    fmts = ",".join(sorted({c.format for c in report.converted}))
    return out, fmts + (int8_lm_head_(out) if int8 else "")


def save_hf(model, tokenizer, path: Path) -> Path:
    """``model`` as a plain (dense) Hugging Face directory for llama.cpp's converter (cached)."""
    if not (path / "config.json").exists():
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(path)
    return path


# --------------------------------------------------------------------------- speed join and plot


def speed_key(name: str) -> str:
    """The e2e_llamacpp.json row prefix measuring quality row ``name``'s kind of variant: the name without
    its parenthesised detail and fine-tuning tag ("sparseforge 2:4 int8 (nm 2:4)" and "sparseforge 2:4 int8, 200
    SquareHead steps (nm 2:4)" -> "sparseforge 2:4 int8": the same kernels read the same bytes; "llama.cpp q8_0
    (2:4 SparseGPT)" -> "llama.cpp q8_0": llama.cpp reads the zeros too)."""
    return name.split(" (")[0].split(", ")[0]


def join_speed(rows: dict, speed_json: Path) -> None:
    import json

    speed = json.loads(speed_json.read_text())["rows"]
    for name, row in rows.items():
        key = speed_key(name)
        match = next((v for k, v in speed.items() if k == key or k.startswith(key + " ")), None)
        row["decode_tps"] = None if match is None else match.get("decode_tps")


OFF_SCALE = 0.15  # perplexity changes above +15% are listed beside the plot, not drawn (they would flatten it)


def plot(rows: dict, path: Path, title: str) -> Path | None:
    """Decode tokens/s (x) against the perplexity change vs dense fp32 (y, %) for every row with a speed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(r["decode_tps"], r["vs_dense_fp32"], name) for name, r in rows.items() if r.get("decode_tps")]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(9, 5.5))
    off = []
    for tps, change, name in points:
        if change > OFF_SCALE:
            off.append(f"{name}: {change:+.0%} at {tps:.1f} tok/s")
            continue
        ours = name.startswith("sparseforge")
        ax.scatter(tps, 100 * change, marker="o" if ours else "s", color="tab:blue" if ours else "tab:orange")
        ax.annotate(name.replace("sparseforge ", "sf ").replace("llama.cpp ", "lc "), (tps, 100 * change), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")  # fmt: skip
    if off:
        ax.text(0.01, 0.99, "off scale:\n" + "\n".join(off), transform=ax.transAxes, va="top", fontsize=7)
    ax.set_xlabel("decode tokens/s (Llama-shaped 721M model, batch 1, 2 threads)")
    ax.set_ylabel("perplexity change vs dense fp32, % (built-in model)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------- main


def rejoin(args) -> dict:
    """``--reuse``: the last run's perplexities joined with ``--speed`` and plotted again."""
    import json

    if args.speed is None or not args.out.exists():
        raise SystemExit(f"--reuse needs --speed and an existing {args.out}")
    result = json.loads(args.out.read_text())
    join_speed(result["rows"], args.speed)
    png = plot(result["rows"], args.out.with_suffix(".png"), f"speed vs quality; CPU {host_info()['cpu']}")
    result["plot"] = None if png is None else str(png)
    result["speed_from"] = str(args.speed)
    write_json(args.out, result, indent=2)
    print_table(result["rows"])
    print(f"wrote {args.out} and {png}")
    return result


def print_table(rows: dict) -> None:
    print("| variant | perplexity | vs dense fp32 | decode tok/s (721M shape) |\n|---|---:|---:|---:|")
    for name, r in sorted(rows.items(), key=lambda kv: kv[1]["ppl"]):
        tps = r.get("decode_tps")
        print(f"| {name} | {r['ppl']:.4f} | {r['vs_dense_fp32']:+.2%} | {'-' if tps is None else f'{tps:.1f}'} |")
    for name, r in rows.items():
        if r.get("note"):
            print(f"{name}: {r['note']}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.reuse:
        return rejoin(args)
    import transformers as t

    from sparseforge.data.calibration import encode
    from sparseforge.data.corpus import load_text

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    tools = peer.ensure_llamacpp()
    hf = builtin_dir(args.work)
    tokenizer = t.AutoTokenizer.from_pretrained(hf)
    dense = t.LlamaForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    text_file = args.work / "heldout.txt"
    text = load_text("heldout")
    if not text_file.exists() or text_file.read_text(encoding="utf-8") != text:
        tmp = text_file.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(text_file)

    ggufs = {f"llama.cpp {k.lower()}": v for k, v in convert_all(tools, hf).items()}
    add_bos = gguf_add_bos(tools, ggufs["llama.cpp f32"])
    ids = protocol_ids(tokenizer, text, add_bos)  # (n,)
    bos = tokenizer.bos_token_id if add_bos else None
    gen = torch.Generator().manual_seed(0)
    train = encode(tokenizer, load_text("train"))
    starts = torch.randint(0, train.numel() - args.ctx, (args.calibration,), generator=gen)
    calib = torch.stack([train[s:s + args.ctx] for s in starts.tolist()])  # (samples, ctx)

    ours = {"sparseforge dense fp32": (dense, "dense"), "sparseforge dense bf16": (copy.deepcopy(dense).to(torch.bfloat16), "dense")}
    for label in args.sparsities:
        for bits in (None, 8) if label in INT8_OF else (None,):
            pruned = prune(dense, label, bits, calib, args.work)
            nm = SPARSITIES[label][0] if SPARSITIES[label][1] is None else None
            model, fmts = compressed(pruned, int8=bits is not None, pattern=nm)
            ours[f"sparseforge {label} {'int8' if bits else 'fp32'} ({fmts})"] = (model, "sparse")
            if bits == 8:  # the same weights with int8 activations (bitmap / N:M layers; CSR keeps float x)
                from sparseforge.runtime.compress import set_activation_precision_

                w8a8 = copy.deepcopy(model)
                set_activation_precision_(w8a8, "int8")
                ours[f"sparseforge {label} w8a8 ({fmts})"] = (w8a8, "sparse")
            if bits is None and args.finetune_steps > 0:  # recovery, then int8 weights (and activations)
                from sparseforge.runtime.compress import set_activation_precision_

                tuned, fmts = compressed(recovered(pruned, dense, tokenizer, label, args.finetune_steps, args.work),
                                         int8=True, pattern=nm)
                tag = f"{args.finetune_steps} SquareHead steps"
                ours[f"sparseforge {label} int8, {tag} ({fmts})"] = (tuned, "sparse")
                w8a8 = copy.deepcopy(tuned)
                set_activation_precision_(w8a8, "int8")
                ours[f"sparseforge {label} w8a8, {tag} ({fmts})"] = (w8a8, "sparse")
                print(f"fine-tuned {label} ({time.perf_counter() - start:.0f} s)", flush=True)
            if label == "2:4" and bits is None:  # llama.cpp gets our pruned model too
                tag = f"{calib.shape[0]}x{calib.shape[1]}"  # the same calibration as the cached pruned state
                sparse_hf = save_hf(pruned, tokenizer, args.work / f"builtin-llama-sparsegpt-2of4-{tag}")
                conv = convert_all(tools, sparse_hf)
                ggufs["llama.cpp f32 (2:4 SparseGPT)"] = conv["f32"]
                ggufs["llama.cpp q8_0 (2:4 SparseGPT)"] = conv["q8_0"]
            print(f"pruned {label}{' + int8' if bits else ''} ({time.perf_counter() - start:.0f} s)", flush=True)

    rows: dict[str, dict] = {}
    for name, path in ggufs.items():
        measured = peer.perplexity(tools, path, text_file, threads=args.threads, ctx=args.ctx, chunks=args.chunks)
        ppl, note = measured.ppl, measured.note
        rows[name] = {"ppl": ppl, "source": "llama-perplexity", "file_bytes": path.stat().st_size, "note": note}
        print(f"{name}: {ppl:.4f}", flush=True)
    from sparseforge import kernels

    with kernels.sparse_threads(args.threads):
        for name, (model, kind) in ours.items():
            ppl = protocol_perplexity(model, ids, args.ctx, args.chunks, bos)
            rows[name] = {"ppl": ppl, "source": "sparseforge (llama-perplexity protocol)", "kind": kind}
            print(f"{name}: {ppl:.4f}", flush=True)
    base = rows["sparseforge dense fp32"]["ppl"]
    for r in rows.values():
        r["vs_dense_fp32"] = r["ppl"] / base - 1
    if args.speed is not None:
        join_speed(rows, args.speed)

    checks = []
    for ours_name, theirs in (("sparseforge dense fp32", "llama.cpp f32"),
                              (next((k for k in rows if k.startswith("sparseforge 2:4 fp32")), None), "llama.cpp f32 (2:4 SparseGPT)")):
        if ours_name in rows and theirs in rows:
            gap = rows[theirs]["ppl"] / rows[ours_name]["ppl"] - 1
            ok = abs(gap) <= PROTOCOL_TOLERANCE
            checks.append(f"{'PASS' if ok else 'FAIL'}: protocol check {theirs} vs {ours_name}: {gap:+.3%} "
                          f"(|gap| <= {PROTOCOL_TOLERANCE:.1%})")
    cpu = host_line()
    print(f"\nheld-out perplexity, built-in model, {args.chunks} chunks of {args.ctx} tokens "
          f"(second half scored), add_bos={add_bos}; CPU {cpu}")
    print_table(rows)
    print("\n".join(checks))
    result = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "host": host_info(),
              "add_bos": add_bos, "tokens_scored_per_chunk": args.ctx - args.ctx // 2 - 1, "rows": rows,
              "checks": checks, "seconds": time.perf_counter() - start, "loadavg": os.getloadavg()}  # fmt: skip
    if args.speed is not None:
        png = plot(rows, args.out.with_suffix(".png"), f"speed vs quality; CPU {host_info()['cpu']}")
        result["plot"] = None if png is None else str(png)
        if png:
            print(f"wrote {png}")
    write_json(args.out, result, indent=2)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
