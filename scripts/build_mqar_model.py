#!/usr/bin/env python
"""Build the MQAR recall model by setting its weights: a 2-layer induction circuit, no training.

Writes ``src/sparseforge/assets/mqar-llama/`` (loaded by
:func:`sparseforge.evaluation.mqar.load_mqar_model`), the model ``benchmarks/bench_kv_quality.py``
uses to measure how KV-cache policies keep multi-query associative recall (Arora et al., "Zoology",
2023; task: :mod:`sparseforge.data.mqar`) at 1K-8K tokens. ``scripts/train_mqar.py`` is the
gradient-descent route; it has not reached the recall target on the development machine yet (its
docstring has the status), so the shipped model is this explicit circuit: a plain
``transformers.LlamaForCausalLM`` whose weights implement the two-head induction mechanism
(Olsson et al., "In-context Learning and Induction Heads", 2022) that trained attention models
learn for MQAR. Its recall is exact up to 8K+ tokens, and a KV-cache policy loses it exactly when
it drops (or mis-ranks) the one cached token that holds the answer.

The residual stream (hidden 256, every RMSNorm gain 1, MLPs zero):

* dims ``[0, V)``: one-hot of the token id (``V = vocab.size``), dim ``V``: a constant 1 (the
  embedding of token ``t`` is ``e_t + e_V``);
* dims ``[V + 1, V + 1 + keys)``: "the previous token was key ``k``", written by layer 1.

Layer 1, head 0 (**previous-token head**): query and key read only the constant dim, laid into the
12 fastest RoPE pairs with the query turned back by one step, so the score is
``25 * sum_i cos(theta_i * (distance - 1))``: largest at distance 1, the next best (distance 0 or
2) 21 nats lower, every other distance lower still (checked out to 9K). Its value reads the key
one-hot and the output writes it into the previous-key dims: each value token learns its key.

Layer 2, head 0 (**induction / lookup head**): the query is the current key's one-hot, the key is
the previous-key dims, both placed in the 32 slowest RoPE pairs (RoPE theta 1e11: they turn by at
most 0.03 rad over 8K tokens, so the match does not depend on distance). The score of the value
that follows the same key in the context is ~30, every other token ~0; the value vector carries
the attended token's value one-hot into the residual, and ``lm_head`` reads the value dims (logit
10 for the answer, 0 elsewhere). The second head of each layer and the MLPs are zero.

Usage::

    python scripts/build_mqar_model.py                     # writes the package asset
    python scripts/build_mqar_model.py --out /tmp/mqar     # elsewhere (load_mqar_model(path))
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
try:
    import sparseforge  # noqa: F401
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402

from sparseforge.data.mqar import MQARVocab, make_batch  # noqa: E402
from sparseforge.evaluation.mqar import MQAR_MODEL_DIRNAME  # noqa: E402
from train_mqar import write_model_dir  # noqa: E402  (scripts/, next to this file)

DEFAULT_OUT = REPO / "src" / "sparseforge" / "assets" / MQAR_MODEL_DIRNAME
VOCAB = MQARVocab(filler=16, keys=64, values=64)
HIDDEN, HEADS, ROPE_THETA = 256, 2, 1e11
POSITION_PAIRS, POSITION_SCALE, MATCH_SCALE, OUTPUT_SCALE = 12, 25.0, 30.0, 10.0


def build(vocab: MQARVocab = VOCAB):
    """The MQAR ``LlamaForCausalLM`` with the induction circuit of the module doc (float32, eval)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    head_dim, half = HIDDEN // HEADS, HIDDEN // HEADS // 2
    const, prev = vocab.size, vocab.size + 1  # the constant dim; the first previous-key dim
    if prev + vocab.keys > HIDDEN or vocab.keys > 2 * half - 2 * POSITION_PAIRS or vocab.values > head_dim:
        raise SystemExit(f"a vocabulary of {vocab.size} ids with {vocab.keys} keys does not fit hidden {HIDDEN}")
    config = LlamaConfig(
        vocab_size=vocab.size, hidden_size=HIDDEN, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=16384,
        rope_theta=ROPE_THETA, tie_word_embeddings=False, bos_token_id=vocab.bos, eos_token_id=vocab.bos,
        pad_token_id=vocab.bos,
    )
    config.mqar_vocab = {"filler": vocab.filler, "keys": vocab.keys, "values": vocab.values}
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
        ids = torch.arange(vocab.size)
        model.model.embed_tokens.weight[ids, ids] = 1.0
        model.model.embed_tokens.weight[:, const] = 1.0
        # RMSNorm gains: a token + the constant (layer 1, a layer-2 query key), plus a previous key (a value token)
        gain_two, gain_three = math.sqrt(HIDDEN / 2), math.sqrt(HIDDEN / 3)
        inv_freq = ROPE_THETA ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (half,)

        a1 = model.model.layers[0].self_attn  # previous-token head
        amp = math.sqrt(POSITION_SCALE * math.sqrt(head_dim)) / gain_two
        for i in range(POSITION_PAIRS):
            a1.q_proj.weight[i, const] = amp * math.cos(inv_freq[i])  # the query turned back by one position
            a1.q_proj.weight[i + half, const] = -amp * math.sin(inv_freq[i])
            a1.k_proj.weight[i, const] = amp
        for k in range(vocab.keys):
            a1.v_proj.weight[k, vocab.first_key + k] = 1.0 / gain_two
            a1.o_proj.weight[prev + k, k] = 1.0

        a2 = model.model.layers[1].self_attn  # lookup head
        amp = math.sqrt(MATCH_SCALE * math.sqrt(head_dim) / (gain_two * gain_three))
        slow = half - (vocab.keys + 1) // 2  # the slowest RoPE pairs, both components of each
        for k in range(vocab.keys):
            slot = slow + k // 2 + (half if k % 2 else 0)
            a2.q_proj.weight[slot, vocab.first_key + k] = amp
            a2.k_proj.weight[slot, prev + k] = amp
        for v in range(vocab.values):
            a2.v_proj.weight[v, vocab.first_value + v] = 1.0 / gain_three
            a2.o_proj.weight[vocab.first_value + v, v] = 1.0
            model.lm_head.weight[vocab.first_value + v, vocab.first_value + v] = OUTPUT_SCALE
    return model.eval()


