"""Tiny random Hugging Face models of every supported family, for fast structural tests."""

from __future__ import annotations

import torch

FAMILIES = ("llama", "qwen2", "mistral", "gpt2", "opt", "gpt_neox", "bert")
VOCAB = 96


def tiny_model(family: str, seed: int = 0, dtype=torch.float32):
    """A 2-block model with hidden 32 (all linear in_features divisible by 8)."""
    import transformers as t

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB)
    if family == "llama":
        cfg = t.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=64, **common)
        model = t.LlamaForCausalLM(cfg)
    elif family == "qwen2":
        cfg = t.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=64, **common)
        model = t.Qwen2ForCausalLM(cfg)
    elif family == "mistral":
        cfg = t.MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=64, **common)
        model = t.MistralForCausalLM(cfg)
    elif family == "gpt2":
        cfg = t.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0, **common)
        model = t.GPT2LMHeadModel(cfg)
    elif family == "opt":
        cfg = t.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                          max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=1, bos_token_id=0,
                          eos_token_id=0, **common)
        model = t.OPTForCausalLM(cfg)
    elif family == "gpt_neox":
        cfg = t.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              max_position_embeddings=64, bos_token_id=0, eos_token_id=0, **common)
        model = t.GPTNeoXForCausalLM(cfg)
    elif family == "bert":
        cfg = t.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=64, **common)
        model = t.BertModel(cfg)
    else:
        raise ValueError(family)
    return model.to(dtype).eval()


def tokens(samples: int = 8, seqlen: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (samples, seqlen), generator=g)


def finetune_with_l1(model, teacher, l1_peak: float, steps: int = 30) -> None:
    """A short recovery fine-tune of a ReLU-fied tiny model (ce+kd from ``teacher``), with the progressive
    activation L1 penalty at ``l1_peak`` (0: none)."""
    from sparseforge.activation.relufy import ActivationL1
    from sparseforge.finetune import FinetuneConfig, finetune_

    l1 = ActivationL1(model, peak=l1_peak, warmup=10) if l1_peak else None
    data = torch.randint(2, VOCAB, (6000,), generator=torch.Generator().manual_seed(0))
    cfg = FinetuneConfig(loss="ce+kd", steps=steps, lr=3e-3, allow_dense=True, batch_size=4, seqlen=32)
    finetune_(model, cfg, teacher=teacher, data=data, kind="causal-lm", evaluate=False, progress=False,
              callback=l1.callback if l1 else None)
    if l1:
        l1.remove()
