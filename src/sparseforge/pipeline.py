"""End-to-end jobs behind the CLI: load -> evaluate -> prune -> evaluate -> save, and the demo.

These functions only compose the public API (:func:`~sparseforge.io.models.load_model`,
:func:`~sparseforge.prune.sparsify.sparsify_`, :mod:`~sparseforge.evaluation.quality`,
:mod:`~sparseforge.io.checkpoint`); the CLI is a thin layer over them.

Example:
    >>> from sparseforge.config import SparsifyConfig                  # doctest: +SKIP
    >>> from sparseforge.pipeline import prune_model
    >>> result = prune_model("builtin", [SparsifyConfig(method="wanda", pattern="2:4")], out="pruned")
    >>> print(result.format())
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sparseforge.config import SparsifyConfig
from sparseforge.errors import ConfigError
from sparseforge.io.writable import check_output_dir
from sparseforge.prune.sparsify import SparsifyReport, check_calibration_memory, peak_rss_mb, sparsify_

__all__ = ["PruneResult", "prune_model", "evaluate_model", "run_demo", "weights_equal"]


@dataclass
class PruneResult:
    model: str
    kind: str
    reports: list[SparsifyReport]
    metric_name: str | None = None  # "perplexity" or "embedding cosine"
    dense_metric: float | None = None
    pruned_metric: float | None = None
    out: Path | None = None
    checkpoint_bytes: int | None = None
    dense_bytes: int | None = None
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    activation: Any = None  # the ActivationSparsityReport when activation sparsity was calibrated

    def format(self) -> str:
        lines = [report.summary() for report in self.reports]
        if self.activation is not None:
            lines.append(self.activation.summary())
        if self.metric_name is not None:
            lines.append(f"{self.metric_name}: dense {self.dense_metric:.4f} -> pruned {self.pruned_metric:.4f}")
        if "int8_activations_metric" in self.extra:
            lines.append(f"{self.metric_name} with int8 activations (sparse kernels, "
                         f"{self.extra['int8_activation_layers']} layer(s)): {self.extra['int8_activations_metric']:.4f}")
        if self.out is not None:
            lines.append(
                f"saved to {self.out} ({self.checkpoint_bytes / 2**20:.2f} MiB on disk, "
                f"dense weights {self.dense_bytes / 2**20:.2f} MiB, ratio {self.checkpoint_bytes / self.dense_bytes:.3f})"
            )
        lines.append(f"total {self.seconds:.1f} s, peak RSS {self.peak_rss_mb:.0f} MiB")
        return "\n".join(lines)


def _check_out(out: Path | None, overwrite: bool) -> None:
    if out is not None:
        check_output_dir(out, overwrite=overwrite, option="--out")


def prune_model(
    model: str,
    configs: list[SparsifyConfig],
    *,
    out: Path | str | None = None,
    compressed: bool = True,
    overwrite: bool = False,
    evaluate: bool = True,
    dtype=None,
    progress: bool = True,
    activation=None,
    int8_activations: bool = False,
) -> PruneResult:
    """Load ``model``, prune it with every config in turn, evaluate before/after and save to ``out``.

    ``activation``: an :class:`~sparseforge.activation.ActivationSparsityConfig` calibrated on the
    pruned model after the last stage (its thresholds are saved in the checkpoint and restored by
    :func:`sparseforge.load`); the "pruned" metric then includes it. ``int8_activations``: after saving,
    the pruned model's layers are compressed in place (``compress_(format="rule", activations="int8")``)
    and the perplexity measured again with int8 activations (``extra["int8_activations_metric"]``);
    needs a causal LM and an int8 quantization stage, and ``evaluate``."""
    from sparseforge.evaluation.quality import embedding_fidelity, perplexity
    from sparseforge.io.checkpoint import save_pretrained
    from sparseforge.io.layout import checkpoint_sizes
    from sparseforge.io.models import load_model

    start = time.perf_counter()
    out = None if out is None else Path(out)
    _check_out(out, overwrite)
    if int8_activations and not (evaluate and any(c.quantize is not None and c.quantize.bits == 8 for c in configs)):
        raise ConfigError("int8 activations are measured on int8 weights after the evaluation: add --quantize int8 "
                          "and keep --eval")
    loaded = load_model(model, dtype=dtype)
    if int8_activations and loaded.kind != "causal-lm":
        raise ConfigError(f"int8 activations are measured by perplexity; {model} is an encoder")
    for config in configs:
        check_calibration_memory(loaded.model, config)
    result = PruneResult(model=str(model), kind=loaded.kind, reports=[])
    dense_copy = None
    if evaluate and loaded.kind == "causal-lm":
        result.metric_name = "perplexity"
        result.dense_metric = perplexity(loaded.model, loaded.tokenizer, progress=progress).ppl
    elif evaluate:
        result.metric_name = "embedding cosine"
        dense_copy = copy.deepcopy(loaded.model)
        result.dense_metric = 1.0
    for config in configs:
        result.reports.append(sparsify_(loaded.model, config, tokenizer=loaded.tokenizer, progress=progress))
    if activation is not None:
        from sparseforge.activation import sparsify_activations_

        result.activation = sparsify_activations_(loaded.model, activation, tokenizer=loaded.tokenizer, progress=progress)
    if evaluate and loaded.kind == "causal-lm":
        result.pruned_metric = perplexity(loaded.model, loaded.tokenizer, progress=progress).ppl
    elif evaluate:
        result.pruned_metric = embedding_fidelity(dense_copy, loaded.model, loaded.tokenizer).mean_cosine
    if out is not None:
        sparsity_config = result.reports[-1].sparsity_config()
        sparsity_config["targets"] = sorted({t for r in result.reports for t in r.sparsity_config()["targets"]})
        save_pretrained(loaded.model, out, tokenizer=loaded.tokenizer, compressed=compressed,
                        sparsity_config=sparsity_config, overwrite=overwrite)
        sizes = checkpoint_sizes(out)
        result.out, result.checkpoint_bytes, result.dense_bytes = out, sizes["file_bytes"], sizes["dense_bytes"]
    if int8_activations:  # after saving: the model's pruned layers are replaced in place
        from sparseforge.runtime.compress import compress_

        report = compress_(loaded.model, format="rule", activations="int8")
        result.extra["int8_activation_layers"] = sum(c.activations == "int8" for c in report.converted)
        result.extra["int8_activations_metric"] = perplexity(loaded.model, loaded.tokenizer, progress=progress).ppl
    result.seconds = time.perf_counter() - start
    result.peak_rss_mb = peak_rss_mb()
    return result


def evaluate_model(model: str, *, reference: str | None = None, seqlen: int = 256, max_windows: int = 64,
                   progress: bool = True, activations: str = "float") -> str:
    """One-line evaluation: perplexity for causal LMs, embedding cosine vs ``reference`` for encoders.

    ``activations="int8"``: ``model`` must be a compressed checkpoint with int8 values; it is loaded on the
    sparse kernels (:func:`~sparseforge.io.loading.load_sparse`) with int8 activations in its bitmap / N:M
    layers (:func:`~sparseforge.runtime.compress.set_activation_precision_`), and the line says how many.
    """
    from sparseforge.errors import ModelError
    from sparseforge.evaluation.quality import embedding_fidelity, perplexity
    from sparseforge.io.models import load_model, resolve_model_path

    if reference is not None:
        try:
            resolve_model_path(reference)  # a bad --reference fails before the model is loaded
        except ModelError as exc:
            raise ModelError(f"--reference: {exc}") from None
    if activations == "float":
        loaded, note = load_model(model), ""
    else:
        loaded, count = _load_int8_activations(model, activations)
        note = f", {activations} activations in {count} layer(s)"
    if loaded.kind == "causal-lm" and reference is not None:
        raise ConfigError(
            f"--reference compares an encoder's embeddings; {model} is a causal LM, evaluated by perplexity "
            "alone: drop --reference"
        )
    if loaded.kind == "causal-lm":
        r = perplexity(loaded.model, loaded.tokenizer, seqlen=seqlen, max_windows=max_windows, progress=progress)
        return f"perplexity {r.ppl:.4f} over {r.tokens} predicted tokens ({r.windows} windows of {seqlen}){note}"
    if reference is None:
        raise ConfigError(f"{model} is an encoder: pass --reference DENSE_MODEL to measure embedding fidelity")
    f = embedding_fidelity(load_model(reference).model, loaded.model, loaded.tokenizer)
    return f"embedding cosine vs {reference}: mean {f.mean_cosine:.4f}, min {f.min_cosine:.4f} over {f.n} sentences{note}"


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def weights_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Bit-exact equality of every parameter and buffer (same names, dtypes and bytes)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape and torch.equal(_bits(sa[k]), _bits(sb[k]))
        for k in sa
    )


def run_demo(out: Path | str = "sparseforge-demo", patterns: tuple[str, ...] = ("unstructured", "2:4"),
             sparsity: float | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Prune the built-in model with magnitude, Wanda and SparseGPT for each pattern; evaluate;
    save the last SparseGPT model compressed to ``out``; reload it and check it is bit-exact."""
    from sparseforge.config import dump_recipe
    from sparseforge.evaluation.quality import perplexity
    from sparseforge.io.checkpoint import save_pretrained
    from sparseforge.io.layout import checkpoint_sizes
    from sparseforge.io.loading import load
    from sparseforge.io.models import load_model

    out = Path(out)
    check_output_dir(out, overwrite=True, option="--out")
    loaded = load_model("builtin")
    print(f"built-in model: {loaded.path} ({sum(p.numel() for p in loaded.model.parameters()) / 1e6:.2f} M parameters)")
    dense_ppl = perplexity(loaded.model, loaded.tokenizer, progress=progress).ppl
    rows = [{"method": "dense", "pattern": "-", "sparsity": 0.0, "ppl": dense_ppl, "seconds": 0.0}]
    kept = None
    for pattern in patterns:
        for method in ("magnitude", "wanda", "sparsegpt"):
            config = SparsifyConfig(method=method, pattern=pattern, sparsity=sparsity)
            print("\n# " + dump_recipe([config]).replace("\n", "\n# ").rstrip("# "), flush=True)
            model = copy.deepcopy(loaded.model)
            report = sparsify_(model, config, tokenizer=loaded.tokenizer, progress=progress)
            ppl = perplexity(model, loaded.tokenizer, progress=progress).ppl
            rows.append({"method": method, "pattern": pattern, "sparsity": report.sparsity, "ppl": ppl,
                         "seconds": report.seconds})
            if method == "sparsegpt":
                kept = (model, report)
    model, report = kept
    save_pretrained(model, out, tokenizer=loaded.tokenizer, compressed=True,
                    sparsity_config=report.sparsity_config(), overwrite=True)
    reloaded = load(out)
    exact = weights_equal(model, reloaded)
    reloaded_ppl = perplexity(reloaded, loaded.tokenizer, progress=progress).ppl
    print("\n| method | pattern | sparsity | perplexity | vs dense | prune time (s) |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['pattern']} | {r['sparsity']:.1%} | {r['ppl']:.3f} | "
              f"{r['ppl'] / dense_ppl - 1:+.1%} | {r['seconds']:.1f} |")
    sizes = checkpoint_sizes(out)
    print(f"\nSparseGPT {report.config.pattern} model saved compressed to {out}: {sizes['file_bytes'] / 2**20:.2f} MiB "
          f"vs {sizes['dense_bytes'] / 2**20:.2f} MiB dense (ratio {sizes['ratio']:.2f}; embeddings stay dense)")
    print(f"reloaded with sparseforge.load: weights bit-exact: {exact}; perplexity {reloaded_ppl:.3f}")
    print(f"peak RSS {peak_rss_mb():.0f} MiB")
    if not exact:
        raise ConfigError("reloaded checkpoint differs from the pruned model (please report this bug)")
    return rows


def _load_int8_activations(model: str, activations: str):
    """``(LoadedModel, layer count)``: a compressed checkpoint loaded on the sparse kernels with ``activations``
    set in every layer that has the mode."""
    from sparseforge.io.layout import is_compressed, read_sparsity_config
    from sparseforge.io.loading import load_sparse
    from sparseforge.io.models import LoadedModel, load_tokenizer, model_kind, resolve_model_path
    from sparseforge.io.validation import read_json
    from sparseforge.runtime.compress import set_activation_precision_

    path = resolve_model_path(model)
    if not is_compressed(read_sparsity_config(path)):
        raise ConfigError(f"activations={activations!r} runs the sparse int8 kernels; {model} is not a compressed "
                          "sparseforge checkpoint (prune it with --quantize int8 --compressed)")
    net = load_sparse(path).eval()
    layers = set_activation_precision_(net, activations)
    kind = model_kind(read_json(path / "config.json"))
    return LoadedModel(model=net, tokenizer=load_tokenizer(path), kind=kind, path=path), len(layers)
