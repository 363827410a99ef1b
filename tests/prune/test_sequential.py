"""The block-by-block pipeline sees exactly the activations a full forward pass sees."""

import pytest
import torch

from sparseforge.layers import find_blocks, select_targets
from sparseforge.prune.sequential import capture_block_inputs, collect_stats, float32_block, propagate

import transformers  # noqa: F401  (test dependency: missing means failure)
from tiny_models import FAMILIES, tiny_model, tokens  # noqa: E402


class Recorder:
    def __init__(self, name, d):
        self.xs = []

    def add_batch(self, x):
        self.xs.append(x.reshape(-1, x.shape[-1]).clone())


@pytest.mark.parametrize("family", FAMILIES)
def test_sequential_inputs_match_full_forward(family):
    model = tiny_model(family)
    prefix, blocks = find_blocks(model)
    ids = tokens(6, 12)
    batches = list(ids.split(4))  # uneven last batch on purpose
    # reference: inputs of every linear in block 1 during an ordinary forward pass
    names = [n for n in select_targets(model, None, [], prefix) if n.startswith(f"{prefix}.1.")]
    local = [n[len(f"{prefix}.1."):] for n in names]
    modules = dict(model.named_modules())
    seen = {n: [] for n in names}
    hooks = [modules[n].register_forward_hook(lambda m, a, o, n=n: seen[n].append(a[0].reshape(-1, a[0].shape[-1])))
             for n in names]
    with torch.no_grad():
        for b in batches:
            model(input_ids=b)
    for h in hooks:
        h.remove()
    inputs = capture_block_inputs(model, blocks, batches)
    assert [h.shape[0] for h in inputs.hidden] == [4, 2]
    with float32_block(blocks[0]):
        inputs = propagate(blocks[0], inputs)
    stats = collect_stats(blocks[1], local, inputs, Recorder)
    for n, l in zip(names, local):
        assert torch.allclose(torch.cat(stats[l].xs), torch.cat(seen[n]), atol=1e-5), n


def test_float32_block_restores_dtype():
    model = tiny_model("llama", dtype=torch.bfloat16)
    _, blocks = find_blocks(model)
    with float32_block(blocks[0]):
        assert all(p.dtype == torch.float32 for p in blocks[0].parameters())
        assert all(p.dtype == torch.bfloat16 for p in blocks[1].parameters())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_layers_fed_the_same_tensor_share_one_accumulator():
    model = tiny_model("llama")
    prefix, blocks = find_blocks(model)
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    inputs = capture_block_inputs(model, blocks, list(tokens(6, 12).split(4)))
    stats = collect_stats(blocks[0], names, inputs, Recorder)
    assert stats["self_attn.q_proj"] is stats["self_attn.k_proj"] is stats["self_attn.v_proj"]
    assert stats["mlp.gate_proj"] is stats["mlp.up_proj"]
    distinct = {id(s) for s in stats.values()}
    assert len(distinct) == 4  # qkv, o, gate/up, down
    assert len(stats["self_attn.q_proj"].xs) == 2  # one add_batch per batch, not three
