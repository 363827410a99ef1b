"""End to end against llama.cpp: batch-1 decode and prefill of one Llama-shaped model, same run.

The comparison users make: llama.cpp with a quantized GGUF against sparseforge's dense and sparse
models. One random-weight Llama (default: hidden 2048, 16 layers, FFN 5632, 32 heads / 4 KV heads,
vocab 4096 with the built-in model's byte-level BPE tokenizer) is written as a Hugging Face
directory, converted with llama.cpp's own ``convert_hf_to_gguf.py`` to F32 / BF16 / Q8_0 and
quantized with ``llama-quantize`` to Q4_K_M (``bench_llamacpp_peer.py`` builds llama.cpp from the
source vendored in the ``llama-cpp-python`` sdist and caches everything under ``.bench/llamacpp``).

Cells, interleaved round by round so drifting load hits every cell alike (medians reported):
- llama.cpp ``llama-bench -t THREADS``: decode tokens/s (``--new`` tokens) and prefill tokens/s
  (``--prefill`` tokens), one repetition per round;
- sparseforge, decoding ``--new`` tokens greedily after a ``--prompt``-token prompt through the native
  decode engine (:func:`sparseforge.generation.loop.native_generate`: fused projections, static KV
  cache, native decode attention), and one forward of ``--prefill`` tokens: dense fp32, dense bf16,
  magnitude-pruned 2:4 / 75% / 90% compressed with ``compress_`` (fp32 values), and 2:4 / 75% / 4:16 with
  int8 values (``compress_(..., format=--int8-format, dtype=torch.int8)``: by default the format measured
  with int8 values on this host; one scale per output row; the dense
  ``lm_head`` int8 too, stored as a full bitmap: :func:`int8_lm_head_`, as llama.cpp's Q8_0 quantizes its
  ``output.weight``; ``--float-lm-head`` keeps it float32), each also
  with int8 activations (``w8a8``: ``set_activation_precision_(model, "int8")`` on the rule's formats, bitmap /
  N:M, the ones with int8-activation kernels; 4:16 is 75% sparse as N:M with 16-column groups, whose 4-bit
  positions the AVX2 kernel uses as shuffle controls, and counts for the 75% targets); 2:4 / 75% with bf16
  values (the pruned model cast to bfloat16 as a whole, as the dense bf16 cell, then ``compress_``); plus the dense fp32
  model through transformers' ``generate`` as the reference row (``transformers generate: dense fp32``).
  Decode tokens/s are timed from the first generated token to the last (:class:`TokenClock`), so the
  prompt's prefill is not in them, as ``llama-bench``'s generation test runs no prompt.
The table gives tokens/s, ms per token, weight bytes read per token and the achieved GB/s, beside a
same-run probe of torch's dense fp32 GEMV streaming rate. The issue-13 targets (against llama.cpp) and
issue 17's decode targets (2:4 >= 1.8x and 75% >= 3x our dense fp32, per values dtype, with the bytes
ratio that bounds each) are printed as verdicts from these same-run figures.

    python benchmarks/bench_e2e_llamacpp.py --quick   # hidden 256, 2 layers (smoke; builds llama.cpp once)
    python benchmarks/bench_e2e_llamacpp.py           # the issue's shape; writes results/e2e_llamacpp.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_llamacpp_peer as peer  # noqa: E402
from bench_host import host_info, host_line  # noqa: E402
from bench_output import write_json  # noqa: E402
from bench_timing import TokenClock  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GGUF_TYPES = ("f32", "bf16", "q8_0", "Q4_K_M")  # the first three by the converter, the last by llama-quantize
# the dense fp32 model through transformers' generate: named apart from the "sparseforge ..." cells, which
# bench_e2e_quality.py joins by name prefix
REFERENCE_CELL = "transformers generate: dense fp32"
VALUES_TAG = {None: "fp32", torch.int8: "int8", torch.bfloat16: "bf16"}  # values dtype -> the cell name's tag
DECODE_TARGETS = (("2:4", 1.8), ("75%", 3.0))  # issue 17: decode vs our dense fp32, same run


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, few tokens (smoke run)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens before decoding")
    p.add_argument("--new", type=int, default=128, help="decoded tokens per measurement")
    p.add_argument("--prefill", type=int, default=512, help="prefill length")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--attention", default="native", choices=["native", "auto", "sdpa"],
                   help="the native engine's decode attention for our cells (default native: the native kernel for "
                        "bf16 models too, as llama.cpp does not round as the model does either; 'auto' gives bf16 "
                        "models torch SDPA, model-exact rounding, ~18 ms per token slower on a Zen 3 host)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sparsities", nargs="+", default=["2:4", "0.75", "0.9"])
    p.add_argument("--int8-sparsities", nargs="+", default=["2:4", "0.75", "4:16"],
                   help="variants also built with int8 values (N:M such as 4:16 count for the target of their sparsity)")
    p.add_argument("--bf16-sparsities", nargs="*", default=["2:4", "0.75"],
                   help="variants also built with bf16 values (the whole model in bf16, as the dense bf16 cell)")
    p.add_argument("--bf16-format", default="auto",
                   help="format of the bf16-valued cells: 'auto' (measured per layer shape on this host), 'rule' or one format")
    p.add_argument("--int8-format", default="auto",
                   help="format of the int8-valued cells: 'auto' (measured per layer shape with int8 values on this "
                        "host; a layer where dense fp32 is faster stays dense and the cell name counts it), 'rule' or "
                        "one format. The w8a8 cells always use the rule (bitmap / N:M: the formats with int8 activations)")
    p.add_argument("--float-lm-head", action="store_true",
                   help="int8 cells keep the lm_head float32 (default: int8, as Q8_0 quantizes output.weight)")
    p.add_argument("--work", type=Path, default=peer.CACHE / "models")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--cells", nargs="+", default=None, metavar="TEXT",
                   help="time only the cells whose name contains one of these texts (e.g. 'q8_0' 'int8'); default: all")
    p.add_argument("--start-file", type=Path, default=None,
                   help="after building and warming up every cell, wait until this file exists before the timed "
                        "rounds (start the timing from a quiet moment)")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.ffn, args.heads, args.kv_heads = 256, 2, 704, 4, 2
        args.prompt, args.new, args.prefill, args.rounds = 16, 16, 64, 2
    if args.out is None:
        args.out = RESULTS / ("e2e_llamacpp.quick.json" if args.quick else "e2e_llamacpp.json")
    return args


def write_model(args) -> Path:
    """A random Llama of the requested shape as an HF directory with the built-in tokenizer (cached)."""
    import transformers as t

    from sparseforge.io.builtin import builtin_model_path

    name = f"llama-h{args.hidden}-l{args.layers}-f{args.ffn}-a{args.heads}-kv{args.kv_heads}"
    out = args.work / name
    if (out / "config.json").exists():
        return out
    torch.manual_seed(0)
    tokenizer_dir = builtin_model_path()
    vocab = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
    cfg = t.LlamaConfig(hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
                        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=vocab,
                        max_position_embeddings=max(1024, args.prefill + args.prompt + args.new + 16),
                        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)  # fmt: skip
    model = t.LlamaForCausalLM(cfg).float().eval()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tokenizer_dir / f, tmp / f)
    tmp.rename(out)
    return out


CONVERT_WRAPPER = """
import sys
sys.argv = sys.argv[1:]
sys.path.insert(0, sys.argv[0].rsplit('/', 1)[0])
import convert_hf_to_gguf as c
from conversion.base import TextModel
orig = TextModel.get_vocab_base_pre
def pre(self, tokenizer):
    try:
        return orig(self, tokenizer)
    except NotImplementedError:
        return "gpt-2"   # the built-in tokenizer is GPT-2's byte-level BPE regex
