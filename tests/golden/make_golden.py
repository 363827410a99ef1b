"""Write the golden sparseforge checkpoints that tests/io/test_checkpoint.py::test_golden must always load.

Run from the repository root: ``python tests/golden/make_golden.py``. It writes only the golden
checkpoints that do not exist yet (e.g. ``v3-...`` after a format change) and adds them to
``expected.json``; an existing one is never regenerated, because its point is that files written
by an old sparseforge keep loading bit-exactly.

Writes, next to this script:
* ``v1-llama-2of4-fp32/``: tiny Llama (tied embeddings), every linear layer but lm_head pruned 2:4
  by magnitude, float32, N:M format.
* ``v1-gpt2-unstructured-bf16/``: tiny GPT-2 (Conv1D, tied lm_head), 50% unstructured magnitude,
  bfloat16, bitmap format.
* ``v3-llama-2of4-fp32/``, ``v3-gpt2-unstructured-bf16/``: the same models written by format_version 3
  (a CRC-32 of every tensor in ``sparsity_config.checksums``).
* ``v4-llama-2of4-teal-fp32/``: the v3 Llama, plus activation thresholds in ``sparsity_config.activation``
  (format_version 4): q_proj 0.1, o_proj +inf, down_proj one threshold per input channel.
* ``v4-llama-2of4-int8/``, ``v4-gpt2-unstructured-int8/``: the same models (float32), quantized after
  pruning as ``sparseforge.quant`` leaves them (weight = q * scale, a ``weight_scale`` buffer with
  ``scale = max|w_row| / 127``), written by format_version 4: int8 values plus float32 row scales.
* ``expected.json``: sha256 of the raw bytes of every tensor of the loaded model's state dict, and a
  few packed buffers written out in full.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
NAMES = ("v1-llama-2of4-fp32", "v1-gpt2-unstructured-bf16", "v3-llama-2of4-fp32", "v3-gpt2-unstructured-bf16",
         "v4-llama-2of4-teal-fp32", "v4-llama-2of4-int8", "v4-gpt2-unstructured-int8")
THRESHOLDS = {"model.layers.0.self_attn.q_proj": 0.1, "model.layers.0.self_attn.o_proj": float("inf"),
              "model.layers.0.mlp.down_proj": [round(0.01 * i, 2) for i in range(16)]}  # v4: activation sparsity


def tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def build(name: str):
    import transformers as t

    torch.manual_seed(0)
    if "-llama-" in name:
        cfg = t.LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                            tie_word_embeddings=True)
        return t.LlamaForCausalLM(cfg).eval(), "2:4", None, torch.float32
    cfg = t.GPT2Config(vocab_size=16, n_embd=8, n_layer=1, n_head=2, n_positions=8, bos_token_id=0, eos_token_id=0)
    return t.GPT2LMHeadModel(cfg).eval(), "unstructured", 0.5, torch.float32 if name.endswith("-int8") else torch.bfloat16


def main() -> None:
    from sparseforge.io.checkpoint import save_pretrained
    from sparseforge.io.layout import load_state_dict_compressed
    from sparseforge.io.loading import load
    from sparseforge.layers import linear_layers, weight_2d
    from sparseforge.masks import mask_from_scores

    expected_file = HERE / "expected.json"
    expected = json.loads(expected_file.read_text()) if expected_file.is_file() else {}
    for name in NAMES:
        if (HERE / name).exists():
            continue  # never regenerated
        model, pattern, sparsity, dtype = build(name)
        model = model.to(dtype)
        modules = dict(model.named_modules())
        targets = []
        with torch.no_grad():
            for layer in linear_layers(model):
                if layer == "lm_head":
                    continue
                w = weight_2d(modules[layer])  # (out, in)
                w.copy_(torch.where(mask_from_scores(w.abs().float(), pattern, sparsity), w, torch.zeros((), dtype=dtype)))
                if name.endswith("-int8"):
                    scale = w.abs().amax(dim=1) / 127  # (out,)
                    w.copy_(torch.round(w / scale[:, None]) * scale[:, None])
                    modules[layer].register_buffer("weight_scale", scale.clone())
                targets.append(f"{layer}.weight")
        if "-teal-" in name:
            from sparseforge.activation import SparseInputLinear
            from sparseforge.layers import set_module

            for layer, t in THRESHOLDS.items():
                set_module(model, layer, SparseInputLinear.from_linear(modules[layer], threshold=torch.tensor(t)))
        out = save_pretrained(model, HERE / name, overwrite=True, sparsity_config={
            "method": "magnitude", "pattern": pattern, "sparsity": sparsity, "targets": targets, "ignore": []})
        loaded = load(out)
        packed = load_state_dict_compressed(out)
        first = packed[targets[0]]
        expected[name] = {
            "class": type(loaded).__name__,
            "dtype": str(dtype).removeprefix("torch."),
            "sha256": {k: tensor_sha256(v) for k, v in loaded.state_dict().items()},
            "formats": {k: type(packed[k]).__name__ for k in targets},
            "first_target": targets[0],
            "first_target_buffers": {k: v.view(torch.uint8).flatten().tolist() if v.dtype != torch.uint8 else v.tolist()
                                     for k, v in first.state_dict().items()},
        }
        if "-teal-" in name:
            expected[name]["activation"] = {n: m.threshold.tolist() for n, m in loaded.named_modules()
                                            if type(m).__name__ == "SparseInputLinear"}
        print(f"wrote {out}: {sum(f.stat().st_size for f in out.iterdir())} bytes")
    expected_file.write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
