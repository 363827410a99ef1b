"""The token-split frozen linear of SparseLoRA against dense torch with the skipped channels zeroed, values and gradients."""

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.nn import functional as F

from sparseforge.errors import ConfigError, ModelError
from sparseforge.finetune.lora import attach_lora
from sparseforge.finetune.sparselora import SparseLoRA
from sparseforge.finetune.svd_estimator import skip_channel_mlp
from sparseforge.finetune.token_split_linear import token_split_linear


def reference(x, delta, weight, bias, keep, context, mode):
    """Dense autograd: context tokens through the weight with the skipped rows / columns zeroed, the rest dense."""
    mask = torch.zeros(weight.shape[0] if mode == "rows" else weight.shape[1], dtype=weight.dtype)
    mask[keep] = 1.0
    w_ctx = weight * (mask[:, None] if mode == "rows" else mask[None, :])
    b_ctx = None if bias is None else (bias * mask if mode == "rows" else bias)
    out = torch.cat([F.linear(x[:, :context], w_ctx, b_ctx), F.linear(x[:, context:], weight, bias)], dim=1)
    return out if delta is None else out + delta


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 3), tokens=st.integers(1, 9), n_in=st.integers(1, 12), n_out=st.integers(1, 12),
       frac=st.floats(0, 1), ctx_frac=st.floats(0, 1), mode=st.sampled_from(["rows", "cols"]),
       with_delta=st.booleans(), with_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_values_and_gradients_match_dense_autograd_on_the_kept_channels(batch, tokens, n_in, n_out, frac, ctx_frac, mode,
                                                                      with_delta, with_bias, seed):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(n_out, n_in, generator=g, dtype=torch.float64)
    bias = torch.randn(n_out, generator=g, dtype=torch.float64) if with_bias else None
    channels = n_out if mode == "rows" else n_in
    k = max(1, int(round(frac * channels)))
    keep = torch.randperm(channels, generator=g)[:k].sort().values
    context = int(round(ctx_frac * tokens))
    x = torch.randn(batch, tokens, n_in, generator=g, dtype=torch.float64, requires_grad=True)
    d0 = torch.randn(batch, tokens, n_out, generator=g, dtype=torch.float64, requires_grad=True) if with_delta else None
    grad = torch.randn(batch, tokens, n_out, generator=g, dtype=torch.float64)

    got = token_split_linear(x, None if d0 is None else d0 * 1.0, weight, bias, keep, context, mode)
    want = reference(x, d0, weight, bias, keep, context, mode)
    torch.testing.assert_close(got, want)
    inputs = [x] + ([d0] if with_delta else [])
    got_grads = torch.autograd.grad(got, inputs, grad)
    want_grads = torch.autograd.grad(want, inputs, grad)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)


def test_gradcheck_in_float64():
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(7, 5, generator=g, dtype=torch.float64)
    bias = torch.randn(7, generator=g, dtype=torch.float64)
    for mode, keep in (("rows", torch.tensor([0, 2, 6])), ("cols", torch.tensor([1, 4]))):
        w = weight if mode == "rows" else weight.t().contiguous()[:5, :]  # cols: (out 5, in 7)
        b = bias if mode == "rows" else None
        x = torch.randn(2, 4, w.shape[1], generator=g, dtype=torch.float64, requires_grad=True)
        d = torch.randn(2, 4, w.shape[0], generator=g, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, d: token_split_linear(x, d * 1.0, w, b, keep, 3, mode), (x, d))


def test_the_skipped_channels_get_no_base_on_context_tokens_only():
    x = torch.randn(2, 6, 4)
    w = torch.randn(8, 4)
    keep = torch.tensor([1, 5])
    out = token_split_linear(x, None, w, None, keep, 4, "rows")
    skipped = [c for c in range(8) if c not in (1, 5)]
    assert bool((out[:, :4, skipped] == 0).all())  # context tokens: skipped rows zero
    torch.testing.assert_close(out[:, 4:], x[:, 4:] @ w.t())  # output tokens dense


def test_bad_input_is_refused():
    x, w, keep = torch.randn(1, 3, 4), torch.randn(5, 4), torch.tensor([0])
    with pytest.raises(ConfigError, match="mode"):
        token_split_linear(x, None, w, None, keep, 1, "diag")
    with pytest.raises(ConfigError, match="context"):
        token_split_linear(x, None, w, None, keep, 4, "rows")
    with pytest.raises(ModelError, match="freeze"):
        token_split_linear(x, None, w.requires_grad_(True), None, keep, 1, "rows")


def tiny_lora_mlp(seed=0):
    import transformers as t

    torch.manual_seed(seed)
    cfg = t.LlamaConfig(hidden_size=16, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2,
                        vocab_size=32, mlp_bias=True)
    model = t.LlamaForCausalLM(cfg).double()
    attach_lora(model, rank=3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn_like(p))
    controller = SparseLoRA.attach(model, sparsity=0.7, layers="all", start=0.0, dense_tokens=0.25)
    mlp = next(iter(controller.modules.values()))
    return model, mlp.train()


def test_the_one_pass_mlp_equals_the_split_reference_with_gradients_of_input_and_adapters():
    model, mlp = tiny_lora_mlp()
    x = torch.randn(3, 8, 16, dtype=torch.float64, requires_grad=True)
    n_ctx = 6
    keep = mlp.keep(x)
    fast = mlp.split_pass(x, keep, n_ctx)
    slow = torch.cat([mlp.sparse(x[:, :n_ctx], keep), mlp.dense(x[:, n_ctx:])], dim=1)
    torch.testing.assert_close(fast, slow)
    params = [p for p in mlp.parameters() if p.requires_grad]  # the MLP's six LoRA factors
    assert len(params) == 6
    grad = torch.randn_like(fast)
    for a, b in zip(torch.autograd.grad(fast, [x, *params], grad), torch.autograd.grad(slow, [x, *params], grad)):
        torch.testing.assert_close(a, b)
    # and the split reference is the pure skip-channel function on the context tokens
    g, u, d = (getattr(mlp, p).get_base_layer() for p in ("gate_proj", "up_proj", "down_proj"))
    plain = skip_channel_mlp(x[:, :n_ctx], keep, (g.weight, g.bias), (u.weight, u.bias), (d.weight, d.bias), mlp.act_fn)
    assert plain.shape == slow[:, :n_ctx].shape


def test_forward_uses_the_one_pass_only_for_a_frozen_base():
    model, mlp = tiny_lora_mlp()
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    frozen = mlp(x)
    mlp.gate_proj.get_base_layer().weight.requires_grad_(True)  # a trainable base: the autograd split path
    trainable = mlp(x)
    torch.testing.assert_close(frozen, trainable)
