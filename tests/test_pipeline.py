import pytest
import torch

from sparseforge.config import SparsifyConfig
from sparseforge.pipeline import weights_equal
from sparseforge.prune.sparsify import sparsify_

import transformers  # noqa: F401  (test dependency: missing means failure)
from tiny_models import tiny_model, tokens  # noqa: E402


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prune_save_load_is_bit_exact(tmp_path, method, dtype):
    from sparseforge.io.checkpoint import save_pretrained
    from sparseforge.io.loading import load

    model = tiny_model("llama", dtype=dtype)
    opts = {"blocksize": 16} if method == "sparsegpt" else {}
    report = sparsify_(model, SparsifyConfig(method=method, sparsity=0.5, method_options=opts),
                       calibration=tokens(4, 16), progress=False)
    pruned = model.model.layers[0].mlp.up_proj.weight
    assert not torch.signbit(pruned[pruned == 0]).any(), "pruned entries must be +0.0"
    save_pretrained(model, tmp_path / "ckpt", sparsity_config=report.sparsity_config())
    assert weights_equal(model, load(tmp_path / "ckpt"))


def test_weights_equal_sees_single_bit_flips():
    a, b = tiny_model("llama"), tiny_model("llama")
    assert weights_equal(a, b)
    with torch.no_grad():
        b.model.layers[0].mlp.up_proj.weight[0, 0] = -b.model.layers[0].mlp.up_proj.weight[0, 0]
    assert not weights_equal(a, b)
    with torch.no_grad():
        a.model.layers[0].mlp.up_proj.weight[0, 0] = 0.0
        b.model.layers[0].mlp.up_proj.weight[0, 0] = -0.0
    assert not weights_equal(a, b)