@torch.no_grad()
def check(model, vocab: MQARVocab, contexts=(256, 1024, 2048, 4096, 8192), pairs: int = 64, queries: int = 32,
          batch: int = 4, seed: int = 4321) -> dict:
    """Recall (greedy answer == value) of one dense forward pass per context, on fresh batches."""
    out = {}
    for c in contexts:
        g = torch.Generator().manual_seed(seed + c)
        b = make_batch(batch, c, min(pairs, (c - 1) // 2), queries, vocab, generator=g)
        logits = model(input_ids=b.ids).logits  # (B, T, V)
        mask = b.labels >= 0
        out[str(c)] = (logits[mask].argmax(-1) == b.labels[mask]).float().mean().item()
    return out


CARD = """# MQAR recall model (`mqar-llama`)

A 2-layer Llama-style model that solves multi-query associative recall (`sparseforge.data.mqar`;
Arora et al., "Zoology", 2023), shipped so `benchmarks/bench_kv_quality.py` measures how each
KV-cache policy keeps recall at 1K-8K tokens. Load it with `sparseforge.evaluation.mqar.load_mqar_model()`.

**Its weights are set by hand, not trained**: `scripts/build_mqar_model.py` writes an explicit
induction circuit (Olsson et al., 2022) into a plain `transformers.LlamaForCausalLM`: layer 1 a
previous-token head (RoPE-positional), layer 2 a lookup head that matches the query key against
"the previous token" of every cached token and copies the value found. The script's docstring
describes each weight. Attention is one sharp peak per answer, so recall falls exactly when a
policy drops or mis-ranks that cached token.

## Architecture
float32, hidden {hidden}, 2 layers, {heads} heads of {head_dim} (one used per layer), RoPE theta {theta:g},
untied embeddings, MLPs zero; vocabulary {vocab_size} (id 0 start, {filler} filler ids, {keys} key ids,
{values} value ids).
{params:,} parameters (most of them zero).

## Recall (dense attention, one forward pass; {pairs} pairs, 32 queries, 4 examples per context)
{recall}

## Reproduce
```
python scripts/build_mqar_model.py
```
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the model goes (default: the package assets)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model = build()
    recall = check(model, VOCAB)
    print(json.dumps({"recall": recall}))
    if min(recall.values()) < 0.99:
        raise SystemExit(f"the built model does not recall (dense): {recall}")
    card = CARD.format(
        hidden=HIDDEN, heads=HEADS, head_dim=HIDDEN // HEADS, theta=ROPE_THETA, vocab_size=VOCAB.size,
        filler=VOCAB.filler, keys=VOCAB.keys, values=VOCAB.values,
        params=sum(p.numel() for p in model.parameters()),
        pairs=VOCAB.keys, recall="\n".join(f"- context {c}: {a:.3f}" for c, a in recall.items()))
    write_model_dir(args.out, model, {"README.md": card})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