TextModel.get_vocab_base_pre = pre
orig_sp = TextModel._set_vocab_sentencepiece
def sentencepiece(self, *args, **kwargs):
    if not (self.dir_model / "tokenizer.model").is_file():   # no SentencePiece model: try the next vocab kind
        raise FileNotFoundError("tokenizer.model")
    return orig_sp(self, *args, **kwargs)
TextModel._set_vocab_sentencepiece = sentencepiece
c.main()
"""


def convert_all(tools: peer.LlamaCpp, hf_dir: Path) -> dict[str, Path]:
    """F32 / BF16 / Q8_0 by llama.cpp's converter, Q4_K_M by ``llama-quantize``.

    Two patches in the wrapper: the converter's pre-tokenizer table does not know the built-in
    tokenizer's hash, so unknown hashes map to ``gpt-2`` (the regex that tokenizer uses); and it
    imports sentencepiece before looking for ``tokenizer.model``, so a missing file is reported
    first and the converter goes on to the byte-level BPE vocabulary."""
    wrapper = hf_dir.parent / "convert_wrapper.py"
    wrapper.write_text(CONVERT_WRAPPER)
    out: dict[str, Path] = {}
    for outtype in ("f32", "bf16", "q8_0"):
        path = hf_dir.parent / f"{hf_dir.name}.{outtype}.gguf"
        if not path.exists():
            env = {**os.environ, "PYTHONPATH": str(tools.source / "gguf-py")}
            tmp = path.with_suffix(".tmp")
            peer._run([sys.executable, wrapper, tools.source / "convert_hf_to_gguf.py", hf_dir, "--outtype", outtype,
                       "--outfile", tmp], f"convert to {outtype}", env=env)  # fmt: skip
            tmp.rename(path)
        out[outtype] = path
    out["Q4_K_M"] = peer.quantize(tools, out["f32"], "Q4_K_M")
    return out


def torch_gemv_gbps(threads: int, mbytes: int = 512) -> float:
    """torch's dense fp32 GEMV streaming rate (GB/s): a matrix far larger than the caches, median of 5."""
    torch.set_num_threads(threads)
    cols = 4096
    w = torch.randn(mbytes * 2**20 // 4 // cols, cols)
    x = torch.randn(cols)
    torch.mv(w, x)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        torch.mv(w, x)
        times.append(time.perf_counter() - t0)
    return w.numel() * 4 / statistics.median(times) / 1e9


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: every linear layer (stored format) plus one embedding row."""
    from sparseforge.nn.sparse_linear import SparseLinear

    total = 0
    for module in model.modules():
        if isinstance(module, SparseLinear):
            total += sum(b.numel() * b.element_size() for b in module.buffers(recurse=False))
            total += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
        elif isinstance(module, torch.nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
    emb = model.get_input_embeddings().weight
    return total + emb.shape[1] * emb.element_size()


def int8_lm_head_(model) -> str:
    """Store ``model``'s (dense) lm_head with int8 values, one scale per output row, in the bitmap format (every
    bit set): the counterpart of the Q8_0 ``output.weight`` llama.cpp reads per token. Returns the cell-name tag:
    ``"; lm_head int8"``, or ``"; lm_head float32 (tied)"`` where the head shares the embedding's weight (``compress_``
    keeps a tied layer dense rather than untie it)."""
    from sparseforge.runtime.compress import compress_

    report = compress_(model, format="bitmap", targets=["lm_head"], min_sparsity=0.0, dtype=torch.int8)
    if report.converted:
        return "; lm_head int8"
    reason = report.kept_dense[0][1] if report.kept_dense else "not converted"
    return "; lm_head float32 (tied)" if "tied" in reason else f"; lm_head float32 ({reason})"


def _pruned(dense, s: str, dtype=None):
    """A copy of ``dense`` magnitude-pruned to ``s`` (N:M or a sparsity), not yet compressed; in bf16 for bf16 cells."""
    import sparseforge as sf

    model = copy.deepcopy(dense)
    kw = dict(pattern=s) if ":" in s else dict(pattern="unstructured", sparsity=float(s))
    sf.sparsify_(model, sf.SparsifyConfig(method="magnitude", **kw), progress=False)
    if dtype == torch.bfloat16:  # embeddings, norms and lm_head in bf16 too, as the dense bf16 cell
        model = model.to(torch.bfloat16)
    return model


def _compressed(model, s: str, dtype=None, int8_head: bool = True, fmt: str = "auto") -> str:
    """Compress the pruned ``model`` in place with ``compress_(format=fmt)``; its cell name. int8 cells get an int8
    lm_head too unless ``int8_head`` is False."""
    from sparseforge.runtime.compress import compress_

    # the measured choice by default ("auto"): on an AVX-512 BF16 host the bitmap's bf16-x walk wins every shape of
    # this model, on an AVX2 host CSR wins at 75% (bf16 and int8 values alike); --bf16-format / --int8-format rule
    # or one format name forces it. Under "auto" a layer where dense fp32 measured faster stays dense: the cell
    # name then says how many ("; 3 dense"), since those layers read dense bytes
    report = compress_(model, format=fmt, dtype=dtype, pattern=s if ":" in s else None)  # N:M: its own pattern
    measured_dense = sum(1 for _, why in report.kept_dense if str(why).startswith("dense is faster"))
    fmts = ",".join(sorted({c.format for c in report.converted})) or "no layer converted: dense"
    if report.converted and measured_dense:
        fmts += f"; {measured_dense} dense"
    if dtype == torch.int8 and int8_head:
        fmts += int8_lm_head_(model)
    return f"sparseforge {_label(s)} {VALUES_TAG[dtype]} ({fmts})"


def selected(name: str, cells: list[str] | None) -> bool:
    """Whether cell ``name`` is timed: every cell without ``--cells``, else those containing one of its texts."""
    return cells is None or any(c in name for c in cells)


def _label(s: str) -> str:
    """The cell label of a sparsity argument: ``2:4`` as it is, ``0.75`` as ``75%``."""
    return s if ":" in s else f"{float(s):.0%}"


def our_variants(hf_dir: Path, sparsities: list[str], int8_sparsities: list[str], cells: list[str] | None = None,
                 int8_head: bool = True, bf16_sparsities: tuple[str, ...] = (), bf16_format: str = "auto",
                 int8_format: str = "auto") -> dict:
    """cell name -> (model, sparse, engine): every cell decodes through the native engine except the
    ``generate`` reference row (the same dense fp32 model through transformers' ``generate``). With
    ``cells``, only the selected ones (a pruned variant is built when it or its w8a8 twin is selected)."""
    import transformers as t

    dense = t.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    out = {REFERENCE_CELL: (dense, False, "transformers"),
           "sparseforge dense fp32": (copy.deepcopy(dense), False, "native") if selected("sparseforge dense fp32", cells) else None,
           "sparseforge dense bf16": (copy.deepcopy(dense).to(torch.bfloat16), False, "native")
           if selected("sparseforge dense bf16", cells) else None}
    todo = [(s, None) for s in sparsities] + [(s, torch.int8) for s in int8_sparsities]
    for s, dtype in todo + [(s, torch.bfloat16) for s in bf16_sparsities]:
        label = _label(s)
        kinds = ("int8", "w8a8") if dtype == torch.int8 else (VALUES_TAG[dtype],)
        if not any(selected(f"sparseforge {label} {k} (", cells) for k in kinds):
            continue
        pruned = _pruned(dense, s, dtype)  # once per sparsity and values dtype, whichever cells use it
        fmt = {torch.int8: int8_format, torch.bfloat16: bf16_format}.get(dtype, "auto")
        w8a8 = dtype == torch.int8 and selected(f"sparseforge {label} w8a8 (", cells)  # int8 activations too (W8A8)
        if selected(f"sparseforge {label} {kinds[0]} (", cells):
            # the w8a8 cell needs a copy of its own: another format, or the same model with another activation mode
            model = copy.deepcopy(pruned) if w8a8 else pruned
            name = _compressed(model, s, dtype, int8_head, fmt)
            if selected(name, cells):
                out[name] = (model, True, "native")
        if w8a8:
            from sparseforge.runtime.compress import set_activation_precision_

            # int8 activations run on the bitmap / N:M kernels only: the rule's formats
            name = _compressed(pruned, s, dtype, int8_head, "rule")
            set_activation_precision_(pruned, "int8")
            out[name.replace(" int8 (", " w8a8 (")] = (pruned, True, "native")
    return {name: v for name, v in out.items() if v is not None and selected(name, cells)}


def time_ours(model, sparse: bool, engine: str, prompt: torch.Tensor, new: int, prefill: torch.Tensor, threads: int,
              attention: str = "native") -> dict:
    from sparseforge import kernels
    from sparseforge.generation.loop import native_generate

    ctx = kernels.sparse_threads(threads) if sparse else nullcontext()
    clock = TokenClock()
    with ctx, torch.inference_mode():
        if engine == "native":
            native_generate(model, prompt, max_new_tokens=new, min_new_tokens=new, streamer=clock, attention=attention)
        else:
            model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0, streamer=clock)
        from sparseforge.generation.prefill import prompt_forward

        t0 = time.perf_counter()
        prompt_forward(model, prefill) if engine == "native" else model(prefill)  # the native engine's prefill
        prefill_s = time.perf_counter() - t0
    return {"decode_tps": clock.decode_tps(), "prefill_tps": prefill.shape[1] / prefill_s}


def median_or_none(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value: float | None, digits: int) -> str:
    return "failed" if value is None else f"{value:.{digits}f}"


def verdicts(rows: dict[str, dict]) -> list[str]:
    """The issue-13 targets, judged from this run's medians."""
    def tps(name):
        return rows.get(name, {}).get("decode_tps")
    lines = []
    ours_bf16, lc_bf16, lc_q8 = tps("sparseforge dense bf16"), tps("llama.cpp bf16"), tps("llama.cpp q8_0")
    if ours_bf16 and lc_bf16:
        ok = ours_bf16 >= 0.9 * lc_bf16
        lines.append(f"{'PASS' if ok else 'FAIL'}: dense bf16 decode within 10% of llama.cpp BF16 "
                     f"({ours_bf16:.1f} vs {lc_bf16:.1f} tokens/s)")
    for label, factor in (("2:4", 1.0), ("75%", 1.3)):
        int8 = cells_for(rows, label, "int8")
        for name, tps_ in int8 if lc_q8 else ():
            lines.append(f"{'PASS' if tps_ >= factor * lc_q8 else 'FAIL'}: {label} + int8 decode >= {factor}x llama.cpp "
                         f"Q8_0 ({tps_:.1f} vs {lc_q8:.1f} tokens/s = {tps_ / lc_q8:.2f}x; {name})")
        if not (int8 and lc_q8):
            lines.append(f"MISSING: {label} + int8 decode >= {factor}x llama.cpp Q8_0: no measurement of both cells")
        for name, tps_ in cells_for(rows, label, "w8a8") if lc_q8 else ():
            lines.append(f"{'PASS' if tps_ >= factor * lc_q8 else 'FAIL'}: {label} + int8 weights and activations (w8a8) "
                         f"decode >= {factor}x llama.cpp Q8_0 ({tps_:.1f} vs {lc_q8:.1f} tokens/s = {tps_ / lc_q8:.2f}x; "
                         f"{name})")
        for name, tps_ in cells_for(rows, label, "fp32") if lc_q8 else ():
            lines.append(f"INFO: {name} decodes {tps_:.1f} tokens/s = {tps_ / lc_q8:.2f}x llama.cpp Q8_0")
    lines += decode_verdicts(rows)
    engine, reference = tps("sparseforge dense fp32"), tps(REFERENCE_CELL)
    if engine and reference:
        lines.append(f"INFO: the native engine decodes dense fp32 at {engine:.1f} tokens/s, transformers' generate at "
                     f"{reference:.1f} ({engine / reference:.2f}x)")
    best_prefill = max((v["prefill_tps"] for k, v in rows.items() if k.startswith("sparseforge") and v["prefill_tps"]),
                       default=None)  # fmt: skip
    lc_pp = rows.get("llama.cpp bf16", {}).get("prefill_tps")
    if best_prefill and lc_pp:
        lines.append(f"{'PASS' if best_prefill >= lc_pp else 'FAIL'}: best sparseforge prefill >= llama.cpp BF16 "
                     f"({best_prefill:.0f} vs {lc_pp:.0f} tokens/s)")
    return lines


def label_sparsity(label: str) -> float | None:
    """The sparsity a cell label stands for: ``75%`` -> 0.75, ``4:16`` -> 0.75; ``None`` if it is neither."""
    try:
        if label.endswith("%"):
            return float(label[:-1]) / 100
        n, m = (int(v) for v in label.split(":"))
        return 1 - n / m
    except ValueError:
        return None


def counts_for(label: str, target: str) -> bool:
    """Whether a cell labelled ``label`` counts for ``target``: ``2:4`` the 2:4 pattern itself; ``NN%`` every cell of
    that sparsity, unstructured or N:M (75%: ``75%``, ``4:16``, ``1:4``)."""
    return label == target or (target.endswith("%") and label_sparsity(label) == label_sparsity(target))


def cells_for(rows: dict[str, dict], target: str, kind: str) -> list[tuple[str, float]]:
    """``(name, decode tokens/s)`` of the measured sparseforge cells of values ``kind`` (``int8``, ``w8a8``, ``fp32``,
    ...) that count for ``target`` (:func:`counts_for`)."""
    out = []
    for name, r in rows.items():
        parts = name.split()
        if len(parts) < 3 or parts[0] != "sparseforge" or parts[2] != kind or not r.get("decode_tps"):
            continue
        if counts_for(parts[1], target):
            out.append((name, r["decode_tps"]))
    return out


def decode_verdicts(rows: dict[str, dict]) -> list[str]:
    """Issue 17's decode targets (2:4 >= 1.8x, 75% >= 3x our dense fp32 in the same run), one line per sparse cell
    of each values dtype, with the ratio of weight bytes per token that bounds the speed-up (dense fp32 / cell)."""
    base = rows.get("sparseforge dense fp32", {})
    if not base.get("decode_tps"):
        return ["MISSING: issue-17 decode targets: no sparseforge dense fp32 measurement"]
    lines = []
    bf16 = rows.get("sparseforge dense bf16", {}).get("decode_tps")
    for label, factor in DECODE_TARGETS:
        for name, r in rows.items():
            parts = name.split()
            if len(parts) < 2 or parts[0] != "sparseforge" or not counts_for(parts[1], label) or not r.get("decode_tps"):
                continue
            ratio = r["decode_tps"] / base["decode_tps"]
            beside = f", {r['decode_tps'] / bf16:.2f}x dense bf16" if bf16 else ""
            if base.get("weight_bytes_per_token") and r.get("weight_bytes_per_token"):
                beside += f"; weight-bytes bound {base['weight_bytes_per_token'] / r['weight_bytes_per_token']:.2f}x"
            sparse = "no layer converted" not in name  # "auto" kept every layer dense: not a sparse model
            beside += "" if sparse else "; no layer is sparse"
            lines.append(f"{'PASS' if sparse and ratio >= factor else 'FAIL'}: {name} decode >= {factor}x dense fp32 "
                         f"({ratio:.2f}x{beside})")
    return lines


def main(argv=None) -> dict:
    args = parse_args(argv)
    from sparseforge import kernels

    args.work.mkdir(parents=True, exist_ok=True)
    tools = peer.ensure_llamacpp()
    print(f"llama.cpp build: {'reused' if tools.build_seconds == 0 else f'{tools.build_seconds:.0f} s'} ({tools.bin})")
    hf_dir = write_model(args)
    ggufs = {kind: path for kind, path in convert_all(tools, hf_dir).items() if selected(f"llama.cpp {kind.lower()}", args.cells)}
    ours = our_variants(hf_dir, args.sparsities, args.int8_sparsities, args.cells, int8_head=not args.float_lm_head,
                        bf16_sparsities=args.bf16_sparsities, bf16_format=args.bf16_format,
                        int8_format=args.int8_format)
    torch.set_num_threads(args.threads)
    kernels.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    vocab = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    prompt = torch.randint(1, vocab, (1, args.prompt), generator=gen)
    prefill = torch.randint(1, vocab, (1, args.prefill), generator=gen)
    for model, sparse, engine in ours.values():  # warm-up
        time_ours(model, sparse, engine, prompt[:, :4], 2, prefill[:, :8], args.threads, args.attention)
    if args.start_file is not None:
        print(f"warmed up; waiting for {args.start_file}", flush=True)
        while not args.start_file.exists():
            time.sleep(0.5)
    samples: dict[str, list[dict]] = {}
    gbps = []
    for r in range(args.rounds):
        gbps.append(torch_gemv_gbps(args.threads))
        for kind, path in ggufs.items():
            res = peer.bench(tools, path, threads=args.threads, prompt=args.prefill, generate=args.new, repetitions=1)
            samples.setdefault(f"llama.cpp {kind.lower()}", []).append(res)
        for name, (model, sparse, engine) in ours.items():
            samples.setdefault(name, []).append(time_ours(model, sparse, engine, prompt, args.new, prefill, args.threads,
                                                          args.attention))
        print(f"round {r + 1}/{args.rounds} done")
    bytes_per_token = {name: weight_bytes_per_token(model) for name, (model, _, _) in ours.items()}
    for kind, path in ggufs.items():
        bytes_per_token[f"llama.cpp {kind.lower()}"] = path.stat().st_size  # the GGUF holds the weights read per token
    rows = {}
    for name, runs in samples.items():
        d = median_or_none([r.get("decode_tps") for r in runs])
        pp = median_or_none([r.get("prefill_tps") for r in runs])
        errors = sorted({v for r in runs for k, v in r.items() if k.endswith(("_error", "_note"))})
        rows[name] = {"decode_tps": d, "prefill_tps": pp, "ms_per_token": 1e3 / d if d else None, "errors": errors,
                      "weight_bytes_per_token": bytes_per_token[name], "gbps": bytes_per_token[name] * d / 1e9 if d else None,
                      "runs": runs}  # fmt: skip
    gemv = statistics.median(gbps)
    cpu = host_line()
    print(f"\nbatch 1, {args.threads} threads, prompt {args.prompt}, {args.new} new tokens, prefill {args.prefill}, "
          f"our decode attention {args.attention}; "
          f"model hidden {args.hidden}, {args.layers} layers, FFN {args.ffn}, {args.heads}/{args.kv_heads} heads; "
          f"CPU {cpu}, isa {kernels.isa()}; torch fp32 GEMV streams {gemv:.1f} GB/s (same run)")
    print("| cell | decode tok/s | ms/token | weight MB/token | GB/s | prefill tok/s |\n|---|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {fmt(r['decode_tps'], 1)} | {fmt(r['ms_per_token'], 1)} | {r['weight_bytes_per_token'] / 1e6:.1f} | "
              f"{fmt(r['gbps'], 1)} | {fmt(r['prefill_tps'], 0)} |")
    for name, r in rows.items():
        for err in r["errors"]:
            print(f"{name}: {err}")
    lines = verdicts(rows)
    print("\n".join(lines))
    result = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "host": host_info(),
              "isa": kernels.isa(), "torch_gemv_gbps": gemv, "llamacpp_build_seconds": tools.build_seconds,
              "loadavg": os.getloadavg(), "rows": rows, "verdicts": lines}  # fmt: skip
    write_json(args.out, result, indent=2)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
