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
