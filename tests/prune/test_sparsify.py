import copy

import pytest
import torch

import sparseforge as sf
from sparseforge.config import SparsifyConfig
from sparseforge.errors import ConfigError, DataError, NumericalError
from sparseforge.layers import find_blocks, select_targets, weight_2d
from sparseforge.masks import satisfies
from sparseforge.prune.sparsify import apply_recipe_, sparsify_

import transformers  # noqa: F401  (test dependency: missing means failure)
from tiny_models import FAMILIES, tiny_model, tokens  # noqa: E402


def _weights(model, names):
    modules = dict(model.named_modules())
    return {n: weight_2d(modules[n]).clone() for n in names}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_every_family_prunes_2_4(family, method):
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = SparsifyConfig(method=method, pattern="2:4", method_options={"blocksize": 16} if method == "sparsegpt" else {})
    report = sparsify_(model, cfg, calibration=tokens(8, 16), progress=False)
    prefix, _ = find_blocks(model)
    targets = select_targets(model, None, [], prefix)
    assert [l.name for l in report.layers] == targets
    for name, w in _weights(model, targets).items():
        assert satisfies(w != 0, "2:4"), name
        assert (w == 0).float().mean() >= 0.5
    # everything that is not a target is untouched
    target_keys = set()
    for n in targets:
        target_keys.add(n + ".weight")
    for k, v in model.state_dict().items():
        if k not in target_keys:
            assert torch.equal(v, before[k]), k
    out = model(input_ids=tokens(2, 8))
    hidden = out.logits if hasattr(out, "logits") else out.last_hidden_state
    assert torch.isfinite(hidden).all()
    assert abs(report.sparsity - 0.5) < 1e-9


def test_magnitude_needs_no_data_and_is_exact():
    model = tiny_model("llama")
    report = sparsify_(model, SparsifyConfig(method="magnitude", sparsity=0.7), progress=False)
    assert all(abs(l.achieved_sparsity - 0.7) < 0.01 for l in report.layers)
    for l in report.layers:
        rows, cols = l.shape
        assert l.achieved_sparsity == pytest.approx(round(0.7 * rows * cols) / (rows * cols))


def test_sparsegpt_beats_magnitude_on_output_error():
    """Layer-wise reconstruction: SparseGPT's pruned model tracks the dense outputs more closely."""
    dense = tiny_model("llama", seed=1)
    ids = tokens(16, 32, seed=1)
    ref = dense(input_ids=ids).logits
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = copy.deepcopy(dense)
        sparsify_(model, SparsifyConfig(method=method, sparsity=0.5, method_options={"blocksize": 16} if method == "sparsegpt" else {}),
                  calibration=ids, progress=False)
        errors[method] = (model(input_ids=ids).logits - ref).pow(2).mean().item()
    assert errors["sparsegpt"] < errors["magnitude"]
    assert errors["wanda"] < errors["magnitude"] * 1.05


def test_bf16_model_pruned_block_by_block_without_float32_copy(monkeypatch):
    model = tiny_model("llama", dtype=torch.bfloat16)
    _, blocks = find_blocks(model)
    block_params = sum(p.numel() for p in blocks[0].parameters())
    observed = []
    from sparseforge.prune.methods.base import PruningMethod

    original = PruningMethod.prune

    def spy(self, *a, **k):
        observed.append(sum(p.numel() for p in model.parameters() if p.dtype == torch.float32))
        return original(self, *a, **k)

    monkeypatch.setattr(PruningMethod, "prune", spy)
    sparsify_(model, SparsifyConfig(method="sparsegpt", sparsity=0.5, method_options={"blocksize": 16}),
              calibration=tokens(4, 16), progress=False)
    assert observed and max(observed) <= block_params
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_owl_allocation_varies_per_block_with_same_mean():
    model = tiny_model("llama")
    cfg = SparsifyConfig(method="wanda", sparsity=0.5, allocation="owl", owl_lambda=0.1, owl_threshold=2.0)
    report = sparsify_(model, cfg, calibration=tokens(8, 16), progress=False)
    per_block = {}
    for l in report.layers:
        per_block.setdefault(l.name.split(".")[2], set()).add(round(l.target_sparsity, 9))
    values = [v.pop() for v in per_block.values()]
    assert all(0.4 - 1e-9 <= v <= 0.6 + 1e-9 for v in values)
    assert sum(values) / len(values) == pytest.approx(0.5)


def test_overrides_and_ignore():
    model = tiny_model("llama")
    cfg = SparsifyConfig(method="magnitude", sparsity=0.5, ignore=["*.o_proj"], overrides={"*.mlp.*": 0.8})
    report = sparsify_(model, cfg, progress=False)
    by_name = {l.name: l for l in report.layers}
    assert not any("o_proj" in n for n in by_name)
    assert by_name["model.layers.0.mlp.up_proj"].achieved_sparsity == pytest.approx(0.8, abs=0.01)
    assert by_name["model.layers.0.self_attn.q_proj"].achieved_sparsity == pytest.approx(0.5, abs=0.01)


def test_pattern_that_does_not_fit_names_layer_and_changes_nothing():
    model = tiny_model("llama")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=r"model\.layers\.0\..*not divisible by M=64.*ignore"):
        sparsify_(model, SparsifyConfig(method="magnitude", pattern="16:64"), progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_nan_weights_rejected():
    model = tiny_model("llama")
    model.model.layers[1].mlp.up_proj.weight.data[0, 0] = float("nan")
    with pytest.raises(NumericalError, match=r"model\.layers\.1\.mlp\.up_proj"):
        sparsify_(model, SparsifyConfig(method="magnitude", sparsity=0.5), progress=False)


def test_calibration_method_without_data_is_a_clear_error():
    with pytest.raises(DataError, match="needs calibration data"):
        sparsify_(tiny_model("llama"), SparsifyConfig(method="wanda", sparsity=0.5), progress=False)


def test_owl_with_nm_rejected():
    with pytest.raises(ConfigError, match="owl"):
        sparsify_(tiny_model("llama"), SparsifyConfig(method="wanda", pattern="2:4", allocation="owl"),
                  calibration=tokens(2, 8), progress=False)


def test_recipe_runs_stages_in_order():
    model = tiny_model("llama")
    recipe = """
version: 1
stages:
  - {method: magnitude, sparsity: 0.3}
  - {method: wanda, pattern: "2:4", calibration: {samples: 4, seqlen: 16, batch_size: 2}}
"""
    reports = apply_recipe_(model, recipe, calibration=tokens(4, 16), progress=False)
    assert [r.config.method for r in reports] == ["magnitude", "wanda"]
    assert reports[-1].sparsity == pytest.approx(0.5)


def test_public_api_exports():
    assert sf.sparsify_ is sparsify_


def test_config_sparsity_defaults():
    assert SparsifyConfig(pattern="1:4").sparsity == 0.75
    assert SparsifyConfig(pattern="unstructured").sparsity == 0.5
    assert SparsifyConfig(pattern="fanin8").sparsity is None
    with pytest.raises(ConfigError, match="fixes sparsity"):
        SparsifyConfig(pattern="1:4", sparsity=0.5)
